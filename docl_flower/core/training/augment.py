"""Augmentation of training features: small random affine transforms of the images.

A leaf module (torch only), so that the registry of recipe components can hold it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from docl_flower.core.common.checks import check_int, check_number


@dataclass(frozen=True)
class RandomAffine:
    """Per-image random rotation, translation and scaling of spatial features.

    Applied to each training batch on the device, to the client's own images only.

    Parameters
    ----------
    image_shape : tuple of int
        ``(H, W)`` of the images the features are made from.
    degrees : float
        Maximum absolute rotation.
    translate : float
        Maximum absolute shift, in pixels.
    scale : float
        Maximum relative zoom (``0.1`` means 0.9 to 1.1).
    """

    image_shape: tuple[int, int]
    degrees: float = 10.0
    translate: float = 2.0
    scale: float = 0.1

    def __post_init__(self) -> None:
        shape = self.image_shape
        if not isinstance(shape, tuple | list) or len(shape) != 2:
            raise ValueError(f"image_shape must be (H, W), got {shape!r}")
        for side in shape:
            check_int("image_shape", side, minimum=1)
        check_number("degrees", self.degrees, minimum=0.0)
        check_number("translate", self.translate, minimum=0.0)
        if check_number("scale", self.scale, minimum=0.0) >= 1.0:
            raise ValueError(f"scale must be < 1, got {self.scale}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return augmented copies of ``x`` (shape ``(n, H*W)``), values kept in [0, 1]."""
        n = x.shape[0]
        h, w = self.image_shape

        def uniform(lo: float, hi: float) -> torch.Tensor:
            r = torch.rand(n, generator=generator, device=x.device if generator is None else "cpu")
            return (lo + (hi - lo) * r).to(x.device)

        angle = uniform(-self.degrees, self.degrees) * (math.pi / 180.0)
        zoom = uniform(1.0 - self.scale, 1.0 + self.scale)
        tx = uniform(-self.translate, self.translate) * (2.0 / w)
        ty = uniform(-self.translate, self.translate) * (2.0 / h)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1
        ).to(x.dtype)
        grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
        out = F.grid_sample(x.view(n, 1, h, w), grid, align_corners=False, padding_mode="zeros")
        return out.reshape(n, h * w).clamp_(0.0, 1.0)
