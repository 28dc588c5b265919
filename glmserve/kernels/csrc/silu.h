// silu_isa_avx2.cpp's activation, which silu_mul (fused_step.cpp) calls where the CPU runs AVX2.
#pragma once
#include <cstdint>

namespace glmserve {

// out[c] = silu(gate[c]) * up[c] for n values; out may be gate.
void silu_mul_avx2(const float* gate, const float* up, int64_t n, float* out);

}  // namespace glmserve
