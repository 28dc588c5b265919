// The contract between the torch-facing ops (ops.cpp) and the per-ISA kernels (isa_*.cpp): plain pointers only, so
// the ISA translation units include no torch header and compile fast.
#pragma once
#include <cstdint>

namespace glmserve {

// The weight formats of reference.py, in the order ops.cpp maps torch dtypes to them.
enum WeightType : int { kF32, kF16, kBF16, kF8E4M3, kI8, kI4, kNumWeightTypes };

// y[m, n] = bias[n] + sum_k x[m, k] * W[n, k] for m < rows and n in the range a call is given.
struct GemmArgs {
  const float* x;       // [rows, k], rows ldx apart
  int64_t ldx;
  int64_t rows;
  const void* w;        // [N, k] in its format (int4: [N, k / 2] bytes)
  const float* scales;  // [N, groups] for fp8 / int8 / int4, else null
  int64_t k;
  int64_t group_size;   // inputs per scale (k for per-row scales)
  int64_t groups;       // ceil(k / group_size)
  const float* bias;    // [N] or null
  float* y;             // [rows, N], rows ldy apart
  int64_t ldy;
};

using GemmFn = void (*)(const GemmArgs&, int64_t n_begin, int64_t n_end);

struct IsaKernels {
  GemmFn gemm[kNumWeightTypes];
};

// Each is compiled in its own translation unit with its own target attributes; call one only on a CPU that has them.
IsaKernels portable_kernels();
IsaKernels avx2_kernels();
IsaKernels avx512_kernels();

}  // namespace glmserve
