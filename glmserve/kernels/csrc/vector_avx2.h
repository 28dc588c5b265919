// 8 fp32 lanes on AVX2 + FMA: the arithmetic vector_exp.h's cephes_exp asks of its vector type, and that exp.
// Included inside a translation unit's own namespace, after vector_exp.h, within `#pragma GCC target("avx2,fma")`.
struct Avx2Lanes {
  using F = __m256;
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F floor(F a) { return _mm256_floor_ps(a); }
  static F pow2(F n) {  // 2^n for whole n in fp32's exponent range
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  static F exp(F x) { return cephes_exp<Avx2Lanes>(x); }
};
