"""Tables of the experiments (experiments/tables.py): one run's report, a sweep, the JSON."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from docl_flower.core.evaluation.results import RunResult, write_results
from docl_flower.experiments import tables


def _result(acc: float, **extra) -> RunResult:
    return RunResult.from_dict(
        {
            "method": "docl",
            "overall_accuracy": acc,
            "per_class_accuracy": {"0": 0.995, "9": acc - 0.1},
            "rounds": 1,
            "registered": [0, 1],
            "failed": {"2": "timeout"},
            "bytes_uploaded": {"0": 101, "1": 101},
            "bytes_downloaded": {"0": 0, "1": 0},
            "receives_others_parameters": False,
            "train_seconds": {"0": 3.2, "1": 11.7},
            "wall_seconds": 42.4,
            "config": {"seed": 7, "model": {"hidden": 32}, "train": {"epochs": 50}},
            **extra,
        }
    )


def test_the_report_of_one_run_sits_beside_the_papers_figures():
    text = tables.run_report(_result(0.9712, guarded_accuracy=0.9, alpha=1.5))
    lines = text.splitlines()
    assert lines[:3] == [
        "| metric | docl-flower | paper |",
        "|---|---|---|",
        "| overall accuracy | 0.9712 | 0.97 |",
    ]
    assert "| class 0 accuracy | 0.9950 | > 0.99 |" in lines
    assert "| class 9 accuracy | 0.8712 | about 0.95 |" in lines
    assert "| guarded accuracy (alpha 1.5) | 0.9000 | Fig. 3 |" in lines
    assert not any("acceptance rate" in line or "AUROC" in line for line in lines)
    assert "| bytes uploaded per user | 101 | - |" in lines
    assert "| client training seconds (min-max) | 3-12 | - |" in lines
    assert lines[-1] == "Users: 2 registered, 1 failed; seed 7; M = 32; 50 epochs."


def test_a_sweep_table_lists_its_jobs_in_order_and_skips_unfinished_ones(tmp_path):
    for job, acc in (("10", 0.5), ("2", 0.9), ("3", None)):
        folder = tmp_path / job
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(f"- train.epochs={job}\n- seed=1\n")
        if acc is not None:
            write_results(folder / "results.json", _result(acc))
    lines = tables.sweep_table(tmp_path).splitlines()
    assert lines == [
        "| overrides | overall | class 0 | class 9 | worst class | wall s |",
        "|---|---|---|---|---|---|",
        "| `train.epochs=2 seed=1` | 0.9000 | 0.9950 | 0.8000 | 0.8000 | 42 |",
        "| `train.epochs=10 seed=1` | 0.5000 | 0.9950 | 0.4000 | 0.4000 | 42 |",
    ]


def test_the_newest_results_file_is_found_or_its_absence_said(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `make run` first"):
        tables.newest_results(tmp_path)
    for day, stamp in (("a", 100), ("b", 200)):
        path = tmp_path / day / "t" / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text("{}")
        os.utime(path, (stamp, stamp))
    assert tables.newest_results(tmp_path).parts[-3] == "b"


def test_benchmark_json_takes_numpy_numbers_and_refuses_other_objects(tmp_path):
    path = tmp_path / "deep" / "out.json"
    tables.write_json(path, {"n": np.int64(3), "x": np.float32(0.5), "bad": math.inf})
    assert json.loads(path.read_text()) == {"n": 3, "x": 0.5, "bad": math.inf}
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        tables.write_json(path, {"o": object()})
    assert tables.fmt(None) == "-" and tables.fmt(0.123456, ".3f") == "0.123"
    assert tables.fmt(7) == "7"
