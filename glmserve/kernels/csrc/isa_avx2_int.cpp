// The AVX2 path's integer dot products (CPUs without AVX-512 VNNI, e.g. AMD Zen 3): int8 and int4 weights against
// activations quantized to int8 per row (gemm.h's QuantizedRows), with vpmaddubsw + vpmaddwd as llama.cpp's AVX2
// q8_0 / q4_0 dots, so that weights are not widened to fp32. Also the activation quantization every integer path
// shares (AVX2 code: every CPU with AVX-512 VNNI has AVX2).
//
// vpmaddubsw multiplies unsigned bytes by signed ones and saturates each pair's sum to int16. int4 nibbles are
// unsigned (q + 8, lane_bias takes the 8 back out): a pair is at most 2 * 15 * 127. int8 weights are signed, so
// they take llama.cpp's sign trick: |w| (up to 128, unsigned) times x with w's sign, a pair at most 2 * 128 * 127
// = 32512 < 32767 for any w in [-128, 127], since activations are quantized to [-127, 127]; no bias is needed.
#include <immintrin.h>

#include <climits>
#include <cstdint>
#include <cstring>

#include "gemm.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace glmserve {
namespace avx2_int {

constexpr int kTileRows = 2, kTileCols = 4;  // 16 ymm registers: 8 accumulators, the activations, temporaries

inline __m256 load_x(const float* row, int64_t k, int64_t i) {  // 8 inputs from i on, zero past k
  if (i + 8 <= k) return _mm256_loadu_ps(row + i);
  const int64_t left = k - i < 0 ? 0 : k - i;
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_maskload_ps(row + i, mask);
}

// 32 inputs from i on times `inverse`, rounded to nearest even (the default rounding mode, as std::nearbyint), as
// bytes in input order.
inline __m256i quantize32(const float* row, int64_t k, int64_t i, __m256 inverse) {
  __m256i q[4];
  for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(load_x(row, k, i + 8 * j), inverse));
  // The packs interleave 128-bit halves: dwords come out as q0[0:4] q1[0:4] q2[0:4] q3[0:4] q0[4:8] ...
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// The sum of each 4 consecutive bytes, as 8 int32.
inline __m256i sums_of_4(__m256i bytes) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), bytes), _mm256_set1_epi16(1));
}

// Each 32 bytes' even bytes in the low 128 bits, odd ones in the high 128.
inline __m256i evens_then_odds(__m256i bytes) {
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  return _mm256_permute4x64_epi64(_mm256_shuffle_epi8(bytes, split), 0xD8);
}

}  // namespace avx2_int

void quantize_rows_avx2(WeightType t, bool per_row, const float* x, int64_t ldx, int64_t rows, int64_t k, int8_t* q,
                        float* row_scale, int32_t* lane_bias) {
  using namespace avx2_int;
  const int64_t padded = (k + kQ8Pad - 1) / kQ8Pad * kQ8Pad, lanes = per_row ? 1 : padded / q8_lane_inputs(t);
  for (int64_t row = 0; row < rows; ++row) {
    const float* xr = x + row * ldx;
    int8_t* qr = q + row * padded;
    int32_t* bias = lane_bias + row * lanes;
    // Four running maxima: one would wait on the previous vmaxps at every vector (half the quantizer's time).
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 amax4[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t i = 0;
    for (; i + 32 <= k; i += 32)
      for (int j = 0; j < 4; ++j)
        amax4[j] = _mm256_max_ps(amax4[j], _mm256_andnot_ps(sign, _mm256_loadu_ps(xr + i + 8 * j)));
    for (; i < k; i += 8) amax4[0] = _mm256_max_ps(amax4[0], _mm256_andnot_ps(sign, load_x(xr, k, i)));
    const __m256 amax = _mm256_max_ps(_mm256_max_ps(amax4[0], amax4[1]), _mm256_max_ps(amax4[2], amax4[3]));
    __m128 top4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    top4 = _mm_max_ps(top4, _mm_movehl_ps(top4, top4));
    const float top = _mm_cvtss_f32(_mm_max_ss(top4, _mm_movehdup_ps(top4)));
    const __m256 inverse = _mm256_set1_ps(top > 0.f ? 127.f / top : 0.f);
    row_scale[row] = top / 127.f;
    __m256i total = _mm256_setzero_si256();
    for (int64_t b = 0; b < padded; b += 128) {  // one 128-input block, zero past k
      __m256i bytes[4], sums[4];
      for (int j = 0; j < 4; ++j) {
        bytes[j] = quantize32(xr, k, b + 32 * j, inverse);
        sums[j] = sums_of_4(bytes[j]);
      }
      if (t == kI4) {  // even inputs first, then odd ones, as the weight's nibbles; lanes of 8 inputs, bias -8 q
        __m256i split[4];
        for (int j = 0; j < 4; ++j) split[j] = evens_then_odds(bytes[j]);
        for (int h = 0; h < 2; ++h) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + b + 32 * h),
                              _mm256_permute2x128_si256(split[2 * h], split[2 * h + 1], 0x20));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + b + 64 + 32 * h),
                              _mm256_permute2x128_si256(split[2 * h], split[2 * h + 1], 0x31));
          const __m256i sums8 = _mm256_permute4x64_epi64(_mm256_hadd_epi32(sums[2 * h], sums[2 * h + 1]), 0xD8);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(bias + b / 8 + 8 * h),
                              _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sums8, 3)));
        }
        continue;
      }
      for (int j = 0; j < 4; ++j) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + b + 32 * j), bytes[j]);
        if (per_row) {
          total = _mm256_add_epi32(total, sums[j]);
        } else {  // int8: lanes of 4 inputs, bias -128 q
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(bias + (b + 32 * j) / 4),
                              _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sums[j], 7)));
        }
      }
    }
    if (per_row) {
      __m128i s = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
      bias[0] = -128 * _mm_cvtsi128_si32(s);
    }
  }
}

namespace avx2_int {

inline int32_t reduce_add(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

inline float reduce_add(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The 32 weight bytes from `offset` on: a plain load, or at a row's end the bytes left, zero past it.
inline __m256i load_weights(const uint8_t* row, int64_t offset, int64_t row_bytes) {
  if (offset + 32 <= row_bytes) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + offset));
  alignas(32) uint8_t tail[32] = {};
  std::memcpy(tail, row + offset, row_bytes - offset);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
}

// w * x summed over each 4 bytes (8 int32), by the sign trick; abs_w is |w|.
inline __m256i dot_i8(__m256i abs_w, __m256i w, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(abs_w, _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1));
}

// Nibbles (q + 8) times x, low nibbles against x_low and high against x_high, summed over each 4 bytes (8 inputs).
inline __m256i dot_i4(__m256i low, __m256i high, __m256i x_low, __m256i x_high) {
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(low, x_low), _mm256_maddubs_epi16(high, x_high));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

// The tile of NR weight rows at least kPrefetchAheadBytes after the one at `w` is requested a slice per step: the
// part matching the 32 * NR bytes the step reads. A product of one row block (decode's GEMVs, an expert's few
// tokens) reads each weight line once, so it is fetched non-temporally: the weights a step streams then no longer
// evict from L2 / L3 what the rest of the step keeps there (activations, KV blocks, the interpreter's own working
// set). More rows re-read each tile from cache, so theirs is fetched into L1.
template <int NR>
struct TilePrefetch {
  const char* next_tile;
  bool streaming;

  TilePrefetch(const GemmArgs& a, const uint8_t* w, int64_t row_bytes)
      : next_tile(reinterpret_cast<const char*>(
            w + (kPrefetchAheadBytes + NR * row_bytes - 1) / (NR * row_bytes) * NR * row_bytes)),
        streaming(a.rows <= kTileRows) {}

  void operator()(int64_t offset) const {
    #pragma GCC unroll 8
    for (int line = 0; line < (NR + 1) / 2; ++line) {
      if (streaming) {
        _mm_prefetch(next_tile + NR * offset + 64 * line, _MM_HINT_NTA);
      } else {
        _mm_prefetch(next_tile + NR * offset + 64 * line, _MM_HINT_T0);
      }
    }
  }
};

// Per-row activations against an int8 weight with one scale per row: int32 sums over all of k.
template <int MB, int NR>
inline void gemm_tile_per_row(const GemmArgs& a, int64_t m0, int64_t n0) {
  const int64_t row_bytes = a.k;
  const QuantizedRows& qx = *a.qx;
  const uint8_t* w = static_cast<const uint8_t*>(a.w) + n0 * row_bytes;
  const TilePrefetch<NR> prefetch(a, w, row_bytes);
  __m256i acc[MB][NR];
  #pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
    #pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_si256();
  for (int64_t offset = 0; offset < row_bytes; offset += 32) {
    prefetch(offset);
    __m256i xv[MB];
    #pragma GCC unroll 8
    for (int m = 0; m < MB; ++m)
      xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx.q + (m0 + m) * qx.ld_q + offset));
    #pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const __m256i wv = load_weights(w + r * row_bytes, offset, row_bytes), abs_w = _mm256_sign_epi8(wv, wv);
      #pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[m][r] = _mm256_add_epi32(acc[m][r], dot_i8(abs_w, wv, xv[m]));
    }
  }
  #pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
    #pragma GCC unroll 8
    for (int r = 0; r < NR; ++r)
      a.y[(m0 + m) * a.ldy + n0 + r] = static_cast<float>(reduce_add(acc[m][r])) *
                                           (qx.row_scale[m0 + m] * a.scales[n0 + r]) + (a.bias ? a.bias[n0 + r] : 0.f);
}

// A tile's fp32 sums, one vector of lanes per (activation row, weight row).
template <int MB, int NR>
struct TileSums {
  __m256 acc[MB][NR];
  TileSums() {
    #pragma GCC unroll 8
    for (int m = 0; m < MB; ++m)
      #pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  }
  // y = the sums times the activation row's scale, plus the bias.
  void store(const GemmArgs& a, int64_t m0, int64_t n0) const {
    #pragma GCC unroll 8
    for (int m = 0; m < MB; ++m)
      #pragma GCC unroll 8
      for (int r = 0; r < NR; ++r)
        a.y[(m0 + m) * a.ldy + n0 + r] =
            reduce_add(acc[m][r]) * a.qx->row_scale[m0 + m] + (a.bias ? a.bias[n0 + r] : 0.f);
  }
};

// Per-row activations against grouped int8 / int4 weights, the row's 32-byte vectors from `first_vector` on: each
// vector's int32 sums are scaled by its weight groups' scales into fp32 sums (the row's activation scale is
// applied once, by TileSums::store). ops.cpp sends group sizes that a vector (32 int8 or 64 int4 inputs) never
// straddles, except int4 groups of 32: two to a vector.
template <int T, int MB, int NR>
inline void grouped_vectors(const GemmArgs& a, int64_t m0, int64_t n0, int64_t first_vector, TileSums<MB, NR>& sums) {
  constexpr int64_t kInputs = T == kI4 ? 64 : 32;  // inputs one 32-byte weight vector holds
  const int64_t row_bytes = T == kI4 ? a.k / 2 : a.k;
  const QuantizedRows& qx = *a.qx;
  const bool two_groups = T == kI4 && a.group_size == 32;
  const int64_t vectors_per_group = two_groups ? 1 : a.groups == 1 ? INT64_MAX : a.group_size / kInputs;
  const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
  const uint8_t* w = static_cast<const uint8_t*>(a.w) + n0 * row_bytes;
  const float* s = a.scales + n0 * a.groups;
  const TilePrefetch<NR> prefetch(a, w, row_bytes);
  int64_t g = two_groups ? 2 * first_vector : first_vector / vectors_per_group;
  int64_t in_group = two_groups ? 0 : first_vector % vectors_per_group;
  for (int64_t v = first_vector, offset = 32 * first_vector; offset < row_bytes; ++v, offset += 32) {
    prefetch(offset);
    // The vector's activations: int4's 64 inputs are half a 128-input block, its even inputs then its odd ones.
    const int64_t q_offset = T == kI4 ? 128 * (v / 2) + 32 * (v % 2) : offset;
    __m256i x_low[MB], x_high[MB], bias[MB];
    #pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const int8_t* qm = qx.q + (m0 + m) * qx.ld_q + q_offset;
      x_low[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qm));
      if constexpr (T == kI4) {
        x_high[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qm + 64));
        bias[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx.lane_bias + (m0 + m) * qx.ld_lane + 8 * v));
      }
    }
    // The second group of a two-group vector, where the row has one (its lanes past k meet zero activations).
    const int64_t g_high = two_groups && g + 1 < a.groups ? g + 1 : g;
    #pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const __m256i wv = load_weights(w + r * row_bytes, offset, row_bytes);
      const float* sr = s + r * a.groups;
      const __m256 scale = _mm256_set_m128(_mm_set1_ps(sr[g_high]), _mm_set1_ps(sr[g]));
      if constexpr (T == kI4) {
        const __m256i low = _mm256_and_si256(wv, low_nibbles);
        const __m256i high = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low_nibbles);
        #pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
          const __m256i dot = _mm256_add_epi32(dot_i4(low, high, x_low[m], x_high[m]), bias[m]);
          sums.acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, sums.acc[m][r]);
        }
      } else {
        const __m256i abs_w = _mm256_sign_epi8(wv, wv);
        #pragma GCC unroll 8
        for (int m = 0; m < MB; ++m)
          sums.acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i8(abs_w, wv, x_low[m])), scale, sums.acc[m][r]);
      }
    }
    if (two_groups) {
      g += 2;
    } else if (++in_group == vectors_per_group) {
      in_group = 0;
      ++g;
    }
  }
}

// Per-row activations against int4 weights whose groups hold whole 128-input blocks (AWQ's 128, or one group per
// row), the row's whole blocks: a block's two vectors add their int16 pair sums before one widening, so the
// widening, the bias, the conversion and the scaling run once per 128 inputs instead of once per 64 (two vectors'
// pair sums stay within int16: 4 * 15 * 127 = 7620). Returns the vectors it covered.
template <int MB, int NR>
inline int64_t i4_blocks(const GemmArgs& a, int64_t m0, int64_t n0, TileSums<MB, NR>& sums) {
  const int64_t row_bytes = a.k / 2, blocks = row_bytes / 64;
  const QuantizedRows& qx = *a.qx;
  const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
  const uint8_t* w = static_cast<const uint8_t*>(a.w) + n0 * row_bytes;
  const float* s = a.scales + n0 * a.groups;
  const int64_t blocks_per_group = a.groups == 1 ? INT64_MAX : a.group_size / 128;
  const TilePrefetch<NR> prefetch(a, w, row_bytes);
  for (int64_t b = 0; b < blocks; ++b) {
    prefetch(64 * b);
    prefetch(64 * b + 32);
    const int64_t g = b / blocks_per_group;
    __m256i bias[MB];
    #pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {  // the block's two vectors' lanes, added as their pair sums are
      const int32_t* lanes = qx.lane_bias + (m0 + m) * qx.ld_lane + 16 * b;
      bias[m] = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lanes)),
                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lanes + 8)));
    }
    #pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const uint8_t* wr = w + r * row_bytes + 64 * b;
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + 32));
      const __m256i low0 = _mm256_and_si256(w0, low_nibbles);
      const __m256i high0 = _mm256_and_si256(_mm256_srli_epi16(w0, 4), low_nibbles);
      const __m256i low1 = _mm256_and_si256(w1, low_nibbles);
      const __m256i high1 = _mm256_and_si256(_mm256_srli_epi16(w1, 4), low_nibbles);
      const __m256 scale = _mm256_broadcast_ss(s + r * a.groups + g);
      #pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        // The block's activations: the first vector's even inputs, the second's, then their odd ones.
        const __m256i* xb = reinterpret_cast<const __m256i*>(qx.q + (m0 + m) * qx.ld_q + 128 * b);
        const __m256i pairs = _mm256_add_epi16(
            _mm256_add_epi16(_mm256_maddubs_epi16(low0, _mm256_loadu_si256(xb)),
                             _mm256_maddubs_epi16(high0, _mm256_loadu_si256(xb + 2))),
            _mm256_add_epi16(_mm256_maddubs_epi16(low1, _mm256_loadu_si256(xb + 1)),
                             _mm256_maddubs_epi16(high1, _mm256_loadu_si256(xb + 3))));
        const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)), bias[m]);
        sums.acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, sums.acc[m][r]);
      }
    }
  }
  return 2 * blocks;
}

template <int T, int MB, int NR>
inline void gemm_tile_grouped(const GemmArgs& a, int64_t m0, int64_t n0) {
  TileSums<MB, NR> sums;
  int64_t first_vector = 0;
  if constexpr (T == kI4) {
    if (a.groups == 1 || a.group_size % 128 == 0) first_vector = i4_blocks<MB, NR>(a, m0, n0, sums);
  }
  grouped_vectors<T, MB, NR>(a, m0, n0, first_vector, sums);
  sums.store(a, m0, n0);
}

template <int T, int MB, int NR>
inline void gemm_tile(const GemmArgs& a, int64_t m0, int64_t n0) {
  if constexpr (T == kI8) {
    if (a.qx->per_row) return gemm_tile_per_row<MB, NR>(a, m0, n0);
  }
  gemm_tile_grouped<T, MB, NR>(a, m0, n0);
}

template <int T, int NR>
inline void gemm_columns(const GemmArgs& a, int64_t n0) {
  int64_t m0 = 0;
  for (; m0 + kTileRows <= a.rows; m0 += kTileRows) gemm_tile<T, kTileRows, NR>(a, m0, n0);
  if (m0 < a.rows) gemm_tile<T, 1, NR>(a, m0, n0);
  static_assert(kTileRows == 2, "one row is left at most");
}

template <int T>
void gemm(const GemmArgs& a, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + kTileCols <= n_end; n += kTileCols) gemm_columns<T, kTileCols>(a, n);
  for (; n < n_end; ++n) gemm_columns<T, 1>(a, n);
}

}  // namespace avx2_int
}  // namespace glmserve

#pragma GCC pop_options

glmserve::IsaKernels glmserve::avx2_integer_kernels() {
  IsaKernels table = avx2_kernels();
  table.gemm_q8[kI8] = &avx2_int::gemm<kI8>;
  table.gemm_q8[kI4] = &avx2_int::gemm<kI4>;
  table.quantize_rows = &quantize_rows_avx2;
  return table;
}
