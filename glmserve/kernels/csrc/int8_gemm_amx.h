// int8_gemm_amx.cpp's GEMM, called by int8_channel_gemm (ops.cpp) where the CPU has AMX.
#pragma once
#include <cstdint>

namespace glmserve {

// y[m, n] = float(sum_k q[m, k] * w[n, k]) * (row_scale[m] * w_scale[n]) (+ bias[n]).
struct Int8GemmArgs {
  const int8_t* q;         // [m, ldq] activations quantized per row, zero past k; ldq a multiple of 64
  int64_t ldq;
  const float* row_scale;  // [m]
  int64_t m;
  const int8_t* w;         // [n, k]
  int64_t k, n;
  const float* w_scale;    // [n]
  const float* bias;       // [n] or null
  float* y;                // [m, n]
};

// Whether this CPU has AMX tiles with int8 multiplies and the OS let this process use them (asked once).
bool amx_int8_ready();

// Call only where amx_int8_ready().
void int8_channel_gemm_amx(const Int8GemmArgs& args);

}  // namespace glmserve
