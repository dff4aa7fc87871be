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
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from safetensors import SafetensorError

from docl_flower.core.data.folders import read_image
from docl_flower.core.features.extractors import FeatureExtractor
from docl_flower.core.filter.global_filter import GUARDS, GlobalFilter, Guard, Registration
from docl_flower.core.filter.store import META_FILE, load_filter
from docl_flower.core.pipeline.components import build

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".pgm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
PROG = "docl-flower filter check"

EXIT_OK = 0
EXIT_FILE_ERRORS = 1
EXIT_USAGE = 2


class FilterError(Exception):
    """The filter folder cannot be used (the message names the folder)."""


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


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _saved_alpha(meta: object, guard_name: str, sided: str) -> float | None:
    """The alpha the run calibrated for this Guard rule (``guard.target_acceptance``), if any."""
    cal = meta.get("calibration") if isinstance(meta, dict) else None
    if not isinstance(cal, dict) or (cal.get("guard"), cal.get("sided")) != (guard_name, sided):
        return None
    alpha = cal.get("alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise ValueError(f"calibration alpha must be a number, got {alpha!r}")
    return float(alpha)


def _load(
    folder: Path, guard_name: str, alpha: float | None
) -> tuple[list[Registration], FeatureExtractor, Guard, float, list[int] | None]:
    """The filter's autoencoders, its feature extractor and the Guard; raises FilterError."""
    try:
        regs, meta = load_filter(folder)
    except FileNotFoundError as err:
        raise FilterError(f"{folder}: not a saved filter ({err.filename} is missing)") from err
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        text = _one_line(err).removeprefix(f"{folder}: ")
        raise FilterError(f"{folder}: cannot read the filter ({text})") from err
    config = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(config, dict):
        config = {}
    try:
        features = build("features", config["features"])
    except (KeyError, TypeError, ValueError) as err:
        raise FilterError(f"{folder}: no usable extractor ({_one_line(err)})") from err
    if not isinstance(features, FeatureExtractor):
        raise FilterError(f"{folder}: not a feature extractor")
    try:
        guard_cfg = config.get("guard", {})
        guard_cfg = guard_cfg if isinstance(guard_cfg, dict) else {}
        sided = str(guard_cfg.get("sided", "two"))
        if alpha is None:
            alpha = _saved_alpha(meta, guard_name, sided)
        if alpha is None:
            alpha = float(guard_cfg.get("alpha", 1.5))
        guard = GUARDS[guard_name](alpha, sided)
        # The loosest alpha whose blocking region the upload check judged (a filter saved
        # before max_alpha existed was judged at its own alpha only).
        limit = float(guard_cfg.get("max_alpha") or guard_cfg.get("alpha") or 1.5)
    except (TypeError, ValueError) as err:
        raise FilterError(f"{folder}: the filter's guard {_one_line(err)}") from err
    if not alpha <= limit:
        raise FilterError(
            f"{folder}: alpha {alpha:g} is looser than this filter allows (max_alpha "
            f"{limit:g}: its uploads were checked for what a Guard up to that alpha can block)"
        )
    dataset = config.get("dataset")
    raw = dataset.get("image_shape") if isinstance(dataset, dict) else None
    shape: list[int] | None = None
    if isinstance(raw, list) and len(raw) in (2, 3):
        sides = [s for s in raw if isinstance(s, int) and not isinstance(s, bool) and s > 0]
        shape = sides if len(sides) == len(raw) else None
    return regs, features, guard, alpha, shape


def main(argv: Sequence[str]) -> int:
    """Entry point of ``docl-flower filter check``; returns the exit code.

    Bad arguments make argparse print the usage and exit with status 2.
    """
    args = _parser().parse_args(list(argv))
    try:
        regs, features, guard, alpha, shape = _load(args.filter, args.guard, args.alpha)
        flt = GlobalFilter(regs)
    except (FilterError, ValueError) as err:
        print(f"{PROG}: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        files = collect(args.paths)
    except OSError as err:  # a named folder that cannot be listed
        where = shown(Path(err.filename)) if err.filename else "a folder"
        print(f"{PROG}: {where}: cannot list ({err.strerror or _one_line(err)})", file=sys.stderr)
        return EXIT_USAGE
    if not files:
        print(f"{PROG}: no image files found", file=sys.stderr)
        return EXIT_USAGE
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
            print(f"{PROG}: {shown(f)}: cannot read image ({_one_line(err)})", file=sys.stderr)
    rows: list[str] = []
    if decided:
        try:
            scores = flt.scores(features(np.stack(images)))
        except ValueError as err:  # --image-size gives features of another size
            print(f"{PROG}: {args.filter}: {_one_line(err)} (check --image-size)", file=sys.stderr)
            return EXIT_USAGE
        idx, dmin = flt.predict(scores)
        block = guard.block(flt, scores, args.uploader)
        for f, i, d, b in zip(decided, idx.tolist(), dmin.tolist(), block.tolist(), strict=True):
            reg = regs[i]
            hi = reg.err_mean + alpha * reg.err_std
            lo = reg.err_mean - alpha * reg.err_std if guard.sided == "two" else float("-inf")
            rows.append(
                f"{shown(f)}\t{reg.user_id}\t{reg.label}\t{d:.3f}\t[{lo:.3f}, {hi:.3f}]\t"
                f"{'block' if b else 'share'}"
            )
    print(
        f"filter: {len(regs)} autoencoders; guard {args.guard} ({guard.sided}-sided), "
        f"alpha {alpha}; "
        f"uploader {args.uploader}"
    )
    print("image\tpredicted_owner\tpredicted_class\tscore\tinterval\tdecision")
    for row in rows:
        print(row)
    return EXIT_FILE_ERRORS if failed else EXIT_OK
