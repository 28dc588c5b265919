// silu_isa_avx2.cpp's activation, called by silu_and_mul (fused_step.cpp) and the decode MoE block (ops.cpp) where
// the CPU runs AVX2.
#pragma once
#include <cstdint>

namespace glmserve {

// out[c] = silu(gate[c]) * up[c] for n values; out may be gate.
void silu_mul_avx2(const float* gate, const float* up, int64_t n, float* out);

// out[r, c] = silu(x[r, c]) * x[r, inter + c] for `rows` rows of [gate | up] (2 * inter values each).
void silu_and_mul_rows_avx2(const float* x, int64_t rows, int64_t inter, float* out);

}  // namespace glmserve
