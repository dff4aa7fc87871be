// Fused decoder + sigmoid + squared-error kernel of the global filter (see native.py).
// Built by docl_flower/core/native.py on first use: g++ -O3 -march=native -fopenmp.
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
