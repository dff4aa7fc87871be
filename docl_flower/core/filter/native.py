"""A fused AVX-512 scoring kernel of the global filter, built on first use.

Per autoencoder and tile of images, the encoder product, the ReLU, the decoder product, the
sigmoid, the difference to the image and the sum of squares run in one pass over register
tiles: neither the hidden code nor the ``(images, D)`` decoder output reaches memory (see
:meth:`docl_flower.core.filter.global_filter.GlobalFilter.scores`). Tiles are 16, 32 or 64
images wide, so that one image (an upload service checks one at a time) does not pay for 64. The C++
source, ``native_kernel.cpp`` (package data next to this module), is compiled once per process with
the system C++ compiler (``$CXX``, else ``g++``/``c++``) and ``-march=native``, cached on disk by a
hash of source, flags and CPU flags, and loaded with :mod:`ctypes`. It uses OpenMP; linked against
the ``libgomp`` that PyTorch already loaded, it shares PyTorch's worker threads.

:func:`load` returns ``None`` (and logs why) where no compiler, no AVX-512 or no x86-64 is
available; the filter then scores with plain PyTorch.

Math, per autoencoder and image (``t`` is computed directly, the decoder rows being
pre-multiplied by ``-log2(e)`` when packed): ``t = -log2(e) * (W2 h + b2)``,
``sigmoid = 1 / (1 + 2^t)``, ``2^t = 2^n * p(t - n)`` with ``n = round(t)`` and ``p`` a
degree-6 polynomial (relative error about 1e-7 on ``[-1/2, 1/2]``), ``1 / d`` by ``rcp14``
and one Newton step. The float32 result matches the PyTorch path to float32 rounding.

The same kernel has a bfloat16 variant (weights, images and hidden code rounded to bfloat16,
products summed in float32, sigmoid and error in float32): on AVX512_BF16 instructions where
the compiler targets them (``-march=native`` on a CPU with ``avx512_bf16``;
:attr:`Kernel.bf16_hardware`), else emulated with float32 FMAs (same numbers up to the order
of two additions, slower than float32: for checking the decisions on any AVX-512 machine).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from docl_flower.core.common.files import cache_folder
from docl_flower.core.common.install import package_file

log = logging.getLogger(__name__)

#: ``-log2(e)``: the decoder is packed as ``-log2(e) * (W2, b2)`` for the kernel.
NEG_LOG2E = -1.4426950408889634

#: The kernel's C++ source: package data next to this module (see :func:`_read_source`).
_SOURCE_NAME = "native_kernel.cpp"
_SOURCE_FILE = Path(__file__).with_name(_SOURCE_NAME)
#: The same file relative to the project folder, where an app bundle's ServerApp looks for it.
SOURCE_PATH = f"docl_flower/core/filter/{_SOURCE_NAME}"


def _read_source() -> str | None:
    """The C++ source: next to this module, else in the installed distribution.

    A Flower app bundle carries only Python, TOML, Markdown, YAML and JSON files, so a
    ServerApp imported from the bundle reads the source of the installed ``docl-flower``.
    """
    found = _SOURCE_FILE if _SOURCE_FILE.is_file() else package_file(SOURCE_PATH)
    if found is None:
        return None
    try:
        return found.read_text(encoding="utf-8")
    except OSError:
        return None


_FLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-Wall",
    "-Wextra",
    "-Wno-maybe-uninitialized",
)


@dataclass(frozen=True)
class Kernel:
    """The loaded kernel: its ctypes handle, image tile width and build time.

    Attributes
    ----------
    lib : ctypes.CDLL
        Exposes ``docl_fused`` (tiles of images), ``docl_rows`` (one image at a time),
        ``docl_transpose``, ``docl_pack_bf16`` (see the C++ source), ``docl_lanes`` and
        ``docl_bf16_hardware``.
    lanes : int
        Widest tile of images (64); tiles of 16 and 32 images serve small batches. The image
        count passed to ``docl_fused`` must be a multiple of the tile width used.
    build_seconds : float
        Seconds spent compiling in this process (0 when loaded from the disk cache).
    path : Path
        The shared library.
    bf16_hardware : bool
        Whether the bfloat16 variant runs on AVX512_BF16 instructions (else it is emulated).
    """

    lib: ctypes.CDLL
    lanes: int
    build_seconds: float
    path: Path
    bf16_hardware: bool = False


_lock = threading.Lock()
_loaded: dict[str, Kernel | None] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (``/proc/cpuinfo``; empty if unknown)."""
    line = _cpu_flags()
    return frozenset(line.split(":", 1)[1].split()) if ":" in line else frozenset()


#: CPU flags that mean bfloat16 dot products in hardware (AMX CPUs also list ``avx512_bf16``).
BF16_FLAGS = ("avx512_bf16",)


def cpu_has_bf16() -> bool:
    """Whether this CPU reports bfloat16 dot-product instructions (``avx512_bf16``).

    Read from the operating system's flags (``/proc/cpuinfo``), whatever the vendor; a
    hypervisor that hides the instructions hides the flag too.
    """
    flags = cpu_flags()
    return any(f in flags for f in BF16_FLAGS)


def _cache_dir() -> Path:
    return cache_folder("native")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return name
    return None


def _build() -> Kernel | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        log.warning("fused scoring kernel: needs x86-64, not %s", platform.machine())
        return None
    cxx = _compiler()
    if cxx is None:
        log.warning("fused scoring kernel: no C++ compiler found ($CXX, g++, c++)")
        return None
    source = _read_source()
    if source is None:
        log.warning("fused scoring kernel: %s not found (an app bundle, no install?)", _SOURCE_NAME)
        return None
    key = hashlib.sha256("\0".join([source, cxx, *_FLAGS, _cpu_flags()]).encode()).hexdigest()
    path = _cache_dir() / f"score-{key[:16]}.so"
    seconds = 0.0
    if not path.exists():
        src = path.with_suffix(f".{os.getpid()}.cpp")
        tmp = path.with_suffix(f".{os.getpid()}.so")
        src.write_text(source)
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [cxx, *_FLAGS, str(src), "-o", str(tmp)],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as err:
            log.warning("fused scoring kernel: %s failed: %s", cxx, err)
            return None
        finally:
            src.unlink(missing_ok=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            log.warning(
                "fused scoring kernel: compilation failed (%s):\n%s", cxx, proc.stderr[-2000:]
            )
            return None
        os.replace(tmp, path)
        log.info("fused scoring kernel: built %s in %.1f s", path, seconds)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        log.warning("fused scoring kernel: cannot load %s: %s", path, err)
        return None
    lib.docl_lanes.restype = ctypes.c_int
    lib.docl_lanes.argtypes = []
    lib.docl_bf16_hardware.restype = ctypes.c_int
    lib.docl_bf16_hardware.argtypes = []
    ptr, long_, int_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.docl_fused.restype = None
    lib.docl_fused.argtypes = [ptr, ptr, long_, ptr, ptr, ptr, ptr, ptr, long_, long_]
    lib.docl_fused.argtypes += [int_] * 8
    lib.docl_transpose.restype = None
    lib.docl_transpose.argtypes = [ptr, long_, int_, int_, ptr, long_, int_, int_]
    lib.docl_pack_bf16.restype = None
    lib.docl_pack_bf16.argtypes = [ptr, long_, int_, int_, ptr, long_, int_]
    lib.docl_rows.restype = None
    lib.docl_rows.argtypes = [ptr, long_, ptr, long_, ptr, ptr, ptr, ptr, ptr, long_, long_]
    lib.docl_rows.argtypes += [int_] * 6
    return Kernel(
        lib, int(lib.docl_lanes()), seconds, path, bf16_hardware=bool(lib.docl_bf16_hardware())
    )


def load() -> Kernel | None:
    """The kernel, built (or read from the disk cache) once per process; ``None`` if unusable.

    Failures are logged as warnings once; the caller then uses the PyTorch path.
    """
    with _lock:
        if "score" not in _loaded:
            try:
                _loaded["score"] = _build()
            except OSError as err:  # e.g. an unwritable cache directory
                log.warning("fused scoring kernel: %s", err)
                _loaded["score"] = None
            if _loaded["score"] is None:
                log.warning("fused scoring kernel unavailable: scoring with PyTorch operations")
        return _loaded["score"]
