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

struct V {
  using F = __m512;
  static constexpr int kWidth = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float reduce(F a) { return _mm512_reduce_add_ps(a); }
  static float reduce_max(F a) { return _mm512_reduce_max_ps(a); }
  // Cephes' expf: 2^n times a degree-6 polynomial on [-ln2/2, ln2/2]; inputs at or below -88.38 (-inf) give 0.
  static F exp(F x) {
    x = _mm512_max_ps(_mm512_min_ps(x, set1(88.3762626647949f)), set1(-88.3762626647949f));
    const F n = _mm512_roundscale_ps(fma(x, set1(1.44269504088896341f), set1(0.5f)),
                                     _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = fma(n, set1(-0.693359375f), x);
    x = fma(n, set1(2.12194440e-4f), x);
    F y = set1(1.9875691500e-4f);
    y = fma(y, x, set1(1.3981999507e-3f));
    y = fma(y, x, set1(8.3334519073e-3f));
    y = fma(y, x, set1(4.1665795894e-2f));
    y = fma(y, x, set1(1.6666665459e-1f));
    y = fma(y, x, set1(5.0000001201e-1f));
    y = fma(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, set1(1.f)));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(bits));
  }
  template <int T>
  static F load_kv(const uint8_t* row, int64_t d);
};

template <>
inline __m512 V::load_kv<kKvBF16>(const uint8_t* row, int64_t d) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * d)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
template <>
inline __m512 V::load_kv<kKvF8E4M3>(const uint8_t* row, int64_t d) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d)));
  const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
  const __m512i magnitude = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x7F)), 20);
  return _mm512_mul_ps(_mm512_castsi512_ps(_mm512_or_si512(sign, magnitude)), _mm512_set1_ps(kFp8Rebias));
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
