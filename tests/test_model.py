import numpy as np
import pytest
import torch

from docl_flower.core.training.autoencoder import (
    Autoencoder,
    AutoencoderSpec,
    RandomAffine,
    TrainSpec,
    error_stats,
    reconstruction_errors,
    state_to_numpy,
    train_autoencoder,
)


def _blobs(n: int = 256, dim: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, dim, generator=g)
    return (base + 0.1 * torch.randn(n, dim, generator=g)).clamp(0, 1)


def test_autoencoder_shapes_follow_eq_2_3():
    # Prepare
    spec = AutoencoderSpec(hidden=7)
    model = Autoencoder(30, spec)
    # Execute
    out = model(torch.rand(5, 30))
    params = state_to_numpy(model)
    # Assert
    assert out.shape == (5, 30)
    assert bool(((out > 0) & (out < 1)).all())
    assert {k: v.shape for k, v in params.items()} == spec.shapes(30)
    assert all(v.dtype == np.float32 for v in params.values())


def test_training_decreases_the_bce_loss():
    x = _blobs()
    spec = TrainSpec(epochs=15, batch_size=32)
    _, report = train_autoencoder(x, AutoencoderSpec(hidden=8), spec, seed=1)
    assert len(report.losses) == 15
    assert report.losses[-1] < 0.9 * report.losses[0]


def test_training_is_deterministic_for_a_seed():
    x = _blobs()
    spec = TrainSpec(epochs=2, batch_size=64)
    a, _ = train_autoencoder(x, AutoencoderSpec(hidden=8), spec, seed=3)
    b, _ = train_autoencoder(x, AutoencoderSpec(hidden=8), spec, seed=3)
    c, _ = train_autoencoder(x, AutoencoderSpec(hidden=8), spec, seed=4)
    pa, pb, pc = state_to_numpy(a), state_to_numpy(b), state_to_numpy(c)
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert not all(np.array_equal(pa[k], pc[k]) for k in pa)


def test_reconstruction_error_is_eq_6_and_stats_are_mean_std():
    model = Autoencoder(10, AutoencoderSpec(hidden=3))
    x = torch.rand(9, 10)
    errors = reconstruction_errors(model, x, batch_size=4)
    with torch.no_grad():
        manual = ((x - model(x)) ** 2).sum(dim=1)
    torch.testing.assert_close(errors, manual)
    mu, sd = error_stats(errors)
    assert mu == pytest.approx(float(manual.mean()))
    assert sd == pytest.approx(float(manual.std(unbiased=False)))


def test_scheduler_and_augmentation_configs_instantiate():
    spec = TrainSpec(
        epochs=2,
        batch_size=50,
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3},
        scheduler={
            "_target_": "torch.optim.lr_scheduler.OneCycleLR",
            "_partial_": True,
            "max_lr": 1e-2,
        },
        augment={"_target_": "docl_flower.core.model.RandomAffine", "image_shape": [8, 8]},
    )
    _, report = train_autoencoder(torch.rand(100, 64), AutoencoderSpec(hidden=4), spec, seed=0)
    assert len(report.losses) == 2


def test_random_affine_identity_when_ranges_are_zero():
    x = torch.rand(6, 28 * 28)
    same = RandomAffine((28, 28), degrees=0.0, translate=0.0, scale=0.0)(x)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    moved = RandomAffine((28, 28), degrees=10.0, translate=2.0, scale=0.1)(x)
    assert moved.shape == x.shape and not torch.allclose(moved, x)


def test_empty_training_data_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        train_autoencoder(torch.empty(0, 5), AutoencoderSpec(hidden=2), TrainSpec(epochs=1), 0)


def test_min_steps_gives_small_partitions_as_many_updates():
    spec = TrainSpec(epochs=100, batch_size=128, min_steps=4000)
    assert spec.epochs_for(6000) == 100  # 47 steps/epoch: already over 4000
    assert spec.epochs_for(60) == 4000  # one step per epoch
    assert TrainSpec(epochs=3, batch_size=10).epochs_for(5) == 3
    _, report = train_autoencoder(
        torch.rand(20, 16),
        AutoencoderSpec(hidden=2),
        TrainSpec(epochs=1, batch_size=10, min_steps=6),
        0,
    )
    assert len(report.losses) == 3


def test_progress_is_logged_at_quarters_only_for_a_training_that_runs_a_second(caplog):
    import logging

    from docl_flower.core.pipeline import user_fit as device

    def run(seconds_per_epoch: float) -> list[str]:
        now = [0.0]
        report = device._progress(user=7, cls=3, epochs=8, clock=lambda: now[0])
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=device.log.name):
            for epoch in range(8):
                now[0] = (epoch + 1) * seconds_per_epoch  # the clock when the epoch ends
                report(epoch, 1.0 / (epoch + 1))
        return [r.getMessage() for r in caplog.records]

    # 60 images: the whole training is well under a second, nothing but start and result.
    assert run(0.01) == []
    # A long training: each quarter (epochs 2, 4, 6, 8) once a second has passed.
    assert run(0.3) == [
        "user 7 class 3: epoch 4/8, loss 0.250",
        "user 7 class 3: epoch 6/8, loss 0.167",
        "user 7 class 3: epoch 8/8, loss 0.125",
    ]
    assert len(run(1.0)) == 4
