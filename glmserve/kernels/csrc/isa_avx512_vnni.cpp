// The AVX-512 VNNI path: int8 and int4 weights against activations quantized to int8 with one scale per row
// (gemm.h's QuantizedRows), 64 multiply-adds per instruction (vpdpbusd), so that batch-1 decode is bound by memory
// rather than by widening weights to fp32. An int8 weight with one scale per output row gets int32 sums over all of
// k (gemm_tile_per_row, as fbgemm's dynamic int8 linear); grouped weights get one fp32 conversion per vector and
// weight row (gemm_tile). Other formats, and group sizes whose scales do not line up with a vector's lanes, take the
// AVX-512 float path.
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
// prefetched, NR cache lines per vector step (gemm.h's kPrefetchAheadBytes), as the float path does (gemm_impl.h).
// A product of one row tile (decode's GEMVs, an expert's few tokens) reads each line once, so it fetches them
// non-temporally, as the AVX2 path does: the streamed weights then evict less of what the step keeps in L2 / L3.
// More rows re-read each tile, which then goes to L2 (into L1 the int4 GEMVs read memory slower; BENCHMARKS.md).
// Forced inline: left to GCC 12, the kernels lost every weight prefetch (none in the objects).
__attribute__((always_inline)) inline void prefetch_weights(const char* line, bool streaming) {
  if (streaming) {
    _mm_prefetch(line, _MM_HINT_NTA);
  } else {
    _mm_prefetch(line, _MM_HINT_T1);
  }
}

// vpdpbusd multiplies unsigned bytes by signed ones: int8 weights are shifted to unsigned by +128 (an xor), int4
// nibbles already are (q + 8); lane_bias takes the shift back out. Input k's weights sit at byte k (int8) or in
// nibble k % 2 of byte k / 2 (int4), so an int4 vector's low nibbles meet the block's even inputs, high the odd.
// Where a vector's weight scales start: `g0` advances by groups_per_vector every vector (groups of 32 or 64
// inputs), or by one every vectors_per_group vectors (larger groups), counted rather than divided.
struct ScaleWalk {
  __m512i index;  // which of the 4 scales from g0 on each lane takes
  int64_t groups_per_vector, vectors_per_group;
};

// Per-row activations against grouped int8 / int4 weights. kOneScale: every vector lies inside one weight group
// (groups of at least a vector's inputs), so a row's scale for it is one broadcast rather than a gather of four.
// Each (vector, weight row, activation row) is one or two vpdpbusd from the activation's lane biases, converted to
// fp32 and scaled by the weight's scale; the activation rows' scales are applied once, at the end.
template <int T, int MB, int NR, bool kOneScale>
inline void gemm_tile(const GemmArgs& a, int64_t m0, int64_t n0, const ScaleWalk& walk) {
  constexpr int64_t kInputs = T == kI4 ? 128 : 64;  // inputs one 64-byte weight vector holds
  const int64_t row_bytes = T == kI4 ? a.k / 2 : a.k, full = row_bytes / 64;
  const QuantizedRows& qx = *a.qx;
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F), sign_bit = _mm512_set1_epi8(static_cast<char>(0x80));
  const uint8_t* w = static_cast<const uint8_t*>(a.w) + n0 * row_bytes;
  const float* s = a.scales + n0 * a.groups;
  const int64_t tiles_ahead = (kPrefetchAheadBytes + NR * row_bytes - 1) / (NR * row_bytes);
  const char* next_tile = reinterpret_cast<const char*>(w + tiles_ahead * NR * row_bytes);
  const bool streaming = a.rows <= kTileRows;  // each tile read once
  // The scales likewise, one line a step.
  const char* next_scales = reinterpret_cast<const char*>(s + tiles_ahead * NR * a.groups);
  const int64_t scale_bytes = NR * a.groups * static_cast<int64_t>(sizeof(float));
  __m512 acc[MB][NR];
  #pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  auto step = [&](int64_t v, int64_t g0, __mmask64 bytes) __attribute__((always_inline)) {
    __m512i x_low[MB], x_high[MB], bias[MB];  // int4: the block's even inputs, then its odd ones
    #pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      const int8_t* q = qx.q + (m0 + m) * qx.ld_q + kInputs * v;
      x_low[m] = _mm512_loadu_si512(q);
      if constexpr (T == kI4) x_high[m] = _mm512_loadu_si512(q + 64);
      bias[m] = _mm512_loadu_si512(qx.lane_bias + (m0 + m) * qx.ld_lane + 16 * v);
    }
    if (64 * v < scale_bytes) _mm_prefetch(next_scales + 64 * v, _MM_HINT_T1);
    const __mmask8 scales_left = static_cast<__mmask8>((1 << (a.groups - g0 < 4 ? a.groups - g0 : 4)) - 1);
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      prefetch_weights(next_tile + 64 * (NR * v + r), streaming);
      // Masked loads only at a row's end: on AMD Zen they cost several times a plain load.
      const uint8_t* wp = w + r * row_bytes + 64 * v;
      const __m512i wv = bytes == ~0ULL ? _mm512_loadu_si512(wp) : _mm512_maskz_loadu_epi8(bytes, wp);
      const float* sr = s + r * a.groups + g0;
      __m512 w_scale;
      if constexpr (kOneScale) {
        w_scale = _mm512_set1_ps(*sr);
      } else {
        const __m128 four = scales_left == 0xF ? _mm_loadu_ps(sr) : _mm_maskz_loadu_ps(scales_left, sr);
        w_scale = _mm512_permutexvar_ps(walk.index, _mm512_castps128_ps512(four));
      }
      if constexpr (T == kI4) {
        const __m512i low = _mm512_and_si512(wv, low_nibbles);
        const __m512i high = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low_nibbles);
        #pragma GCC unroll 16
        for (int m = 0; m < MB; ++m) {
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(bias[m], low, x_low[m]), high, x_high[m]);
          acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), w_scale, acc[m][r]);
        }
      } else {
        const __m512i unsigned_w = _mm512_xor_si512(wv, sign_bit);
        #pragma GCC unroll 16
        for (int m = 0; m < MB; ++m) acc[m][r] = _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(bias[m], unsigned_w, x_low[m])), w_scale, acc[m][r]);
      }
    }
  };
  int64_t g0 = 0, in_group = 0;
  auto next_vector = [&]() __attribute__((always_inline)) {
    if (walk.groups_per_vector) {
      g0 += walk.groups_per_vector;
    } else if (++in_group == walk.vectors_per_group) {
      in_group = 0;
      ++g0;
    }
  };
  for (int64_t v = 0; v < full; ++v, next_vector()) step(v, g0, ~0ULL);
  if (full * 64 < row_bytes) step(full, g0, (1ULL << (row_bytes - full * 64)) - 1);
  #pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r)
      a.y[(m0 + m) * a.ldy + n0 + r] =
          _mm512_reduce_add_ps(acc[m][r]) * qx.row_scale[m0 + m] + (a.bias ? a.bias[n0 + r] : 0.f);
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
  const bool streaming = a.rows <= kPerRowTileRows;  // each tile read once
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
      prefetch_weights(next_tile + 64 * (NR * v + r), streaming);
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
    const float x_scale = qx.row_scale[m0 + m];
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
  // An int8 GEMV takes one weight row at a time, so that a thread reads one sequential stream, where a row holds
  // enough vectors to outweigh a tile's setup (measured faster: per-row sums at every k, grouped rows of 1 KiB).
  // An int4 vector costs twice the instructions: its GEMVs keep the tile, whose weight rows share their activation
  // loads and whose accumulators are independent (measured faster, BENCHMARKS.md).
  if (T == kI8 && a.rows == 1 && (a.qx->per_row || (kOneScale && a.k >= 1024))) {
    for (; n < n_end; ++n) gemm_columns<T, 1, kOneScale>(a, n, walk);
    return;
  }
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

}  // namespace avx512_vnni
}  // namespace glmserve

#pragma GCC pop_options

glmserve::IsaKernels glmserve::avx512_vnni_kernels() {
  IsaKernels table = avx512_kernels();
  table.gemm_q8[kI8] = &avx512_vnni::gemm<kI8>;
  table.gemm_q8[kI4] = &avx512_vnni::gemm<kI4>;
  table.quantize_rows = &quantize_rows_avx2;
  return table;
}
