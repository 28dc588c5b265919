// The AVX-512 paged-attention path (F, BW, VL, DQ): 16 fp32 lanes.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "gemm.h"
#include "paged_attention.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

namespace glmserve {
namespace avx512_attention {

#include "weights.h"
#include "transpose_avx512.h"
#include "vector_exp.h"

struct V {
  using F = __m512;
  static constexpr int kWidth = 16, kScoreRows = 8;  // query rows scored together (16 accumulators of 32)
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float reduce(F a) { return _mm512_reduce_add_ps(a); }
  static void transpose(F* r) { transpose_16x16(r); }
  static float reduce_max(F a) { return _mm512_reduce_max_ps(a); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F floor(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static F pow2(F n) {  // 2^n for whole n in fp32's exponent range
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  static F exp(F x) { return cephes_exp<V>(x); }
  template <int T>
  static F load_kv(const uint8_t* row, int64_t d);
};

template <>
inline __m512 V::load_kv<kKvBF16>(const uint8_t* row, int64_t d) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * d)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
// e4m3 as an fp16 (sign, and exponent and mantissa shifted into fp16's: the value / 2^8, e4m3's subnormals landing on
// fp16 subnormals), widened by the conversion instruction: no arithmetic on subnormal fp32s, which stalls for
// microcode on some CPUs.
template <>
inline __m512 V::load_kv<kKvF8E4M3>(const uint8_t* row, int64_t d) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d)));
  const __m256i half = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8),
                                       _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)), 7));
  return _mm512_mul_ps(_mm512_cvtph_ps(half), _mm512_set1_ps(256.f));
}
template <>
inline __m512 V::load_kv<kKvF8E5M2>(const uint8_t* row, int64_t d) {  // the high bytes of 16 fp16s
  const __m256i halves = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(
      reinterpret_cast<const __m128i*>(row + d))), 8);
  return _mm512_cvtph_ps(halves);
}

#include "paged_attention_impl.h"

}  // namespace avx512_attention
}  // namespace glmserve

#pragma GCC pop_options

glmserve::AttentionKernels glmserve::avx512_attention_kernels() {
  return avx512_attention::attention_kernel_table();
}
