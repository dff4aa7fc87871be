"""A fused AVX-512 kernel for the decoder half of the global filter, built on first use.

The decoder product, the sigmoid, the difference to the image and the sum of squares run in
one pass over register tiles, so the ``(images, D)`` decoder output never reaches memory
(see :meth:`docl_flower.filter.GlobalFilter.scores`). The C++ source below is compiled once
per process with the system C++ compiler (``$CXX``, else ``g++``/``c++``) and
``-march=native``, cached on disk by a hash of source, flags and CPU flags, and loaded with
:mod:`ctypes`. It uses OpenMP; linked against the ``libgomp`` that PyTorch already loaded, it
shares PyTorch's worker threads.

:func:`load` returns ``None`` (and logs why) where no compiler, no AVX-512 or no x86-64 is
available; the filter then scores with plain PyTorch.

Math, per autoencoder and image (``t`` is computed directly, the decoder rows being
pre-multiplied by ``-log2(e)`` when packed): ``t = -log2(e) * (W2 h + b2)``,
``sigmoid = 1 / (1 + 2^t)``, ``2^t = 2^n * p(t - n)`` with ``n = round(t)`` and ``p`` a
degree-6 polynomial (relative error about 1e-7 on ``[-1/2, 1/2]``), ``1 / d`` by ``rcp14``
and one Newton step. The result matches the PyTorch path to float32 rounding.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: ``-log2(e)``: the decoder is packed as ``-log2(e) * (W2, b2)`` for the kernel.
NEG_LOG2E = -1.4426950408889634

_SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cstdlib>

#ifndef __AVX512F__
#error "the fused scoring kernel needs AVX-512F"
#endif

#define UNROLL _Pragma("GCC unroll 32")

namespace {

constexpr int kRows = 4;   // decoder rows (features) per register tile
constexpr int kVecs = 4;   // 16-image vectors per register tile
constexpr int kLanes = 16 * kVecs;
constexpr int kBlock = 16 * kRows;  // feature rows per partial sum

// 1 / (1 + 2^t) - x: 2^t = 2^n p(t - n), n = round(t); 1/d by rcp14 and one Newton step
// whose last multiplication also subtracts x (one rounding).
inline __m512 sigmoid_of_t_minus(__m512 t, __m512 x) {
  t = _mm512_min_ps(t, _mm512_set1_ps(100.0f));  // 2^t stays finite
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5332507609855384e-04f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3394701527431607e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618490934371948e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503424257040024e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022647738456726e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471824645996e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __m512 d = _mm512_add_ps(_mm512_scalef_ps(p, n), _mm512_set1_ps(1.0f));
  const __m512 q = _mm512_rcp14_ps(d);
  return _mm512_fmsub_ps(q, _mm512_fnmadd_ps(d, q, _mm512_set1_ps(2.0f)), x);
}

// R decoder rows x kLanes images: t = W2[rows] h + b2[rows], err += (sigmoid - x)^2.
template <int R>
inline void tile(const float* h, const float* w, const float* b2, const float* xt, long ldx,
                 int M, __m512* err) {
  __m512 acc[R][kVecs];
  UNROLL for (int r = 0; r < R; ++r) {
    const __m512 b = _mm512_set1_ps(b2[r]);
    UNROLL for (int v = 0; v < kVecs; ++v) acc[r][v] = b;
  }
  for (int m = 0; m < M; ++m) {
    __m512 hv[kVecs];
    UNROLL for (int v = 0; v < kVecs; ++v) hv[v] = _mm512_load_ps(h + m * kLanes + 16 * v);
    UNROLL for (int r = 0; r < R; ++r) {
      const __m512 wb = _mm512_set1_ps(w[r * M + m]);
      UNROLL for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm512_fmadd_ps(wb, hv[v], acc[r][v]);
    }
  }
  UNROLL for (int r = 0; r < R; ++r) {
    UNROLL for (int v = 0; v < kVecs; ++v) {
      const __m512 e = sigmoid_of_t_minus(acc[r][v], _mm512_loadu_ps(xt + r * ldx + 16 * v));
      err[v] = _mm512_fmadd_ps(e, e, err[v]);
    }
  }
}

}  // namespace

extern "C" int docl_lanes() { return kLanes; }

// xt[d * ldt + i] = x[i * ldx + d] for i < n, 0 for n <= i < B: images as columns, padded.
// Each thread fills whole 64-image column blocks (contiguous writes, strided reads).
extern "C" void docl_transpose(const float* x, long ldx, int n, int D, float* xt, long ldt,
                               int B, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) \
    if (static_cast<long>(B) * D > 65536)
  for (int i0 = 0; i0 < B; i0 += kLanes) {
    const int i1 = std::min(i0 + kLanes, n);
    const int i2 = std::min(i0 + kLanes, B);
    for (int d = 0; d < D; ++d) {
      float* dst = xt + d * ldt;
      for (int i = i0; i < i1; ++i) dst[i] = x[i * ldx + d];
      for (int i = std::max(i0, i1); i < i2; ++i) dst[i] = 0.0f;
    }
  }
}

// hT: (A*M, ldh) encoder products without bias, row a*M+m; b1: (A, M); W2: (A, D, M) and
// b2: (A, D), both times -log2(e); xT: (D, ldx) images as columns, B of them (a multiple of
// kLanes, zero padded); out[i*so_i + a*so_a] = error of image i < n_valid under autoencoder a.
// threads: OpenMP threads (PyTorch's count, passed in: a new Python thread would otherwise
// get the OpenMP default).
extern "C" void docl_score(const float* hT, long ldh, const float* b1, const float* W2,
                           const float* b2, const float* xT, long ldx, float* out, long so_i,
                           long so_a, int A, int M, int D, int B, int n_valid, int threads) {
  const int tiles = B / kLanes;
  const long total = static_cast<long>(A) * tiles;
#pragma omp parallel num_threads(threads) if (total > 1)
  {
    float* h = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * M * kLanes));
#pragma omp for schedule(static)
    for (long w = 0; w < total; ++w) {
      const long a = w / tiles;
      const int i0 = static_cast<int>(w % tiles) * kLanes;
      for (int m = 0; m < M; ++m) {
        const float* src = hT + (a * M + m) * ldh + i0;
        const float bias = b1[a * M + m];
        for (int i = 0; i < kLanes; ++i) h[m * kLanes + i] = std::max(src[i] + bias, 0.0f);
      }
      const float* wa = W2 + a * D * static_cast<long>(M);
      const float* ba = b2 + a * static_cast<long>(D);
      // Two-level sum over the features (blocks of kBlock rows), for a smaller rounding error.
      __m512 total[kVecs];
      UNROLL for (int v = 0; v < kVecs; ++v) total[v] = _mm512_setzero_ps();
      for (int d0 = 0; d0 < D; d0 += kBlock) {
        const int d1 = std::min(d0 + kBlock, D);
        __m512 err[kVecs];
        UNROLL for (int v = 0; v < kVecs; ++v) err[v] = _mm512_setzero_ps();
        int d = d0;
        for (; d + kRows <= d1; d += kRows)
          tile<kRows>(h, wa + d * static_cast<long>(M), ba + d, xT + d * ldx + i0, ldx, M, err);
        for (; d < d1; ++d)
          tile<1>(h, wa + d * static_cast<long>(M), ba + d, xT + d * ldx + i0, ldx, M, err);
        UNROLL for (int v = 0; v < kVecs; ++v) total[v] = _mm512_add_ps(total[v], err[v]);
      }
      alignas(64) float e[kLanes];
      UNROLL for (int v = 0; v < kVecs; ++v) _mm512_store_ps(e + 16 * v, total[v]);
      const int n = std::min(kLanes, n_valid - i0);
      for (int i = 0; i < n; ++i) out[(i0 + i) * so_i + a * so_a] = e[i];
    }
    std::free(h);
  }
}
"""

_FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC")


@dataclass(frozen=True)
class Kernel:
    """The loaded kernel: its ctypes handle, image tile width and build time.

    Attributes
    ----------
    lib : ctypes.CDLL
        Exposes ``docl_score``, ``docl_transpose`` (see the C++ source) and ``docl_lanes``.
    lanes : int
        Images per tile; the image count passed to ``docl_score`` must be a multiple.
    build_seconds : float
        Seconds spent compiling in this process (0 when loaded from the disk cache).
    path : Path
        The shared library.
    """

    lib: ctypes.CDLL
    lanes: int
    build_seconds: float
    path: Path


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


def _cache_dir() -> Path:
    root = os.environ.get("DOCL_FLOWER_CACHE") or os.environ.get("XDG_CACHE_HOME")
    try:
        base = Path(root) if root else Path.home() / ".cache"
        path = base / "docl_flower" / "native"
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except (OSError, RuntimeError):  # RuntimeError: no home directory
        path = Path(tempfile.gettempdir()) / f"docl_flower-native-{os.getuid()}"
        path.mkdir(parents=True, exist_ok=True)
    return path


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
    key = hashlib.sha256("\0".join([_SOURCE, cxx, *_FLAGS, _cpu_flags()]).encode()).hexdigest()
    path = _cache_dir() / f"score-{key[:16]}.so"
    seconds = 0.0
    if not path.exists():
        src = path.with_suffix(f".{os.getpid()}.cpp")
        tmp = path.with_suffix(f".{os.getpid()}.so")
        src.write_text(_SOURCE)
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
    lib.docl_score.restype = None
    ptr, long_, int_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.docl_score.argtypes = [ptr, long_, ptr, ptr, ptr, ptr, long_, ptr, long_, long_]
    lib.docl_score.argtypes += [int_] * 6
    lib.docl_transpose.restype = None
    lib.docl_transpose.argtypes = [ptr, long_, int_, int_, ptr, long_, int_, int_]
    return Kernel(lib, int(lib.docl_lanes()), seconds, path)


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
