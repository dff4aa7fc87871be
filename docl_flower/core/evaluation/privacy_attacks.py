"""What the server can learn about a user's images from the user's upload (no Flower).

An upload is an autoencoder trained only on the user's private images, plus ``mu`` and
``sigma`` of its reconstruction errors. Two attacks that the service provider can run with
the saved filter and data it owns, and the numbers that measure them:

* **Inversion** (:func:`invert`): gradient descent on the *input* of one uploaded autoencoder
  to minimise its reconstruction error (eq. 6), from seeded public starting points, in one of
  two search spaces: ``"prior"`` searches the span of the leading principal components of the
  provider's public features (:class:`PublicPrior`, a linear stand-in for the generative
  models of public data used by model-inversion attacks); ``"pixels"`` searches the whole
  feature space from uniform noise, clamped to ``[0, 1]`` after each step. Then, optionally,
  ``x <- AE(x)`` is iterated towards a fixed point. Several restarts per autoencoder.
  What was recovered is scored by who it shows: :class:`NearestNeighbours` trained on public
  labelled features names its class (digits), :func:`identification_ranks` ranks the people
  of a gallery by their distance to the recovered template (faces).
  Whether it recovered the user's own images rather than their class:
  :func:`nearest_is_member` (is the nearest of as many training images as other images of the
  class a training image?).
* **Membership inference** (:func:`membership_auroc`): the server scores candidate images by
  the uploaded autoencoder's reconstruction error (lower: more likely a training image) and
  is measured by the AUROC of members (the user's training images) against non-members
  (other images of the same class or person).

Everything here is deterministic for a seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from docl_flower.core.common.checks import check_int, check_number
from docl_flower.core.evaluation.metrics import auroc
from docl_flower.core.training.autoencoder import PARAM_NAMES, Autoencoder, AutoencoderSpec

#: Values of :attr:`InversionSpec.space`.
SPACES = ("prior", "pixels")


def frozen_autoencoder(params: Mapping[str, NDArray[np.float32]]) -> Autoencoder:
    """The autoencoder of an upload's four tensors, in eval mode, without gradients.

    Parameters
    ----------
    params : mapping
        ``encoder.weight`` (M, D), ``encoder.bias``, ``decoder.weight`` (D, M),
        ``decoder.bias`` (as in :class:`~docl_flower.core.filter.global_filter.Registration`).
    """
    hidden, dim = (int(s) for s in np.shape(params["encoder.weight"]))
    model = Autoencoder(dim, AutoencoderSpec(hidden=hidden))
    model.load_state_dict(
        {name: torch.as_tensor(np.asarray(params[name], dtype=np.float32)) for name in PARAM_NAMES}
    )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def dissimilarity(model: Autoencoder, x: torch.Tensor) -> torch.Tensor:
    """Eq. 6 for every row of ``x``, differentiable in ``x``: ``sum_l (x_l - AE(x)_l)^2``."""
    out: torch.Tensor = ((model(x) - x) ** 2).sum(dim=1)
    return out


@dataclass(frozen=True)
class PublicPrior:
    """A Gaussian over the span of the leading principal components of public features.

    ``decode(z) = clamp(mean + (z * scale) @ basis, 0, 1)``: ``z ~ N(0, I)`` gives features
    with the public data's mean and leading variances. Built from data the provider owns.

    Parameters
    ----------
    mean : torch.Tensor
        ``(D,)`` mean of the public features.
    basis : torch.Tensor
        ``(k, D)`` orthonormal principal directions.
    scale : torch.Tensor
        ``(k,)`` standard deviation of the public features along each direction.
    """

    mean: torch.Tensor
    basis: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def from_features(cls, x: torch.Tensor, components: int) -> PublicPrior:
        """PCA of ``x`` (``(n, D)``, n >= 2), keeping at most ``components`` directions."""
        check_int("components", components, minimum=1)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"need at least 2 public feature rows, got shape {tuple(x.shape)}")
        data = x.to(torch.float32)
        mean = data.mean(dim=0)
        _, s, vh = torch.linalg.svd(data - mean, full_matrices=False)
        k = min(components, int(vh.shape[0]))
        return cls(mean, vh[:k].contiguous(), s[:k] / math.sqrt(data.shape[0] - 1))

    @property
    def components(self) -> int:
        """Number k of directions."""
        return int(self.basis.shape[0])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Features of codes ``z`` (``(n, k)``), clamped to ``[0, 1]``."""
        return (self.mean + (z * self.scale) @ self.basis).clamp(0.0, 1.0)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` codes drawn from ``N(0, I)``."""
        return torch.randn(n, self.components, generator=generator)


@dataclass(frozen=True)
class InversionSpec:
    """How :func:`invert` searches for the inputs an autoencoder reconstructs best.

    Parameters
    ----------
    space : str
        ``"prior"``: codes of a :class:`PublicPrior`, started from its samples;
        ``"pixels"``: the features themselves, started from uniform noise, clamped to
        ``[0, 1]`` after every step.
    steps : int
        Adam steps on the input (or code).
    lr : float
        Adam's learning rate.
    restarts : int
        Independent starting points per autoencoder.
    fixed_point_steps : int
        Iterations of ``x <- AE(x)`` after the descent (0: none).
    seed : int
        Seed of the starting points (combine with the user with :func:`derive_seed`).
    """

    space: str = "prior"
    steps: int = 500
    lr: float = 0.05
    restarts: int = 16
    fixed_point_steps: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {list(SPACES)}, got {self.space!r}")
        check_int("steps", self.steps, minimum=0)
        check_number("lr", self.lr, above=0.0)
        check_int("restarts", self.restarts, minimum=1)
        check_int("fixed_point_steps", self.fixed_point_steps, minimum=0)
        check_int("seed", self.seed, minimum=0)


def invert(
    model: Autoencoder, spec: InversionSpec, prior: PublicPrior | None = None
) -> torch.Tensor:
    """Inputs that ``model`` reconstructs best, found without any of its training data.

    Parameters
    ----------
    model : Autoencoder
        An uploaded autoencoder (see :func:`frozen_autoencoder`).
    spec : InversionSpec
        Search space, steps, restarts, seed.
    prior : PublicPrior, optional
        Needed for ``space="prior"``; it must have the autoencoder's input dimension.

    Returns
    -------
    torch.Tensor
        ``(restarts, D)`` recovered features in ``[0, 1]``.
    """
    dim = int(model.encoder.in_features)
    gen = torch.Generator().manual_seed(spec.seed)
    if spec.space == "prior":
        if prior is None:
            raise ValueError("space='prior' needs a PublicPrior")
        if int(prior.mean.shape[0]) != dim:
            raise ValueError(f"the prior has dimension {prior.mean.shape[0]}, the model {dim}")
        z = prior.sample(spec.restarts, gen).requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=spec.lr)
        for _ in range(spec.steps):
            loss = dissimilarity(model, prior.decode(z)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
            optimizer.step()
        x = prior.decode(z.detach())
    else:
        x = torch.rand(spec.restarts, dim, generator=gen).requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=spec.lr)
        for _ in range(spec.steps):
            loss = dissimilarity(model, x).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            with torch.no_grad():
                x.clamp_(0.0, 1.0)
        x = x.detach()
    with torch.no_grad():
        for _ in range(spec.fixed_point_steps):
            x = model(x)
    return x


class NearestNeighbours:
    """A k-nearest-neighbour classifier (Euclidean, majority vote, ties to the nearest).

    Trained on public labelled features only; it names the class of recovered inputs.

    Parameters
    ----------
    x, y : torch.Tensor
        ``(n, D)`` reference features and their ``(n,)`` integer labels.
    k : int
        Neighbours that vote.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, k: int = 5) -> None:
        check_int("k", k, minimum=1)
        if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < k:
            raise ValueError(f"need (n, D) features with n >= k = {k} labels")
        self.x = x.to(torch.float32)
        self.y = y.to(torch.int64)
        self.k = k

    def predict(self, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """Predicted label of each row of ``x``."""
        out = []
        classes = int(self.y.max()) + 1
        for part in torch.split(x.to(torch.float32), chunk):
            dist, idx = torch.cdist(part, self.x).topk(self.k, largest=False)
            labels = self.y[idx]
            votes = torch.zeros(part.shape[0], classes).scatter_add_(
                1, labels, torch.ones_like(dist)
            )
            # Ties go to the class of the nearer neighbours: subtract a tiny rank term.
            votes.scatter_add_(1, labels, -1e-3 * torch.arange(self.k).expand_as(dist) / self.k)
            out.append(votes.argmax(dim=1))
        return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Fraction of ``x`` classified as ``y``."""
        return float((self.predict(x) == y.to(torch.int64)).double().mean())


def identification_ranks(
    templates: torch.Tensor,
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
    owner: int,
    candidates: Sequence[int] | None = None,
) -> tuple[list[int], dict[int, list[float]]]:
    """Rank of ``owner`` among the gallery's people, by distance to each template.

    A person's distance to a template is the mean Euclidean distance of the template to that
    person's gallery features. Rank 0 means the template is closest to ``owner``
    (identified, top-1).

    Parameters
    ----------
    templates : torch.Tensor
        ``(r, D)`` recovered features.
    gallery, gallery_labels : torch.Tensor
        ``(G, D)`` features of known people and their ``(G,)`` person labels.
    owner : int
        The person whose autoencoder was inverted (must be in the gallery).
    candidates : sequence of int, optional
        The people to rank (default: every person in the gallery); must contain ``owner``.

    Returns
    -------
    tuple
        The rank of ``owner`` for each template, and per candidate its distance to each
        template.
    """
    people = (
        sorted({int(v) for v in gallery_labels.tolist()})
        if candidates is None
        else [int(c) for c in candidates]
    )
    if owner not in people:
        raise ValueError(f"the owner {owner} is not among the candidates")
    dist = torch.cdist(templates.to(torch.float32), gallery.to(torch.float32))
    per_person: dict[int, list[float]] = {}
    for p in people:
        mask = gallery_labels == p
        if not bool(mask.any()):
            raise ValueError(f"person {p} has no gallery features")
        per_person[p] = dist[:, mask].mean(dim=1).tolist()
    ranks = []
    for i in range(templates.shape[0]):
        own = per_person[owner][i]
        ranks.append(sum(1 for p in people if p != owner and per_person[p][i] < own))
    return ranks, per_person


def membership_auroc(
    member_errors: NDArray[np.floating] | torch.Tensor,
    nonmember_errors: NDArray[np.floating] | torch.Tensor,
) -> float:
    """AUROC of telling members from non-members by reconstruction error (lower: member).

    1.0: every training image has a lower error than every other image of its class; 0.5:
    the errors tell nothing; ties count one half.
    """
    members = -np.asarray(member_errors, dtype=np.float64)
    others = -np.asarray(nonmember_errors, dtype=np.float64)
    return auroc(others, members)


def nearest_is_member(
    recovered: torch.Tensor,
    members: torch.Tensor,
    others: torch.Tensor,
    generator: torch.Generator,
) -> float:
    """Fraction of recovered inputs whose nearest image is a training image (0.5: no preference).

    Balanced: as many training images (``members``) as other images of the same class
    (``others``) are drawn (``min`` of the two counts, without replacement), so 0.5 means the
    recovered inputs are no closer to the user's own images than to the class; 1.0 means each
    one lies next to a training image (memorised).
    """
    m = min(int(members.shape[0]), int(others.shape[0]))
    if m == 0 or recovered.shape[0] == 0:
        raise ValueError("need recovered inputs, members and others")
    pick_m = torch.randperm(int(members.shape[0]), generator=generator)[:m]
    pick_o = torch.randperm(int(others.shape[0]), generator=generator)[:m]
    pool = torch.cat([members[pick_m], others[pick_o]]).to(torch.float32)
    nearest = torch.cdist(recovered.to(torch.float32), pool).argmin(dim=1)
    return float((nearest < m).double().mean())
