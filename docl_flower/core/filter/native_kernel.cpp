// Fused scoring kernel of the global filter (see native.py): encoder, ReLU, decoder, sigmoid
// and squared error of every (autoencoder, tile of images) in one pass over register tiles.
// Built by docl_flower/core/filter/native.py on first use: g++ -O3 -march=native -fopenmp.
//
// Two precisions share one structure:
// - float32: weights and images in float32, products in float32 FMAs;
// - bfloat16: weights, images and the hidden code rounded to bfloat16 (round to nearest
//   even), products summed in float32. With AVX512_BF16 (compiled with -march=native on a
//   CPU that has it) the pairs go through vdpbf16ps; without it they are emulated with two
//   float32 FMAs per pair (the products of two bfloat16 values are exact in float32, so the
//   emulation matches the instruction up to the order in which the two products are added
//   and denormals; it is slower than float32 and exists so that the decisions of the
//   bfloat16 path can be checked on any AVX-512 machine). The sigmoid, the error and its
//   sum are float32 in both, against the float32 image.
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cstdint>
#include <cstdlib>

#ifndef __AVX512F__
#error "the fused scoring kernel needs AVX-512F"
#endif

#define UNROLL _Pragma("GCC unroll 32")

namespace {

constexpr int kMaxVecs = 4;            // 16-image vectors per tile at most
constexpr int kMaxLanes = 16 * kMaxVecs;
constexpr int kBlock = 64;             // features per encoder block and per partial error sum

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

// ------------------------------------------------------------------------------ bfloat16

// acc + a.lo * b.lo + a.hi * b.hi, per 32-bit lane holding two bfloat16 values (lo: bits
// 0-15, the even index of the pair).
inline __m512 dot2(__m512 acc, __m512i a, __m512i b) {
#ifdef __AVX512BF16__
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
#else
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(a, hi)),
                        _mm512_castsi512_ps(_mm512_and_si512(b, hi)), acc);
  return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)),
                         _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)), acc);
#endif
}

// float32 -> bfloat16 bits (in the low 16 bits of each lane), round to nearest even; NaN
// stays a (quiet) NaN.
inline __m512i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                            _mm512_set1_epi32(0x7FC00000));
  return _mm512_srli_epi32(r, 16);
}

// ------------------------------------------------------------------------------ tiles

// Encoder, R hidden units x V vectors of images over nd features (float32):
// h[r][.] (+)= sum_d W1p[d, r] xT[d, .]; W1p is (D, M), w points at W1p[d0, m0].
template <int R, int V>
inline void enc_f32(const float* xt, long ldx, const float* w, int M, int nd, float* h,
                    bool first) {
  constexpr int L = 16 * V;
  __m512 acc[R][V];
  UNROLL for (int r = 0; r < R; ++r) {
    UNROLL for (int v = 0; v < V; ++v) {
      acc[r][v] = first ? _mm512_setzero_ps() : _mm512_load_ps(h + r * L + 16 * v);
    }
  }
  for (int d = 0; d < nd; ++d) {
    __m512 xv[V];
    UNROLL for (int v = 0; v < V; ++v) xv[v] = _mm512_loadu_ps(xt + d * ldx + 16 * v);
    UNROLL for (int r = 0; r < R; ++r) {
      const __m512 wb = _mm512_set1_ps(w[d * M + r]);
      UNROLL for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(wb, xv[v], acc[r][v]);
    }
  }
  UNROLL for (int r = 0; r < R; ++r) {
    UNROLL for (int v = 0; v < V; ++v) _mm512_store_ps(h + r * L + 16 * v, acc[r][v]);
  }
}

// The same with bfloat16 pairs of features: xp is (D/2, ldx) pairs, w points at W1q[p0, m0]
// of W1q (D/2, M) pairs.
template <int R, int V>
inline void enc_bf16(const uint32_t* xp, long ldx, const uint32_t* w, int M, int np, float* h,
                     bool first) {
  constexpr int L = 16 * V;
  __m512 acc[R][V];
  UNROLL for (int r = 0; r < R; ++r) {
    UNROLL for (int v = 0; v < V; ++v) {
      acc[r][v] = first ? _mm512_setzero_ps() : _mm512_load_ps(h + r * L + 16 * v);
    }
  }
  for (int p = 0; p < np; ++p) {
    __m512i xv[V];
    UNROLL for (int v = 0; v < V; ++v) {
      xv[v] = _mm512_loadu_si512(reinterpret_cast<const void*>(xp + p * ldx + 16 * v));
    }
    UNROLL for (int r = 0; r < R; ++r) {
      const __m512i wb = _mm512_set1_epi32(static_cast<int>(w[p * M + r]));
      UNROLL for (int v = 0; v < V; ++v) acc[r][v] = dot2(acc[r][v], xv[v], wb);
    }
  }
  UNROLL for (int r = 0; r < R; ++r) {
    UNROLL for (int v = 0; v < V; ++v) _mm512_store_ps(h + r * L + 16 * v, acc[r][v]);
  }
}

// err += (sigmoid(acc) - x)^2 over R feature rows x V vectors.
template <int R, int V>
inline void finish_rows(__m512 (&acc)[R][V], const float* xt, long ldx, __m512* err) {
  UNROLL for (int r = 0; r < R; ++r) {
    UNROLL for (int v = 0; v < V; ++v) {
      const __m512 e = sigmoid_of_t_minus(acc[r][v], _mm512_loadu_ps(xt + r * ldx + 16 * v));
      err[v] = _mm512_fmadd_ps(e, e, err[v]);
    }
  }
}

// Decoder, R feature rows x V vectors (float32): t = W2[rows] h + b2[rows]; w points at
// W2t[0, d0] of the transposed decoder W2t (M, D); h is (M, 16V).
template <int R, int V>
inline void dec_f32(const float* h, const float* w, int D, const float* b2, const float* xt,
                    long ldx, int M, __m512* err) {
  constexpr int L = 16 * V;
  __m512 acc[R][V];
  UNROLL for (int r = 0; r < R; ++r) {
    const __m512 b = _mm512_set1_ps(b2[r]);
    UNROLL for (int v = 0; v < V; ++v) acc[r][v] = b;
  }
  for (int m = 0; m < M; ++m) {
    __m512 hv[V];
    UNROLL for (int v = 0; v < V; ++v) hv[v] = _mm512_load_ps(h + m * L + 16 * v);
    UNROLL for (int r = 0; r < R; ++r) {
      const __m512 wb = _mm512_set1_ps(w[m * static_cast<long>(D) + r]);
      UNROLL for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(wb, hv[v], acc[r][v]);
    }
  }
  finish_rows<R, V>(acc, xt, ldx, err);
}

// The same with bfloat16 pairs of hidden units: hq is (M/2, 16V) pairs, w points at
// W2q[0, d0] of W2q (M/2, D) pairs.
template <int R, int V>
inline void dec_bf16(const uint32_t* hq, const uint32_t* w, int D, const float* b2,
                     const float* xt, long ldx, int M2, __m512* err) {
  constexpr int L = 16 * V;
  __m512 acc[R][V];
  UNROLL for (int r = 0; r < R; ++r) {
    const __m512 b = _mm512_set1_ps(b2[r]);
    UNROLL for (int v = 0; v < V; ++v) acc[r][v] = b;
  }
  for (int p = 0; p < M2; ++p) {
    __m512i hv[V];
    UNROLL for (int v = 0; v < V; ++v) {
      hv[v] = _mm512_load_si512(reinterpret_cast<const void*>(hq + p * L + 16 * v));
    }
    UNROLL for (int r = 0; r < R; ++r) {
      const __m512i wb = _mm512_set1_epi32(static_cast<int>(w[p * static_cast<long>(D) + r]));
      UNROLL for (int v = 0; v < V; ++v) acc[r][v] = dot2(acc[r][v], hv[v], wb);
    }
  }
  finish_rows<R, V>(acc, xt, ldx, err);
}

// ------------------------------------------------------------------------------ one tile

struct Weights {
  const void* w1;  // encoders: float32 (A, D, M) or bfloat16 pairs (A, D/2, M)
  const float* b1;  // (A, M)
  const void* w2;  // decoders, transposed: float32 (A, M, D) or bfloat16 pairs (A, M/2, D),
                   // times -log2(e)
  const float* b2;  // (A, D), times -log2(e)
  int M, D;
};

// Squared reconstruction errors of 16V images (columns i0.. of xT / xP) under autoencoder a,
// into total[V]. h: scratch of M x 16V floats, hq: of (M+1)/2 x 16V pairs (64-byte aligned).
// Register tiles hold R x V = 16 accumulators.
template <int V, bool BF16>
void score_tile(const Weights& W, long a, const float* xt, const uint32_t* xp, long ldx, int i0,
                float* h, uint32_t* hq, __m512* total) {
  constexpr int L = 16 * V;
  constexpr int R = 16 / V;
  const int M = W.M, D = W.D, M2 = (M + 1) / 2, D2 = (D + 1) / 2;
  const float* x0 = xt + i0;
  const float* b1 = W.b1 + a * M;
  const float* b2 = W.b2 + a * static_cast<long>(D);
  // Encoder, blocks of kBlock features (the block of xT stays in L1 for all hidden units).
  if (BF16) {
    const uint32_t* w1 = static_cast<const uint32_t*>(W.w1) + a * D2 * static_cast<long>(M);
    const uint32_t* p0 = xp + i0;
    for (int q0 = 0; q0 < D2; q0 += kBlock / 2) {
      const int nq = std::min(kBlock / 2, D2 - q0);
      int m = 0;
      for (; m + R <= M; m += R)
        enc_bf16<R, V>(p0 + q0 * ldx, ldx, w1 + q0 * M + m, M, nq, h + m * L, q0 == 0);
      for (; m < M; ++m)
        enc_bf16<1, V>(p0 + q0 * ldx, ldx, w1 + q0 * M + m, M, nq, h + m * L, q0 == 0);
    }
  } else {
    const float* w1 = static_cast<const float*>(W.w1) + a * D * static_cast<long>(M);
    for (int d0 = 0; d0 < D; d0 += kBlock) {
      const int nd = std::min(kBlock, D - d0);
      int m = 0;
      for (; m + R <= M; m += R)
        enc_f32<R, V>(x0 + d0 * ldx, ldx, w1 + d0 * M + m, M, nd, h + m * L, d0 == 0);
      for (; m < M; ++m)
        enc_f32<1, V>(x0 + d0 * ldx, ldx, w1 + d0 * M + m, M, nd, h + m * L, d0 == 0);
    }
  }
  // Bias and ReLU (and, for bfloat16, rounding into pairs of hidden units).
  const __m512 zero = _mm512_setzero_ps();
  for (int m = 0; m < M; ++m) {
    const __m512 b = _mm512_set1_ps(b1[m]);
    UNROLL for (int v = 0; v < V; ++v) {
      float* p = h + m * L + 16 * v;
      _mm512_store_ps(p, _mm512_max_ps(_mm512_add_ps(_mm512_load_ps(p), b), zero));
    }
  }
  if (BF16) {
    for (int p = 0; p < M2; ++p) {
      UNROLL for (int v = 0; v < V; ++v) {
        const __m512i lo = to_bf16(_mm512_load_ps(h + 2 * p * L + 16 * v));
        const __m512i hi =
            2 * p + 1 < M ? to_bf16(_mm512_load_ps(h + (2 * p + 1) * L + 16 * v))
                          : _mm512_setzero_si512();
        _mm512_store_si512(reinterpret_cast<void*>(hq + p * L + 16 * v),
                           _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
  }
  // Decoder, sigmoid and error: a two-level sum over the features (blocks of kBlock rows),
  // for a smaller rounding error.
  UNROLL for (int v = 0; v < V; ++v) total[v] = _mm512_setzero_ps();
  for (int d0 = 0; d0 < D; d0 += kBlock) {
    const int d1 = std::min(d0 + kBlock, D);
    __m512 err[V];
    UNROLL for (int v = 0; v < V; ++v) err[v] = _mm512_setzero_ps();
    int d = d0;
    if (BF16) {
      const uint32_t* w2 = static_cast<const uint32_t*>(W.w2) + a * D * static_cast<long>(M2);
      for (; d + R <= d1; d += R)
        dec_bf16<R, V>(hq, w2 + d, D, b2 + d, x0 + d * ldx, ldx, M2, err);
      for (; d < d1; ++d) dec_bf16<1, V>(hq, w2 + d, D, b2 + d, x0 + d * ldx, ldx, M2, err);
    } else {
      const float* w2 = static_cast<const float*>(W.w2) + a * D * static_cast<long>(M);
      for (; d + R <= d1; d += R) dec_f32<R, V>(h, w2 + d, D, b2 + d, x0 + d * ldx, ldx, M, err);
      for (; d < d1; ++d) dec_f32<1, V>(h, w2 + d, D, b2 + d, x0 + d * ldx, ldx, M, err);
    }
    UNROLL for (int v = 0; v < V; ++v) total[v] = _mm512_add_ps(total[v], err[v]);
  }
}

// ------------------------------------------------------------------------------ one image

inline __mmask16 tail_mask(int n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// Up to K vectors of 16 hidden units m0.. of one image: h = W1 x (no bias), features
// vectorised over hidden units (two partial sums per vector for more independent FMAs).
template <int K, bool BF16>
inline void enc_one(const Weights& W, long a, const float* x, const uint32_t* xq, int m0,
                    float* h) {
  const int M = W.M, D = W.D;
  __mmask16 mask[K];
  UNROLL for (int k = 0; k < K; ++k) mask[k] = tail_mask(M - m0 - 16 * k);
  __m512 acc0[K], acc1[K];
  UNROLL for (int k = 0; k < K; ++k) acc0[k] = acc1[k] = _mm512_setzero_ps();
  if (BF16) {
    const int D2 = (D + 1) / 2;
    const uint32_t* w = static_cast<const uint32_t*>(W.w1) + a * D2 * static_cast<long>(M) + m0;
    int q = 0;
    for (; q + 2 <= D2; q += 2) {
      const __m512i x0 = _mm512_set1_epi32(static_cast<int>(xq[q]));
      const __m512i x1 = _mm512_set1_epi32(static_cast<int>(xq[q + 1]));
      UNROLL for (int k = 0; k < K; ++k) {
        acc0[k] = dot2(acc0[k], _mm512_maskz_loadu_epi32(mask[k], w + q * M + 16 * k), x0);
        acc1[k] = dot2(acc1[k], _mm512_maskz_loadu_epi32(mask[k], w + (q + 1) * M + 16 * k), x1);
      }
    }
    if (q < D2) {
      const __m512i x0 = _mm512_set1_epi32(static_cast<int>(xq[q]));
      UNROLL for (int k = 0; k < K; ++k)
        acc0[k] = dot2(acc0[k], _mm512_maskz_loadu_epi32(mask[k], w + q * M + 16 * k), x0);
    }
  } else {
    const float* w = static_cast<const float*>(W.w1) + a * D * static_cast<long>(M) + m0;
    int d = 0;
    for (; d + 2 <= D; d += 2) {
      const __m512 x0 = _mm512_set1_ps(x[d]);
      const __m512 x1 = _mm512_set1_ps(x[d + 1]);
      UNROLL for (int k = 0; k < K; ++k) {
        acc0[k] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask[k], w + d * M + 16 * k), x0, acc0[k]);
        acc1[k] =
            _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask[k], w + (d + 1) * M + 16 * k), x1, acc1[k]);
      }
    }
    if (d < D) {
      const __m512 x0 = _mm512_set1_ps(x[d]);
      UNROLL for (int k = 0; k < K; ++k)
        acc0[k] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask[k], w + d * M + 16 * k), x0, acc0[k]);
    }
  }
  const float* b1 = W.b1 + a * M + m0;
  UNROLL for (int k = 0; k < K; ++k) {
    const __m512 b = _mm512_maskz_loadu_ps(mask[k], b1 + 16 * k);
    const __m512 v = _mm512_max_ps(_mm512_add_ps(_mm512_add_ps(acc0[k], acc1[k]), b),
                                   _mm512_setzero_ps());
    _mm512_store_ps(h + m0 + 16 * k, _mm512_maskz_mov_ps(mask[k], v));
  }
}

// Up to K vectors of 16 features d0.. of one image: err += (sigmoid(t) - x)^2, vectorised
// over features.
template <int K, bool BF16>
inline void dec_one(const Weights& W, long a, const float* x, const float* h,
                    const uint32_t* hq, int d0, __m512& err) {
  const int M = W.M, D = W.D;
  __mmask16 mask[K];
  UNROLL for (int k = 0; k < K; ++k) mask[k] = tail_mask(D - d0 - 16 * k);
  const float* b2 = W.b2 + a * static_cast<long>(D) + d0;
  __m512 acc0[K], acc1[K];
  UNROLL for (int k = 0; k < K; ++k) {
    acc0[k] = _mm512_maskz_loadu_ps(mask[k], b2 + 16 * k);
    acc1[k] = _mm512_setzero_ps();
  }
  if (BF16) {
    const int M2 = (M + 1) / 2;
    const uint32_t* w = static_cast<const uint32_t*>(W.w2) + a * M2 * static_cast<long>(D) + d0;
    int p = 0;
    for (; p + 2 <= M2; p += 2) {
      const __m512i h0 = _mm512_set1_epi32(static_cast<int>(hq[p]));
      const __m512i h1 = _mm512_set1_epi32(static_cast<int>(hq[p + 1]));
      UNROLL for (int k = 0; k < K; ++k) {
        acc0[k] = dot2(acc0[k], _mm512_maskz_loadu_epi32(mask[k], w + p * D + 16 * k), h0);
        acc1[k] = dot2(acc1[k], _mm512_maskz_loadu_epi32(mask[k], w + (p + 1) * D + 16 * k), h1);
      }
    }
    if (p < M2) {
      const __m512i h0 = _mm512_set1_epi32(static_cast<int>(hq[p]));
      UNROLL for (int k = 0; k < K; ++k)
        acc0[k] = dot2(acc0[k], _mm512_maskz_loadu_epi32(mask[k], w + p * D + 16 * k), h0);
    }
  } else {
    const float* w = static_cast<const float*>(W.w2) + a * M * static_cast<long>(D) + d0;
    int m = 0;
    for (; m + 2 <= M; m += 2) {
      const __m512 h0 = _mm512_set1_ps(h[m]);
      const __m512 h1 = _mm512_set1_ps(h[m + 1]);
      UNROLL for (int k = 0; k < K; ++k) {
        acc0[k] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask[k], w + m * D + 16 * k), h0, acc0[k]);
        acc1[k] =
            _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask[k], w + (m + 1) * D + 16 * k), h1, acc1[k]);
      }
    }
    if (m < M) {
      const __m512 h0 = _mm512_set1_ps(h[m]);
      UNROLL for (int k = 0; k < K; ++k)
        acc0[k] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask[k], w + m * D + 16 * k), h0, acc0[k]);
    }
  }
  UNROLL for (int k = 0; k < K; ++k) {
    const __m512 e = sigmoid_of_t_minus(_mm512_add_ps(acc0[k], acc1[k]),
                                        _mm512_maskz_loadu_ps(mask[k], x + d0 + 16 * k));
    err = _mm512_mask3_fmadd_ps(e, e, err, mask[k]);
  }
}

// Error of one image (x: D floats; xq: its D/2 bfloat16 pairs) under autoencoder a.
// h: scratch of M (rounded up to 16) floats, hq: of M/2 pairs.
template <bool BF16>
float score_one(const Weights& W, long a, const float* x, const uint32_t* xq, float* h,
                uint32_t* hq) {
  const int M = W.M, D = W.D;
  int m0 = 0;
  for (; m0 + 64 <= M; m0 += 64) enc_one<4, BF16>(W, a, x, xq, m0, h);
  switch ((M - m0 + 15) / 16) {
    case 4: enc_one<4, BF16>(W, a, x, xq, m0, h); break;
    case 3: enc_one<3, BF16>(W, a, x, xq, m0, h); break;
    case 2: enc_one<2, BF16>(W, a, x, xq, m0, h); break;
    case 1: enc_one<1, BF16>(W, a, x, xq, m0, h); break;
    default: break;
  }
  if (BF16) {
    const int M2 = (M + 1) / 2;
    int p = 0;
    for (; p + 16 <= M2; p += 16) {
      // h[2p..2p+31] -> 16 pairs: even and odd hidden units of 32 consecutive ones.
      const __m512 a0 = _mm512_load_ps(h + 2 * p), a1 = _mm512_load_ps(h + 2 * p + 16);
      const __m512i idx_lo = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
      const __m512i idx_hi = _mm512_add_epi32(idx_lo, _mm512_set1_epi32(1));
      const __m512i lo = to_bf16(_mm512_permutex2var_ps(a0, idx_lo, a1));
      const __m512i hi = to_bf16(_mm512_permutex2var_ps(a0, idx_hi, a1));
      _mm512_storeu_si512(reinterpret_cast<void*>(hq + p), _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
    for (; p < M2; ++p) {
      const __m512 lo = _mm512_set1_ps(h[2 * p]);
      const __m512 hi = 2 * p + 1 < M ? _mm512_set1_ps(h[2 * p + 1]) : _mm512_setzero_ps();
      const __m512i pr = _mm512_or_si512(to_bf16(lo), _mm512_slli_epi32(to_bf16(hi), 16));
      hq[p] = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm512_castsi512_si128(pr)));
    }
  }
  __m512 err = _mm512_setzero_ps();
  int d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) dec_one<4, BF16>(W, a, x, h, hq, d0, err);
  switch ((D - d0 + 15) / 16) {
    case 4: dec_one<4, BF16>(W, a, x, h, hq, d0, err); break;
    case 3: dec_one<3, BF16>(W, a, x, h, hq, d0, err); break;
    case 2: dec_one<2, BF16>(W, a, x, h, hq, d0, err); break;
    case 1: dec_one<1, BF16>(W, a, x, h, hq, d0, err); break;
    default: break;
  }
  alignas(64) float e[16];
  _mm512_store_ps(e, err);
  for (int w = 8; w > 0; w /= 2) {
    for (int i = 0; i < w; ++i) e[i] += e[i + w];
  }
  return e[0];
}

// A few images (rows of x, (n, ldx) floats; xq: (n, ldq) pairs) under every autoencoder.
template <bool BF16>
void score_rows(const Weights& W, const float* x, long ldx, const uint32_t* xq, long ldq,
                float* out, long so_i, long so_a, int A, int n, int threads) {
  const double work = static_cast<double>(A) * n * W.D * W.M;
  const long chunk = std::max(1L, A / (16L * threads));
#pragma omp parallel num_threads(threads) if (A > 1 && work > 4e6)
  {
    const int Mp = (W.M + 15) / 16 * 16;
    float* h = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * (Mp + 16)));
    uint32_t* hq = static_cast<uint32_t*>(std::aligned_alloc(64, sizeof(uint32_t) * (Mp + 16)));
#pragma omp for schedule(dynamic, chunk)
    for (long a = 0; a < A; ++a) {
      for (int i = 0; i < n; ++i) {
        out[i * so_i + a * so_a] =
            score_one<BF16>(W, a, x + i * ldx, BF16 ? xq + i * ldq : nullptr, h, hq);
      }
    }
    std::free(hq);
    std::free(h);
  }
}

template <int V, bool BF16>
void score_all(const Weights& W, const float* xt, const uint32_t* xp, long ldx, float* out,
               long so_i, long so_a, int A, int B, int n_valid, int threads) {
  constexpr int L = 16 * V;
  const int tiles = B / L;
  const long total = static_cast<long>(A) * tiles;
  // Small jobs (a few autoencoders, one image) are not worth waking the other threads.
  const double work = static_cast<double>(total) * L * W.D * W.M;
  const long chunk = std::max(1L, std::min<long>(tiles, total / (8L * threads)));
#pragma omp parallel num_threads(threads) if (total > 1 && work > 4e6)
  {
    const int M2 = (W.M + 1) / 2;
    float* h = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * W.M * L));
    uint32_t* hq = static_cast<uint32_t*>(
        std::aligned_alloc(64, sizeof(uint32_t) * std::max(M2, 1) * L));
    // Autoencoder-major: a thread's consecutive items share an autoencoder, whose weights
    // then stay in its cache for all the tiles of images. Dynamic chunks of up to one
    // autoencoder's tiles: a thread that the OS pauses (a busy machine) holds up one chunk,
    // not half of the work.
#pragma omp for schedule(dynamic, chunk)
    for (long w = 0; w < total; ++w) {
      const long a = w / tiles;
      const int i0 = static_cast<int>(w % tiles) * L;
      __m512 sums[V];
      score_tile<V, BF16>(W, a, xt, xp, ldx, i0, h, hq, sums);
      alignas(64) float e[L];
      UNROLL for (int v = 0; v < V; ++v) _mm512_store_ps(e + 16 * v, sums[v]);
      const int n = std::min(L, n_valid - i0);
      for (int i = 0; i < n; ++i) out[(i0 + i) * so_i + a * so_a] = e[i];
    }
    std::free(hq);
    std::free(h);
  }
}

template <bool BF16>
void dispatch(int lanes, const Weights& W, const float* xt, const uint32_t* xp, long ldx,
              float* out, long so_i, long so_a, int A, int B, int n_valid, int threads) {
  if (lanes == 16)
    score_all<1, BF16>(W, xt, xp, ldx, out, so_i, so_a, A, B, n_valid, threads);
  else if (lanes == 32)
    score_all<2, BF16>(W, xt, xp, ldx, out, so_i, so_a, A, B, n_valid, threads);
  else
    score_all<4, BF16>(W, xt, xp, ldx, out, so_i, so_a, A, B, n_valid, threads);
}

}  // namespace

// Widest tile of images (the image count passed to docl_fused is a multiple of its lanes).
extern "C" int docl_lanes() { return kMaxLanes; }

// 1 where the bfloat16 products run on AVX512_BF16 instructions, 0 where they are emulated.
extern "C" int docl_bf16_hardware() {
#ifdef __AVX512BF16__
  return 1;
#else
  return 0;
#endif
}

// xt[d * ldt + i] = x[i * ldx + d] for i < n, 0 for n <= i < B: images as columns, padded.
// Each thread fills whole 64-image column blocks (contiguous writes, strided reads).
extern "C" void docl_transpose(const float* x, long ldx, int n, int D, float* xt, long ldt,
                               int B, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) \
    if (static_cast<long>(B) * D > 65536)
  for (int i0 = 0; i0 < B; i0 += kMaxLanes) {
    const int i1 = std::min(i0 + kMaxLanes, n);
    const int i2 = std::min(i0 + kMaxLanes, B);
    for (int d = 0; d < D; ++d) {
      float* dst = xt + d * ldt;
      for (int i = i0; i < i1; ++i) dst[i] = x[i * ldx + d];
      for (int i = std::max(i0, i1); i < i2; ++i) dst[i] = 0.0f;
    }
  }
}

// xp[q * ldp + i] = the bfloat16 pair (xt[2q, i], xt[2q + 1, i]) (0 past D) of the columns
// i < B of xt (D, ldt): images as columns, in pairs of features.
extern "C" void docl_pack_bf16(const float* xt, long ldt, int D, int B, uint32_t* xp, long ldp,
                               int threads) {
  const int D2 = (D + 1) / 2;
#pragma omp parallel for schedule(static) num_threads(threads) \
    if (static_cast<long>(B) * D > 65536)
  for (int q = 0; q < D2; ++q) {
    const float* lo = xt + 2 * q * ldt;
    const float* hi = 2 * q + 1 < D ? lo + ldt : nullptr;
    int i = 0;
    for (; i + 16 <= B; i += 16) {
      const __m512i l = to_bf16(_mm512_loadu_ps(lo + i));
      const __m512i u = hi ? to_bf16(_mm512_loadu_ps(hi + i)) : _mm512_setzero_si512();
      _mm512_storeu_si512(reinterpret_cast<void*>(xp + q * ldp + i),
                          _mm512_or_si512(l, _mm512_slli_epi32(u, 16)));
    }
    if (i < B) {
      const __mmask16 k = static_cast<__mmask16>((1u << (B - i)) - 1);
      const __m512i l = to_bf16(_mm512_maskz_loadu_ps(k, lo + i));
      const __m512i u = hi ? to_bf16(_mm512_maskz_loadu_ps(k, hi + i)) : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(reinterpret_cast<void*>(xp + q * ldp + i), k,
                               _mm512_or_si512(l, _mm512_slli_epi32(u, 16)));
    }
  }
}

// Errors of B images (columns of xT: (D, ldx) float32, zero padded; xP: (D/2, ldx) bfloat16
// pairs, read only when bf16 != 0) under A autoencoders, in tiles of `lanes` (16, 32 or 64)
// images; B is a multiple of lanes. W1: (A, D, M) float32 or (A, D/2, M) pairs; b1: (A, M);
// W2: (A, D, M) float32 or (A, D, M/2) pairs, and b2: (A, D), both times -log2(e).
// out[i*so_i + a*so_a] = error of image i < n_valid under autoencoder a.
// threads: OpenMP threads (PyTorch's count, passed in: a new Python thread would otherwise
// get the OpenMP default).
extern "C" void docl_fused(const float* xT, const uint32_t* xP, long ldx, const void* W1,
                           const float* b1, const void* W2, const float* b2, float* out,
                           long so_i, long so_a, int A, int M, int D, int B, int n_valid,
                           int lanes, int bf16, int threads) {
  const Weights W{W1, b1, W2, b2, M, D};
  if (bf16)
    dispatch<true>(lanes, W, xT, xP, ldx, out, so_i, so_a, A, B, n_valid, threads);
  else
    dispatch<false>(lanes, W, xT, xP, ldx, out, so_i, so_a, A, B, n_valid, threads);
}

// Errors of n images (rows of x: (n, ldx) float32; xq: (n, ldq) bfloat16 pairs of features,
// read only when bf16 != 0) under A autoencoders, one image at a time, vectorised over
// features and hidden units: for a few images, where image tiles would mostly be padding.
// Weights and out as for docl_fused.
extern "C" void docl_rows(const float* x, long ldx, const uint32_t* xq, long ldq, const void* W1,
                          const float* b1, const void* W2, const float* b2, float* out,
                          long so_i, long so_a, int A, int M, int D, int n, int bf16,
                          int threads) {
  const Weights W{W1, b1, W2, b2, M, D};
  if (bf16)
    score_rows<true>(W, x, ldx, xq, ldq, out, so_i, so_a, A, n, threads);
  else
    score_rows<false>(W, x, ldx, xq, ldq, out, so_i, so_a, A, n, threads);
}
