import logging
import platform
import threading

import numpy as np
import pytest
import torch

from docl_flower.core.filter import native
from docl_flower.core.filter.global_filter import (
    ArgminGuard,
    GlobalFilter,
    Registration,
    ScoringConfig,
    StrictGuard,
    reference_scores,
)
from docl_flower.core.pipeline.config import PROJECT_ROOT

from .conftest import random_registration

needs_native = pytest.mark.skipif(
    native.load() is None, reason="the fused kernel cannot be built here (see the warning)"
)


@pytest.mark.parametrize("kernel", ["native", "torch"])
@pytest.mark.parametrize("chunks", [(512, 4), (7, 3), (1, 1), (1000, 100)])
def test_batched_scores_equal_a_naive_loop(chunks, kernel):
    # Prepare
    rng = np.random.default_rng(0)
    regs = [random_registration(rng, u, u) for u in range(11)]
    x = torch.rand(37, 20)
    flt = GlobalFilter(regs, ScoringConfig(*chunks, kernel=kernel))
    # Execute
    got = flt.scores(x)
    # Assert
    torch.testing.assert_close(got, reference_scores(regs, x), rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("n_images", [1, 63, 64, 65, 200])
@pytest.mark.parametrize(("dim", "hidden"), [(21, 7), (784, 32)])
def test_native_kernel_on_ragged_shapes(n_images, dim, hidden):
    # Image counts around the 64-image tile, chunks that are not whole tiles, D not a
    # multiple of the 4-row tile, more autoencoders than one encoder block.
    rng = np.random.default_rng(n_images)
    n_models = 130 if n_images == 200 else 3
    regs = [random_registration(rng, u, u, dim=dim, hidden=hidden) for u in range(n_models)]
    x = torch.rand(n_images, dim)
    flt = GlobalFilter(regs, ScoringConfig(chunk_images=100))
    assert flt.kernel == "native"
    torch.testing.assert_close(flt.scores(x), reference_scores(regs, x), rtol=1e-5, atol=1e-5)
    # a non-contiguous float64 input is converted, not misread
    x64 = torch.rand(dim, n_images, dtype=torch.float64).T
    torch.testing.assert_close(
        flt.scores(x64), reference_scores(regs, x64.float()), rtol=1e-5, atol=1e-5
    )


@needs_native
def test_native_kernel_saturated_sigmoid():
    # Decoder outputs far beyond +-88 (sigmoid exactly 0 or 1 in float32): finite, exact.
    rng = np.random.default_rng(3)
    regs = []
    for u in range(2):
        reg = random_registration(rng, u, u)
        params = dict(reg.params)
        sign = 1.0 if u == 0 else -1.0
        bias = np.where(np.arange(20) % 2 == 0, 500.0, -500.0) * sign
        params["decoder.bias"] = bias.astype(np.float32)
        regs.append(Registration(u, u, params, 1.0, 1.0, 1))
    x = torch.rand(70, 20)
    got = GlobalFilter(regs).scores(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference_scores(regs, x), rtol=1e-5, atol=1e-5)


@needs_native
def test_native_kernel_in_another_thread_and_with_one_torch_thread():
    rng = np.random.default_rng(5)
    regs = [random_registration(rng, u, u, dim=784, hidden=32) for u in range(5)]
    x = torch.rand(300, 784)
    flt = GlobalFilter(regs)
    want = reference_scores(regs, x)
    got: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda: got.append(flt.scores(x)))
    worker.start()
    worker.join()
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.testing.assert_close(flt.scores(x), want, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_native_kernel_falls_back_to_torch_with_a_warning(monkeypatch, caplog):
    rng = np.random.default_rng(0)
    regs = [random_registration(rng, u, u) for u in range(3)]
    x = torch.rand(9, 20)
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger="docl_flower.core.filter.native"):
        flt = GlobalFilter(regs, ScoringConfig(kernel="native"))
    assert flt.kernel == "torch"
    assert "no C++ compiler" in caplog.text
    torch.testing.assert_close(flt.scores(x), reference_scores(regs, x), rtol=1e-5, atol=1e-5)


def test_native_kernel_falls_back_when_compilation_fails(monkeypatch, caplog, tmp_path):
    if native._compiler() is None or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("no C++ compiler or not x86-64 here")
    monkeypatch.setattr(native, "_loaded", {})
    broken = tmp_path / "broken.cpp"
    broken.write_text("#error broken on purpose\n")
    monkeypatch.setattr(native, "_SOURCE_FILE", broken)
    monkeypatch.setenv("DOCL_FLOWER_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="docl_flower.core.filter.native"):
        kernel = native.load()
    assert kernel is None
    assert "compilation failed" in caplog.text
    assert not list(tmp_path.rglob("*.so"))


def test_an_app_bundle_without_the_kernel_source_reads_the_installed_one(monkeypatch, tmp_path):
    """A ServerApp imported from a Flower app bundle (Python files only) finds the C++ source of
    the installed package: a moved source file fails here, not as a silent PyTorch fallback."""
    assert native._SOURCE_FILE.is_file()
    assert native.package_file(native.SOURCE_PATH) == native._SOURCE_FILE.resolve()
    monkeypatch.setattr(native, "_SOURCE_FILE", tmp_path / "bundle" / native._SOURCE_NAME)
    assert native._read_source() == (PROJECT_ROOT / native.SOURCE_PATH).read_text()


def test_scoring_config_rejects_unknown_kernel():
    with pytest.raises(ValueError, match="kernel"):
        ScoringConfig(kernel="cuda")
    with pytest.raises(ValueError, match="chunk"):
        ScoringConfig(chunk_images=0)


def test_filter_rejects_mixed_shapes_and_bad_inputs():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="differ"):
        GlobalFilter(
            [random_registration(rng, 0, 0, dim=20), random_registration(rng, 1, 1, dim=21)]
        )
    with pytest.raises(ValueError, match="at least one"):
        GlobalFilter([])
    flt = GlobalFilter([random_registration(rng, 0, 0)])
    with pytest.raises(ValueError, match="features must be"):
        flt.scores(torch.rand(3, 19))


def _filter_with(mu: list[float], sigma: list[float]) -> GlobalFilter:
    rng = np.random.default_rng(1)
    regs = [
        Registration(u, u, random_registration(rng, u, u).params, mu[u], sigma[u], 5)
        for u in range(len(mu))
    ]
    return GlobalFilter(regs)


def test_argmin_guard_cases():
    flt = _filter_with([10.0, 20.0], [1.0, 2.0])
    guard = ArgminGuard(alpha=1.5)
    # rows: best AE 0 inside, best AE 0 at the upper edge, best AE 0 outside, best AE 1 inside
    scores = torch.tensor([[10.0, 30.0], [11.5, 30.0], [11.6, 30.0], [40.0, 21.0]])
    outsider = guard.block(flt, scores, -1)
    assert outsider.tolist() == [True, True, False, True]
    # The owner of the best autoencoder may always share its own image.
    assert guard.block(flt, scores, 0).tolist() == [False, False, False, True]
    assert guard.block(flt, scores, torch.tensor([1, 1, 1, 1])).tolist() == [
        True,
        True,
        False,
        False,
    ]
    # Below the interval is also outside.
    assert guard.block(flt, torch.tensor([[8.4, 30.0]]), -1).tolist() == [False]


def test_strict_guard_blocks_when_any_foreign_autoencoder_accepts():
    flt = _filter_with([10.0, 20.0], [1.0, 2.0])
    scores = torch.tensor([[5.0, 20.5]])  # best is AE 0 (outside its interval), AE 1 accepts
    assert ArgminGuard(1.5).block(flt, scores, -1).tolist() == [False]
    assert StrictGuard(1.5).block(flt, scores, -1).tolist() == [True]
    assert StrictGuard(1.5).block(flt, scores, 1).tolist() == [False]


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_guard_rejects_non_positive_alpha(alpha):
    with pytest.raises(ValueError):
        ArgminGuard(alpha)
    with pytest.raises(ValueError):
        StrictGuard(alpha)
