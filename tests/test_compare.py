"""The comparison table and plot are made from results files only."""

import importlib.util

from docl_flower.core.results import RunResult

from .conftest import PROJECT_ROOT

spec = importlib.util.spec_from_file_location("compare", PROJECT_ROOT / "scripts" / "compare.py")
assert spec is not None and spec.loader is not None
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def _fake(acc: float, down: int, curve: bool = True, **extra):
    r = {
        "method": "x",
        "registered": [0, 1],
        "failed": {},
        "train_seconds": {},
        "overall_accuracy": acc,
        "per_class_accuracy": {"0": acc, "1": acc / 2},
        "rounds": 2,
        "bytes_uploaded": {"0": 100, "1": 100},
        "bytes_downloaded": {"0": down, "1": down},
        "wall_seconds": 3.0,
        "receives_others_parameters": down > 0,
        **extra,
    }
    if curve:
        r["accuracy_curve"] = [
            {"round": 0, "accuracy": 0.1, "bytes_per_user": 0.0},
            {"round": 1, "accuracy": acc, "bytes_per_user": 200.0},
        ]
    return RunResult.from_dict(r)


def test_table_and_plot_from_results(tmp_path):
    rows = {
        "docl": _fake(0.97, 0, curve=False),
        "fedavg": _fake(0.3, 1000),
        "centralised": _fake(0.98, 0, uploads_raw_images=True),
    }
    md = compare.table(rows)
    assert md.count("\n") == 5
    assert "| DOCL (one class per user) | 0.9700 | 0.4850 | 2 |" in md
    assert "yes" in md.splitlines()[3] and "hands over its images" in md
    compare.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 5000
