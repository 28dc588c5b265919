// silu_isa_avx2.cpp's activation, called by silu_and_mul (fused_step.cpp) where the CPU runs AVX2.
#pragma once
#include <cstdint>

namespace glmserve {

// out[r, c] = silu(x[r, c]) * x[r, inter + c] for `rows` rows of [gate | up] (2 * inter values each).
void silu_and_mul_rows_avx2(const float* x, int64_t rows, int64_t inter, float* out);

}  // namespace glmserve
