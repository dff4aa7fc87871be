"""The server's probe check: an upload enters the filter only if it behaves like an autoencoder.

The provider holds a small probe set of public images (a slice of the harmless set, plus
uniform noise in feature space). Before an upload is registered, its autoencoder scores the
probe set with the filter's own kernel and with a float64 reference computation: the scores
must be finite and agree (a crafted autoencoder whose scores overflow, or that the fused
kernel computes differently, is refused), and its privacy interval may hold at most
``max_block_share`` of the probe set (an interval that swallows harmless images would block
them: a catch-all, refused with the measured share).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .filter import GlobalFilter, Registration, ScoringConfig


def reference_scores64(reg: Registration, x: torch.Tensor) -> torch.Tensor:
    """Eq. 6-8 for one autoencoder in float64 (the yardstick)."""
    p = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in reg.params.items()}
    x64 = x.to(torch.float64)
    h = torch.relu(x64 @ p["encoder.weight"].T + p["encoder.bias"])
    x_hat = torch.sigmoid(h @ p["decoder.weight"].T + p["decoder.bias"])
    return ((x64 - x_hat) ** 2).sum(1)


@dataclass(frozen=True)
class ProbeCheck:
    """Vet one registration against the provider's probe set.

    Parameters
    ----------
    probe : torch.Tensor
        ``(n, D)`` float32 features in [0, 1] the server owns (harmless images, noise).
    alpha : float
        The Guard's alpha: the interval ``mu +- alpha * sigma`` that would block.
    scoring : ScoringConfig
        The filter's scoring (the kernel under test).
    max_block_share : float
        Largest share of the probe set that may fall in the autoencoder's interval.
    rtol, atol : float
        Agreement of the kernel's scores with the float64 reference.
    """

    probe: torch.Tensor
    alpha: float
    scoring: ScoringConfig
    max_block_share: float = 0.2
    rtol: float = 1e-4
    atol: float = 1e-4

    def __post_init__(self) -> None:
        if self.probe.ndim != 2 or self.probe.shape[0] == 0:
            raise ValueError(
                f"the probe set must be a non-empty (n, D) matrix, got {self.probe.shape}"
            )
        if not 0.0 <= self.max_block_share <= 1.0:
            raise ValueError(f"max_block_share must be in [0, 1], got {self.max_block_share}")

    def problem(self, reg: Registration) -> str | None:
        """Why ``reg`` must not enter the filter, or ``None`` when it passes."""
        scores = GlobalFilter([reg], self.scoring).scores(self.probe)[:, 0].to(torch.float64)
        reference = reference_scores64(reg, self.probe)
        if not bool(torch.isfinite(scores).all()) or not bool(torch.isfinite(reference).all()):
            return "its scores on the probe set are not finite"
        gap = (scores - reference).abs()
        bound = self.atol + self.rtol * reference.abs()
        if bool((gap > bound).any()):
            worst = float((gap / bound).max())
            return (
                f"its scores disagree with the reference computation ({worst:.1f}x the tolerance)"
            )
        lo = reg.err_mean - self.alpha * reg.err_std
        hi = reg.err_mean + self.alpha * reg.err_std
        share = float(((reference >= lo) & (reference <= hi)).to(torch.float64).mean())
        if share > self.max_block_share:
            return (
                f"catch-all: its interval [{lo:.3g}, {hi:.3g}] holds {share:.1%} of the server's "
                f"probe images (limit {self.max_block_share:.0%})"
            )
        return None


def probe_set(
    harmless: torch.Tensor | None, dim: int, count: int = 256, noise: int = 64, seed: int = 0
) -> torch.Tensor:
    """``count`` harmless feature rows (the first ones) and ``noise`` uniform rows in [0, 1]."""
    parts = []
    if harmless is not None and harmless.shape[0] > 0:
        parts.append(harmless[:count].to(torch.float32))
    generator = torch.Generator().manual_seed(seed)
    parts.append(torch.rand(noise, dim, generator=generator))
    return torch.cat(parts)
