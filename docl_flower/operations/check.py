"""``docl-flower filter check``: block or share image files with a saved filter (no Flower).

    docl-flower filter check FILTER_DIR --uploader USER [--alpha A] [--guard paper|strict] PATH...

PATH is an image file (PNG, JPEG, PGM, ...) or a folder of them. Images are read as grey,
resized to the data set's image size, passed through the feature extractor the filter was
built with, and scored by every registered autoencoder.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.features import FeatureExtractor
from ..core.filter import GUARDS, GlobalFilter
from ..core.registry import build
from ..core.store import load_filter

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".pgm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def collect(paths: Sequence[Path]) -> list[Path]:
    """Image files named directly or found (non-recursively) in named folders, sorted."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


def load_images(files: Sequence[Path], size: tuple[int, int]) -> np.ndarray:
    """``(n, H, W)`` uint8 grey images."""
    out = []
    for f in files:
        with Image.open(f) as img:
            grey = img.convert("L")
            if grey.size != (size[1], size[0]):
                grey = grey.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            out.append(np.asarray(grey, dtype=np.uint8))
    return np.stack(out)


def main(argv: Sequence[str]) -> int:
    """Entry point of ``docl-flower filter check``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="docl-flower filter check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("filter", type=Path, help="folder written by a run (RUN_DIR/filter)")
    parser.add_argument("paths", type=Path, nargs="+", help="image files or folders")
    parser.add_argument(
        "--uploader", type=int, required=True, help="user id of the uploader (-1: a third party)"
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="Guard alpha (default: the one the filter was run with)",
    )
    parser.add_argument("--guard", choices=sorted(GUARDS), default="paper")
    parser.add_argument("--image-size", type=int, nargs=2, default=(28, 28), metavar=("H", "W"))
    args = parser.parse_args(list(argv))
    try:
        regs, meta = load_filter(args.filter)
        files = collect(args.paths)
    except (OSError, ValueError) as err:
        print(f"docl-flower filter check: {err}", file=sys.stderr)
        return 2
    if not files:
        print("docl-flower filter check: no image files found", file=sys.stderr)
        return 2
    config = meta.get("config", {})
    try:
        features = build("features", config["features"])
    except (KeyError, TypeError, ValueError) as err:
        print(
            f"docl-flower filter check: {args.filter}: no usable extractor ({err})", file=sys.stderr
        )
        return 2
    if not isinstance(features, FeatureExtractor):
        print(f"docl-flower filter check: {args.filter}: not a feature extractor", file=sys.stderr)
        return 2
    alpha = (
        args.alpha if args.alpha is not None else float(config.get("guard", {}).get("alpha", 1.5))
    )
    guard = GUARDS[args.guard](alpha)
    flt = GlobalFilter(regs)
    x = features(load_images(files, tuple(args.image_size)))
    scores = flt.scores(x)
    idx, dmin = flt.predict(scores)
    block = guard.block(flt, scores, args.uploader)
    print(
        f"filter: {len(regs)} autoencoders; guard {args.guard}, alpha {alpha}; "
        f"uploader {args.uploader}"
    )
    print("image\tpredicted_owner\tpredicted_class\tscore\tinterval\tdecision")
    for f, i, d, b in zip(files, idx.tolist(), dmin.tolist(), block.tolist(), strict=True):
        reg = regs[i]
        lo, hi = reg.err_mean - alpha * reg.err_std, reg.err_mean + alpha * reg.err_std
        print(
            f"{f}\t{reg.user_id}\t{reg.label}\t{d:.3f}\t[{lo:.3f}, {hi:.3f}]\t"
            f"{'block' if b else 'share'}"
        )
    return 0
