// The contract between the torch-facing ops (ops.cpp) and the per-ISA kernels (isa_*.cpp): plain pointers only, so
// the ISA translation units include no torch header and compile fast.
#pragma once
#include <cstdint>

namespace glmserve {

// The weight formats of reference.py, in the order ops.cpp maps torch dtypes to them.
enum WeightType : int { kF32, kF16, kBF16, kF8E4M3, kI8, kI4, kNumWeightTypes };

// Activation rows quantized to int8 in blocks of 32 inputs (as llama.cpp's q8_0), zero-padded to a multiple of
// kQ8Pad inputs, for integer dot products (AVX-512 VNNI) against int8 / int4 weights. A "lane" is one int32 of a
// dot product: 4 inputs of an int8 weight row, 8 of an int4 one (whose even and odd inputs sit in separate halves
// of each 128-input block, as the weight's low and high nibbles do).
constexpr int64_t kQ8Pad = 128;

//
// Per-row mode (`per_row`, for int8 weights with one scale per output row): one activation scale for the whole row,
// so a dot product's int32 sum spans all of k and is converted to fp32 once; a row then has one "lane" (ld_lane 1).
struct QuantizedRows {
  const int8_t* q;           // [rows, padded k]
  const float* lane_scale;   // [rows, lanes]: the scale of the block each lane's inputs belong to
  const int32_t* lane_bias;  // [rows, lanes]: minus the weight's zero point (128 or 8) times the lane's sum of q
  int64_t ld_q, ld_lane;
  bool per_row;
};

// Per-row int32 sums stay exact while k * 255 * 127 < 2^31.
constexpr int64_t kQ8PerRowMaxK = 65536;

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
  const QuantizedRows* qx;  // x quantized, for the kernels that take it (IsaKernels::gemm_q8), else null
};

using GemmFn = void (*)(const GemmArgs&, int64_t n_begin, int64_t n_end);

// Quantizes `rows` rows of x ([rows, k], ldx apart) for weights of type t, in blocks of 32 or per row.
using QuantizeRowsFn = void (*)(WeightType t, bool per_row, const float* x, int64_t ldx, int64_t rows, int64_t k,
                                int8_t* q, float* lane_scale, int32_t* lane_bias);

struct IsaKernels {
  GemmFn gemm[kNumWeightTypes];
  GemmFn gemm_q8[kNumWeightTypes];  // integer dot products on quantized x; null where this ISA has none
  QuantizeRowsFn quantize_rows;     // null where gemm_q8 is all null
};

// Inputs per lane of a quantized dot product for weights of type t (kI8: 4, kI4: 8).
inline int64_t q8_lane_inputs(WeightType t) { return t == kI4 ? 8 : 4; }

// Each is compiled in its own translation unit with its own target attributes; call one only on a CPU that has them.
IsaKernels portable_kernels();
IsaKernels avx2_kernels();
IsaKernels avx512_kernels();
IsaKernels avx512_vnni_kernels();

}  // namespace glmserve
