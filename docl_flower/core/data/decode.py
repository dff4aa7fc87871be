"""Decode untrusted image files one by one in a worker process, with byte, pixel and time budgets.

Every image a user hands to the package (``docl-flower filter check``, image-folder data sets)
goes through :func:`read_image_isolated`. A crafted file may make a decoder raise anything
(Pillow raises ``TypeError`` and ``struct.error`` from inside its TIFF and WebP plugins), loop,
crash the interpreter or ask for gigabytes; a FIFO or a device named ``x.png`` blocks whoever
opens it. So each file is

1. ``stat``-ed first: anything but a regular file (FIFO, socket, device, directory, a symlink
   loop) is refused without being opened, and so is a file larger than :data:`MAX_IMAGE_BYTES`;
2. opened with ``O_NONBLOCK`` and checked again with ``fstat`` (same file, still regular), so a
   file swapped for a FIFO between the two steps is refused too, and read whole (at most
   :data:`MAX_IMAGE_BYTES`);
3. decoded from those bytes with :data:`MAX_IMAGE_PIXELS` as Pillow's limit (its warning and
   its error both refuse the file), in a long-lived worker process (this file run as a
   script), which answers within :data:`DECODE_TIMEOUT_S` or is killed and replaced.

Whatever goes wrong becomes :class:`ImageReadError` naming the reason, for that file alone; the
worker serves the next file. The worker is started on first use (about 0.2 s), reused by every
later call of the process, exits when it has been idle for :data:`IDLE_EXIT_S` or when the
process that started it goes away (its end of the pipe closes), and ignores SIGINT (the process
that started it decides what an interrupt does). It needs POSIX pipes (``poll``).

The decoded array is the same, byte for byte, as decoding the file in-process with
:func:`decode_image` (EXIF orientation, 16-bit and palette handling, grey or RGB, bilinear
resize).
"""

from __future__ import annotations

import atexit
import io
import json
import math
import os
import select
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

#: Largest image file read (bytes). A 24-megapixel JPEG is about 10 MiB and a 16-bit TIFF
#: scan of an A4 page at 600 dpi about 70 MiB uncompressed; 64 MiB bounds what one file can
#: make the worker hold before decoding starts.
MAX_IMAGE_BYTES = 64 * 1024 * 1024
#: Largest image decoded (width x height). 64 megapixels covers the photos of current cameras
#: and phones (up to ~50 MP) and bounds a decoded RGBA image at 256 MiB: a decompression bomb
#: (a tiny file that declares 100000 x 100000 pixels) is refused before its pixels are
#: allocated. Pillow's own default (89 MP, an error only at twice that) is replaced by this.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
#: Seconds one file may take to read and decode before its worker is killed. A 64-megapixel
#: PNG decodes and resizes in about 2 s on one core; anything slower is a looping decoder.
DECODE_TIMEOUT_S = 15.0
#: Seconds allowed for a new worker to start (import numpy and Pillow) and say it is ready.
STARTUP_TIMEOUT_S = 60.0
#: Seconds a worker waits for the next file before it exits on its own (restarted on demand).
IDLE_EXIT_S = 60.0

#: Pillow decoders the worker may use when the caller names none.
DEFAULT_FORMATS = ("PNG", "JPEG", "PPM", "BMP", "GIF", "TIFF", "WEBP")
#: Modes an image is converted to, and its channels.
MODES = {"L": 1, "RGB": 3}

_READY = b"R"
_OK = b"K"
_ERROR = b"E"
_LENGTH = struct.Struct("<I")
_SHAPE = struct.Struct("<III")
#: Largest request or error message exchanged with the worker (bytes).
_MAX_MESSAGE = 1 << 20


class ImageReadError(ValueError):
    """One image file could not be read or decoded; the message says why (one line)."""


# ---------------------------------------------------------------- decoding (in the worker)


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _too_large(size: int, limit: int) -> ImageReadError:
    return ImageReadError(f"file of {size} bytes is larger than the limit of {limit} bytes")


def read_file_bytes(path: str | os.PathLike[str], max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, refusing anything else unopened.

    Parameters
    ----------
    path : str or os.PathLike
        The file; symbolic links are followed.
    max_bytes : int
        Largest size read.

    Returns
    -------
    bytes
        The whole file.

    Raises
    ------
    ImageReadError
        A FIFO, socket, device or directory (refused before ``open``), a file that changed
        into one while being opened, a file larger than ``max_bytes``.
    OSError
        The file is missing, unreadable, or a symlink loop.
    """
    before = os.stat(path)
    if not stat.S_ISREG(before.st_mode):
        raise ImageReadError(f"not a regular file ({_kind(before.st_mode)})")
    if before.st_size > max_bytes:
        raise _too_large(before.st_size, max_bytes)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    try:
        after = os.fstat(fd)
        if not stat.S_ISREG(after.st_mode) or (after.st_dev, after.st_ino) != (
            before.st_dev,
            before.st_ino,
        ):
            raise ImageReadError("the file was replaced while being opened")
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # it grew after fstat
                raise _too_large(total, max_bytes)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _to_8bit(image: Image.Image) -> Image.Image:
    """A PIL image with 8-bit channels: 16-/32-bit grey is scaled (top 8 of 16 bits)."""
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I;16L", "I" (32-bit int)
        wide = np.asarray(image).astype(np.int64)
        # High byte of the 16-bit value: exact for both v*257 and v<<8 encodings of 8-bit data.
        return Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8))
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).round().astype(np.uint8))
    if image.mode in ("P", "PA"):
        return image.convert("RGBA")
    return image


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageReadError(
            f"image of {width} x {height} pixels is larger than the limit of {max_pixels} pixels"
        )


def decode_image(
    data: bytes,
    mode: str,
    size: tuple[int, int],
    formats: Sequence[str] = DEFAULT_FORMATS,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> NDArray[np.uint8]:
    """Decode one image from its bytes, in this process (no time budget: see the module).

    Parameters
    ----------
    data : bytes
        The file's contents.
    mode : str
        ``"L"`` (grey) or ``"RGB"``.
    size : tuple of int
        ``(H, W)``; images of another size are resized (bilinear, antialiased).
    formats : sequence of str
        Pillow decoders allowed (those this Pillow build lacks are ignored).
    max_pixels : int
        Largest ``width * height`` decoded.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` uint8 for ``"L"``, ``(H, W, 3)`` for ``"RGB"``.

    Raises
    ------
    Exception
        Whatever the decoder raises for a damaged or hostile file; :class:`ImageReadError`
        for an image over ``max_pixels``.
    """
    Image.init()  # registers the decoders, so that OPEN lists those this PIL build has
    allowed = [f for f in formats if f in Image.OPEN]
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            opened = Image.open(io.BytesIO(data), formats=allowed)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise ImageReadError(
                f"image larger than the limit of {max_pixels} pixels (a decompression bomb)"
            ) from err
        with opened:
            _check_pixels(opened.size, max_pixels)
            opened.load()
            image = _to_8bit(ImageOps.exif_transpose(opened)).convert(mode)
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.array(image, dtype=np.uint8)


def reason(err: BaseException) -> str:
    """One line saying why a file could not be read (no traceback, no object addresses)."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image in a format this reader accepts"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = " ".join(str(err).split())
    kind = type(err)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    if isinstance(err, ImageReadError):
        return text or name
    return f"{name}: {text}" if text else name


def _serve(inp: int, out: int) -> int:
    """The worker's loop: one request in, one answer out, until EOF or idleness."""
    poller = select.poll()
    poller.register(inp, select.POLLIN)
    while True:
        if not poller.poll(IDLE_EXIT_S * 1000):
            return 0
        header = _read_all(inp, _LENGTH.size)
        if header is None:
            return 0
        (length,) = _LENGTH.unpack(header)
        body = _read_all(inp, length) if length <= _MAX_MESSAGE else None
        if body is None:
            return 3
        try:
            request = json.loads(body)
            Image.MAX_IMAGE_PIXELS = int(request["max_pixels"])
            data = read_file_bytes(str(request["path"]), int(request["max_bytes"]))
            height, width = (int(s) for s in request["size"])
            array = decode_image(
                data,
                str(request["mode"]),
                (height, width),
                [str(f) for f in request["formats"]],
                int(request["max_pixels"]),
            )
            shape = (*array.shape, 1)[:3]
            payload = _SHAPE.pack(*shape) + array.tobytes()
            answer = _OK
        except Exception as err:  # any decoder failure is this file's answer
            payload = reason(err).encode("utf-8", "backslashreplace")[:_MAX_MESSAGE]
            answer = _ERROR
        _write_all(out, answer + _LENGTH.pack(len(payload)) + payload)


def _read_all(fd: int, size: int) -> bytes | None:
    """Exactly ``size`` bytes from ``fd`` (blocking), or None at EOF."""
    parts = bytearray()
    while len(parts) < size:
        chunk = os.read(fd, size - len(parts))
        if not chunk:
            return None
        parts += chunk
    return bytes(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _worker_main() -> int:
    """Entry point of the worker process (this file run as a script)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inp, out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)  # nothing a decoder prints can reach the protocol
    os.dup2(devnull, 1)
    warnings.simplefilter("ignore")
    _write_all(out, _READY)
    return _serve(inp, out)


# ---------------------------------------------------------------- the worker, seen from the caller


class _GoneError(Exception):
    """The worker closed its end of the pipe."""


class _UnsentError(Exception):
    """The request could not be written: the worker had gone."""


class _LateError(Exception):
    """The worker did not answer in time."""


class ImageDecoder:
    """A reusable worker process that decodes image files under the budgets of the module.

    Thread-safe (one file at a time). :meth:`close` ends the worker; the next call starts one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        if not sys.executable:
            raise ImageReadError("cannot start the image decoder (no Python executable known)")
        env = dict(os.environ)
        # The worker imports the same numpy and Pillow as this process.
        env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = "1"
        try:
            proc = subprocess.Popen(
                [sys.executable, "-P", os.path.abspath(__file__)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                bufsize=0,
                env=env,
            )
        except (OSError, ValueError) as err:
            raise ImageReadError(f"cannot start the image decoder ({reason(err)})") from err
        self._proc = proc
        try:
            if self._receive(STARTUP_TIMEOUT_S, 1) != _READY:
                raise _GoneError
        except _GoneError:
            rc = self._kill(grace=1.0)
            raise ImageReadError(f"cannot start the image decoder (exit status {rc})") from None
        except _LateError:
            self._kill()
            raise ImageReadError(
                f"the image decoder did not start within {STARTUP_TIMEOUT_S:g} s"
            ) from None
        return proc

    def _kill(self, grace: float = 0.0) -> int | None:
        """End the worker (after ``grace`` s); its exit status (negative: the ending signal)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
        return proc.wait()

    def _receive(self, timeout: float, size: int) -> bytes:
        """``size`` bytes from the worker within ``timeout`` s; raises _GoneError or _LateError."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        parts = bytearray()
        while len(parts) < size:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(math.ceil(left * 1000)):
                raise _LateError
            chunk = os.read(fd, min(size - len(parts), 1 << 22))
            if not chunk:
                raise _GoneError
            parts += chunk
        return bytes(parts)

    def _ask(self, request: bytes, timeout: float) -> tuple[bytes, bytes]:
        """Send one request and read its answer: ``(status, payload)``.

        Raises _UnsentError when the request did not reach a live worker (it ended between
        two files: idle, or killed from outside), _GoneError when the worker ended on it.
        """
        if self._proc is not None and self._proc.poll() is not None:
            self._kill()
        proc = self._proc or self._start()
        assert proc.stdin is not None
        try:
            _write_all(proc.stdin.fileno(), _LENGTH.pack(len(request)) + request)
        except OSError:  # BrokenPipeError: the worker has gone
            raise _UnsentError from None
        deadline = time.monotonic() + timeout
        status = self._receive(timeout, 1)
        (length,) = _LENGTH.unpack(self._receive(deadline - time.monotonic(), _LENGTH.size))
        return status, self._receive(deadline - time.monotonic(), length)

    def decode(
        self,
        path: str | os.PathLike[str],
        mode: str,
        size: tuple[int, int],
        *,
        formats: Sequence[str] = DEFAULT_FORMATS,
        timeout: float | None = None,
        max_bytes: int | None = None,
        max_pixels: int | None = None,
    ) -> NDArray[np.uint8]:
        """Decode one file in the worker: see :func:`read_image_isolated`."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        height, width = (int(s) for s in size)
        if height < 1 or width < 1:
            raise ValueError(f"size must be two positive integers, got {size!r}")
        limit = DECODE_TIMEOUT_S if timeout is None else float(timeout)
        request = json.dumps(
            {
                "path": os.path.abspath(os.fspath(path)),
                "mode": mode,
                "size": [height, width],
                "formats": list(formats),
                "max_bytes": MAX_IMAGE_BYTES if max_bytes is None else int(max_bytes),
                "max_pixels": MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels),
            }
        ).encode("ascii")  # a name that is no valid UTF-8 travels as \\udcxx escapes
        with self._lock:
            for attempt in (1, 2):
                try:
                    status, payload = self._ask(request, limit)
                except _UnsentError:
                    self._kill()
                    if attempt == 1:
                        continue
                    raise ImageReadError("the image decoder ended before reading it") from None
                except _GoneError:
                    rc = self._kill(grace=1.0)
                    if rc == 0 and attempt == 1:  # it exited, idle, as the request came
                        continue
                    raise ImageReadError(_crash(rc)) from None
                except _LateError:
                    self._kill()
                    raise ImageReadError(f"decoding took longer than {limit:g} s") from None
                except BaseException:  # interrupted mid-answer: the pipe is out of step
                    self._kill()
                    raise
                break
        if status == _ERROR:
            raise ImageReadError(" ".join(payload.decode("utf-8", "replace").split()))
        channels = MODES[mode]
        shape = _SHAPE.unpack(payload[: _SHAPE.size]) if len(payload) >= _SHAPE.size else None
        if status != _OK or shape != (height, width, channels):
            self.close()
            raise ImageReadError("the image decoder answered out of protocol")
        pixels = np.frombuffer(bytearray(payload[_SHAPE.size :]), dtype=np.uint8)
        return pixels.reshape((height, width) if channels == 1 else (height, width, channels))

    def close(self, wait: float | None = None) -> None:
        """End the worker (a later :meth:`decode` starts another).

        ``wait``: most seconds to wait for a decode in progress in another thread (default:
        as long as it takes); the worker is ended in any case.
        """
        held = self._lock.acquire(timeout=-1 if wait is None else wait)
        try:
            self._kill()
        finally:
            if held:
                self._lock.release()

    def forget(self) -> None:
        """In a forked child: drop the parent's worker without touching it."""
        proc, self._proc = self._proc, None
        self._lock = threading.Lock()
        if proc is not None:
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
            proc.returncode = 0  # not this process's child: never wait for it


def _crash(rc: int | None) -> str:
    if rc is not None and rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"the image decoder crashed on this file ({name})"
    return f"the image decoder stopped on this file (exit status {rc})"


_shared = ImageDecoder()
atexit.register(_shared.close, 1.0)
os.register_at_fork(after_in_child=_shared.forget)


def read_image_isolated(
    path: str | os.PathLike[str],
    mode: str,
    size: tuple[int, int],
    *,
    formats: Sequence[str] = DEFAULT_FORMATS,
    timeout: float | None = None,
) -> NDArray[np.uint8]:
    """Decode one untrusted image file in the shared worker process of this module.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    mode : str
        ``"L"`` (grey) or ``"RGB"``.
    size : tuple of int
        ``(H, W)`` of the result (see :func:`decode_image`).
    formats : sequence of str
        Pillow decoders allowed.
    timeout : float, optional
        Seconds allowed (default :data:`DECODE_TIMEOUT_S`, read at each call).

    Returns
    -------
    numpy.ndarray
        As :func:`decode_image` returns it for the file's bytes.

    Raises
    ------
    ImageReadError
        For any reason the file cannot be decoded (the message says which, in one line).
    ValueError
        For a ``mode`` or ``size`` that no file could satisfy.
    """
    return _shared.decode(path, mode, size, formats=formats, timeout=timeout)


if __name__ == "__main__":
    sys.exit(_worker_main())
