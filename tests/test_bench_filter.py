"""The filter benchmark (experiments/bench_filter.py): end to end on tiny sizes through its
script, and its tables from given figures.
"""

import importlib.util
import json

import pytest
import torch

from docl_flower.core.filter import native
from docl_flower.core.filter.global_filter import GlobalFilter, bf16_available
from docl_flower.experiments import bench_filter as bench

from .conftest import PROJECT_ROOT

spec = importlib.util.spec_from_file_location(
    "bench_filter_script", PROJECT_ROOT / "scripts" / "bench_filter.py"
)
assert spec is not None and spec.loader is not None
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)

NATIVE = native.load() is not None


def test_bench_writes_its_json(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DOCL_FLOWER_FILTER_KEY", raising=False)
    out = tmp_path / "bench.json"
    argv = ["--sizes", "3", "17", "--dims", "20", "--images", "64", "--repeats", "1"]
    argv += ["--latency-reps", "25", "--latency-budget", "60", "--gemm-size", "128"]
    argv += ["--no-agreement", "--out", str(out)]
    script.main(argv)
    payload = json.loads(out.read_text())
    text = capsys.readouterr().out
    assert "| D | autoencoders | kernel |" in text and "Saved filter" in text
    # Without the fused kernel (no AVX-512) the torch kernel scores, and the report says so.
    assert ("native kernel unavailable" in text) is not NATIVE
    assert payload["sizes"] == [3, 17] and payload["dims"] == [20]
    assert payload["machine"]["flags"]["avx512_bf16"] == native.cpu_has_bf16()
    kernels = {"native", "bf16"} if NATIVE else {"torch"}
    assert {r["kernel"] for r in payload["rows"]} == kernels
    for row in payload["rows"]:
        lat = row["latency_1"]
        assert row["images_per_second"] > 0 and row["fraction_of_gemm"] > 0
        assert 0 < lat["p50_s"] <= lat["p99_s"] and lat["reps"] == 25
        assert row["filter_bytes"] > 0 and row["peak_rss_scoring_bytes"] > 0
    fp32 = "native" if NATIVE else "torch"
    f32 = [r for r in payload["rows"] if r["kernel"] == fp32]
    assert [r["filter_bytes"] for r in f32] == [n * 4 * (2 * 20 * 32 + 20 + 32) for n in (3, 17)]
    assert [(r["autoencoders"], r["entries_loaded"]) for r in payload["load"]] == [
        (3, True),
        (17, True),
    ]
    for load in payload["load"]:
        assert 0 < load["register_seconds_median"] <= load["register_seconds_max"]
    assert "+1 user ms" in text
    assert payload["agreement"] is None
    # Without bfloat16 instructions auto always picks float32; with them, a timing decides.
    auto = payload["auto"]["20"]
    assert auto["bf16_instructions"] == bf16_available()
    assert auto["picks"] in (("bf16", "native") if auto["bf16_instructions"] else ("native",))


def _payload(kernel_labels, agreement=None):
    row = {
        "dim": 784,
        "autoencoders": 1000,
        "label": kernel_labels[0],
        "filter_bytes": 200 * 2**20,
        "images": 409,
        "seconds": 0.25,
        "images_per_second": 1636.0,
        "gflops": 164.3,
        "fraction_of_gemm": 0.5,
        "fraction_of_adjacent_gemm": 0.55,
        "latency_1": {"p50_s": 0.00123, "p99_s": 2.5},
        "peak_rss_scoring_bytes": 300 * 2**20,
        "scoring_temporary_bytes": 20 * 2**20,
        "naive_loop_images_per_second": None,
    }
    load = {
        "dim": 784,
        "autoencoders": 1000,
        "file_bytes": 201 * 2**20,
        "save_seconds": 1.234,
        "load_seconds": 0.5,
        "filter_build_seconds": 0.25,
        "register_seconds_median": 0.004,
        "register_seconds_max": 0.01,
        "peak_rss_bytes": 700 * 2**20,
    }
    return {
        "machine": {
            "cpu": "Test CPU",
            "cores": 2,
            "memory_bytes": 8 * 2**30,
            "torch_threads": 2,
            "gpu": None,
            "flags": {"avx2": True, "avx512f": False},
            "bf16_kernel_on_instructions": False,
            "bf16_instructions": False,
            "load_average_start": [1.0, 2.0, 3.0],
            "load_average_end": [4.0, 5.0, 6.0],
        },
        "gemm_gflops": 328.6,
        "gemm_gflops_runs": [300.2, 328.6],
        "scoring": {"kernel": "native", "chunk_images": 512, "chunk_models": 64},
        "kernel": kernel_labels,
        "auto": {"784": {"picks": "native"}},
        "native_load_seconds": None,
        "hidden": 32,
        "rows": [row],
        "load": [load],
        "agreement": agreement,
    }


def test_the_report_is_made_from_the_measured_figures():
    text = bench.render(_payload(["torch"]), gemm_size=2048)
    lines = text.splitlines()
    assert lines[0].startswith("native kernel unavailable")  # native asked, torch scored
    assert "machine: Test CPU, 2 cores, 8192 MiB, 2 torch threads, GPU: none" in lines
    assert "CPU flags: avx2 yes, avx512f no; bf16 kernel on instructions: no" in lines
    assert "load average (1/5/15 min) at start 1.0/2.0/3.0, at end 4.0/5.0/6.0" in lines
    assert "float32 GEMM (2048^3, torch.mm): 328.6 GFLOP/s (best of 300, 329:" in text
    assert (
        "| 784 | 1000 | torch | 200 | 409 | 0.250 | 1636 | 164.3 | 0.50 (0.55) | 1.23 | 2500 "
        "| 300 (20) | - |" in lines
    )
    assert "| 784 | 1000 | 201 | 1.23 | 0.50 | 0.25 | 4.00 / 10.00 | 700 |" in lines
    assert "Decisions" not in text
    # The native kernel scored: no such line; a decision check adds its table.
    agreement = {
        "kernel": "bf16 (emulated)",
        "source": "a run",
        "autoencoders": 10,
        "alpha": 1.5,
        "sided": "one",
        "refinement": {"bf16_margin": 0.1, "refine_alpha": 2.0},
        "results": [
            {
                "set": "MNIST test",
                "bf16": "pure",
                "uploader": "third party",
                "images": 10000.0,
                "argmin": 0.99991,
                "guard:paper": 1.0,
                "max_relative_difference": 0.0123,
                "scoring_seconds": {"float32": 0.5, "pure": 1.25},
            }
        ],
    }
    text = bench.render(_payload(["native"], agreement), gemm_size=2048)
    assert "native kernel unavailable" not in text
    assert "refined: entries within 10% of the best score or of mu + 2.0 sigma" in text
    assert "| images | bf16 | uploader | n | argmin | paper Guard |" in text
    assert (
        "| MNIST test | pure | third party | 10000 | 0.99991 | 1.00000 | 1.23e-02 | 0.50 / 1.25 |"
        in text
    )


def test_random_autoencoders_are_seeded_and_the_batch_shrinks_for_many():
    a, b = bench.make_registrations(3, 20, 8), bench.make_registrations(3, 20, 8)
    for x, y in zip(a, b, strict=True):
        assert (x.params["encoder.weight"] == y.params["encoder.weight"]).all()
    assert a[0].params["encoder.weight"].shape == (8, 20) and [r.user_id for r in a] == [0, 1, 2]
    # Up to 100 autoencoders every image; then images * 100 / N, but never under 512.
    assert [bench.batch_images(n, 4096) for n in (10, 100, 400, 1000, 10000)] == [
        4096,
        4096,
        1024,
        512,
        512,
    ]
    assert bench.batch_images(1000, 64) == 64  # never more images than there are


@pytest.mark.skipif(not NATIVE, reason="the fused kernel cannot be built here")
def test_the_one_image_latency_is_measured_on_single_images():
    regs = bench.make_registrations(4, 20, 8)
    flt = GlobalFilter(regs)
    seen = []
    scores = flt.scores
    flt.scores = lambda x: seen.append(tuple(x.shape)) or scores(x)  # type: ignore[method-assign]
    lat = bench.one_image_latency(flt, torch.rand(10, 20), reps=30, budget_s=60)
    assert lat["reps"] == 30 and set(seen) == {(1, 20)}
