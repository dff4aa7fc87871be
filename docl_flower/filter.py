"""The global filter (eq. 7-8) and the Guard: score every registered autoencoder, decide.

No Flower here. Autoencoders of one shape are stacked into ``(N, M, D)`` tensors and scored
with batched matrix products, chunked over images and autoencoders so that the
``(chunk, images, D)`` intermediates stay small (see ``scripts/bench_filter.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from .model import PARAM_NAMES

log = logging.getLogger(__name__)

#: Uploader id of a third party that owns no registered class.
OUTSIDER = -1


@dataclass(frozen=True)
class Registration:
    """One accepted upload: an autoencoder of ``user_id`` for class ``label``, with its stats."""

    user_id: int
    label: int
    params: Mapping[str, NDArray[np.float32]]
    err_mean: float
    err_std: float
    num_examples: int


@dataclass(frozen=True)
class ScoringConfig:
    """Chunk sizes of the batched scoring (images x autoencoders per step)."""

    chunk_images: int = 512
    chunk_models: int = 4


class GlobalFilter:
    """All registered autoencoders, stacked, plus their error statistics.

    Parameters
    ----------
    registrations : sequence of Registration
        Autoencoders of one shape; their order defines the column order of :meth:`scores`.
    scoring : ScoringConfig
        Chunk sizes.
    """

    def __init__(
        self, registrations: Sequence[Registration], scoring: ScoringConfig | None = None
    ) -> None:
        if not registrations:
            raise ValueError("a global filter needs at least one registered autoencoder")
        self.scoring = scoring or ScoringConfig()
        self.registrations = tuple(registrations)

        def stack(name: str) -> torch.Tensor:
            arrays = [np.asarray(r.params[name], dtype=np.float32) for r in registrations]
            shapes = {a.shape for a in arrays}
            if len(shapes) != 1:
                raise ValueError(f"autoencoders differ in the shape of {name}: {sorted(shapes)}")
            return torch.from_numpy(np.stack(arrays)).contiguous()

        enc_w, enc_b, dec_w, dec_b = (stack(n) for n in PARAM_NAMES)
        # Encoder weights as (N, D, M) so that x @ W^T is a plain matmul.
        self.enc_wt = enc_w.transpose(1, 2).contiguous()
        self.enc_b = enc_b
        self.dec_wt = dec_w.transpose(1, 2).contiguous()  # (N, M, D)
        self.dec_b = dec_b
        self.labels = torch.tensor([r.label for r in registrations])
        self.owners = torch.tensor([r.user_id for r in registrations])
        self.mu = torch.tensor([r.err_mean for r in registrations], dtype=torch.float64)
        self.sigma = torch.tensor([r.err_std for r in registrations], dtype=torch.float64)

    @property
    def size(self) -> int:
        """Number N of registered autoencoders."""
        return len(self.registrations)

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.enc_wt.shape[1])

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 7-8: ``d_i(x)`` for every image (rows) and autoencoder (columns), shape (n, N)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be (n, {self.dim}), got {tuple(x.shape)}")
        x = x.to(torch.float32)
        n, big_n = x.shape[0], self.size
        out = torch.empty(n, big_n, dtype=torch.float32)
        ci, cm = self.scoring.chunk_images, self.scoring.chunk_models
        for i0 in range(0, n, ci):
            xb = x[i0 : i0 + ci]
            for j0 in range(0, big_n, cm):
                j1 = min(j0 + cm, big_n)
                # Encoder: one (b, D) x (c, D, M) batched product -> (c, b, M).
                h = torch.matmul(xb, self.enc_wt[j0:j1])
                h.add_(self.enc_b[j0:j1, None, :]).relu_()
                # Decoder: (c, b, M) x (c, M, D) -> (c, b, D), bias added inside the product.
                z = torch.baddbmm(self.dec_b[j0:j1, None, :], h, self.dec_wt[j0:j1])
                z.sigmoid_().sub_(xb)
                out[i0 : i0 + xb.shape[0], j0:j1] = z.square_().sum(dim=2).T
        return out

    def predict(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Index ``i*`` of the best autoencoder per image and its error ``d_{i*}``."""
        dmin, idx = scores.min(dim=1)
        return idx, dmin

    def predict_labels(self, scores: torch.Tensor) -> torch.Tensor:
        """Predicted class (the label of autoencoder ``i*``) per image."""
        return self.labels[self.predict(scores)[0]]

    def inside(self, scores: torch.Tensor, alpha: float) -> torch.Tensor:
        """Whether each error lies in its autoencoder's privacy interval, shape (n, N)."""
        lo = self.mu - alpha * self.sigma
        hi = self.mu + alpha * self.sigma
        s = scores.to(torch.float64)
        return (s >= lo) & (s <= hi)


@dataclass(frozen=True)
class ArgminGuard:
    """The paper's Guard: look only at the best autoencoder ``i*``.

    Share if ``i*`` belongs to the uploader; else block if ``d_{i*}`` lies in the privacy
    interval ``[mu - alpha*sigma, mu + alpha*sigma]`` of ``i*``; else share.
    """

    alpha: float = 1.5

    def __post_init__(self) -> None:
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")

    def block(
        self, flt: GlobalFilter, scores: torch.Tensor, uploader: torch.Tensor | int
    ) -> torch.Tensor:
        """Boolean block decision per image uploaded by ``uploader`` (a user id per image)."""
        idx, _ = flt.predict(scores)
        inside = flt.inside(scores, self.alpha).gather(1, idx[:, None])[:, 0]
        own = flt.owners[idx] == torch.as_tensor(uploader)
        return inside & ~own


@dataclass(frozen=True)
class StrictGuard:
    """A stricter rule: block if any autoencoder not owned by the uploader accepts the image.

    An autoencoder accepts an image when the image's error lies in its privacy interval.
    """

    alpha: float = 1.5

    def __post_init__(self) -> None:
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")

    def block(
        self, flt: GlobalFilter, scores: torch.Tensor, uploader: torch.Tensor | int
    ) -> torch.Tensor:
        """Boolean block decision per image uploaded by ``uploader``."""
        inside = flt.inside(scores, self.alpha)
        up = torch.as_tensor(uploader).reshape(-1, 1)
        foreign = flt.owners[None, :] != up
        return (inside & foreign).any(dim=1)


Guard = ArgminGuard | StrictGuard
