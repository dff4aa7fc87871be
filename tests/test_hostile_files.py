"""No file can break or hang a batch: fuzzed images, special files and malformed filter.json.

``docl-flower filter check`` (and every reader of user images, :func:`read_image`) decodes each
file in a worker process under byte, pixel and time budgets; ``filter.json`` is parsed so that
every malformation is the store's ``ValueError`` (one line, exit 2).
"""

from __future__ import annotations

import io
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from docl_flower.core.data import decode
from docl_flower.core.data.decode import ImageReadError, read_image_isolated
from docl_flower.core.data.folders import IMAGE_FORMATS, ImageFolderDataset, read_image
from docl_flower.core.filter.store import META_FILE, load_filter, save_filter
from docl_flower.operations.check import PROG, main, shown

from .test_check import _saved_filter

CLI = str(Path(sys.executable).parent / "docl-flower")
SIDE = 28


@pytest.fixture
def saved_filter(tmp_path: Path) -> Path:
    return _saved_filter(tmp_path / "filter")


# ---------------------------------------------------------------- hostile files


def _encode(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _valid_images() -> dict[str, bytes]:
    """Small valid files in every format the reader accepts (some with EXIF)."""
    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 256, (SIDE, SIDE), dtype=np.uint8))
    rgb = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[274] = 6  # orientation: rotate
    exif[305] = "docl"  # software
    return {
        "grey.png": _encode(grey, "PNG"),
        "wide.png": _encode(Image.fromarray(np.asarray(grey).astype(np.uint16) * 257), "PNG"),
        "photo.jpg": _encode(rgb, "JPEG", exif=exif.tobytes()),
        "scan.tif": _encode(grey, "TIFF"),
        "web.webp": _encode(rgb, "WEBP", exif=exif.tobytes()),
        "anim.gif": _encode(rgb.convert("P"), "GIF"),
        "old.bmp": _encode(rgb, "BMP"),
    }


def _ifd_entries(data: bytes) -> Iterator[tuple[int, str]]:
    """Offset and byte order of each 12-byte entry of the first IFD of the first TIFF
    structure in ``data`` (a TIFF file, or the EXIF block of a JPEG or WebP)."""
    for start in (m.start() for m in re.finditer(rb"II\*\x00|MM\x00\*", data)):
        order = "<" if data[start : start + 2] == b"II" else ">"
        try:
            (ifd,) = struct.unpack_from(order + "I", data, start + 4)
            (count,) = struct.unpack_from(order + "H", data, start + ifd)
        except struct.error:
            continue
        for k in range(min(count, 64)):
            entry = start + ifd + 2 + 12 * k
            if entry + 12 <= len(data):
                yield entry, order
        return


def _tag_edits(data: bytes) -> Iterator[bytes]:
    """Copies of ``data`` with one IFD entry of the wrong type: its type field changed, or its
    tag changed to SubIFDs (330, whose values must be integers)."""
    for entry, order in _ifd_entries(data):
        for kind in (2, 5, 7, 12, 16):  # ASCII, RATIONAL, UNDEFINED, DOUBLE, LONG8
            edited = bytearray(data)
            struct.pack_into(order + "H", edited, entry + 2, kind)
            yield bytes(edited)
        edited = bytearray(data)
        struct.pack_into(order + "H", edited, entry, 330)
        yield bytes(edited)


def _mutants(data: bytes, seed: int, count: int) -> Iterator[bytes]:
    """Seeded byte flips and truncations of ``data``."""
    rng = np.random.default_rng(seed)
    for k in range(count):
        if k % 3 == 0:
            yield data[: int(rng.integers(0, len(data)))]
            continue
        flipped = bytearray(data)
        for _ in range(int(rng.integers(1, 5))):
            flipped[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        yield bytes(flipped)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _bomb_png() -> bytes:
    """A 100-byte PNG that declares 100000 x 100000 pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _hostile_folder(folder: Path, mutants_per_image: int) -> list[Path]:
    """Valid images, their fuzzed copies and special files in ``folder``; all the paths."""
    folder.mkdir()
    files: dict[str, bytes] = {}
    for k, (name, data) in enumerate(_valid_images().items()):
        stem, suffix = name.rsplit(".", 1)
        files[name] = data
        for j, mutant in enumerate(_mutants(data, k, mutants_per_image)):
            files[f"{stem}-fuzz{j}.{suffix}"] = mutant
        for j, edited in enumerate(_tag_edits(data)):
            files[f"{stem}-tag{j}.{suffix}"] = edited
    files["empty.png"] = b""
    files["bomb.png"] = _bomb_png()
    files["new\nline.png"] = files["grey.png"]  # a name that would split its line
    for name, data in files.items():
        (folder / name).write_bytes(data)
    with open(os.fsencode(folder) + b"/\xff-not-utf8.png", "wb") as handle:  # no valid text
        handle.write(files["grey.png"])
    os.mkfifo(folder / "x.png")
    (folder / "y.png").mkdir()
    (folder / "loop-a.png").symlink_to(folder / "loop-b.png")
    (folder / "loop-b.png").symlink_to(folder / "loop-a.png")
    return sorted(folder.iterdir())


def _assert_one_line_per_file(files: list[Path], code: int, out: str, err: str) -> list[str]:
    """Exactly one decision row or one error line per file; returns the error lines.

    Other stderr lines (a log warning that the fused scoring kernel cannot be built on this
    CPU, say) name no file.
    """
    assert "Traceback" not in out + err
    rows = out.splitlines()[2:]
    errors = [line for line in err.splitlines() if line.startswith(f"{PROG}: ")]
    named = [r.split("\t")[0] for r in rows] + [
        line.removeprefix(f"{PROG}: ").split(": cannot read image (")[0] for line in errors
    ]
    assert sorted(named) == sorted(shown(f) for f in files)
    assert code == (1 if errors else 0)
    return errors


def test_fuzzed_and_special_files_get_one_line_each_in_process(saved_filter, tmp_path, capsys):
    # Prepare: ~300 fuzzed images in seven formats, tag-type edits, a FIFO named x.png, a
    # folder named y.png, a symlink loop, an empty file and a decompression bomb.
    files = _hostile_folder(tmp_path / "uploads", mutants_per_image=30)
    # Execute
    start = time.monotonic()
    code = main([str(saved_filter), str(tmp_path / "uploads"), "--uploader", "0"])
    elapsed = time.monotonic() - start
    # Assert: every file decided or refused (one line), the valid ones decided.
    out, err = capsys.readouterr()
    errors = _assert_one_line_per_file(files, code, out, err)
    assert code == 1 and elapsed < 60
    refused = {line.split(": cannot read image (")[0].rsplit("/", 1)[-1]: line for line in errors}
    assert "not a regular file (a FIFO)" in refused["x.png"]
    assert "not a regular file (a directory)" in refused["y.png"]
    assert "symbolic links" in refused["loop-a.png"]
    assert "larger than the limit" in refused["bomb.png"]
    assert "empty.png" in refused
    decided = {r.split("\t")[0].rsplit("/", 1)[-1] for r in out.splitlines()[2:]}
    assert set(_valid_images()) <= decided
    assert {"new\\nline.png", "\\udcff-not-utf8.png"} <= decided


def test_the_console_script_finishes_without_a_traceback(saved_filter, tmp_path):
    # Prepare
    files = _hostile_folder(tmp_path / "uploads", mutants_per_image=4)
    # Execute: as a user would, with a bound on the time.
    proc = subprocess.run(
        [CLI, "filter", "check", str(saved_filter), str(tmp_path / "uploads"), "--uploader", "0"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    # Assert
    _assert_one_line_per_file(files, proc.returncode, proc.stdout, proc.stderr)
    assert proc.returncode == 1


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's, from the in-process decodes
def test_the_crafted_tiff_and_webp_of_the_report_are_one_error_each(saved_filter, tmp_path, capsys):
    # Prepare: the first tag-type edits that make Pillow raise TypeError / struct.error.
    valid = _valid_images()
    folder = tmp_path / "uploads"
    folder.mkdir()
    found: dict[str, str] = {}
    for name in ("scan.tif", "web.webp"):
        for edited in _tag_edits(valid[name]):
            try:
                decode.decode_image(edited, "L", (SIDE, SIDE))
            except (TypeError, struct.error) as exc:
                (folder / f"crafted-{name}").write_bytes(edited)
                found[name] = type(exc).__name__
                break
            except Exception:  # other failures are not what this test looks for
                continue
    assert set(found) == {"scan.tif", "web.webp"}  # TypeError and struct.error
    (folder / "good.png").write_bytes(valid["grey.png"])
    # Execute
    code = main([str(saved_filter), str(folder), "--uploader", "0"])
    # Assert
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err
    assert len(err.splitlines()) == 2
    assert all(f"{kind}:" in err for kind in set(found.values())), (found, err)
    assert [r.split("\t")[0] for r in out.splitlines()[2:]] == [str(folder / "good.png")]


@pytest.fixture(scope="module")
def slow_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64-megapixel black PNG: 60 kB, about 0.4 s to decode and resize."""
    path = tmp_path_factory.mktemp("slow") / "slow.png"
    Image.new("L", (8192, 8192)).save(path)
    return path


def test_a_file_over_the_time_budget_is_refused_and_the_rest_decided(
    saved_filter, slow_png, tmp_path, capsys, monkeypatch
):
    # Prepare: a budget of 0.1 s for the slow file (it takes about 0.45 s, more under load),
    # and the default one for the small file: a loaded machine must not fail the good one.
    real = decode.ImageDecoder.decode

    def budgeted(self, path, *args, **kwargs):
        kwargs["timeout"] = 0.1 if str(path) == str(slow_png) else decode.DECODE_TIMEOUT_S
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(decode.ImageDecoder, "decode", budgeted)
    good = tmp_path / "good.png"
    good.write_bytes(_valid_images()["grey.png"])
    # Execute
    code = main([str(saved_filter), str(slow_png), str(good), "--uploader", "0"])
    # Assert: the worker was replaced; the next file was decided.
    out, err = capsys.readouterr()
    assert code == 1
    assert err.splitlines() == [
        f"{PROG}: {slow_png}: cannot read image (decoding took longer than 0.1 s)"
    ]
    assert [r.split("\t")[0] for r in out.splitlines()[2:]] == [str(good)]


def test_a_file_over_the_byte_budget_is_refused_before_it_is_read(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.setattr(decode, "MAX_IMAGE_BYTES", 100)
    path = tmp_path / "a.png"
    path.write_bytes(_valid_images()["grey.png"])
    # Execute / Assert
    with pytest.raises(ImageReadError, match=r"file of \d+ bytes is larger than the limit of 100"):
        read_image(path, "L", (SIDE, SIDE))


def test_a_worker_that_died_between_files_is_replaced_silently(tmp_path):
    # Prepare: a live worker, killed from outside.
    path = tmp_path / "a.png"
    path.write_bytes(_valid_images()["grey.png"])
    first = read_image(path, "L", (SIDE, SIDE))
    worker = decode._shared._proc
    assert worker is not None
    worker.kill()
    worker.wait()
    # Execute
    again = read_image(path, "L", (SIDE, SIDE))
    # Assert
    assert np.array_equal(first, again)


def _old_read_image(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """``read_image`` as it decoded in-process before the worker (the reference)."""
    Image.init()
    with Image.open(path, formats=[f for f in IMAGE_FORMATS if f in Image.OPEN]) as opened:
        opened.load()
        image = decode._to_8bit(ImageOps.exif_transpose(opened)).convert(mode)
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.array(image, dtype=np.uint8)


def test_the_worker_decodes_byte_for_byte_as_before(tmp_path):
    # Prepare: every valid sample, plus PGM, RGBA, transparent-palette and float TIFF images.
    rng = np.random.default_rng(5)
    for name, data in _valid_images().items():
        (tmp_path / name).write_bytes(data)
    Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8)).save(tmp_path / "face.pgm")
    Image.fromarray(rng.random((16, 16)).astype(np.float32) * 300).save(tmp_path / "f.tif")
    rgba = Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8))
    rgba.save(tmp_path / "rgba.png")
    rgba.convert("RGB").convert("P").save(tmp_path / "palette.png", transparency=0)
    files = sorted(p for p in tmp_path.iterdir())
    # Execute / Assert
    for path in files:
        for mode, size in (("L", (SIDE, SIDE)), ("RGB", (12, 10)), ("L", (20, 24))):
            got = read_image(path, mode, size)
            want = _old_read_image(path, mode, size)
            assert got.dtype == want.dtype and got.shape == want.shape, path
            assert got.tobytes() == want.tobytes(), (path, mode, size)
            assert got.flags.writeable and got.flags.c_contiguous


def test_an_image_folder_skips_hostile_files(tmp_path):
    # Prepare: one class folder with a good image, a FIFO and a crafted TIFF.
    folder = tmp_path / "set" / "a"
    folder.mkdir(parents=True)
    (folder / "good.png").write_bytes(_valid_images()["grey.png"])
    os.mkfifo(folder / "x.png")
    (folder / "bad.tif").write_bytes(next(_tag_edits(_valid_images()["scan.tif"])))
    dataset = ImageFolderDataset(str(tmp_path / "set"), (SIDE, SIDE), test_fraction=0.0)
    # Execute
    images, labels = dataset.load("train")
    # Assert: the FIFO is no image file; the crafted TIFF is skipped.
    assert images.shape == (1, SIDE, SIDE) and labels.tolist() == [0]


def test_the_isolated_reader_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        read_image_isolated(tmp_path / "a.png", "CMYK", (2, 2))
    with pytest.raises(ValueError, match="size"):
        read_image_isolated(tmp_path / "a.png", "L", (0, 2))


# ---------------------------------------------------------------- malformed filter.json


#: name: (the file's new content, or how to rewrite its text; what the error line says).
MALFORMED: dict[str, tuple[object, str]] = {
    "empty file": (b"", "(empty)"),
    "deep arrays": (b"[" * 100_000, "nested too deeply"),
    "deep objects": (b'{"a":' * 100_000, "nested too deeply"),
    "200 levels": (b'{"x":' + b"[" * 200 + b"]" * 200 + b"}", "deeper than 100 levels"),
    "huge float": (lambda t: t.replace('"format":3', '"format":3,"x":1e999', 1), "out of range"),
    "huge int": (
        lambda t: t.replace('"format":3', '"format":3,"x":' + "9" * 5000, 1),
        "integer of 5000 digits",
    ),
    "duplicate key": (
        lambda t: t.replace('"format":3', '"format":3,"format":3', 1),
        "'format' appears twice",
    ),
    "invalid utf-8": (
        lambda t: t.encode().replace(b'"format":3', b'"format":3,"x":"\xff"', 1),
        "can't decode byte 0xff",
    ),
    "lone surrogate": (
        lambda t: t.replace('"format":3', '"format":3,"x":"\\ud800"', 1),
        "surrogates not allowed",
    ),
    "NaN err_mean": (
        lambda t: re.sub(r'"err_mean":[-0-9.e]+', '"err_mean":NaN', t, count=1),
        "entries[0].err_mean is nan",
    ),
    "Infinity err_std": (
        lambda t: re.sub(r'"err_std":[-0-9.e]+', '"err_std":Infinity', t, count=1),
        "entries[0].err_std is inf",
    ),
    "utf-8 bom": (lambda t: b"\xef\xbb\xbf" + t.encode(), "BOM"),
    "top-level list": (b"[]", "not a JSON object"),
    "top-level string": (b'"filter"', "not a JSON object"),
    "format as text": (lambda t: t.replace('"format":3', '"format":"3"', 1), "format '3'"),
    "history an object": (
        lambda t: t.replace('"history":[]', '"history":{}', 1),
        "fails its SHA-256 digest",
    ),
    "truncated": (lambda t: t[: len(t) // 2], "truncated or not JSON"),
    "nul bytes": (b"\x00" * 64, "truncated or not JSON"),
}


@pytest.mark.parametrize(("how", "says"), MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_filter_json_is_one_line_and_exit_2(saved_filter, tmp_path, capsys, how, says):
    # Prepare
    meta = saved_filter / META_FILE
    text = meta.read_text(encoding="utf-8")
    assert '"format":3' in text and '"err_mean":' in text
    raw = how(text) if callable(how) else how
    meta.write_bytes(raw.encode() if isinstance(raw, str) else raw)
    image = tmp_path / "a.png"
    image.write_bytes(_valid_images()["grey.png"])
    # Execute
    code = main([str(saved_filter), str(image), "--uploader", "0"])
    # Assert
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"{PROG}: {saved_filter}") and "Traceback" not in err
    assert says in err, err


def test_free_metadata_may_hold_nan_as_json_dumps_writes_it(tmp_path):
    # Prepare: a config value that is NaN (written as the literal NaN).
    folder = _saved_filter(tmp_path / "filter")
    regs, meta = load_filter(folder)
    save_filter(folder, regs, info={"config": {**meta["config"], "note": float("nan")}})
    # Execute
    again, meta2 = load_filter(folder)
    # Assert
    assert len(again) == 2 and meta2["config"]["note"] != meta2["config"]["note"]
