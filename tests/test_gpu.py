"""The GPU check (experiments/gpu.py): its CUDA scoring path, its report, its refusal."""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

from docl_flower.core.filter.global_filter import reference_scores
from docl_flower.experiments import gpu

from .conftest import PROJECT_ROOT, random_registration


def test_the_gpu_checks_scoring_matches_the_reference_and_it_refuses_without_cuda(monkeypatch):
    rng = np.random.default_rng(0)
    regs = [random_registration(rng, u, u) for u in range(5)]
    x = torch.from_numpy(
        rng.random((70, regs[0].params["encoder.weight"].shape[1]), dtype=np.float32)
    )
    got = gpu.cuda_scores(regs, x, chunk=32, device="cpu")
    torch.testing.assert_close(
        got.double(), reference_scores(regs, x).double(), rtol=1e-4, atol=1e-3
    )
    spec = importlib.util.spec_from_file_location(
        "gpu_check", PROJECT_ROOT / "scripts" / "gpu_check.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert script.main(["--out", "unused"]) == 2


def test_the_synthetic_filter_has_the_papers_shape_and_the_summary_reads_the_report():
    big = gpu.synthetic_filter(3)
    assert [r.label for r in big] == [0, 1, 2]
    assert big[0].params["encoder.weight"].shape == (32, 784)
    assert 0.03 < float(np.std(big[0].params["decoder.weight"])) < 0.07
    report = {
        "gpu": "Test GPU",
        "runs": {
            "gpu": {
                "wall_seconds": 61.24,
                "overall_accuracy": 0.97,
                "trained_on_cuda": {"0": True, "1": True, "2": False},
                "peak_gpu_memory_mib": 2048,
            },
            "cpu": {"wall_seconds": 90.0, "overall_accuracy": 0.9701},
        },
        "filter": {
            "autoencoders": 3,
            "cpu_images_per_s": 1000.4,
            "cuda_images_per_s": 20000.0,
            "cuda_peak_memory_mib": 12.3,
            "argmin_agreement": 0.99995,
        },
        "filter_10000": {"cuda_images_per_s": 5000.0},
    }
    text = gpu.summary(report, users=3)
    assert text.startswith("# GPU check on Test GPU")
    assert "| 3 users, wall s | 61.2 | 90.0 |" in text
    assert "| trained on CUDA | 2/3 | 0 |" in text
    assert "| filter images/s (3 AEs) | 20000 | 1000 |" in text
    assert "| i* agreement CUDA vs CPU | 0.99995 | |" in text
