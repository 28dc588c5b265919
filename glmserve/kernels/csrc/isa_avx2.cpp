// The AVX2 + FMA + F16C path (e.g. AMD Zen 3, Intel Haswell and later): 8 fp32 lanes, 16 vector registers, so
// tiles of 2 activation rows x 4 weight rows.
#include <immintrin.h>

#include <cstdint>

#include "gemm.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace glmserve {
namespace avx2 {

#include "weights.h"

struct V {
  using F = __m256;
  static constexpr int kWidth = 8, kTileRows = 2, kTileCols = 4;
  static constexpr bool kNonTemporalStreams = true;  // gemm_impl.h; BENCHMARKS.md, session 24
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float reduce(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static void reduce4(const F* a, float* out) {  // the four sums of a[0..3] by pairwise adds
    const F sums = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1)));
  }
  template <int T>
  static F load_w(const uint8_t* row, int64_t k);
};

template <>
inline __m256 V::load_w<kF32>(const uint8_t* row, int64_t k) {
  return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + k);
}
template <>
inline __m256 V::load_w<kF16>(const uint8_t* row, int64_t k) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * k)));
}
template <>
inline __m256 V::load_w<kBF16>(const uint8_t* row, int64_t k) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * k)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
template <>
inline __m256 V::load_w<kF8E4M3>(const uint8_t* row, int64_t k) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k)));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
  const __m256i magnitude = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7F)), 20);
  return _mm256_mul_ps(_mm256_castsi256_ps(_mm256_or_si256(sign, magnitude)), _mm256_set1_ps(kFp8Rebias));
}
template <>
inline __m256 V::load_w<kI8>(const uint8_t* row, int64_t k) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k))));
}
template <>
inline __m256 V::load_w<kI4>(const uint8_t* row, int64_t k) {  // k is even: groups and vectors start on a byte
  int32_t packed;
  __builtin_memcpy(&packed, row + k / 2, 4);
  const __m128i b = _mm_cvtsi32_si128(packed), low_nibbles = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(b, low_nibbles), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low_nibbles);
  const __m128i q = _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), _mm_set1_epi8(8));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
}

#include "gemm_impl.h"

}  // namespace avx2
}  // namespace glmserve

#pragma GCC pop_options

glmserve::IsaKernels glmserve::avx2_kernels() { return avx2::kernel_table(); }
