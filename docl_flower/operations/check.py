"""``docl-flower filter check``: block or share image files with a saved filter (no Flower).

    docl-flower filter check FILTER_DIR --uploader USER [--alpha A] [--guard paper|strict] PATH...

PATH is an image file (PNG, JPEG, PGM, ...) or a folder of them. Images are read as grey,
resized to the data set's image size, passed through the feature extractor the filter was
built with, and scored by every registered autoencoder.

A file that cannot be read as an image gets one error line (on stderr) and the other images
are still decided. Every file is treated as hostile (see :mod:`docl_flower.core.data.decode`): a
FIFO, device or folder with an image name is refused unopened, a file over 64 MiB or 64
megapixels is refused, and each file is decoded in a worker process that is replaced when a
file crashes it or takes longer than 15 s, so no file can stop the others from being decided.
Exit status: 0 when every file was decided, 1 when some file could not be read, 2 for bad
arguments or a filter that cannot be used.

Loading the filter and deciding live in :mod:`.deciding`, shared with ``docl-flower filter
serve``, which decides the same files with the same scores, bit for bit.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from docl_flower.core.data.folders import read_image
from docl_flower.core.filter.global_filter import GUARDS
from docl_flower.core.filter.store import META_FILE, load_filter

from .deciding import FilterError, decide, load, one_line

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".pgm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
PROG = "docl-flower filter check"

EXIT_OK = 0
EXIT_FILE_ERRORS = 1
EXIT_USAGE = 2


def collect(paths: Sequence[Path]) -> list[Path]:
    """Image files named directly or found (non-recursively) in named folders, sorted.

    A named path that does not exist, and a folder entry with an image suffix that is not a
    regular file (a dangling link, a FIFO, a folder), are kept: reading them fails, for that
    file alone. Raises OSError for a named folder that cannot be listed.
    """
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(p)
    return files


def shown(path: Path) -> str:
    """``path`` as printed, on one line and printable in any locale.

    A name with control characters (a newline, say) or bytes that are no valid text gets
    them escaped; other names are printed as they are.
    """
    text = str(path)
    if text.isprintable():
        return text
    return text.encode("unicode_escape", "backslashreplace").decode("ascii")


def load_image(path: Path, shape: Sequence[int]) -> NDArray[np.uint8]:
    """One image as the filter's data set holds them: ``(H, W)`` grey or ``(H, W, 3)`` RGB.

    EXIF orientation applied, 16-bit and palette images converted exactly as the data set
    loader does, in the decoding worker; raises
    :class:`~docl_flower.core.data.decode.ImageReadError` if unreadable.
    """
    mode = "RGB" if len(shape) == 3 else "L"
    return read_image(path, mode, (int(shape[0]), int(shape[1])))


def load_images(files: Sequence[Path], shape: Sequence[int]) -> NDArray[np.uint8]:
    """Stacked images (raises for the first unreadable file)."""
    return np.stack([load_image(f, shape) for f in files])


def _alpha(text: str) -> float:
    """Argparse type of ``--alpha``: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _user_id(text: str) -> int:
    """Argparse type of ``--uploader``: a user id, or -1 for a third party."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a user id (an integer >= -1), got {text!r}"
        ) from None
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be a user id (an integer >= -1), got {text!r}")
    return value


def _side(text: str) -> int:
    """Argparse type of ``--image-size``: a positive number of pixels."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _filter_dir(text: str) -> Path:
    """Argparse type of FILTER_DIR: an existing folder that holds a ``filter.json``."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    if not (path / META_FILE).is_file():
        raise argparse.ArgumentTypeError(f"{text}: not a saved filter (no {META_FILE})")
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("filter", type=_filter_dir, help="folder written by a run (RUN_DIR/filter)")
    parser.add_argument("paths", type=Path, nargs="+", help="image files or folders")
    parser.add_argument(
        "--uploader",
        type=_user_id,
        required=True,
        help="user id of the uploader (-1: a third party)",
    )
    parser.add_argument(
        "--alpha",
        type=_alpha,
        default=None,
        help=(
            "Guard alpha, a finite number > 0 (default: the one the run calibrated to its "
            "target acceptance, else the one it was run with)"
        ),
    )
    parser.add_argument("--guard", choices=sorted(GUARDS), default="paper")
    parser.add_argument(
        "--image-size",
        type=_side,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="resize to H x W (default: the image shape of the filter's data set)",
    )
    return parser


def main(argv: Sequence[str]) -> int:
    """Entry point of ``docl-flower filter check``; returns the exit code.

    Bad arguments make argparse print the usage and exit with status 2.
    """
    args = _parser().parse_args(list(argv))
    try:
        # check's own name for the reader, so that a test can stand in for it
        loaded = load(args.filter, args.guard, args.alpha, read=load_filter)
    except (FilterError, ValueError) as err:
        print(f"{PROG}: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        files = collect(args.paths)
    except OSError as err:  # a named folder that cannot be listed
        where = shown(Path(err.filename)) if err.filename else "a folder"
        print(f"{PROG}: {where}: cannot list ({err.strerror or one_line(err)})", file=sys.stderr)
        return EXIT_USAGE
    if not files:
        print(f"{PROG}: no image files found", file=sys.stderr)
        return EXIT_USAGE
    shape = list(loaded.image_shape) if loaded.image_shape is not None else None
    if args.image_size is not None:
        shape = [int(args.image_size[0]), int(args.image_size[1]), *(shape or [])[2:]]
    if shape is None:
        print(
            f"{PROG}: {args.filter}: no dataset.image_shape in its config: pass --image-size",
            file=sys.stderr,
        )
        return EXIT_USAGE
    decided: list[Path] = []
    images: list[NDArray[np.uint8]] = []
    failed = 0
    for f in files:
        try:
            images.append(load_image(f, shape))
            decided.append(f)
        except Exception as err:  # whatever one file makes the decoder do is that file's error
            failed += 1
            print(f"{PROG}: {shown(f)}: cannot read image ({one_line(err)})", file=sys.stderr)
    rows: list[str] = []
    if decided:
        try:
            decisions = decide(loaded, np.stack(images), args.uploader)
        except ValueError as err:  # --image-size gives features of another size
            print(f"{PROG}: {args.filter}: {one_line(err)} (check --image-size)", file=sys.stderr)
            return EXIT_USAGE
        for f, d in zip(decided, decisions, strict=True):
            rows.append(
                f"{shown(f)}\t{d.owner}\t{d.label}\t{d.score:.3f}\t[{d.low:.3f}, {d.high:.3f}]\t"
                f"{d.decision}"
            )
    print(
        f"filter: {loaded.size} autoencoders; guard {args.guard} ({loaded.guard.sided}-sided), "
        f"alpha {loaded.alpha}; "
        f"uploader {args.uploader}"
    )
    print("image\tpredicted_owner\tpredicted_class\tscore\tinterval\tdecision")
    for row in rows:
        print(row)
    return EXIT_FILE_ERRORS if failed else EXIT_OK
