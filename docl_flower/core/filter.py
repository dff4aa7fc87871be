"""The global filter (eq. 7-8) and the Guard: score every registered autoencoder, decide.

No Flower here. Autoencoders of one shape are stacked into ``(N, M, D)`` tensors. The encoders
run as one matrix product per chunk of images and block of autoencoders; the decoders and the
error sums run either in the fused kernel of :mod:`docl_flower.native` (default) or as batched
PyTorch products chunked over images and autoencoders, so that the ``(chunk, images, D)``
intermediates stay small (see ``scripts/bench_filter.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from . import native
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


#: Values of :attr:`ScoringConfig.kernel`.
KERNELS = ("native", "torch")


@dataclass(frozen=True)
class ScoringConfig:
    """How the filter scores: kernel and chunk sizes (images x autoencoders per step).

    Parameters
    ----------
    chunk_images : int
        Images per chunk (rounded up to the native kernel's tile of 64 images there).
    chunk_models : int
        Autoencoders per batched decoder product of the ``"torch"`` kernel.
    kernel : str
        ``"native"``: the fused C++ kernel of :mod:`docl_flower.native`, compiled once per
        process on first use; where it cannot be built (no compiler, no AVX-512), a warning
        is logged and the ``"torch"`` path is used. ``"torch"``: PyTorch operations only.
    """

    chunk_images: int = 512
    chunk_models: int = 4
    kernel: str = "native"

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.chunk_images < 1 or self.chunk_models < 1:
            raise ValueError("chunk sizes must be >= 1")


class ScoredFilter:
    """What the Guards and the metrics need of a filter: scores, owners and intervals.

    A score is a dissimilarity (lower: more alike). Column ``i`` of :meth:`scores` belongs to
    a registration of class ``labels[i]`` owned by user ``owners[i]``, whose privacy interval
    is ``mu[i] +- alpha * sigma[i]`` (or ``<= mu[i] + alpha * sigma[i]``, one-sided). The
    global filter of autoencoders is one; the likelihood filter of the feature-statistics
    baseline (scores: negative log-likelihoods) is another.

    Parameters
    ----------
    labels, owners : torch.Tensor
        Class and owning user of each registration (column).
    mu, sigma : torch.Tensor
        Centre and width unit of each registration's interval (float64).
    """

    def __init__(
        self, labels: torch.Tensor, owners: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor
    ) -> None:
        self.labels = labels
        self.owners = owners
        self.mu = mu
        self.sigma = sigma

    @property
    def size(self) -> int:
        """Number N of registrations (columns of :meth:`scores`)."""
        return int(self.labels.numel())

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Score of every image (rows) under every registration (columns), shape (n, N)."""
        raise NotImplementedError

    def predict(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Index ``i*`` of the best registration per image and its score.

        A NaN score counts as the worst possible score (``torch.min`` would pick it).
        """
        safe = torch.nan_to_num(scores, nan=float("inf"))
        dmin, idx = safe.min(dim=1)
        return idx, dmin

    def predict_labels(self, scores: torch.Tensor) -> torch.Tensor:
        """Predicted class (the label of registration ``i*``) per image."""
        return self.labels[self.predict(scores)[0]]

    def inside(self, scores: torch.Tensor, alpha: float, sided: str = "two") -> torch.Tensor:
        """Whether each score lies in its registration's privacy interval, shape (n, N).

        ``sided="two"`` is the paper's interval ``[mu - alpha*sigma, mu + alpha*sigma]``;
        ``sided="one"`` is ``d <= mu + alpha*sigma`` (an image the autoencoder reconstructs
        better than its own photos is at least as likely to show its owner). NaN is outside.
        """
        hi = self.mu + alpha * self.sigma
        s = scores.to(torch.float64)
        if sided == "one":
            return s <= hi
        if sided != "two":
            raise ValueError(f"sided must be 'one' or 'two', got {sided!r}")
        return (s >= self.mu - alpha * self.sigma) & (s <= hi)


class GlobalFilter(ScoredFilter):
    """All registered autoencoders, stacked, plus their error statistics.

    Attributes
    ----------
    _ENCODER_BLOCK : int
        Autoencoders whose encoders run in one matrix product (bounds memory).

    Parameters
    ----------
    registrations : sequence of Registration
        Autoencoders of one shape; their order defines the column order of :meth:`scores`.
    scoring : ScoringConfig
        Kernel and chunk sizes.
    """

    _ENCODER_BLOCK = 128

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
        n_models, hidden, dim = enc_w.shape
        self._hidden = hidden
        self._dim = dim
        self._kernel = native.load() if self.scoring.kernel == "native" else None
        if self._kernel is not None:
            # Fused kernel: encoders as rows (N * M, D); decoders (N, D, M) and their biases
            # times -log2(e), so that the kernel computes t = -z log2(e), sigmoid = 1/(1 + 2^t).
            self._w1 = enc_w.reshape(n_models * hidden, dim)
            self._b1 = enc_b
            self._w2 = (native.NEG_LOG2E * dec_w).contiguous()
            self._b2 = (native.NEG_LOG2E * dec_b).contiguous()
        else:
            # Biases folded into the products (one extra input column of ones), so that no
            # separate pass adds them. Encoder: all autoencoders side by side, (D + 1, N * M).
            self._enc = torch.cat(
                [enc_w.permute(2, 0, 1).reshape(dim, n_models * hidden), enc_b.reshape(1, -1)]
            ).contiguous()
            # Decoder: (N, M + 1, D), halved because sigmoid(z) = (1 + tanh(z / 2)) / 2 and
            # tanh is the cheaper kernel:
            # d = sum (sigmoid(z) - x)^2 = sum (tanh(z/2) - (2x - 1))^2 / 4.
            self._dec = (
                0.5 * torch.cat([dec_w.transpose(1, 2), dec_b[:, None, :]], dim=1)
            ).contiguous()
        super().__init__(
            labels=torch.tensor([r.label for r in registrations]),
            owners=torch.tensor([r.user_id for r in registrations]),
            mu=torch.tensor([r.err_mean for r in registrations], dtype=torch.float64),
            sigma=torch.tensor([r.err_std for r in registrations], dtype=torch.float64),
        )

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return self._dim

    @property
    def kernel(self) -> str:
        """The kernel in use: ``"native"`` or ``"torch"`` (also when native was asked for)."""
        return "native" if self._kernel is not None else "torch"

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 7-8: ``d_i(x)`` for every image (rows) and autoencoder (columns), shape (n, N).

        Images are processed in chunks of ``chunk_images``; for each chunk the encoders of a
        block of autoencoders run as one matrix product. The decoders then run in the fused
        kernel (``kernel="native"``), or as batched products over ``chunk_models``
        autoencoders at a time, so the ``(chunk_models, chunk_images, D)`` intermediate stays
        in cache.
        """
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be (n, {self.dim}), got {tuple(x.shape)}")
        x = x.to(torch.float32)
        if self._kernel is not None:
            return self._scores_native(x, self._kernel)
        return self._scores_torch(x)

    def _scores_native(self, x: torch.Tensor, kernel: native.Kernel) -> torch.Tensor:
        n, big_n, m, d = x.shape[0], self.size, self._hidden, self._dim
        lanes = kernel.lanes
        ci = -(-self.scoring.chunk_images // lanes) * lanes
        width = min(ci, -(-n // lanes) * lanes)
        block = min(self._ENCODER_BLOCK, big_n)
        threads = torch.get_num_threads()
        out = torch.empty(n, big_n, dtype=torch.float32)
        # Flat buffers, viewed per chunk as contiguous (D, width) images-as-columns (zero
        # padded to whole tiles) and (block * M, width) encoder products.
        x = x.contiguous()
        x_buf = torch.empty(d * width)
        h_buf = torch.empty(block * m * width)
        for i0 in range(0, n, ci):
            b = min(ci, n - i0)
            bp = -(-b // lanes) * lanes
            xt = x_buf[: d * bp].view(d, bp)
            kernel.lib.docl_transpose(x[i0].data_ptr(), d, b, d, xt.data_ptr(), bp, bp, threads)
            for k0 in range(0, big_n, block):
                k1 = min(k0 + block, big_n)
                h = h_buf[: (k1 - k0) * m * bp].view((k1 - k0) * m, bp)
                torch.mm(self._w1[k0 * m : k1 * m], xt, out=h)
                kernel.lib.docl_score(
                    h.data_ptr(),
                    bp,
                    self._b1[k0].data_ptr(),
                    self._w2[k0].data_ptr(),
                    self._b2[k0].data_ptr(),
                    xt.data_ptr(),
                    bp,
                    out[i0, k0:].data_ptr(),
                    big_n,
                    1,
                    k1 - k0,
                    m,
                    d,
                    bp,
                    b,
                    threads,
                )
        return out

    def _scores_torch(self, x: torch.Tensor) -> torch.Tensor:
        n, big_n, m, d = x.shape[0], self.size, self._hidden, self._dim
        ci, cm = self.scoring.chunk_images, self.scoring.chunk_models
        block = max(cm, (self._ENCODER_BLOCK // cm) * cm)
        out = torch.empty(n, big_n, dtype=torch.float32)
        x_aug = torch.ones(min(ci, n), d + 1)
        h_aug = torch.ones(min(block, big_n), min(ci, n), m + 1)
        z = torch.empty(cm, min(ci, n), d)
        for i0 in range(0, n, ci):
            xb = x[i0 : i0 + ci]
            b = xb.shape[0]
            x_aug[:b, :d] = xb
            y = xb * 2.0 - 1.0
            for k0 in range(0, big_n, block):
                k1 = min(k0 + block, big_n)
                h = torch.mm(x_aug[:b], self._enc[:, k0 * m : k1 * m]).relu_()
                h_aug[: k1 - k0, :b, :m] = h.view(b, k1 - k0, m).transpose(0, 1)
                for j0 in range(k0, k1, cm):
                    j1 = min(j0 + cm, k1)
                    t = torch.bmm(
                        h_aug[j0 - k0 : j1 - k0, :b], self._dec[j0:j1], out=z[: j1 - j0, :b]
                    )
                    t.tanh_().sub_(y)
                    err = torch.linalg.vector_norm(t, dim=2).square_().mul_(0.25)
                    out[i0 : i0 + b, j0:j1] = err.T
        return out


def reference_scores(registrations: Sequence[Registration], x: torch.Tensor) -> torch.Tensor:
    """Eq. 7-8 the plain way, one autoencoder at a time (the yardstick of the GlobalFilter)."""
    cols = []
    for r in registrations:
        p = {k: torch.from_numpy(np.asarray(v)) for k, v in r.params.items()}
        h = torch.relu(x @ p["encoder.weight"].T + p["encoder.bias"])
        x_hat = torch.sigmoid(h @ p["decoder.weight"].T + p["decoder.bias"])
        cols.append(((x - x_hat) ** 2).sum(1))
    return torch.stack(cols, 1)


#: Sides of the privacy interval: the paper's two-sided one, or one-sided (``d <= hi``).
SIDES = ("two", "one")


def _check_guard(alpha: object, sided: object) -> None:
    """Raise ``ValueError`` unless ``alpha`` is a finite number > 0 and ``sided`` is known."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if not 0 < alpha < float("inf"):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if sided not in SIDES:
        raise ValueError(f"sided must be one of {list(SIDES)}, got {sided!r}")


@dataclass(frozen=True)
class ArgminGuard:
    """The paper's Guard: look only at the best autoencoder ``i*``.

    Share if ``i*`` belongs to the uploader; else block if ``d_{i*}`` lies in the privacy
    interval ``[mu - alpha*sigma, mu + alpha*sigma]`` of ``i*``; else share.
    """

    alpha: float = 1.5
    sided: str = "two"

    def __post_init__(self) -> None:
        _check_guard(self.alpha, self.sided)

    def block(
        self, flt: ScoredFilter, scores: torch.Tensor, uploader: torch.Tensor | int
    ) -> torch.Tensor:
        """Boolean block decision per image uploaded by ``uploader`` (a user id per image)."""
        idx, _ = flt.predict(scores)
        inside = flt.inside(scores, self.alpha, self.sided).gather(1, idx[:, None])[:, 0]
        own = flt.owners[idx] == torch.as_tensor(uploader)
        return inside & ~own


@dataclass(frozen=True)
class StrictGuard:
    """A stricter rule: block if any autoencoder not owned by the uploader accepts the image.

    An autoencoder accepts an image when the image's error lies in its privacy interval.
    """

    alpha: float = 1.5
    sided: str = "two"

    def __post_init__(self) -> None:
        _check_guard(self.alpha, self.sided)

    def block(
        self, flt: ScoredFilter, scores: torch.Tensor, uploader: torch.Tensor | int
    ) -> torch.Tensor:
        """Boolean block decision per image uploaded by ``uploader``."""
        inside = flt.inside(scores, self.alpha, self.sided)
        up = torch.as_tensor(uploader).reshape(-1, 1)
        foreign = flt.owners[None, :] != up
        return (inside & foreign).any(dim=1)


Guard = ArgminGuard | StrictGuard

#: The Guard rules by name: the one registry behind ``conf/guard/``, ``filter check`` and the
#: figures. ``paper`` is the paper's rule (only ``i*`` decides).
GUARDS: dict[str, type[ArgminGuard] | type[StrictGuard]] = {
    "paper": ArgminGuard,
    "strict": StrictGuard,
}


def make_guard(name: str, alpha: float, sided: str = "two") -> Guard:
    """The Guard called ``name`` (a key of :data:`GUARDS`) with width ``alpha`` and ``sided``."""
    if name not in GUARDS:
        raise ValueError(f"unknown guard {name!r}; choose one of {sorted(GUARDS)}")
    return GUARDS[name](alpha, sided)


def guard_name(guard: Guard) -> str:
    """The registry name of ``guard``."""
    return next(name for name, cls in GUARDS.items() if type(guard) is cls)
