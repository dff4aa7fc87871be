"""scripts/bench_filter.py end to end on tiny sizes: its tables and its JSON."""

import importlib.util
import json

import pytest

from docl_flower.core.filter import native

from .conftest import PROJECT_ROOT

spec = importlib.util.spec_from_file_location(
    "bench_filter", PROJECT_ROOT / "scripts" / "bench_filter.py"
)
assert spec is not None and spec.loader is not None
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_bench_writes_its_json(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DOCL_FLOWER_FILTER_KEY", raising=False)
    out = tmp_path / "bench.json"
    argv = ["--sizes", "3", "17", "--dims", "20", "--images", "64", "--repeats", "1"]
    argv += ["--latency-reps", "25", "--latency-budget", "60", "--gemm-size", "128"]
    argv += ["--no-agreement", "--out", str(out)]
    bench.main(argv)
    payload = json.loads(out.read_text())
    text = capsys.readouterr().out
    assert "| D | autoencoders | kernel |" in text and "Saved filter" in text
    assert payload["sizes"] == [3, 17] and payload["dims"] == [20]
    assert payload["machine"]["flags"]["avx512_bf16"] == native.cpu_has_bf16()
    kernels = {"native", "bf16"} if native.load() is not None else {"torch"}
    assert {r["kernel"] for r in payload["rows"]} == kernels
    for row in payload["rows"]:
        lat = row["latency_1"]
        assert row["images_per_second"] > 0 and row["fraction_of_gemm"] > 0
        assert 0 < lat["p50_s"] <= lat["p99_s"] and lat["reps"] == 25
        assert row["filter_bytes"] > 0 and row["peak_rss_scoring_bytes"] > 0
    fp32 = "native" if native.load() is not None else "torch"  # no AVX-512: PyTorch scores
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
    assert auto["bf16_instructions"] == bench.bf16_available()
    assert auto["picks"] in (("bf16", "native") if auto["bf16_instructions"] else ("native",))


@pytest.mark.skipif(native.load() is None, reason="the fused kernel cannot be built here")
def test_the_one_image_latency_is_measured_on_single_images():
    regs = bench.make_registrations(4, 20, 8)
    flt = bench.GlobalFilter(regs)
    seen = []
    scores = flt.scores
    flt.scores = lambda x: seen.append(tuple(x.shape)) or scores(x)  # type: ignore[method-assign]
    lat = bench.one_image_latency(flt, bench.torch.rand(10, 20), reps=30, budget_s=60)
    assert lat["reps"] == 30 and set(seen) == {(1, 20)}
