// The AVX-512 VNNI path: int8 and int4 weights against activations quantized to int8, 64 multiply-adds per
// instruction (vpdpbusd), so that batch-1 decode is bound by memory rather than by widening weights to fp32. An int8
// weight with one scale per output row meets activations with one scale per row (gemm_tile_per_row: int32 sums over
// all of k, as fbgemm's dynamic int8 linear); grouped weights meet activations in blocks of 32 inputs (gemm_tile,
// as llama.cpp's q8_0 dot products). Other formats, and group sizes whose scales do not line up with a vector's
// lanes, take the AVX-512 float path.
#include <immintrin.h>

#include <cstdint>
#include <climits>

#include "gemm.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")

namespace glmserve {
namespace avx512_vnni {

constexpr int kTileRows = 4, kTileCols = 4;
constexpr int kPerRowTileRows = 4;  // gemm_tile_per_row's rows: it holds only int32 sums
// A tile's NR weight rows are contiguous, and so are the next tiles': while a tile is read, a later one is
// prefetched, NR cache lines per vector step, whole tiles and at least kPrefetchAheadBytes ahead. A row of an int8 [*, 4096] weight is one 4 KiB
// page, where the hardware prefetcher stops and restarts, so prefetching a fixed distance along each row leaves the
// next tile's rows cold and a GEMV bound by latency rather than bandwidth.
constexpr int64_t kPrefetchAheadBytes = 16384;

// vpdpbusd multiplies unsigned bytes by signed ones: int8 weights are shifted to unsigned by +128 (an xor), int4
// nibbles already are (q + 8); lane_bias takes the shift back out. Input k's weights sit at byte k (int8) or in
// nibble k % 2 of byte k / 2 (int4), so an int4 vector's low nibbles meet the block's even inputs, high the odd.
// Where a vector's weight scales start: `g0` advances by groups_per_vector every vector (groups of 32 or 64
// inputs), or by one every vectors_per_group vectors (larger groups), counted rather than divided.
struct ScaleWalk {
  __m512i index;  // which of the 4 scales from g0 on each lane takes
  int64_t groups_per_vector, vectors_per_group;
};

// kOneScale: every vector lies inside one weight group (groups of at least a vector's inputs), so a row's scale
// for it is one broadcast rather than a gather of four.
template <int T, int MB, int NR, bool kOneScale>
inline void gemm_tile(const GemmArgs& a, int64_t m0, int64_t n0, const ScaleWalk& walk) {
  constexpr int64_t kInputs = T == kI4 ? 128 : 64;  // inputs one 64-byte weight vector holds
  const int64_t row_bytes = T == kI4 ? a.k / 2 : a.k, vectors = (a.k + kInputs - 1) / kInputs;
  const QuantizedRows& qx = *a.qx;
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F), sign_bit = _mm512_set1_epi8(static_cast<char>(0x80));
  const uint8_t* w[NR];
  const float* s[NR];
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    w[r] = static_cast<const uint8_t*>(a.w) + (n0 + r) * row_bytes;
    s[r] = a.scales + (n0 + r) * a.groups;
  }
  const int64_t tiles_ahead = (kPrefetchAheadBytes + NR * row_bytes - 1) / (NR * row_bytes);
  const char* next_tile = reinterpret_cast<const char*>(w[0] + tiles_ahead * NR * row_bytes);
  // The scales likewise, one line a step.
  const char* next_scales = reinterpret_cast<const char*>(s[0] + tiles_ahead * NR * a.groups);
  const int64_t scale_bytes = NR * a.groups * static_cast<int64_t>(sizeof(float));
  const bool per_row = a.groups == 1;  // one weight scale per row: applied to the row's sum, not per vector
  __m512 acc[MB][NR];
  #pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t v = 0, g0 = 0, in_group = 0; v < vectors; ++v) {
    const int64_t left = row_bytes - 64 * v;
    const __mmask64 bytes = left >= 64 ? ~0ULL : (1ULL << left) - 1;
    const __mmask8 scales = static_cast<__mmask8>((1 << (a.groups - g0 < 4 ? a.groups - g0 : 4)) - 1);
    __m512 x_scale[MB];
    __m512i x_bias[MB];
    #pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      x_scale[m] = _mm512_loadu_ps(qx.lane_scale + (m0 + m) * qx.ld_lane + 16 * v);
      x_bias[m] = _mm512_loadu_si512(qx.lane_bias + (m0 + m) * qx.ld_lane + 16 * v);
    }
    if (64 * v < scale_bytes) _mm_prefetch(next_scales + 64 * v, _MM_HINT_T0);
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      _mm_prefetch(next_tile + 64 * (NR * v + r), _MM_HINT_T0);
      // Masked loads only at a row's end: on AMD Zen they cost several times a plain load.
      const uint8_t* wp = w[r] + 64 * v;
      const __m512i wv = left >= 64 ? _mm512_loadu_si512(wp) : _mm512_maskz_loadu_epi8(bytes, wp);
      __m512 w_scale = _mm512_setzero_ps();
      if (!per_row && kOneScale) {
        w_scale = _mm512_set1_ps(s[r][g0]);
      } else if (!per_row) {
        const __m128 w_scales = a.groups - g0 >= 4 ? _mm_loadu_ps(s[r] + g0)
                                                   : _mm_maskz_loadu_ps(scales, s[r] + g0);
        w_scale = _mm512_permutexvar_ps(walk.index, _mm512_castps128_ps512(w_scales));
      }
      #pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) {
        const int8_t* q = qx.q + (m0 + m) * qx.ld_q + kInputs * v;
        __m512i dot;
        if constexpr (T == kI4) {
          dot = _mm512_dpbusd_epi32(x_bias[m], _mm512_and_si512(wv, low_nibbles), _mm512_loadu_si512(q));
          dot = _mm512_dpbusd_epi32(dot, _mm512_and_si512(_mm512_srli_epi16(wv, 4), low_nibbles),
                                    _mm512_loadu_si512(q + 64));
        } else {
          dot = _mm512_dpbusd_epi32(x_bias[m], _mm512_xor_si512(wv, sign_bit), _mm512_loadu_si512(q));
        }
        const __m512 scale = per_row ? x_scale[m] : _mm512_mul_ps(w_scale, x_scale[m]);
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[m][r]);
      }
    }
    if (walk.groups_per_vector) {
      g0 += walk.groups_per_vector;
    } else if (++in_group == walk.vectors_per_group) {
      in_group = 0;
      ++g0;
    }
  }
  #pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r)
      a.y[(m0 + m) * a.ldy + n0 + r] =
          _mm512_reduce_add_ps(acc[m][r]) * (per_row ? s[r][0] : 1.f) + (a.bias ? a.bias[n0 + r] : 0.f);
}

// ops.cpp sends only group sizes whose scales line up with the lanes: 32, 64 (int4), multiples of a vector's
// inputs, or one group per row.
inline ScaleWalk scale_walk(int T, int64_t group_size, int64_t groups) {
  const int64_t inputs = T == kI4 ? 128 : 64;
  const int64_t lanes_per_group = group_size / q8_lane_inputs(static_cast<WeightType>(T));
  if (groups == 1) return {_mm512_setzero_si512(), 0, INT64_MAX};
  if (group_size >= inputs) return {_mm512_setzero_si512(), 0, group_size / inputs};
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  return {_mm512_srli_epi32(lane, lanes_per_group == 4 ? 2 : 3), inputs / group_size, 0};
}

// Per-row activations against an int8 weight with one scale per row: a tile's sums stay int32 over all of k, so
// each (weight vector, activation row) costs one vpdpbusd, and the weight vector, shifted to unsigned once, feeds
// the tile's MB activation rows. y = (sum + row bias) * activation scale * weight scale.
template <int MB, int NR>
inline void gemm_tile_per_row(const GemmArgs& a, int64_t m0, int64_t n0) {
  const int64_t row_bytes = a.k, full = a.k / 64;
  const QuantizedRows& qx = *a.qx;
  const __m512i sign_bit = _mm512_set1_epi8(static_cast<char>(0x80));
  const uint8_t* w[NR];
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) w[r] = static_cast<const uint8_t*>(a.w) + (n0 + r) * row_bytes;
  const int8_t* q[MB];
  #pragma GCC unroll 16
  for (int m = 0; m < MB; ++m) q[m] = qx.q + (m0 + m) * qx.ld_q;
  const int64_t tiles_ahead = (kPrefetchAheadBytes + NR * row_bytes - 1) / (NR * row_bytes);
  const char* next_tile = reinterpret_cast<const char*>(w[0] + tiles_ahead * NR * row_bytes);
  __m512i acc[MB][NR];
  #pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_si512();
  // Weight bytes past k load as 0 and meet activations zero-padded past k.
  auto step = [&](int64_t v, __mmask64 bytes) __attribute__((always_inline)) {
    __m512i qv[MB];  // in registers: each meets NR weight vectors
    #pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) qv[m] = _mm512_loadu_si512(q[m] + 64 * v);
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      _mm_prefetch(next_tile + 64 * (NR * v + r), _MM_HINT_T0);
      const uint8_t* wp = w[r] + 64 * v;
      // Masked loads only at a row's end: on AMD Zen they cost several times a plain load.
      const __m512i wv = bytes == ~0ULL ? _mm512_loadu_si512(wp) : _mm512_maskz_loadu_epi8(bytes, wp);
      const __m512i wu = _mm512_xor_si512(wv, sign_bit);
      #pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], wu, qv[m]);
    }
  };
  for (int64_t v = 0; v < full; ++v) step(v, ~0ULL);
  if (full * 64 < row_bytes) step(full, (1ULL << (row_bytes - full * 64)) - 1);
  #pragma GCC unroll 16
  for (int m = 0; m < MB; ++m) {
    const float x_scale = qx.lane_scale[(m0 + m) * qx.ld_lane];
    const int32_t x_bias = qx.lane_bias[(m0 + m) * qx.ld_lane];
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r)
      a.y[(m0 + m) * a.ldy + n0 + r] = static_cast<float>(_mm512_reduce_add_epi32(acc[m][r]) + x_bias) *
                                           (x_scale * a.scales[n0 + r]) + (a.bias ? a.bias[n0 + r] : 0.f);
  }
}

// The activation rows left after whole row tiles (rows < MB), as one shorter tile.
template <int T, int NR, bool kOneScale, int MB>
inline void gemm_rest(const GemmArgs& a, int64_t m0, int64_t n0, int64_t rows, const ScaleWalk& walk) {
  if constexpr (MB > 0) {
    if (rows != MB) return gemm_rest<T, NR, kOneScale, MB - 1>(a, m0, n0, rows, walk);
    if constexpr (T == kI8) {
      if (a.qx->per_row) return gemm_tile_per_row<MB, NR>(a, m0, n0);
    }
    if constexpr (MB <= kTileRows) gemm_tile<T, MB, NR, kOneScale>(a, m0, n0, walk);
  }
}

// Weight rows [n0, n0 + NR) for every activation row: whole row tiles, then the rest as one shorter tile.
template <int T, int NR, bool kOneScale>
inline void gemm_columns(const GemmArgs& a, int64_t n0, const ScaleWalk& walk) {
  const int64_t tile = a.qx->per_row ? kPerRowTileRows : kTileRows;
  int64_t m0 = 0;
  for (; m0 + tile <= a.rows; m0 += tile) gemm_rest<T, NR, kOneScale, kPerRowTileRows>(a, m0, n0, tile, walk);
  gemm_rest<T, NR, kOneScale, kPerRowTileRows>(a, m0, n0, a.rows - m0, walk);
}

template <int T, bool kOneScale>
void gemm_walk(const GemmArgs& a, int64_t n_begin, int64_t n_end, const ScaleWalk& walk) {
  int64_t n = n_begin;
  for (; n + kTileCols <= n_end; n += kTileCols) gemm_columns<T, kTileCols, kOneScale>(a, n, walk);
  for (; n < n_end; ++n) gemm_columns<T, 1, kOneScale>(a, n, walk);
}

template <int T>
void gemm(const GemmArgs& a, int64_t n_begin, int64_t n_end) {
  const ScaleWalk walk = scale_walk(T, a.group_size, a.groups);
  if (walk.groups_per_vector == 0) {
    gemm_walk<T, true>(a, n_begin, n_end, walk);
  } else {
    gemm_walk<T, false>(a, n_begin, n_end, walk);
  }
}

// The lanes of a 16-float vector that hold inputs below k, from input i on.
inline __mmask16 inputs_below(int64_t k, int64_t i) {
  return k - i >= 16 ? __mmask16(0xFFFF) : k <= i ? __mmask16(0) : static_cast<__mmask16>((1u << (k - i)) - 1);
}

// One scale per row (absmax / 127), q zero past k; the row's bias is -128 (int8 weights' zero point) times sum q.
void quantize_rows_per_row(const float* x, int64_t ldx, int64_t rows, int64_t k, int8_t* q, float* row_scale,
                           int32_t* row_bias) {
  const int64_t padded = (k + kQ8Pad - 1) / kQ8Pad * kQ8Pad;
  for (int64_t row = 0; row < rows; ++row) {
    const float* xr = x + row * ldx;
    int8_t* qr = q + row * padded;
    __m512 amax = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(
                                                 inputs_below(k, i), xr + i)));
    const float top = _mm512_reduce_max_ps(amax), inverse = top > 0.f ? 127.f / top : 0.f;
    __m512i sum = _mm512_setzero_si512();
    for (int64_t i = 0; i < padded; i += 16) {
      const __m512 xv = _mm512_maskz_loadu_ps(inputs_below(k, i), xr + i);
      // Rounded to nearest, ties to even (the default rounding mode, as std::nearbyint).
      const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(xv, _mm512_set1_ps(inverse)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + i), _mm512_cvtepi32_epi8(qi));
      sum = _mm512_add_epi32(sum, qi);
    }
    row_scale[row] = top / 127.f;
    row_bias[row] = -128 * _mm512_reduce_add_epi32(sum);
  }
}

void quantize_rows(WeightType t, bool per_row, const float* x, int64_t ldx, int64_t rows, int64_t k, int8_t* q,
                   float* lane_scale, int32_t* lane_bias) {
  if (per_row) return quantize_rows_per_row(x, ldx, rows, k, q, lane_scale, lane_bias);
  const int64_t padded = (k + kQ8Pad - 1) / kQ8Pad * kQ8Pad, lanes = padded / q8_lane_inputs(t);
  const __m256i minus_zero_point = _mm256_set1_epi32(t == kI4 ? -8 : -128), ones = _mm256_set1_epi8(1);
  const __m512i evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
  for (int64_t row = 0; row < rows; ++row) {
    const float* xr = x + row * ldx;
    int8_t* qr = q + row * padded;
    float* scale_r = lane_scale + row * lanes;
    int32_t* bias_r = lane_bias + row * lanes;
    for (int64_t b = 0; b < padded; b += 32) {  // one block of 32 inputs, zero past k
      const __m512 x0 = _mm512_maskz_loadu_ps(inputs_below(k, b), xr + b);
      const __m512 x1 = _mm512_maskz_loadu_ps(inputs_below(k, b + 16), xr + b + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
      const float scale = amax / 127.f, inverse = amax > 0.f ? 127.f / amax : 0.f;
      // Rounded to nearest, ties to even (the default rounding mode, as std::nearbyint).
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, _mm512_set1_ps(inverse)));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, _mm512_set1_ps(inverse)));
      const __m128i bytes0 = _mm512_cvtepi32_epi8(q0), bytes1 = _mm512_cvtepi32_epi8(q1);
      if (t == kI4) {  // each 128-input block's even inputs first, then its odd ones, as the weight's nibbles
        int8_t* block = qr + b / 128 * 128 + (b % 128) / 2;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(block),
                         _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(q0, evens, q1)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(block + 64),
                         _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(q0, odds, q1)));
      } else {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + b), bytes0);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + b + 16), bytes1);
      }
      // The sums of each 4 inputs' q (ones times q), times minus the weight's zero point.
      const __m256i sums4 = _mm256_mullo_epi32(
          _mm256_dpbusd_epi32(_mm256_setzero_si256(), ones, _mm256_set_m128i(bytes1, bytes0)), minus_zero_point);
      if (t == kI4) {  // lanes of 8 inputs: pairs of those sums
        int32_t pair[8];
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pair), sums4);
        for (int j = 0; j < 4; ++j) {
          bias_r[b / 8 + j] = pair[2 * j] + pair[2 * j + 1];
          scale_r[b / 8 + j] = scale;
        }
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(bias_r + b / 4), sums4);
        _mm256_storeu_ps(scale_r + b / 4, _mm256_set1_ps(scale));
      }
    }
  }
}

}  // namespace avx512_vnni
}  // namespace glmserve

#pragma GCC pop_options

glmserve::IsaKernels glmserve::avx512_vnni_kernels() {
  IsaKernels table = avx512_kernels();
  table.gemm_q8[kI8] = &avx512_vnni::gemm<kI8>;
  table.gemm_q8[kI4] = &avx512_vnni::gemm<kI4>;
  table.quantize_rows = &avx512_vnni::quantize_rows;
  return table;
}
