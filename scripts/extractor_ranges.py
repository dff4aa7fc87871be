"""Measure a feature extractor's raw output range and speed: the provider's scaling constants.

The extractors in :mod:`docl_flower.core.features.extractors` map their raw output to
``[0, 1]`` with fixed ``low``/``high`` constants. This script prints the raw range (minimum,
maximum, percentiles) on the ORL faces and on MNIST test digits, the seconds per image, and (faces)
how many images had no detected face, so that the constants can be chosen and documented.

Usage::

    python scripts/extractor_ranges.py face
    python scripts/extractor_ranges.py imagenet --mnist 2000
    python scripts/extractor_ranges.py resnet --weights /path/to/resnet18.pth --arch resnet18
"""

from __future__ import annotations

import argparse
import gzip
import re
import time
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from docl_flower.core.features.extractors import EfficientNetLite0, FaceDescriptor, ResNetFeatures

ROOT = Path(__file__).resolve().parent.parent


def read_pgm(path: Path) -> NDArray[np.uint8]:
    """A binary (P5) 8-bit PGM image as an ``(H, W)`` uint8 array."""
    data = path.read_bytes()
    match = re.match(rb"P5\s+(?:#.*\s+)*(\d+)\s+(\d+)\s+(\d+)\s", data)
    if match is None:
        raise ValueError(f"{path}: not a binary PGM file")
    w, h, maxval = (int(g) for g in match.groups())
    if maxval > 255:
        raise ValueError(f"{path}: 16-bit PGM is not supported")
    pixels = np.frombuffer(data, dtype=np.uint8, count=w * h, offset=match.end())
    return pixels.reshape(h, w).copy()


def load_orl(folder: Path) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """All ORL images ``(400, 112, 92)`` and their person labels (0-39)."""
    images, labels = [], []
    for person in range(1, 41):
        for k in range(1, 11):
            images.append(read_pgm(folder / f"s{person}" / f"{k}.pgm"))
            labels.append(person - 1)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_mnist(folder: Path, count: int) -> NDArray[np.uint8]:
    """The first ``count`` MNIST test images ``(count, 28, 28)``."""
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "rb") as handle:
        data = handle.read()
    n, h, w = (int.from_bytes(data[i : i + 4], "big") for i in (4, 8, 12))
    images = np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, h, w)
    return images[:count].copy()


def summarise(name: str, raw: torch.Tensor, seconds: float) -> None:
    """Print the raw range of ``raw`` ``(n, D)`` and the time per image."""
    x = raw.double()
    q = torch.quantile(
        x.flatten()[:: max(1, x.numel() // 5_000_000)],
        torch.tensor([0.0, 0.001, 0.01, 0.5, 0.99, 0.999, 1.0], dtype=torch.float64),
    )
    per_dim_min, per_dim_max = x.min(dim=0).values, x.max(dim=0).values
    print(
        f"{name}: n={x.shape[0]} D={x.shape[1]}  {seconds / max(1, x.shape[0]):.4f} s/image\n"
        f"  global min {x.min():.4f} max {x.max():.4f} mean {x.mean():.4f} std {x.std():.4f}\n"
        f"  quantiles 0/0.1/1/50/99/99.9/100%: "
        + " ".join(f"{v:.4f}" for v in q.tolist())
        + f"\n  per-dimension min: {per_dim_min.min():.4f}..{per_dim_min.max():.4f}; "
        f"max: {per_dim_max.min():.4f}..{per_dim_max.max():.4f}"
    )


def main() -> None:
    """Parse arguments and print the statistics."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("extractor", choices=["face", "imagenet", "resnet"])
    parser.add_argument("--orl", type=Path, default=ROOT / "data" / "att-faces")
    parser.add_argument("--mnist-root", type=Path, default=ROOT / "data" / "mnist")
    parser.add_argument("--mnist", type=int, default=0, help="MNIST test images to add")
    parser.add_argument("--orl-count", type=int, default=400, help="ORL images to use")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--weights", default="random", help="resnet weights")
    args = parser.parse_args()

    sets: dict[str, NDArray[np.uint8]] = {"ORL": load_orl(args.orl)[0][: args.orl_count]}
    if args.mnist:
        sets["MNIST"] = load_mnist(args.mnist_root, args.mnist)
    for name, images in sets.items():
        start = time.perf_counter()
        if args.extractor == "face":
            face = FaceDescriptor()
            face.raw(images[:1])  # load the models outside the timing
            start = time.perf_counter()
            raw, no_face = face.raw(images)
            print(f"{name}: no face detected in {int(no_face.sum())} of {len(images)} images")
        elif args.extractor == "imagenet":
            net = EfficientNetLite0()
            net.raw(images[:1])
            start = time.perf_counter()
            raw = net.raw(images)
        else:
            res = ResNetFeatures(arch=args.arch, weights=args.weights)
            res.raw(images[:1])
            start = time.perf_counter()
            raw = res.raw(images)
        summarise(f"{args.extractor} on {name}", raw, time.perf_counter() - start)


if __name__ == "__main__":
    main()
