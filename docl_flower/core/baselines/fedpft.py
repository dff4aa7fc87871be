"""One-shot per-class feature statistics, the strongest one-shot peer of DOCL (no Flower).

After FedPFT (Beitollahi et al., *Parametric Feature Transfer: One-shot Federated Learning with
Foundation Models*, 2024): each user fits a Gaussian (or a small Gaussian mixture) to the
features of each class it owns, from the provider's frozen extractor, and uploads its
parameters once; nothing is sent back. The server then has

* a class-conditional **likelihood classifier** (argmax log-likelihood), wrapped as a
  :class:`~docl_flower.core.filter.global_filter.ScoredFilter` whose scores are negative
  log-likelihoods, so that DOCL's Guards and metrics apply unchanged: the argmin Guard blocks an
  image when its most likely class is not the uploader's and ``ll >= ll_mean - alpha * ll_std`` (the
  mirror of DOCL's ``d <= mu + alpha * sigma``), with ``ll_mean``, ``ll_std`` calibrated on the
  device from held-out (k-fold) log-likelihoods of the user's own images, as DOCL does;
* a **classifier trained on features sampled** from the uploaded statistics (FedPFT's server
  step), which needs no Guard and is never sent back either.

Covariances are diagonal (``covariance="diag"``), or full and shrunk (``"shrunk"``): Ledoit-Wolf
shrinkage towards a scaled identity plus a fixed ridge, so that they are positive-definite even
with 7 samples in 128 dimensions. A mixture (``components > 1``) is fitted by seeded EM with
diagonal covariances. Features lie in ``[0, 1]`` (every provider extractor scales them so),
which bounds every honest statistic: :func:`checked_stats` refuses anything outside.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from docl_flower.core.common.checks import check_int, check_number
from docl_flower.core.data.seeds import derive_seed
from docl_flower.core.filter.global_filter import ScoredFilter
from docl_flower.core.filter.probe import ProbeSet, catch_all_problem

log = logging.getLogger(__name__)

#: Values of :attr:`StatsSpec.covariance`.
COVARIANCES = ("diag", "shrunk")
#: Tensors of one class's upload: mixture weights ``(k,)``, means ``(k, D)`` and covariance
#: (``diag``: variances ``(k, D)``; ``shrunk``: the upper triangle of ``(D, D)``, row-major).
TENSOR_NAMES = ("weights", "means", "covariance")
#: Smallest mixture weight an upload may carry (clients keep theirs above 1e-4).
MIN_WEIGHT = 1e-6
_CLIENT_MIN_WEIGHT = 1e-4
_LOG_2PI = math.log(2.0 * math.pi)
#: Rows per block when computing log-likelihoods (bounds the ``(rows, D)`` intermediates).
_CHUNK = 4096

Array64 = NDArray[np.float64]


class StatsError(ValueError):
    """Statistics that cannot be registered; the message is the reason."""


@dataclass(frozen=True)
class StatsSpec:
    """How a user summarises the features of one class (sent to clients in the ClientSpec).

    Parameters
    ----------
    covariance : str
        ``"shrunk"``: full covariance, Ledoit-Wolf shrinkage towards ``trace/D * I`` (or the
        fixed ``shrinkage``) plus ``ridge * I``. ``"diag"``: variances plus ``ridge``.
    components : int
        Gaussians per class; ``> 1`` fits a mixture by EM with diagonal covariances (needs
        ``covariance="diag"``), as FedPFT's GMM option.
    ridge : float
        Added to every variance (features in [0, 1]): the covariance's smallest eigenvalue is
        at least ``ridge``, whatever the number of samples.
    shrinkage : float or None
        Fixed shrinkage intensity in [0, 1]; None estimates it (Ledoit-Wolf).
    folds : int
        Folds of the held-out calibration of ``ll_mean``, ``ll_std`` (at most one per image).
    em_iterations : int
        Largest number of EM iterations (mixtures).
    """

    covariance: str = "shrunk"
    components: int = 1
    ridge: float = 1e-3
    shrinkage: float | None = None
    folds: int = 5
    em_iterations: int = 100

    def __post_init__(self) -> None:
        if self.covariance not in COVARIANCES:
            raise ValueError(
                f"covariance must be one of {list(COVARIANCES)}, got {self.covariance!r}"
            )
        check_int("components", self.components, minimum=1)
        ridge = check_number("ridge", self.ridge, above=0.0)
        if ridge > 1.0:
            raise ValueError(f"ridge must be <= 1 (features lie in [0, 1]), got {ridge}")
        if self.shrinkage is not None:
            value = check_number("shrinkage", self.shrinkage, minimum=0.0)
            if value > 1.0:
                raise ValueError(f"shrinkage must be in [0, 1] or null, got {value}")
        check_int("folds", self.folds, minimum=2)
        check_int("em_iterations", self.em_iterations, minimum=1)
        if self.components > 1 and self.covariance != "diag":
            raise ValueError(
                "components > 1 fits a mixture with diagonal covariances: use covariance=diag"
            )

    def shapes(self, dim: int) -> dict[str, tuple[int, ...]]:
        """The shape of each uploaded tensor of one class, for features of dimension ``dim``."""
        k = self.components
        cov = (k, dim) if self.covariance == "diag" else (packed_size(dim),)
        return {"weights": (k,), "means": (k, dim), "covariance": cov}


def packed_size(dim: int) -> int:
    """Entries of the upper triangle (diagonal included) of a ``(dim, dim)`` matrix."""
    return dim * (dim + 1) // 2


def pack_symmetric(matrix: Array64) -> Array64:
    """The upper triangle of a symmetric matrix, row-major (what an upload carries)."""
    return np.ascontiguousarray(matrix[np.triu_indices(matrix.shape[0])])


def unpack_symmetric(packed: NDArray[np.floating], dim: int) -> Array64:
    """The symmetric ``(dim, dim)`` matrix of :func:`pack_symmetric`'s output."""
    if packed.shape != (packed_size(dim),):
        raise StatsError(f"packed covariance of shape {packed.shape}, need ({packed_size(dim)},)")
    out = np.zeros((dim, dim), dtype=np.float64)
    rows, cols = np.triu_indices(dim)
    out[rows, cols] = packed
    out[cols, rows] = packed
    return out


def ledoit_wolf(x: Array64) -> tuple[Array64, float]:
    """Empirical covariance of the rows of ``x`` and its Ledoit-Wolf shrinkage intensity.

    The shrunk estimate is ``(1 - s) * S + s * trace(S) / D * I`` (Ledoit and Wolf, 2004; the
    formula of scikit-learn's ``ledoit_wolf_shrinkage``). Without spread (one sample, or all
    equal) ``S = 0`` and ``s = 1``.
    """
    n, d = x.shape
    xc = x - x.mean(axis=0)
    emp = xc.T @ xc / n
    mu = float(np.trace(emp)) / d
    if n < 2 or mu <= 0.0:
        return emp, 1.0
    x2 = xc * xc
    beta_ = float((x2.T @ x2).sum())
    delta_ = float((emp * emp).sum())
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * float(np.trace(emp)) + d * mu * mu) / d
    beta = min(beta, delta)
    return emp, 0.0 if beta <= 0.0 else float(beta / delta)


def shrunk_covariance(x: Array64, spec: StatsSpec) -> Array64:
    """The ``"shrunk"`` covariance of ``x``: shrinkage towards ``trace/D * I`` plus the ridge."""
    emp, estimated = ledoit_wolf(x)
    s = estimated if spec.shrinkage is None else float(spec.shrinkage)
    d = emp.shape[0]
    mu = float(np.trace(emp)) / d
    cov = (1.0 - s) * emp
    cov[np.diag_indices(d)] += s * mu + spec.ridge
    return 0.5 * (cov + cov.T)


@dataclass(frozen=True)
class Density:
    """A Gaussian mixture ready to evaluate and sample (k = 1: one Gaussian).

    Build it with :meth:`of`, which refuses a covariance that is not positive-definite.
    """

    kind: str
    log_weights: Array64
    means: Array64
    #: ``diag``: standard deviations ``(k, D)``; ``shrunk``: Cholesky factor ``L`` ``(1, D, D)``.
    scales: Array64
    #: ``diag``: inverse standard deviations; ``shrunk``: ``L^-1``.
    whiten: Array64
    #: ``log det`` of each component's covariance.
    logdets: Array64

    @classmethod
    def of(cls, weights: Array64, means: Array64, covariance: Array64, kind: str) -> Density:
        """The density of mixture ``weights``, ``means`` and ``covariance`` (see StatsSpec).

        Raises
        ------
        StatsError
            When a covariance is not positive-definite (variance <= 0, Cholesky fails).
        """
        if kind == "diag":
            if not bool((covariance > 0.0).all()):
                raise StatsError("a variance is not positive")
            std = np.sqrt(covariance)
            return cls(
                kind,
                np.log(weights),
                means,
                std,
                1.0 / std,
                np.log(covariance).sum(axis=1),
            )
        if kind != "shrunk" or means.shape[0] != 1:
            raise StatsError(f"covariance {kind!r} with {means.shape[0]} components")
        try:
            chol = np.linalg.cholesky(covariance)
        except np.linalg.LinAlgError as err:
            raise StatsError("covariance is not positive-definite (Cholesky failed)") from err
        diag = np.diag(chol)
        if not bool((diag > 0.0).all()) or not bool(np.isfinite(chol).all()):
            raise StatsError("covariance is not positive-definite (Cholesky failed)")
        inverse = np.linalg.solve(chol, np.eye(chol.shape[0]))
        return cls(
            kind,
            np.log(weights),
            means,
            np.asarray(chol, dtype=np.float64)[None],
            np.asarray(inverse, dtype=np.float64)[None],
            np.array([2.0 * float(np.log(diag).sum())]),
        )

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.means.shape[1])

    def component_log_pdfs(self, x: Array64) -> Array64:
        """``log w_j + log N(x; m_j, C_j)`` for every row and component, shape (n, k)."""
        n, d = x.shape
        out = np.empty((n, self.means.shape[0]), dtype=np.float64)
        for j in range(self.means.shape[0]):
            diff = x - self.means[j]
            z = diff * self.whiten[j] if self.kind == "diag" else diff @ self.whiten[0].T
            maha = np.einsum("ij,ij->i", z, z)
            out[:, j] = self.log_weights[j] - 0.5 * (d * _LOG_2PI + self.logdets[j] + maha)
        return out

    def log_likelihood(self, x: NDArray[np.floating]) -> Array64:
        """``log p(x)`` of every row of ``x`` (float64), computed in blocks of rows."""
        rows = np.asarray(x, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"features must be (n, {self.dim}), got {rows.shape}")
        out = np.empty(rows.shape[0], dtype=np.float64)
        for i0 in range(0, rows.shape[0], _CHUNK):
            out[i0 : i0 + _CHUNK] = _logsumexp(self.component_log_pdfs(rows[i0 : i0 + _CHUNK]))
        return out

    def sample(self, count: int, rng: np.random.Generator) -> Array64:
        """``count`` rows drawn from the mixture."""
        k, d = self.means.shape
        comp = rng.choice(
            k, size=count, p=np.exp(self.log_weights) / np.exp(self.log_weights).sum()
        )
        z = rng.standard_normal((count, d))
        if self.kind == "diag":
            out = self.means[comp] + z * self.scales[comp]
        else:
            out = self.means[comp] + z @ self.scales[0].T
        return np.asarray(out, dtype=np.float64)

    def peak(self) -> float:
        """An upper bound of ``log p(x)``: the largest component density at its mean."""
        d = self.dim
        return float(np.max(-0.5 * (d * _LOG_2PI + self.logdets)))


def _logsumexp(values: Array64) -> Array64:
    top = values.max(axis=1)
    safe = np.where(np.isfinite(top), top, 0.0)
    return np.asarray(safe + np.log(np.exp(values - safe[:, None]).sum(axis=1)), dtype=np.float64)


@dataclass(frozen=True)
class ClassStats:
    """One class's statistics as uploaded by its user (float32 values, held as float64).

    Parameters
    ----------
    user_id, label : int
        Owner and class.
    kind : str
        ``"diag"`` or ``"shrunk"`` (see :class:`StatsSpec`).
    weights, means, covariance : ndarray
        ``(k,)``, ``(k, D)``, and ``(k, D)`` variances (``diag``) or ``(D, D)`` (``shrunk``).
    ll_mean, ll_std : float
        Mean and standard deviation of the held-out log-likelihoods of the user's images.
    num_examples : int
        Images the statistics summarise.
    """

    user_id: int
    label: int
    kind: str
    weights: Array64
    means: Array64
    covariance: Array64
    ll_mean: float
    ll_std: float
    num_examples: int

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.means.shape[1])

    def density(self) -> Density:
        """The fitted density (raises :class:`StatsError` when it is not one)."""
        return Density.of(self.weights, self.means, self.covariance, self.kind)

    def upload_arrays(self) -> dict[str, NDArray[np.float32]]:
        """The tensors of the upload, float32, keyed by :data:`TENSOR_NAMES`."""
        cov = self.covariance if self.kind == "diag" else pack_symmetric(self.covariance)
        return {
            "weights": self.weights.astype(np.float32),
            "means": self.means.astype(np.float32),
            "covariance": np.ascontiguousarray(cov, dtype=np.float32),
        }


def _as_float32_values(a: Array64) -> Array64:
    """``a`` rounded to float32 (what the upload carries), held as float64."""
    return a.astype(np.float32).astype(np.float64)


def fit_density(x: Array64, spec: StatsSpec, seed: int) -> tuple[Array64, Array64, Array64]:
    """Weights, means and covariance of ``spec``'s model fitted to the rows of ``x``.

    Values are rounded to float32, as uploaded. A mixture is fitted by EM with diagonal
    covariances from ``components`` distinct rows drawn with ``seed``.
    """
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"need at least one feature row, got shape {x.shape}")
    if spec.components > 1:
        weights, means, cov = _em_diag(x, spec, np.random.default_rng(seed))
    else:
        weights = np.ones(1)
        means = x.mean(axis=0, keepdims=True)
        if spec.covariance == "diag":
            cov = x.var(axis=0, keepdims=True) + spec.ridge
        else:
            cov = shrunk_covariance(x, spec)
    low, high = x.min(axis=0), x.max(axis=0)
    means = np.clip(means, low, high)  # rounding may step out of the data's range
    return _as_float32_values(weights), _as_float32_values(means), _as_float32_values(cov)


def _em_diag(
    x: Array64, spec: StatsSpec, rng: np.random.Generator
) -> tuple[Array64, Array64, Array64]:
    """EM for a ``components``-Gaussian mixture with diagonal covariances (seeded)."""
    n, _ = x.shape
    k = spec.components
    start = rng.choice(n, size=k, replace=n < k)
    means = x[start].copy()
    var = np.tile(x.var(axis=0) + spec.ridge, (k, 1))
    weights = np.full(k, 1.0 / k)
    previous = -math.inf
    for _ in range(spec.em_iterations):
        logp = Density.of(weights, means, var, "diag").component_log_pdfs(x)
        total = _logsumexp(logp)
        mean_ll = float(total.mean())
        resp = np.exp(logp - total[:, None])
        nk = resp.sum(axis=0)
        for j in range(k):
            if nk[j] < 1e-10:  # an empty component keeps its place
                continue
            means[j] = resp[:, j] @ x / nk[j]
            var[j] = resp[:, j] @ (x - means[j]) ** 2 / nk[j] + spec.ridge
        weights = np.maximum(nk / n, _CLIENT_MIN_WEIGHT)
        weights = weights / weights.sum()
        if mean_ll - previous <= 1e-7 * abs(mean_ll):
            break
        previous = mean_ll
    return weights, means, var


def fit_class_stats(
    x: NDArray[np.floating], spec: StatsSpec, seed: int, user_id: int, label: int
) -> ClassStats:
    """Fit the statistics of one class and calibrate ``ll_mean``, ``ll_std`` held-out.

    The uploaded model is fitted on all rows; ``ll_mean`` and ``ll_std`` are the mean and
    (population) standard deviation of the log-likelihoods of each row under a model fitted
    without it (``min(folds, n)`` folds), as DOCL's held-out calibration: the model's own
    images are more likely under it than new images of the class. With one image there is
    nothing to hold out: its own log-likelihood is used (and ``ll_std = 0`` is refused).
    """
    rows = np.asarray(x, dtype=np.float64)
    n = int(rows.shape[0])
    weights, means, cov = fit_density(rows, spec, seed)
    kind = spec.covariance
    if n < 2:
        log.warning("one image only: nothing to hold out, calibrating on its own likelihood")
        lls = Density.of(weights, means, cov, kind).log_likelihood(rows)
    else:
        folds = min(spec.folds, n)
        order = np.random.default_rng(derive_seed(seed, 0xCA1)).permutation(n)
        held: list[Array64] = []
        for k, part in enumerate(np.array_split(order, folds)):
            keep = np.setdiff1d(order, part)
            fw, fm, fc = fit_density(rows[keep], spec, derive_seed(seed, k + 1))
            held.append(Density.of(fw, fm, fc, kind).log_likelihood(rows[part]))
        lls = np.concatenate(held)
    return ClassStats(
        user_id, label, kind, weights, means, cov, float(lls.mean()), float(lls.std()), n
    )


@dataclass(frozen=True)
class StatsLimits:
    """What honest statistics of features in ``[low, high]`` look like (the server's check).

    Every bound follows from the spec and the feature range: means lie in the range; a
    variance of features in a range of width ``w`` is at most ``w^2 / 4`` (plus the ridge); a
    covariance's eigenvalues lie in ``[ridge, D * (w^2 / 4 + ridge)]`` (half the ridge and 1%
    more are allowed for float32 rounding); hence every log-likelihood of an image in the range
    under any such model (the held-out fold models included) lies in :meth:`ll_bounds`.
    """

    spec: StatsSpec
    dim: int
    low: float = 0.0
    high: float = 1.0
    min_std: float = 1e-6

    def variance_bounds(self) -> tuple[float, float]:
        """Smallest and largest variance of one feature (``diag``)."""
        width = self.high - self.low
        return 0.5 * self.spec.ridge, 1.01 * (0.25 * width * width + self.spec.ridge)

    def eigen_bounds(self) -> tuple[float, float]:
        """Smallest and largest eigenvalue of a full covariance (``shrunk``; largest <= trace)."""
        lo, hi = self.variance_bounds()
        return lo, self.dim * hi

    def ll_bounds(self) -> tuple[float, float]:
        """Range of any log-likelihood of an image in range under an honest model."""
        d, ridge, width = self.dim, self.spec.ridge, self.high - self.low
        # log det <= D log(trace / D) <= D log(largest variance); Mahalanobis <= D w^2 / ridge.
        top = self.variance_bounds()[1]
        hi = -0.5 * d * (_LOG_2PI + math.log(ridge))
        lo = -0.5 * (d * (_LOG_2PI + math.log(top)) + d * width * width / ridge)
        return lo - math.log(self.spec.components), hi


def checked_stats(
    user_id: int,
    label: int,
    arrays: Mapping[str, NDArray[np.float32]],
    ll_mean: float,
    ll_std: float,
    num_examples: int,
    limits: StatsLimits,
) -> ClassStats:
    """Validate one class's uploaded tensors (shapes already checked) and build its stats.

    Raises
    ------
    StatsError
        With the reason: non-finite values; weights below :data:`MIN_WEIGHT`, above 1 or not
        summing to 1; means outside the feature range; variances or covariance eigenvalues
        outside :class:`StatsLimits` (not positive-definite included); ``ll_mean`` or
        ``ll_std`` outside what such a model can produce.
    """
    spec = limits.spec
    values = {name: np.asarray(arrays[name], dtype=np.float64) for name in TENSOR_NAMES}
    for name, value in values.items():
        if not bool(np.isfinite(value).all()):
            raise StatsError(f"{name}: non-finite values")
    weights, means = values["weights"], values["means"]
    if bool((weights < MIN_WEIGHT).any()) or bool((weights > 1.0).any()):
        raise StatsError(f"weights {weights.tolist()} outside [{MIN_WEIGHT:g}, 1]")
    if abs(float(weights.sum()) - 1.0) > 1e-4:
        raise StatsError(f"weights sum to {float(weights.sum()):.6g}, not 1")
    tol = 1e-6
    if float(means.min()) < limits.low - tol or float(means.max()) > limits.high + tol:
        raise StatsError(
            f"means in [{float(means.min()):.4g}, {float(means.max()):.4g}], outside the feature "
            f"range [{limits.low:g}, {limits.high:g}]"
        )
    if spec.covariance == "diag":
        cov = values["covariance"]
        lo, hi = limits.variance_bounds()
        smallest, largest = float(cov.min()), float(cov.max())
    else:
        cov = unpack_symmetric(values["covariance"], limits.dim)
        lo, hi = limits.eigen_bounds()
        eig = np.linalg.eigvalsh(cov)
        smallest, largest = float(eig[0]), float(eig[-1])
        top = float(np.diag(cov).max())
        if top > limits.variance_bounds()[1]:
            raise StatsError(
                f"a variance of {top:.4g} is above {limits.variance_bounds()[1]:.4g} "
                f"(features in [{limits.low:g}, {limits.high:g}])"
            )
    what = "variances" if spec.covariance == "diag" else "covariance eigenvalues"
    if smallest < lo or largest > hi:
        problem = "not positive-definite: " if smallest <= 0.0 else ""
        raise StatsError(
            f"{problem}{what} in [{smallest:.4g}, {largest:.4g}], outside [{lo:.4g}, {hi:.4g}]"
        )
    stats = ClassStats(
        user_id, label, spec.covariance, weights, means, cov, ll_mean, ll_std, num_examples
    )
    stats.density()  # Cholesky: positive-definite in float64 too
    ll_lo, ll_hi = limits.ll_bounds()
    if not ll_lo <= ll_mean <= ll_hi:
        raise StatsError(f"ll-mean {ll_mean:.6g} outside [{ll_lo:.6g}, {ll_hi:.6g}]")
    if not limits.min_std <= ll_std <= 0.5 * (ll_hi - ll_lo):
        raise StatsError(
            f"ll-std {ll_std:.6g} outside [{limits.min_std:g}, {0.5 * (ll_hi - ll_lo):.6g}]"
        )
    return stats


class LikelihoodFilter(ScoredFilter):
    """The likelihood classifier of the registered statistics, as a filter DOCL's Guard reads.

    Scores are negative log-likelihoods (a dissimilarity, like DOCL's reconstruction error),
    so ``i*`` is the most likely registration, and the interval of registration ``i`` is
    ``-ll <= -ll_mean + alpha * ll_std``, i.e. ``ll >= ll_mean - alpha * ll_std`` (one-sided;
    two-sided adds ``ll <= ll_mean + alpha * ll_std``).
    """

    def __init__(self, stats: Sequence[ClassStats]) -> None:
        if not stats:
            raise ValueError("a likelihood filter needs at least one registration")
        dims = {s.dim for s in stats}
        if len(dims) != 1:
            raise ValueError(f"statistics of different feature dimensions: {sorted(dims)}")
        self.stats = tuple(stats)
        self.densities = tuple(s.density() for s in stats)
        self._dim = dims.pop()
        super().__init__(
            labels=torch.tensor([s.label for s in stats]),
            owners=torch.tensor([s.user_id for s in stats]),
            mu=torch.tensor([-s.ll_mean for s in stats], dtype=torch.float64),
            sigma=torch.tensor([s.ll_std for s in stats], dtype=torch.float64),
        )

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return self._dim

    def log_likelihoods(self, x: torch.Tensor) -> torch.Tensor:
        """``log p_i(x)`` of every image (rows) under every registration (columns), float64."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be (n, {self.dim}), got {tuple(x.shape)}")
        rows = x.detach().cpu().to(torch.float64).numpy()
        cols = [d.log_likelihood(rows) for d in self.densities]
        return torch.from_numpy(np.stack(cols, axis=1))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihoods, shape (n, N): lower is more alike, as DOCL's errors."""
        return -self.log_likelihoods(x)


def probe_problem(
    stats: ClassStats, probe: ProbeSet, max_alpha: float, max_share: float
) -> str | None:
    """Why ``stats`` must not register (a catch-all range), or ``None`` when it passes.

    The server's probe set (harmless images and noise) must have finite log-likelihoods, and
    at most ``max_share`` of its harmless images (and of its noise) may fall in the widest
    range any Guard with alpha up to ``max_alpha`` can block, ``ll >= ll_mean - max_alpha *
    ll_std`` (one-sided; see :mod:`.probe`).
    """
    flt = LikelihoodFilter([stats])
    scores = flt.scores(probe.images)
    if not bool(torch.isfinite(scores).all()):
        return "its log-likelihoods on the probe set are not finite"
    blocked = flt.inside(scores, max_alpha, "one")[:, 0]
    bound = stats.ll_mean - max_alpha * stats.ll_std
    region = f"ll >= ll_mean - {max_alpha:g} ll_std = {bound:.4g}"
    return catch_all_problem(probe.shares(blocked), max_share, region)


@dataclass(frozen=True)
class SampledClassifierSpec:
    """FedPFT's server step: a classifier trained on features sampled from the statistics.

    Parameters
    ----------
    samples_per_class : int
        Features drawn per class (split between the class's registrations by their images).
    hidden : int
        0: logistic regression; else one hidden ReLU layer of this width.
    epochs, batch_size, lr, weight_decay
        Adam on the cross-entropy; inputs are standardised with the samples' mean and std.
    """

    samples_per_class: int = 2000
    hidden: int = 0
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-2
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        check_int("samples_per_class", self.samples_per_class, minimum=1)
        check_int("hidden", self.hidden, minimum=0)
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_number("lr", self.lr, above=0.0)
        check_number("weight_decay", self.weight_decay, minimum=0.0)


def sample_features(
    stats: Sequence[ClassStats], per_class: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` features per class drawn from the statistics, and their labels.

    A class registered by several users is sampled from each in proportion to the images its
    statistics summarise (at least one row each).
    """
    rng = np.random.default_rng(seed)
    xs: list[Array64] = []
    ys: list[NDArray[np.int64]] = []
    for label in sorted({s.label for s in stats}):
        group = [s for s in stats if s.label == label]
        total = sum(s.num_examples for s in group)
        for s in group:
            count = max(1, round(per_class * s.num_examples / total))
            xs.append(s.density().sample(count, rng))
            ys.append(np.full(count, label, dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)).float(), torch.from_numpy(np.concatenate(ys))


@dataclass(frozen=True)
class SampledClassifier:
    """A trained classifier of sampled features; :meth:`predict` returns class labels."""

    model: nn.Module
    labels: torch.Tensor
    centre: torch.Tensor
    scale: torch.Tensor

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The predicted class label of each row of ``x``."""
        self.model.eval()
        logits = self.model((x.to(torch.float32) - self.centre) / self.scale)
        return self.labels[logits.argmax(dim=1)]


def train_sampled_classifier(
    stats: Sequence[ClassStats], spec: SampledClassifierSpec, seed: int
) -> SampledClassifier:
    """Sample features from ``stats`` and train :class:`SampledClassifierSpec`'s model (seeded)."""
    x, y = sample_features(stats, spec.samples_per_class, derive_seed(seed, 0x5A3))
    labels = torch.unique(y)
    target = torch.searchsorted(labels, y)
    centre = x.mean(dim=0)
    scale = x.std(dim=0).clamp_min(1e-6)
    xs = (x - centre) / scale
    dim, classes = int(x.shape[1]), int(labels.numel())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, 0x5A4))
        model: nn.Module = (
            nn.Linear(dim, classes)
            if spec.hidden == 0
            else nn.Sequential(
                nn.Linear(dim, spec.hidden), nn.ReLU(), nn.Linear(spec.hidden, classes)
            )
        )
    optimiser = torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    generator = torch.Generator().manual_seed(derive_seed(seed, 0x5A5))
    model.train()
    for epoch in range(spec.epochs):
        order = torch.randperm(xs.shape[0], generator=generator)
        total = 0.0
        for i0 in range(0, xs.shape[0], spec.batch_size):
            batch = order[i0 : i0 + spec.batch_size]
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(xs[batch]), target[batch])
            loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
            optimiser.step()
            total += loss.item() * int(batch.numel())
        if (epoch + 1) % max(1, spec.epochs // 3) == 0 or epoch + 1 == spec.epochs:
            log.info(
                "sampled-feature classifier: epoch %d/%d, loss %.4f",
                epoch + 1,
                spec.epochs,
                total / xs.shape[0],
            )
    return SampledClassifier(model, labels, centre, scale)


def class_accuracy(
    predicted: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor
) -> tuple[float, dict[int, float]]:
    """Overall and per-class accuracy over the images whose label is in ``classes``."""
    mask = torch.isin(labels, classes)
    if not bool(mask.any()):
        raise ValueError("no test image belongs to a registered class")
    right = predicted[mask] == labels[mask]
    per_class = {
        int(c): float((predicted[labels == c] == c).double().mean())
        for c in sorted({int(v) for v in classes})
        if bool((labels == c).any())
    }
    return float(right.double().mean()), per_class
