"""Differential privacy for one user's upload: DP-SGD training and a private ``mu``, ``sigma``.

No Flower here. With ``train.dp.epsilon`` set, a client trains each of its autoencoders with
DP-SGD (Opacus: Poisson sampling, per-image gradient clipping, Gaussian noise) and releases the
``mu`` and ``sigma`` of its reconstruction errors through a Gaussian mechanism; one
``(epsilon, delta)`` budget covers both.

What the guarantee covers (per autoencoder, then per user):

* **Unit and neighbouring data sets.** One image of the user, added or removed (Opacus's
  add/remove adjacency). The number of images ``n`` is treated as public, as in Opacus's own
  use of DP-SGD (the sample rate ``batch_size / n`` and hence the noise depend on it); it is
  uploaded in the clear (``num-examples``).
* **Budget split (basic composition).** ``stats_share`` of ``epsilon`` and of ``delta`` pays
  for the statistics, the rest for training: training is ``(eps_t, delta_t)``-DP, the released
  statistics are ``(eps_s, delta_s)``-DP, so the upload (parameters, ``mu``, ``sigma``) is
  ``(eps_t + eps_s, delta_t + delta_s)``-DP. Everything else is post-processing.
* **Training.** DP-SGD on the autoencoder with Opacus's RDP accountant (:data:`ACCOUNTANT`);
  the noise multiplier is the one Opacus's ``make_private_with_epsilon`` would find for
  ``eps_t`` at ``delta_t`` over exactly the steps the recipe runs
  (``TrainSpec.epochs_for(n)`` epochs of ``ceil(n / batch_size)`` Poisson-sampled steps at
  the sample rate ``1 / ceil(n / batch_size)``): the same search, cached
  (:func:`noise_multiplier`), then ``make_private``.
  Per-image gradients are clipped to ``max_grad_norm`` with Opacus's ghost clipping (the
  clipped gradient without materialising per-image gradients; the same result as explicit
  clipping, see ``tests/test_dp.py``).
* **Statistics.** Each image's error is clipped to ``[0, B]`` with ``B = error_clip * D``
  (a bound fixed before seeing the data: for features in ``[0, 1]`` an error is at most
  ``D``). The sums of ``c / B`` and ``(c / B)^2`` change by at most 1 each when one image is
  added or removed (L2 sensitivity ``sqrt(2)``); both get Gaussian noise with the noise
  multiplier that Opacus's RDP accountant gives for ``(eps_s, delta_s)`` (one step, no
  subsampling). ``mu`` and ``sigma`` follow by post-processing with the public ``n``.
* **Calibration.** Only on the training errors: the held-out calibration's k fold models would
  each spend budget, so ``calibration: heldout`` is refused with DP and ``auto`` means
  ``train``.
* **Per user.** A user with several autoencoders on disjoint images is covered by the largest
  of their budgets (parallel composition); when images are shared (an adversary's extra
  classes), by their sum (basic composition).
* **Not covered.** Which user owns which class, the number of images, the training time, and
  the randomness: noise comes from seeded PyTorch generators (reproducible runs), not from a
  cryptographically secure source (Opacus's ``secure_mode``), so a deployment should reseed.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from docl_flower.core.common.checks import check_number
from docl_flower.core.data.seeds import derive_seed
from docl_flower.core.training.autoencoder import (
    Autoencoder,
    AutoencoderSpec,
    TrainReport,
    TrainSpec,
    prepare_training,
    reconstruction_errors,
)
from docl_flower.core.training.recipes import build_scheduler

log = logging.getLogger(__name__)

#: Opacus's accountant for training and for the statistics: Renyi DP (Mironov et al.).
ACCOUNTANT = "rdp"

#: RDP orders for the statistics' single Gaussian step: Opacus's default orders (up to 63) and
#: larger ones, where the optimum lies for one step at a small epsilon.
STATS_ALPHAS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *range(12, 64),
    *(64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024),
)

#: Sub-seeds (see :func:`derive_seed`) of the Poisson sampling, the gradient noise and the
#: statistics noise of one autoencoder.
_SAMPLING, _NOISE, _STATS = 0xD5, 0xD6, 0xD7


@dataclass(frozen=True)
class PrivacySpent:
    """What one autoencoder's upload spent (the accountant's numbers, not the targets).

    ``epsilon = train_epsilon + stats_epsilon`` at ``delta`` (basic composition).
    """

    epsilon: float
    delta: float
    noise_multiplier: float
    train_epsilon: float
    stats_epsilon: float
    stats_noise_multiplier: float
    steps: int
    sample_rate: float
    accountant: str = ACCOUNTANT


def per_user(spent: Sequence[PrivacySpent], disjoint: bool) -> dict[str, float]:
    """One user's guarantee over its autoencoders: ``epsilon``, ``delta``, ``noise_multiplier``.

    ``disjoint``: no image is used by two of the autoencoders (parallel composition: the
    largest budget); else basic composition (the sums). ``noise_multiplier`` is the smallest.
    """
    if not spent:
        raise ValueError("no autoencoder trained with differential privacy")
    combine: Callable[[Sequence[float]], float] = max if disjoint else math.fsum
    return {
        "epsilon": combine([s.epsilon for s in spent]),
        "delta": combine([s.delta for s in spent]),
        "noise_multiplier": min(s.noise_multiplier for s in spent),
    }


@functools.lru_cache(maxsize=64)
def noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """DP-SGD's noise multiplier for ``(epsilon, delta)`` after ``steps`` at ``sample_rate``.

    Exactly what Opacus's ``PrivacyEngine.make_private_with_epsilon`` computes (its
    ``get_noise_multiplier`` with the engine's accountant, :data:`ACCOUNTANT`), cached: the
    search evaluates the accountant some twenty times, and users with the same number of
    images per batch share the result.
    """
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # Large trial noises of the search would need RDP orders above Opacus's largest: a
        # looser bound for noises it does not use.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=ACCOUNTANT,
            )
        )


@functools.lru_cache(maxsize=64)
def accountant_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """The epsilon at ``delta`` of the steps ``(noise multiplier, sample rate, count)``."""
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism=ACCOUNTANT)
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


class ImageBce(nn.Module):
    """The training loss per image (BCE summed over features, eq. 4), reduced like a torch loss.

    Opacus's ghost clipping sets ``reduction = "none"`` to get the per-image losses.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reduction = "mean"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image losses (``"none"``), their mean or their sum."""
        per_image = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1)
        if self.reduction == "none":
            return per_image
        return per_image.sum() if self.reduction == "sum" else per_image.mean()


@dataclass(frozen=True)
class TrainingPrivacy:
    """What DP-SGD spent on one autoencoder."""

    epsilon: float
    delta: float
    noise_multiplier: float
    steps: int
    sample_rate: float


def train_private(
    x: torch.Tensor,
    model_spec: AutoencoderSpec,
    train_spec: TrainSpec,
    seed: int,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[Autoencoder, TrainReport, TrainingPrivacy]:
    """Train one autoencoder with DP-SGD for the training part of ``train_spec.dp``'s budget.

    The recipe is ``train_spec``'s (optimiser, scheduler, augmentation, batch size, epochs);
    Opacus wraps the optimiser and replaces the shuffled batches by Poisson-sampled ones of
    the same expected size. Deterministic for a given seed on a given device.

    Returns
    -------
    tuple
        The trained model (eval mode, CPU), the per-epoch losses and what was spent.
    """
    from opacus import PrivacyEngine  # heavy import: only when DP is on

    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"need a non-empty (n, D) feature matrix, got shape {tuple(x.shape)}")
    n = int(x.shape[0])
    budget = train_spec.dp.budget(n)
    device, gen, model, optimizer, augment = prepare_training(
        x, model_spec, train_spec, seed, device
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x.to(dtype=torch.float32, device="cpu")),
        batch_size=train_spec.batch_size,
        generator=torch.Generator().manual_seed(derive_seed(seed, _SAMPLING)),
    )
    epochs = train_spec.epochs_for(n)
    steps_per_epoch = len(loader)  # Poisson sampling keeps the number of steps per epoch
    noise = noise_multiplier(
        budget.train_epsilon, budget.train_delta, 1.0 / steps_per_epoch, epochs * steps_per_epoch
    )
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off: see the module docstring (seeded noise).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=ACCOUNTANT, secure_mode=False)
    private_model, private_opt, criterion, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=ImageBce(),
        data_loader=loader,
        noise_multiplier=noise,
        max_grad_norm=train_spec.dp.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode="ghost",
        noise_generator=torch.Generator(device=device).manual_seed(derive_seed(seed, _NOISE)),
    )
    if len(private_loader) != steps_per_epoch:
        raise RuntimeError("Poisson sampling changed the number of steps per epoch")
    scheduler = build_scheduler(train_spec.scheduler, private_opt, steps_per_epoch * epochs)
    losses: list[float] = []
    start = time.perf_counter()
    private_model.train()
    with warnings.catch_warnings():
        # Ghost clipping runs a backward pass through layers whose inputs need no gradient,
        # which torch reports on every call; it is expected.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for epoch in range(epochs):
            total, seen = 0.0, 0
            for (batch,) in private_loader:
                batch = batch.to(device)
                if augment is not None and batch.shape[0] > 0:
                    batch = augment(batch, generator=gen)
                # The hooks sit on the autoencoder's layers: its logits go through them.
                loss = criterion(model.logits(batch), batch)
                private_opt.zero_grad(set_to_none=True)
                loss.backward()
                private_opt.step()  # an empty Poisson batch still takes a (pure noise) step
                if scheduler is not None:
                    scheduler.step()
                if batch.shape[0] > 0:
                    total += float(loss.detach()) * batch.shape[0]
                    seen += batch.shape[0]
            losses.append(total / max(seen, 1))
            if on_epoch is not None:
                on_epoch(epoch, losses[-1])
    seconds = time.perf_counter() - start
    private_model.to_standard_module()  # removes Opacus's hooks and attributes
    model.eval()
    history = tuple((float(z), float(q), int(k)) for z, q, k in engine.accountant.history)
    spent = TrainingPrivacy(
        epsilon=accountant_epsilon(history, budget.train_delta),
        delta=budget.train_delta,
        noise_multiplier=float(private_opt.noise_multiplier),
        steps=int(sum(steps for _, _, steps in history)),
        sample_rate=1.0 / steps_per_epoch,
    )
    return model.cpu(), TrainReport(losses=losses, seconds=seconds), spent


@dataclass(frozen=True)
class ReleasedStats:
    """``mu``, ``sigma`` released by the Gaussian mechanism, and what the release spent."""

    err_mean: float
    err_std: float
    epsilon: float
    delta: float
    noise_multiplier: float
    bound: float


def gaussian_noise_multiplier(epsilon: float, delta: float) -> tuple[float, float]:
    """Noise multiplier of one Gaussian mechanism for ``(epsilon, delta)``, and its epsilon.

    Opacus's search (``get_noise_multiplier``) with its RDP accountant, one step, no
    subsampling; the second value is the accountant's epsilon at that noise (<= ``epsilon``).
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    alphas = list(STATS_ALPHAS)
    sigma = float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=1.0,
            steps=1,
            accountant=ACCOUNTANT,
            alphas=alphas,
        )
    )
    accountant = RDPAccountant()
    accountant.history = [(sigma, 1.0, 1)]
    return sigma, float(accountant.get_epsilon(delta=delta, alphas=alphas))


def release_stats(
    errors: torch.Tensor, bound: float, epsilon: float, delta: float, seed: int
) -> ReleasedStats:
    """Release the mean and standard deviation of ``errors`` clipped to ``[0, bound]``.

    Gaussian mechanism on ``(sum c/B, sum (c/B)^2)`` (L2 sensitivity ``sqrt(2)`` under
    add/remove of one image), then ``mu = B * S1 / n`` and
    ``sigma = B * sqrt(S2 / n - (S1 / n)^2)`` with the public ``n``, clamped to ``[0, B]`` and
    ``[1e-3 B, B / 2]`` (post-processing).
    """
    if errors.ndim != 1 or errors.numel() == 0:
        raise ValueError("need a non-empty vector of errors")
    check_number("bound", bound, above=0.0)
    n = int(errors.numel())
    clipped = errors.to(torch.float64).clamp(0.0, bound) / bound
    sums = torch.stack([clipped.sum(), (clipped**2).sum()])
    multiplier, spent = gaussian_noise_multiplier(epsilon, delta)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(2, generator=gen, dtype=torch.float64) * (multiplier * math.sqrt(2.0))
    first, second = ((sums + noise) / n).tolist()
    mean = min(max(first, 0.0), 1.0)
    variance = max(second - mean * mean, 0.0)
    std = min(max(math.sqrt(variance), 1e-3), 0.5)
    return ReleasedStats(mean * bound, std * bound, spent, delta, multiplier, bound)


@dataclass(frozen=True)
class PrivateFit:
    """A DP-trained autoencoder, its privately released ``mu``, ``sigma`` and the spend."""

    model: Autoencoder
    report: TrainReport
    err_mean: float
    err_std: float
    spent: PrivacySpent


def train_and_release(
    x: torch.Tensor,
    model_spec: AutoencoderSpec,
    train_spec: TrainSpec,
    seed: int,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, float], None] | None = None,
) -> PrivateFit:
    """DP-SGD training and the Gaussian release of ``mu``, ``sigma`` under one budget."""
    n, dim = int(x.shape[0]), int(x.shape[1])
    budget = train_spec.dp.budget(n)
    model, report, trained = train_private(x, model_spec, train_spec, seed, device, on_epoch)
    stats = release_stats(
        reconstruction_errors(model, x),
        bound=train_spec.dp.error_clip * dim,
        epsilon=budget.stats_epsilon,
        delta=budget.stats_delta,
        seed=derive_seed(seed, _STATS),
    )
    spent = PrivacySpent(
        epsilon=trained.epsilon + stats.epsilon,
        delta=trained.delta + stats.delta,
        noise_multiplier=trained.noise_multiplier,
        train_epsilon=trained.epsilon,
        stats_epsilon=stats.epsilon,
        stats_noise_multiplier=stats.noise_multiplier,
        steps=trained.steps,
        sample_rate=trained.sample_rate,
    )
    log.info(
        "DP-SGD: %d steps at sample rate %.4g, noise multiplier %.3f, epsilon %.3f; mu, sigma: "
        "noise multiplier %.3f, epsilon %.3f; total epsilon %.3f at delta %.2g (%s accountant)",
        spent.steps,
        spent.sample_rate,
        spent.noise_multiplier,
        spent.train_epsilon,
        spent.stats_noise_multiplier,
        spent.stats_epsilon,
        spent.epsilon,
        spent.delta,
        ACCOUNTANT,
    )
    return PrivateFit(model, report, stats.err_mean, stats.err_std, spent)
