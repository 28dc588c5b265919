// The AVX-512 path (F, BW, VL, DQ; e.g. AMD Zen 4, Intel Skylake-SP and later): 16 fp32 lanes, 32 vector
// registers, so tiles of 4 activation rows x 4 weight rows.
#include <immintrin.h>

#include <cstdint>

#include "gemm.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

namespace glmserve {
namespace avx512 {

#include "weights.h"

struct V {
  using F = __m512;
  static constexpr int kWidth = 16, kTileRows = 4, kTileCols = 4;
  static constexpr bool kNonTemporalStreams = true;  // gemm_impl.h; BENCHMARKS.md, session 31
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float reduce(F a) { return _mm512_reduce_add_ps(a); }
  static void reduce4(const F* a, float* out) {  // the four sums of a[0..3], 128-bit lane halves added first
    const F ab = _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], 0x44), _mm512_shuffle_f32x4(a[0], a[1], 0xEE));
    const F cd = _mm512_add_ps(_mm512_shuffle_f32x4(a[2], a[3], 0x44), _mm512_shuffle_f32x4(a[2], a[3], 0xEE));
    F lanes = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    lanes = _mm512_add_ps(lanes, _mm512_permute_ps(lanes, 0x4E));
    lanes = _mm512_add_ps(lanes, _mm512_permute_ps(lanes, 0xB1));
    const __m512i firsts = _mm512_setr_epi32(0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12);
    _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(firsts, lanes)));
  }
  template <int T>
  static F load_w(const uint8_t* row, int64_t k);
};

template <>
inline __m512 V::load_w<kF32>(const uint8_t* row, int64_t k) {
  return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + k);
}
template <>
inline __m512 V::load_w<kF16>(const uint8_t* row, int64_t k) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * k)));
}
template <>
inline __m512 V::load_w<kBF16>(const uint8_t* row, int64_t k) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * k)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
template <>
inline __m512 V::load_w<kF8E4M3>(const uint8_t* row, int64_t k) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)));
  const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
  const __m512i magnitude = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x7F)), 20);
  return _mm512_mul_ps(_mm512_castsi512_ps(_mm512_or_si512(sign, magnitude)), _mm512_set1_ps(kFp8Rebias));
}
template <>
inline __m512 V::load_w<kI8>(const uint8_t* row, int64_t k) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k))));
}
template <>
inline __m512 V::load_w<kI4>(const uint8_t* row, int64_t k) {  // k is even: groups and vectors start on a byte
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2)), low_nibbles = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(b, low_nibbles), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low_nibbles);
  const __m128i q = _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), _mm_set1_epi8(8));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
}

#include "gemm_impl.h"

}  // namespace avx512
}  // namespace glmserve

#pragma GCC pop_options

glmserve::IsaKernels glmserve::avx512_kernels() { return avx512::kernel_table(); }
