"""A feature extractor's raw output range and speed: the provider's scaling constants.

The extractors in :mod:`docl_flower.core.features.extractors` map their raw output to
``[0, 1]`` with fixed ``low``/``high`` constants. :func:`measure` reports the raw range
(minimum, maximum, percentiles) on the ORL faces and on MNIST test digits, the seconds per
image, and (faces) how many images had no detected face, so that the constants can be chosen
and documented.
"""

from __future__ import annotations

import gzip
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from docl_flower.core.pipeline.config import PROJECT_ROOT

EXTRACTORS = ("face", "imagenet", "resnet")
#: The ORL set: 40 people, 10 photos each (``sK/N.pgm``).
ORL_PEOPLE, ORL_PHOTOS = 40, 10
#: Quantiles are computed on at most this many values (``torch.quantile`` refuses more than
#: 16 million; an even sample of 5 million gives the same percentiles to 4 decimals).
QUANTILE_SAMPLE = 5_000_000
QUANTILES = (0.0, 0.001, 0.01, 0.5, 0.99, 0.999, 1.0)
#: IDX header: magic, then one 4-byte big-endian size per dimension (3 for images).
IDX_IMAGE_HEADER = 16


@dataclass(frozen=True)
class RangeSettings:
    """The command line of ``scripts/extractor_ranges.py``."""

    extractor: str
    orl: Path = PROJECT_ROOT / "data" / "att-faces"
    mnist_root: Path = PROJECT_ROOT / "data" / "mnist"
    #: MNIST test images to add (0: the faces only).
    mnist: int = 0
    #: ORL images to use (all 400).
    orl_count: int = ORL_PEOPLE * ORL_PHOTOS
    arch: str = "resnet18"
    #: ResNet weights: a file, or ``random``.
    weights: str = "random"


def read_pgm(path: Path) -> NDArray[np.uint8]:
    """A binary (P5) 8-bit PGM image as an ``(H, W)`` uint8 array."""
    data = path.read_bytes()
    match = re.match(rb"P5\s+(?:#.*\s+)*(\d+)\s+(\d+)\s+(\d+)\s", data)
    if match is None:
        raise ValueError(f"{path}: not a binary PGM file")
    w, h, maxval = (int(g) for g in match.groups())
    if maxval > 255:  # two bytes per pixel
        raise ValueError(f"{path}: 16-bit PGM is not supported")
    pixels = np.frombuffer(data, dtype=np.uint8, count=w * h, offset=match.end())
    return pixels.reshape(h, w).copy()


def load_orl(folder: Path) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """All ORL images ``(400, 112, 92)`` and their person labels (0-39)."""
    images, labels = [], []
    for person in range(1, ORL_PEOPLE + 1):
        for k in range(1, ORL_PHOTOS + 1):
            images.append(read_pgm(folder / f"s{person}" / f"{k}.pgm"))
            labels.append(person - 1)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_mnist(folder: Path, count: int) -> NDArray[np.uint8]:
    """The first ``count`` MNIST test images ``(count, 28, 28)``."""
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "rb") as handle:
        data = handle.read()
    # After the 4-byte magic: count, rows, columns, 4 bytes each.
    n, h, w = (int.from_bytes(data[i : i + 4], "big") for i in (4, 8, 12))
    images = np.frombuffer(data, dtype=np.uint8, offset=IDX_IMAGE_HEADER).reshape(n, h, w)
    return images[:count].copy()


def summarise(name: str, raw: torch.Tensor, seconds: float) -> str:
    """The raw range of ``raw`` ``(n, D)`` and the time per image, as printed lines."""
    x = raw.double()
    q = torch.quantile(
        x.flatten()[:: max(1, x.numel() // QUANTILE_SAMPLE)],
        torch.tensor(QUANTILES, dtype=torch.float64),
    )
    per_dim_min, per_dim_max = x.min(dim=0).values, x.max(dim=0).values
    return (
        f"{name}: n={x.shape[0]} D={x.shape[1]}  {seconds / max(1, x.shape[0]):.4f} s/image\n"
        f"  global min {x.min():.4f} max {x.max():.4f} mean {x.mean():.4f} std {x.std():.4f}\n"
        f"  quantiles 0/0.1/1/50/99/99.9/100%: "
        + " ".join(f"{v:.4f}" for v in q.tolist())
        + f"\n  per-dimension min: {per_dim_min.min():.4f}..{per_dim_min.max():.4f}; "
        f"max: {per_dim_max.min():.4f}..{per_dim_max.max():.4f}"
    )


#: An extractor's raw output of images, and how many had no face (None: not a face model).
Extract = Callable[[NDArray[np.uint8]], tuple[torch.Tensor, int | None]]


def raw_extractor(settings: RangeSettings) -> Extract:
    """The extractor of ``settings`` as an :data:`Extract`."""
    from docl_flower.core.features.extractors import (
        EfficientNetLite0,
        FaceDescriptor,
        ResNetFeatures,
    )

    if settings.extractor == "face":
        face = FaceDescriptor()

        def faces(images: NDArray[np.uint8]) -> tuple[torch.Tensor, int | None]:
            raw, no_face = face.raw(images)
            return raw, int(no_face.sum())

        return faces
    if settings.extractor == "imagenet":
        net: EfficientNetLite0 | ResNetFeatures = EfficientNetLite0()
    elif settings.extractor == "resnet":
        net = ResNetFeatures(arch=settings.arch, weights=settings.weights)
    else:
        raise ValueError(f"extractor {settings.extractor!r}: one of {EXTRACTORS}")
    return lambda images: (net.raw(images), None)


def measure(settings: RangeSettings, extract: Extract | None = None) -> list[str]:
    """The printed lines of each image set (ORL, and MNIST when asked) under the extractor.

    ``extract`` (default: :func:`raw_extractor`) runs once on one image before the timing, so
    that loading its models is not counted.
    """
    sets: dict[str, NDArray[np.uint8]] = {"ORL": load_orl(settings.orl)[0][: settings.orl_count]}
    if settings.mnist:
        sets["MNIST"] = load_mnist(settings.mnist_root, settings.mnist)
    extract = extract or raw_extractor(settings)
    out = []
    for name, images in sets.items():
        extract(images[:1])  # load the models outside the timing
        start = time.perf_counter()
        raw, no_face = extract(images)
        seconds = time.perf_counter() - start
        if no_face is not None:
            out.append(f"{name}: no face detected in {no_face} of {len(images)} images")
        out.append(summarise(f"{settings.extractor} on {name}", raw, seconds))
    return out
