"""The server's probe check: an upload enters the filter only if it behaves like an autoencoder.

The provider holds a probe set of public images (a slice of the harmless set, plus uniform
noise in feature space). Before an upload is registered, its autoencoder scores the probe set
with the filter's own kernel and with a float64 reference computation: the scores must be
finite and agree (a crafted autoencoder whose scores overflow, or that the fused kernel
computes differently, is refused), and the region in which it could block may hold at most
``max_block_share`` of the probe's harmless images, and of its noise images (a catch-all,
refused with the measured share).

**The region judged is the one that can block, under any setting.** An autoencoder blocks an
image only if its score ``d`` lies in its privacy interval. Whatever Guard rule (argmin or
strict) and sidedness an operator selects, now or later (``filter check``, a service), with
any alpha up to the filter's ``max_alpha``, that interval lies inside the one-sided
``d <= mu + max_alpha * sigma``: the two-sided interval is a subset of it, a smaller alpha
shrinks it, and the argmin rule blocks a subset of what the strict rule blocks. So an upload
with a large ``mu`` and a tiny ``sigma`` (a two-sided interval that holds nothing, above which
nothing is blocked two-sided but everything one-sided) is judged by what it would block
one-sided, and a check that asks for an alpha above ``max_alpha`` is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from docl_flower.core.filter.global_filter import GlobalFilter, Registration, ScoringConfig

#: Default loosest Guard alpha a filter can be checked with (``guard.max_alpha``): the upper
#: end of the paper's alpha range [1, 2]. Measured on the default run's ten MNIST autoencoders
#: (seed 0): the region ``d <= mu + 2 sigma`` holds at most 0.98% of the first 1,024
#: Fashion-MNIST test images (0.83% of all 10,000); at 3 sigma 2.05%, over the 2% limit.
DEFAULT_MAX_ALPHA = 2.0
#: Largest ``guard.max_alpha`` accepted: wider regions than this judge nothing useful.
MAX_ALPHA = 10.0
#: Default largest share of the probe's harmless (and noise) images in an upload's region
#: (``strategy.max_block_share``): what one registered user can block of harmless uploads,
#: up to the probe's sampling error.
DEFAULT_MAX_BLOCK_SHARE = 0.02
#: Default number of harmless probe images (``strategy.probe_images``).
DEFAULT_PROBE_IMAGES = 1024
#: Default number of uniform-noise probe images (``strategy.probe_noise``): a catch-all that
#: accepts noise is refused even where the harmless images miss it; 64 rows cost little.
DEFAULT_PROBE_NOISE = 64


def reference_scores64(reg: Registration, x: torch.Tensor) -> torch.Tensor:
    """Eq. 6-8 for one autoencoder in float64 (the yardstick)."""
    p = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in reg.params.items()}
    x64 = x.to(torch.float64)
    h = torch.relu(x64 @ p["encoder.weight"].T + p["encoder.bias"])
    x_hat = torch.sigmoid(h @ p["decoder.weight"].T + p["decoder.bias"])
    return ((x64 - x_hat) ** 2).sum(1)


def block_bound(mu: float, sigma: float, max_alpha: float) -> float:
    """Upper end ``mu + max_alpha * sigma`` of the widest region in which a score can block."""
    return mu + max_alpha * sigma


@dataclass(frozen=True)
class ProbeSet:
    """The provider's probe images: ``harmless`` rows first, then uniform noise rows.

    Parameters
    ----------
    images : torch.Tensor
        ``(n, D)`` float32 features in [0, 1].
    harmless : int
        How many of the first rows are harmless images (the rest is noise).
    """

    images: torch.Tensor
    harmless: int

    def __post_init__(self) -> None:
        if self.images.ndim != 2 or self.images.shape[0] == 0:
            raise ValueError(
                f"the probe set must be a non-empty (n, D) matrix, got {tuple(self.images.shape)}"
            )
        if not 0 <= self.harmless <= self.images.shape[0]:
            raise ValueError(f"harmless rows {self.harmless} outside 0..{self.images.shape[0]}")

    def shares(self, blocked: torch.Tensor) -> dict[str, float]:
        """Share of the harmless rows and of the noise rows that ``blocked`` (bool, (n,)) marks."""
        out = {}
        parts = {"harmless": blocked[: self.harmless], "noise": blocked[self.harmless :]}
        for name, part in parts.items():
            if part.numel():
                out[name] = float(part.to(torch.float64).mean())
        return out


def catch_all_problem(
    shares: dict[str, float], limit: float, region: str, what: str = "images"
) -> str | None:
    """The refusal when any share of ``shares`` exceeds ``limit``, else ``None``."""
    over = {name: s for name, s in shares.items() if s > limit}
    if not over:
        return None
    measured = ", ".join(f"{s:.1%} of its {name} {what}" for name, s in shares.items())
    return (
        f"catch-all: the region where it can block ({region}) holds {measured} "
        f"(limit {limit:.0%} each)"
    )


@dataclass(frozen=True)
class ProbeCheck:
    """Vet one registration against the provider's probe set.

    Parameters
    ----------
    probe : ProbeSet
        Harmless and noise features in [0, 1] the server owns.
    max_alpha : float
        The loosest Guard alpha the filter may ever be checked with; the region judged is
        ``d <= mu + max_alpha * sigma`` (see the module docstring).
    scoring : ScoringConfig
        The filter's scoring (the kernel under test).
    max_block_share : float
        Largest share of the probe's harmless images, and of its noise images, that may fall
        in the region.
    rtol, atol : float
        Agreement of the kernel's scores with the float64 reference.
    """

    probe: ProbeSet
    max_alpha: float
    scoring: ScoringConfig
    max_block_share: float = DEFAULT_MAX_BLOCK_SHARE
    rtol: float = 1e-4
    atol: float = 1e-4

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_block_share <= 1.0:
            raise ValueError(f"max_block_share must be in [0, 1], got {self.max_block_share}")
        if not (isinstance(self.max_alpha, int | float) and 0 < self.max_alpha < math.inf):
            raise ValueError(f"max_alpha must be a finite number > 0, got {self.max_alpha!r}")

    def problem(self, reg: Registration) -> str | None:
        """Why ``reg`` must not enter the filter, or ``None`` when it passes."""
        return self.measure(reg).problem

    def measure(self, reg: Registration) -> ProbeResult:
        """The check of ``reg``: its refusal (or ``None``) and what the region holds."""
        x = self.probe.images
        scores = GlobalFilter([reg], self.scoring).scores(x)[:, 0].to(torch.float64)
        reference = reference_scores64(reg, x)
        if not bool(torch.isfinite(scores).all()) or not bool(torch.isfinite(reference).all()):
            return self._result("its scores on the probe set are not finite")
        gap = (scores - reference).abs()
        bound = self.atol + self.rtol * reference.abs()
        if bool((gap > bound).any()):
            worst = float((gap / bound).max())
            return self._result(
                f"its scores disagree with the reference computation ({worst:.1f}x the tolerance)"
            )
        hi = block_bound(reg.err_mean, reg.err_std, self.max_alpha)
        # Both the float32 kernel's and the reference score must stay outside to be safe.
        blocked = (reference <= hi) | (scores <= hi)
        region = f"d <= mu + {self.max_alpha:g} sigma = {hi:.4g}"
        shares = self.probe.shares(blocked)
        return self._result(catch_all_problem(shares, self.max_block_share, region), shares)

    def _result(self, problem: str | None, shares: dict[str, float] | None = None) -> ProbeResult:
        images = int(self.probe.images.shape[0])
        return ProbeResult(
            problem,
            dict(shares or {}),
            self.max_alpha,
            self.max_block_share,
            self.probe.harmless,
            images - self.probe.harmless,
        )


@dataclass(frozen=True)
class ProbeResult:
    """What the probe check measured for one upload.

    ``shares`` holds the share of the probe's harmless and noise images in the region the
    upload can block (empty when the check stopped before, at non-finite or disagreeing
    scores). :meth:`record` is what the run saves with the registered autoencoder, so that a
    reader of the signed filter (the upload service) can hold it to its own limit.
    """

    problem: str | None
    shares: dict[str, float]
    max_alpha: float
    max_block_share: float
    harmless_images: int
    noise_images: int

    def record(self) -> dict[str, object]:
        """The entry metadata saved with a registered autoencoder (``probe``)."""
        return {
            "shares": dict(self.shares),
            "max_alpha": self.max_alpha,
            "max_block_share": self.max_block_share,
            "harmless_images": self.harmless_images,
            "noise_images": self.noise_images,
        }


def record_problem(record: object, max_block_share: float, max_alpha: float) -> str | None:
    """Why a saved probe record does not vouch for its autoencoder, or ``None``.

    The record (``entry["probe"]``, see :meth:`ProbeResult.record`) must show a check of the
    region that any Guard up to ``max_alpha`` can block, on at least one probe image, and
    shares of harmless and of noise images of at most ``max_block_share`` each.
    """
    if record is None:
        return "no probe check recorded (saved before probe records, or not by a run)"
    if not isinstance(record, dict):
        return f"its probe record is not a mapping: {type(record).__name__}"
    shares = record.get("shares")
    alpha = record.get("max_alpha")
    counts = (record.get("harmless_images"), record.get("noise_images"))
    if not isinstance(shares, dict) or not shares or not set(shares) <= {"harmless", "noise"}:
        return "its probe record has no harmless or noise shares"
    values = list(shares.values())
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return "its probe record's shares are not numbers"
    if not all(0.0 <= v <= 1.0 for v in values):  # NaN fails here too
        return f"its probe record's shares are not in [0, 1]: {shares}"
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts) or (
        sum(counts) < 1  # type: ignore[arg-type]
    ):
        return f"its probe record counts {counts!r} probe images"
    if not (isinstance(alpha, int | float) and not isinstance(alpha, bool) and alpha >= max_alpha):
        return (
            f"its probe check judged the region up to alpha {alpha!r}, not up to the "
            f"filter's max_alpha {max_alpha:g}"
        )
    over = {k: v for k, v in shares.items() if v > max_block_share}
    if over:
        measured = ", ".join(f"{v:.1%} of the {k} probe images" for k, v in over.items())
        return f"its blocking region holds {measured} (limit {max_block_share:.1%})"
    return None


def probe_set(
    harmless: torch.Tensor | None,
    dim: int,
    count: int = DEFAULT_PROBE_IMAGES,
    noise: int = DEFAULT_PROBE_NOISE,
    seed: int = 0,
) -> ProbeSet:
    """``count`` harmless feature rows (the first ones) and ``noise`` uniform rows in [0, 1]."""
    parts = []
    if harmless is not None and harmless.shape[0] > 0 and count > 0:
        parts.append(harmless[:count].to(torch.float32))
    kept = int(parts[0].shape[0]) if parts else 0
    generator = torch.Generator().manual_seed(seed)
    parts.append(torch.rand(noise, dim, generator=generator))
    return ProbeSet(torch.cat(parts), kept)
