"""The fused kernel's one-image path and its bfloat16 variant: scores, refinement, selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from docl_flower.core.filter import global_filter as filter_mod
from docl_flower.core.filter import native
from docl_flower.core.filter.global_filter import (
    OUTSIDER,
    ArgminGuard,
    GlobalFilter,
    Registration,
    ScoringConfig,
    StrictGuard,
    decision_agreement,
    reference_scores,
)

from .conftest import random_registration

needs_native = pytest.mark.skipif(
    native.load() is None, reason="the fused kernel cannot be built here (see the warning)"
)

# Feature and hidden sizes around the kernel's vectors of 16 and blocks of 64 (tails of 1-15
# and of 49-63 lanes), and the paper's shapes.
SHAPES = [(20, 4), (21, 7), (50, 40), (70, 80), (128, 32), (784, 32)]


def _bf(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float64)


def bf16_reference(regs: list[Registration], x: torch.Tensor) -> torch.Tensor:
    """What the bfloat16 kernel computes, in float64: inputs, weights and hidden code rounded
    to bfloat16, the decoder scaled by -log2(e) before rounding, sigmoid = 1 / (1 + 2^t)."""
    scale = np.float32(native.NEG_LOG2E)
    cols = []
    for r in regs:
        p = {k: torch.from_numpy(np.asarray(v)) for k, v in r.params.items()}
        h = torch.relu(_bf(x) @ _bf(p["encoder.weight"]).T + p["encoder.bias"].double())
        t = _bf(h.float()) @ _bf(p["decoder.weight"] * scale).T + (p["decoder.bias"] * scale)
        cols.append(((1 / (1 + 2**t) - x.double()) ** 2).sum(1))
    return torch.stack(cols, 1)


def _regs(dim: int, hidden: int, n: int, seed: int = 0) -> list[Registration]:
    rng = np.random.default_rng(seed)
    return [random_registration(rng, u, u, dim=dim, hidden=hidden) for u in range(n)]


@needs_native
@pytest.mark.parametrize(("dim", "hidden"), SHAPES)
def test_one_image_path_and_small_tiles_equal_a_naive_loop(dim, hidden):
    regs = _regs(dim, hidden, 5)
    flt = GlobalFilter(regs)
    for n in (1, 2, GlobalFilter.ROWS_MAX, GlobalFilter.ROWS_MAX + 1, 17, 33):
        x = torch.rand(n, dim)
        torch.testing.assert_close(flt.scores(x), reference_scores(regs, x), rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize(("dim", "hidden"), SHAPES)
def test_bf16_scores_equal_a_bfloat16_reference(dim, hidden):
    # The kernel's arithmetic, emulated or on instructions: bfloat16 products summed in
    # float32. A hidden unit that rounds the other way changes a score by ~1e-5 at most.
    regs = _regs(dim, hidden, 4, seed=1)
    flt = GlobalFilter(regs, ScoringConfig(kernel="bf16", bf16_refine=False))
    assert flt.kernel == "bf16"
    kernel = native.load()
    assert kernel is not None and flt.bf16_emulated == (not kernel.bf16_hardware)
    for n in (1, 3, 13, 70):
        x = torch.rand(n, dim)
        want = bf16_reference(regs, x)
        rel = (flt.scores(x).double() - want).abs() / want
        assert rel.max() < 1e-3 and rel.median() < 1e-5


@needs_native
def test_bf16_scores_are_close_to_float32_and_the_filter_half_the_size():
    regs = _regs(784, 32, 6, seed=2)
    x = torch.rand(40, 784)
    f32 = GlobalFilter(regs)
    b16 = GlobalFilter(regs, ScoringConfig(kernel="bf16", bf16_refine=False))
    torch.testing.assert_close(b16.scores(x), f32.scores(x), rtol=2e-2, atol=1e-3)
    assert b16.nbytes < 0.51 * f32.nbytes
    assert f32.nbytes == 6 * 4 * (2 * 784 * 32 + 784 + 32)


@needs_native
def test_bf16_refinement_scores_the_deciding_entries_in_float32():
    # Registrations whose scores are near ties for some images: the refined bfloat16 filter
    # decides as the float32 one; the entries it refined are the float32 scores.
    regs = _regs(50, 40, 8, seed=3)
    x = torch.rand(300, 50)
    f32 = GlobalFilter(regs)
    ref = f32.scores(x)
    b16 = GlobalFilter(regs, ScoringConfig(kernel="bf16", bf16_margin=0.1, refine_alpha=0.0))
    got = b16.scores(x)
    idx = ref.argmin(1)
    assert torch.equal(got.argmin(1), idx)
    torch.testing.assert_close(got.gather(1, idx[:, None]), ref.gather(1, idx[:, None]))
    mu = [float(s) for s in ref.median(0).values]  # half of the images inside each interval
    guarded = [
        Registration(r.user_id, r.label, r.params, m, 1e-3, 1)
        for r, m in zip(regs, mu, strict=True)
    ]
    f32 = GlobalFilter(guarded)
    b16 = GlobalFilter(guarded, ScoringConfig(kernel="bf16", refine_alpha=1.0))
    agree = decision_agreement(f32, f32.scores(x), b16.scores(x), [StrictGuard(1.0, "one")])
    assert agree["argmin"] == 1.0 and agree["guard:strict"] == 1.0


def test_scoring_config_checks_the_bf16_options():
    assert set(filter_mod.KERNELS) == {"native", "torch", "auto", "bf16"}
    with pytest.raises(ValueError, match="bf16_margin"):
        ScoringConfig(bf16_margin=-0.1)
    with pytest.raises(ValueError, match="refine_alpha"):
        ScoringConfig(refine_alpha=float("nan"))
    with pytest.raises(ValueError, match="bf16_refine"):
        ScoringConfig(bf16_refine=1)


# ------------------------------------------------------------------------------ selection


def test_cpu_flags_are_read_from_the_operating_system(monkeypatch):
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags\t\t: fpu avx512f avx512_bf16 amx_tile")
    assert native.cpu_has_bf16() and "amx_tile" in native.cpu_flags()
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags\t\t: fpu avx512f avx512_vnni")
    assert not native.cpu_has_bf16()
    monkeypatch.setattr(native, "_cpu_flags", lambda: "x86_64")  # no /proc/cpuinfo
    assert not native.cpu_has_bf16()


@needs_native
def test_auto_picks_float32_where_the_cpu_lacks_bf16(monkeypatch):
    monkeypatch.setattr(native, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(filter_mod, "_bf16_choice", {})

    def never(*args: object, **kwargs: object) -> dict[str, float]:
        raise AssertionError("measured although the CPU lacks bfloat16 instructions")

    monkeypatch.setattr(filter_mod, "measure_kernels", never)
    flt = GlobalFilter(_regs(20, 4, 3), ScoringConfig(kernel="auto"))
    assert flt.kernel == "native" and not filter_mod.bf16_available()


@needs_native
@pytest.mark.parametrize(
    ("bf16_seconds", "picked"), [(0.5, "bf16"), (0.95, "native"), (1.2, "native")]
)
def test_auto_picks_bf16_only_where_flagged_and_measured_faster(monkeypatch, bf16_seconds, picked):
    monkeypatch.setattr(filter_mod, "bf16_available", lambda: True)
    monkeypatch.setattr(filter_mod, "_bf16_choice", {})
    calls = []

    def measured(dim: int, hidden: int, **kwargs: object) -> dict[str, float]:
        calls.append((dim, hidden))
        return {"native": 1.0, "bf16": bf16_seconds}

    monkeypatch.setattr(filter_mod, "measure_kernels", measured)
    regs = _regs(20, 4, 3)
    x = torch.rand(9, 20)
    for _ in range(2):  # measured once per shape
        flt = GlobalFilter(regs, ScoringConfig(kernel="auto"))
        assert flt.kernel == picked
        torch.testing.assert_close(flt.scores(x), reference_scores(regs, x), rtol=2e-2, atol=1e-3)
    assert calls == [(20, 4)]


@needs_native
def test_measure_kernels_times_both_kernels():
    seconds = filter_mod.measure_kernels(20, 4, models=4, images=32, repeats=1)
    assert set(seconds) == {"native", "bf16"} and all(s > 0 for s in seconds.values())


# ------------------------------------------------------------------------------ decisions


def test_decision_agreement_counts_the_images_that_decide_alike():
    regs = _regs(20, 4, 2)
    flt = GlobalFilter(
        [Registration(u, u, r.params, [10.0, 20.0][u], 1.0, 5) for u, r in enumerate(regs)]
    )
    reference = torch.tensor([[10.0, 30.0], [11.0, 30.0], [40.0, 20.0], [15.0, 30.0]])
    other = torch.tensor([[10.0, 30.0], [12.0, 30.0], [40.0, 19.0], [15.0, 14.0]])
    agree = decision_agreement(
        flt, reference, other, [ArgminGuard(1.5, "one"), StrictGuard(1.5, "one")]
    )
    # row 1 leaves the interval of AE 0 (block -> share); row 3 changes its argmin to AE 1
    # and its Guard decision (AE 1 accepts 14 <= 21.5).
    assert agree["images"] == 4
    assert agree["argmin"] == 0.75
    assert agree["guard:paper"] == 0.5 and agree["guard:strict"] == 0.5
    assert agree["max_relative_difference"] == pytest.approx(16 / 30)
    owner = decision_agreement(flt, reference, other, [ArgminGuard(1.5, "one")], 0)
    assert owner["guard:paper"] == 0.75  # the owner of AE 0 may share its own images
    assert decision_agreement(flt, reference, reference, [], OUTSIDER)["argmin"] == 1.0
    with pytest.raises(ValueError, match="differ"):
        decision_agreement(flt, reference, other[:2])
