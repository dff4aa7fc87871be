"""Feature extractors: the provider-owned stage that maps images to features in [0, 1].

The paper feeds raw MNIST pixels to the autoencoders and ResNet features for natural images.
Every extractor is selected through the Hydra ``features`` group and must return float32
features in ``[0, 1]`` (the decoder ends in a sigmoid).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray


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
