"""Feature extractors: the provider-owned stage that maps images to features in [0, 1].

The paper feeds raw MNIST pixels to the autoencoders and ResNet features for natural images.
Every extractor is selected through the Hydra ``features`` group and must return float32
features in ``[0, 1]`` (the decoder ends in a sigmoid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray


@runtime_checkable
class FeatureExtractor(Protocol):
    """What every extractor offers: images to ``(n, D)`` float32 features in ``[0, 1]``."""

    def __call__(self, images: NDArray[np.uint8] | torch.Tensor) -> torch.Tensor:
        """Extract features."""
        ...

    def dim(self, image_shape: tuple[int, ...]) -> int:
        """Feature dimension D."""
        ...

    @property
    def spatial(self) -> bool:
        """Whether features keep the image layout."""
        ...


@dataclass(frozen=True)
class Identity:
    """Raw pixels scaled to ``[0, 1]`` and flattened (D = 784 for MNIST)."""

    def __call__(self, images: NDArray[np.uint8] | torch.Tensor) -> torch.Tensor:
        """Map ``(n, H, W)`` uint8 images to ``(n, H*W)`` float32 features."""
        x = (
            torch.from_numpy(np.array(images, copy=True))
            if isinstance(images, np.ndarray)
            else images
        )
        return x.reshape(x.shape[0], -1).to(torch.float32).div_(255.0)

    def dim(self, image_shape: tuple[int, ...]) -> int:
        """Feature dimension D for images of the given shape."""
        return int(np.prod(image_shape))

    @property
    def spatial(self) -> bool:
        """Whether features keep the image layout (so image augmentations apply)."""
        return True


@dataclass(frozen=True)
class Deskew:
    """Moment-based deskewing of digit images, then pixels in ``[0, 1]`` (D = H*W).

    A classic, parameter-free MNIST preprocessing: each image is sheared so that the
    covariance of its row and column coordinates (weighted by intensity) vanishes, and
    shifted so that its centre of mass lies at the image centre. Deterministic and the same
    for everyone (provider-owned, like the paper's ResNet), so clients and the server
    compute identical features.

    Parameters
    ----------
    chunk : int
        Images processed at once (bounds memory).
    """

    chunk: int = 8192

    def __call__(self, images: NDArray[np.uint8] | torch.Tensor) -> torch.Tensor:
        """Map ``(n, H, W)`` uint8 images to deskewed ``(n, H*W)`` float32 features."""
        x = torch.as_tensor(
            np.array(images, copy=True) if isinstance(images, np.ndarray) else images
        )
        x = x.to(torch.float32).div_(255.0)
        return torch.cat([self._deskew(part) for part in torch.split(x, self.chunk)]).reshape(
            x.shape[0], -1
        )

    @staticmethod
    def _deskew(img: torch.Tensor) -> torch.Tensor:
        n, h, w = img.shape
        rows = torch.arange(h, dtype=torch.float32)[None, :, None]
        cols = torch.arange(w, dtype=torch.float32)[None, None, :]
        mass = img.sum(dim=(1, 2)).clamp_min(1e-6)
        r0 = (img * rows).sum(dim=(1, 2)) / mass
        c0 = (img * cols).sum(dim=(1, 2)) / mass
        dr = rows - r0[:, None, None]
        var_r = (img * dr**2).sum(dim=(1, 2)) / mass
        cov = (img * dr * (cols - c0[:, None, None])).sum(dim=(1, 2)) / mass
        shear = cov / var_r.clamp_min(1e-6)
        # Output (x, y) in normalised coordinates samples the input at
        # x_in = x + shear * y + cx, y_in = y + cy: centred and sheared about the centre of mass.
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = 1.0
        theta[:, 0, 1] = shear * (h / w)
        theta[:, 1, 1] = 1.0
        theta[:, 0, 2] = (2 * c0 + 1) / w - 1
        theta[:, 1, 2] = (2 * r0 + 1) / h - 1
        grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
        out = F.grid_sample(img[:, None], grid, align_corners=False, padding_mode="zeros")
        return out[:, 0].clamp_(0.0, 1.0)

    def dim(self, image_shape: tuple[int, ...]) -> int:
        """Feature dimension D for images of the given shape."""
        return int(np.prod(image_shape))

    @property
    def spatial(self) -> bool:
        """Whether features keep the image layout (so image augmentations apply)."""
        return True


#: Feature extractors by the name a config's ``_target_`` gives (see :mod:`.registry`).
EXTRACTORS: dict[str, type[FeatureExtractor]] = {
    "docl_flower.core.features.Identity": Identity,
    "docl_flower.core.features.Deskew": Deskew,
}
