// The AVX2 + FMA + F16C paged-attention path: 8 fp32 lanes.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "gemm.h"
#include "paged_attention.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace glmserve {
namespace avx2_attention {

#include "weights.h"
#include "vector_exp.h"
#include "vector_avx2.h"

struct V : Avx2Lanes {
  static constexpr int kWidth = 8, kScoreRows = 2;  // query rows scored together (8 accumulators of 16)
  static float reduce(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  // r[j] = lane j of the 8 rows r[0..7]: pairs of rows interleaved, then fours, then the 128-bit lanes exchanged.
  static void transpose(F* r) {
    F t[8], s[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 2; ++g) {  // s[4g + c], 128-bit lane L: lane 4L + c of rows 4g..4g + 3
      s[4 * g] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
      s[4 * g + 1] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
      s[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
      s[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      r[c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x20);
      r[4 + c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x31);
    }
  }
  static float reduce_max(F a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  template <int T>
  static F load_kv(const uint8_t* row, int64_t d);
};

template <>
inline __m256 V::load_kv<kKvBF16>(const uint8_t* row, int64_t d) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * d)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
// e4m3 as an fp16 widened by the conversion instruction, as the AVX-512 path's.
template <>
inline __m256 V::load_kv<kKvF8E4M3>(const uint8_t* row, int64_t d) {
  const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + d)));
  const __m128i half = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8),
                                    _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7F)), 7));
  return _mm256_mul_ps(_mm256_cvtph_ps(half), _mm256_set1_ps(256.f));
}
template <>
inline __m256 V::load_kv<kKvF8E5M2>(const uint8_t* row, int64_t d) {  // the high bytes of 8 fp16s
  const __m128i halves = _mm_slli_epi16(_mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + d))),
                                        8);
  return _mm256_cvtph_ps(halves);
}

#include "paged_attention_impl.h"

}  // namespace avx2_attention
}  // namespace glmserve

#pragma GCC pop_options

glmserve::AttentionKernels glmserve::avx2_attention_kernels() { return avx2_attention::attention_kernel_table(); }
