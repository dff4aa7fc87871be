"""The global filter (eq. 7-8) and the Guard: score every registered autoencoder, decide.

No Flower here. Autoencoders of one shape are stacked into ``(N, D, M)`` tensors. By default
the fused kernel of :mod:`docl_flower.core.filter.native` runs encoder, decoder and error sum of
each (autoencoder, tile of images) in one pass; the ``"torch"`` kernel runs the encoders as one
matrix product per chunk of images and block of autoencoders and the decoders as batched
PyTorch products chunked over images and autoencoders, so that the ``(chunk, images, D)``
intermediates stay small (see ``scripts/bench_filter.py``). The fused kernel also has a
bfloat16 variant (``kernel="bf16"``, or ``"auto"`` where it is measured to win).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from docl_flower.core.filter import native
from docl_flower.core.training.autoencoder import PARAM_NAMES

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


_warned = {"emulated": False}

#: Values of :attr:`ScoringConfig.kernel`.
KERNELS = ("native", "torch", "auto", "bf16")


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
        ``"native"``: the fused float32 C++ kernel of :mod:`.native`, compiled once per process on
        first use; where it cannot be built (no compiler, no AVX-512), a warning is logged and the
        ``"torch"`` path is used. ``"torch"``: PyTorch operations only. ``"auto"``: the fused kernel
        in bfloat16 where the CPU has bfloat16 dot-product instructions (``avx512_bf16``) and a
        measurement at the first filter of that shape (:func:`prefer_bf16`) finds it faster than
        float32; else ``"native"``. ``"bf16"``: the bfloat16 fused kernel in any case (emulated, and
        slower than float32, without the instructions: for checking decisions, see
        :func:`decision_agreement`).
    bf16_refine : bool
        bfloat16 only: score again in float32 the entries that can decide (see
        :meth:`GlobalFilter.scores`), so that the argmin and the Guards (alpha up to
        ``refine_alpha``) decide as in float32. False: bfloat16 scores as they are.
    bf16_margin : float
        Relative margin of that refinement (0.1: entries within 10% of the image's best
        score, or of a registration's bound ``mu + refine_alpha * sigma``); larger than the
        relative bfloat16 error measured on trained MNIST autoencoders (at most 4.6%).
    refine_alpha : float
        Largest Guard alpha whose decisions the refinement keeps exact.
    """

    chunk_images: int = 512
    chunk_models: int = 4
    kernel: str = "native"
    bf16_refine: bool = True
    bf16_margin: float = 0.1
    refine_alpha: float = 5.0

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.chunk_images < 1 or self.chunk_models < 1:
            raise ValueError("chunk sizes must be >= 1")
        if not isinstance(self.bf16_refine, bool):
            raise ValueError(f"bf16_refine must be true or false, got {self.bf16_refine!r}")
        for name in ("bf16_margin", "refine_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")


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

        names = {n: {np.shape(r.params[n]) for r in registrations} for n in PARAM_NAMES}
        for name, shapes in names.items():
            if len(shapes) != 1:
                raise ValueError(f"autoencoders differ in the shape of {name}: {sorted(shapes)}")
        n_models = len(registrations)
        hidden, dim = (int(k) for k in next(iter(names["encoder.weight"])))
        self._hidden = hidden
        self._dim = dim
        self._precision = "float32"
        self._kernel = native.load() if self.scoring.kernel != "torch" else None
        if self._kernel is not None:
            if self.scoring.kernel == "bf16" or (
                self.scoring.kernel == "auto" and prefer_bf16(dim, hidden)
            ):
                self._precision = "bfloat16"
                if not self._kernel.bf16_hardware and not _warned["emulated"]:
                    _warned["emulated"] = True
                    log.warning(
                        "bfloat16 scoring without AVX512_BF16 instructions: emulated, slower "
                        "than float32 (use it to check decisions, not for speed)"
                    )
            self._pack_native(registrations)
        else:

            def stack(name: str) -> torch.Tensor:
                arrays = [np.asarray(r.params[name], dtype=np.float32) for r in registrations]
                return torch.from_numpy(np.stack(arrays)).contiguous()

            enc_w, enc_b, dec_w, dec_b = (stack(n) for n in PARAM_NAMES)
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
            self._held: tuple[torch.Tensor, ...] = (self._enc, self._dec)
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
        """The kernel in use: ``"native"``, ``"bf16"`` or ``"torch"``.

        ``"native"`` is the fused float32 kernel, ``"bf16"`` the fused bfloat16 one; ``"torch"``
        also when another was asked for but the fused kernel cannot be built.
        """
        if self._kernel is None:
            return "torch"
        return "bf16" if self._precision == "bfloat16" else "native"

    @property
    def bf16_emulated(self) -> bool:
        """Whether the kernel in use is the bfloat16 one without bfloat16 instructions."""
        return self._kernel is not None and self.kernel == "bf16" and not self._kernel.bf16_hardware

    @property
    def nbytes(self) -> int:
        """Bytes of the stacked tensors that the scoring path holds (weights and biases)."""
        return int(sum(t.numel() * t.element_size() for t in self._held))

    def _pack_native(self, registrations: Sequence[Registration]) -> None:
        """Stack the autoencoders the way the fused kernel reads them.

        One autoencoder at a time, so that no second full-size copy exists: encoders
        ``(N, D, M)``, decoders transposed, ``(N, M, D)``, times ``-log2(e)`` (the kernel
        computes ``t = -z log2(e)``, sigmoid = 1/(1 + 2^t)), biases ``(N, M)`` and ``(N, D)``
        (the decoder's times ``-log2(e)``). In bfloat16 the weights are rounded to nearest
        even and paired along the summed axis: encoders ``(N, D/2, M)`` and decoders
        ``(N, M/2, D)``, two bfloat16 in one 32-bit word. One layout serves both image tiles
        and single images.
        """
        n, m, d = len(registrations), self._hidden, self._dim
        b1 = np.empty((n, m), np.float32)
        b2 = np.empty((n, d), np.float32)
        bf16 = self._precision == "bfloat16"
        if bf16:
            w1 = torch.empty(n, (d + 1) // 2, m, dtype=torch.int32)
            w2 = torch.empty(n, (m + 1) // 2, d, dtype=torch.int32)
        else:
            w1 = torch.empty(n, d, m)
            w2 = torch.empty(n, m, d)
        w1_np, w2_np = w1.numpy(), w2.numpy()
        scale = np.float32(native.NEG_LOG2E)
        for i, r in enumerate(registrations):
            enc = np.asarray(r.params["encoder.weight"], dtype=np.float32)  # (M, D)
            dec = np.asarray(r.params["decoder.weight"], dtype=np.float32)  # (D, M)
            b1[i] = r.params["encoder.bias"]
            np.multiply(np.asarray(r.params["decoder.bias"], np.float32), scale, out=b2[i])
            if bf16:
                w1_np[i] = _bf16_pairs(enc, axis=1).T  # pairs of features, (D/2, M)
                w2_np[i] = _bf16_pairs(dec * scale, axis=1).T  # pairs of hidden units, (M/2, D)
            else:
                w1_np[i] = enc.T
                np.multiply(dec.T, scale, out=w2_np[i])
        self._w1, self._w2 = w1, w2
        self._b1, self._b2 = torch.from_numpy(b1), torch.from_numpy(b2)
        self._held = (self._w1, self._b1, self._w2, self._b2)

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 7-8: ``d_i(x)`` for every image (rows) and autoencoder (columns), shape (n, N).

        Fused kernel (``"native"``, ``"bf16"``): up to ``ROWS_MAX`` images are scored one at
        a time, vectorised over features and hidden units (an upload service's single
        image); more in chunks of ``chunk_images`` and tiles of 16-64 images, every
        (autoencoder, tile) in one pass over registers. In bfloat16, the entries that can
        decide are then scored again in float32 (:attr:`ScoringConfig.bf16_refine`).
        ``"torch"``: for each chunk the encoders of a block of autoencoders run as one matrix
        product and the decoders as batched products over ``chunk_models`` autoencoders at a
        time, so the ``(chunk_models, chunk_images, D)`` intermediate stays in cache.
        """
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be (n, {self.dim}), got {tuple(x.shape)}")
        x = x.to(torch.float32)
        if self._kernel is not None:
            out = self._scores_native(x, self._kernel)
            if self._precision == "bfloat16" and self.scoring.bf16_refine:
                self._refine(x, out)
            return out
        return self._scores_torch(x)

    def _refine(self, x: torch.Tensor, scores: torch.Tensor) -> None:
        """Score again, in float32, the bfloat16 entries that can decide (in place).

        An entry can decide the argmin when it lies within ``bf16_margin`` (relative) of its
        image's best score, and a Guard (alpha up to ``refine_alpha``, one- or two-sided)
        when it lies below ``(1 + bf16_margin) * (mu + refine_alpha * sigma)``. Each
        registration with such entries is scored in float32 on those images only, from its
        float32 parameters; the other entries keep their bfloat16 scores.
        """
        margin = 1.0 + self.scoring.bf16_margin
        safe = torch.nan_to_num(scores, nan=float("inf"))
        best = safe.min(dim=1, keepdim=True).values
        bound = (self.mu + self.scoring.refine_alpha * self.sigma).to(torch.float32)
        band = (safe <= best * margin) | (safe <= bound[None, :] * margin)
        cols, rows = band.T.nonzero(as_tuple=True)  # grouped by registration
        if rows.numel() == 0:
            return
        models, counts = torch.unique_consecutive(cols, return_counts=True)
        exact = ScoringConfig(self.scoring.chunk_images, self.scoring.chunk_models, "native")
        start = 0
        for a, count in zip(models.tolist(), counts.tolist(), strict=True):
            images = rows[start : start + count]
            start += count
            one = GlobalFilter([self.registrations[a]], exact)
            scores[images, a] = one.scores(x[images])[:, 0]

    #: At most this many images are scored one at a time (vectorised over features), more
    #: in tiles of 16, 32 or 64 images (vectorised over images).
    ROWS_MAX = 12

    def _scores_native(self, x: torch.Tensor, kernel: native.Kernel) -> torch.Tensor:
        n, big_n, m, d = x.shape[0], self.size, self._hidden, self._dim
        bf16 = self._precision == "bfloat16"
        threads = torch.get_num_threads()
        out = torch.empty(n, big_n, dtype=torch.float32)
        x = x.contiguous()
        weights = tuple(t.data_ptr() for t in (self._w1, self._b1, self._w2, self._b2))
        if n <= self.ROWS_MAX:
            xq = _bf16_pairs(x.numpy(), axis=1) if bf16 else None
            kernel.lib.docl_rows(
                x.data_ptr(),
                d,
                xq.ctypes.data if xq is not None else None,
                (d + 1) // 2,
                *weights,
                out.data_ptr(),
                big_n,
                1,
                big_n,
                m,
                d,
                n,
                int(bf16),
                threads,
            )
            return out
        # Flat buffers, viewed per chunk as contiguous (D, width) images-as-columns (zero
        # padded to whole tiles) and, in bfloat16, (D/2, width) pairs of features.
        ci = -(-self.scoring.chunk_images // kernel.lanes) * kernel.lanes
        first = min(ci, n)
        width = _round_up(first, _tile(first, kernel.lanes))
        x_buf = torch.empty(d * width)
        p_buf = torch.empty(((d + 1) // 2) * width, dtype=torch.int32) if bf16 else None
        for i0 in range(0, n, ci):
            b = min(ci, n - i0)
            lanes = _tile(b, kernel.lanes)
            bp = _round_up(b, lanes)
            xt = x_buf[: d * bp]
            kernel.lib.docl_transpose(x[i0].data_ptr(), d, b, d, xt.data_ptr(), bp, bp, threads)
            xp = None
            if p_buf is not None:
                xp = p_buf.data_ptr()
                kernel.lib.docl_pack_bf16(xt.data_ptr(), bp, d, bp, xp, bp, threads)
            kernel.lib.docl_fused(
                xt.data_ptr(),
                xp,
                bp,
                *weights,
                out[i0].data_ptr(),
                big_n,
                1,
                big_n,
                m,
                d,
                bp,
                b,
                lanes,
                int(bf16),
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


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _tile(n: int, widest: int) -> int:
    """Images per tile of the fused kernel for a chunk of ``n``: 16, 32 or ``widest`` (64)."""
    return next((w for w in (16, 32) if n <= w), widest)


def _bf16_pairs(a: NDArray[np.float32], axis: int) -> NDArray[np.int32]:
    """``a`` rounded to bfloat16, two neighbours along ``axis`` in one 32-bit word.

    Round to nearest even (NaN stays NaN); ``axis`` is zero padded to an even length; the
    even index goes into the low half of the word.
    """
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, axis, -1), dtype=np.float32))
    if t.shape[-1] % 2:
        t = torch.nn.functional.pad(t, (0, 1))
    pairs = t.to(torch.bfloat16).view(torch.int16).view(torch.int32).numpy()
    return np.moveaxis(pairs, -1, axis)


def bf16_available() -> bool:
    """Whether bfloat16 scoring runs on bfloat16 instructions here.

    True where the CPU reports ``avx512_bf16`` and the fused kernel was compiled for it.
    """
    kernel = native.load()
    return kernel is not None and kernel.bf16_hardware and native.cpu_has_bf16()


def measure_kernels(
    dim: int, hidden: int, models: int = 64, images: int = 256, repeats: int = 3
) -> dict[str, float]:
    """Seconds per image and autoencoder of the fused float32 and bfloat16 kernels.

    Measured now on ``models`` random autoencoders of this shape and ``images`` images, best
    of ``repeats``; keys ``"native"`` and ``"bf16"``.
    """
    rng = np.random.default_rng(0)
    shapes = {"encoder.weight": (hidden, dim), "encoder.bias": (hidden,)}
    shapes |= {"decoder.weight": (dim, hidden), "decoder.bias": (dim,)}
    regs = [
        Registration(
            u,
            u,
            {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in shapes.items()},
            1.0,
            1.0,
            1,
        )
        for u in range(models)
    ]
    x = torch.rand(images, dim)
    seconds = {}
    for kernel in ("native", "bf16"):
        flt = GlobalFilter(regs, ScoringConfig(kernel=kernel, bf16_refine=False))
        flt.scores(x)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            flt.scores(x)
            best = min(best, time.perf_counter() - start)
        seconds[kernel] = best / (images * models)
    return seconds


#: Margin by which bfloat16 must beat float32 in :func:`prefer_bf16` (measurement noise).
BF16_MARGIN = 0.9
_bf16_choice: dict[tuple[int, int, int], bool] = {}
_bf16_lock = threading.Lock()


def prefer_bf16(dim: int, hidden: int) -> bool:
    """Whether ``kernel="auto"`` scores autoencoders of this shape in bfloat16.

    Only where :func:`bf16_available` and, measured once per process, shape and thread count
    (:func:`measure_kernels`), bfloat16 takes at most :data:`BF16_MARGIN` of the float32
    time. Never on a CPU without bfloat16 instructions.
    """
    if not bf16_available():
        return False
    key = (dim, hidden, torch.get_num_threads())
    with _bf16_lock:
        if key not in _bf16_choice:
            seconds = measure_kernels(dim, hidden)
            _bf16_choice[key] = seconds["bf16"] <= BF16_MARGIN * seconds["native"]
            log.info(
                "scoring kernel for D=%d, M=%d: %s (float32 %.3g s, bfloat16 %.3g s per image "
                "and autoencoder)",
                dim,
                hidden,
                "bf16" if _bf16_choice[key] else "native",
                seconds["native"],
                seconds["bf16"],
            )
        return _bf16_choice[key]


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


def decision_agreement(
    flt: ScoredFilter,
    reference: torch.Tensor,
    other: torch.Tensor,
    guards: Sequence[Guard] = (),
    uploader: torch.Tensor | int = OUTSIDER,
) -> dict[str, float]:
    """How often two score matrices of the same images under ``flt`` decide alike.

    For instance float32 (``reference``) and bfloat16 (``other``) scoring. Returns the
    fraction of images (rows) with the same best registration ``i*`` (``"argmin"``), the same
    block decision of each Guard for ``uploader`` (keyed ``"guard:<name>"``, see
    :func:`guard_name`), the number of images and the largest relative score difference.
    """
    if reference.shape != other.shape or reference.ndim != 2:
        raise ValueError(f"score matrices differ: {tuple(reference.shape)}, {tuple(other.shape)}")
    n = reference.shape[0]
    if n == 0:
        raise ValueError("no images to compare")
    out = {"images": float(n)}
    same = flt.predict(reference)[0] == flt.predict(other)[0]
    out["argmin"] = same.double().mean().item()
    for guard in guards:
        blocks = guard.block(flt, reference, uploader) == guard.block(flt, other, uploader)
        out[f"guard:{guard_name(guard)}"] = blocks.double().mean().item()
    ref = reference.to(torch.float64)
    rel = (other.to(torch.float64) - ref).abs() / ref.abs().clamp_min(1e-30)
    out["max_relative_difference"] = torch.nan_to_num(rel, nan=float("inf")).max().item()
    return out


def make_guard(name: str, alpha: float, sided: str = "two") -> Guard:
    """The Guard called ``name`` (a key of :data:`GUARDS`) with width ``alpha`` and ``sided``."""
    if name not in GUARDS:
        raise ValueError(f"unknown guard {name!r}; choose one of {sorted(GUARDS)}")
    return GUARDS[name](alpha, sided)


def guard_name(guard: Guard) -> str:
    """The registry name of ``guard``."""
    return next(name for name, cls in GUARDS.items() if type(guard) is cls)
