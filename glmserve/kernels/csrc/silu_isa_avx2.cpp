// silu(gate) * up on AVX2 + FMA, 8 lanes at a time, with vector_exp.h's expf (as the attention kernels take it):
// glibc's expf, one call per value, took most of a prefill's dense MLP and shared-expert activations.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "silu.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace glmserve {
namespace avx2_silu {

#include "vector_exp.h"
#include "vector_avx2.h"

}  // namespace avx2_silu

void silu_mul_avx2(const float* gate, const float* up, int64_t n, float* out) {
  using V = avx2_silu::Avx2Lanes;
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 g = V::load(gate + c), e = V::exp(V::sub(V::zero(), g));
    V::store(out + c, V::mul(_mm256_div_ps(g, V::add(V::set1(1.f), e)), V::load(up + c)));
  }
  for (; c < n; ++c) out[c] = gate[c] / (1.f + std::exp(-gate[c])) * up[c];
}

}  // namespace glmserve

#pragma GCC pop_options
