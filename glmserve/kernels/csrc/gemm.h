// The contract between the torch-facing ops (ops.cpp) and the per-ISA kernels (isa_*.cpp): plain pointers only, so
// the ISA translation units include no torch header and compile fast.
#pragma once
#include <cstdint>

namespace glmserve {

// The weight formats of reference.py, in the order ops.cpp maps torch dtypes to them.
enum WeightType : int { kF32, kF16, kBF16, kF8E4M3, kI8, kI4, kNumWeightTypes };

// Activation rows quantized to int8 with one scale per row (absmax / 127), zero-padded to a multiple of kQ8Pad
// inputs, for integer dot products (AVX-512 VNNI, AVX2) against int8 / int4 weights: the row's scale factors out
// of every sum, so a weight group's sum is converted to fp32 once and scaled by the weight's scale alone. A "lane"
// is one int32 of a dot product: 4 inputs of an int8 weight row, 8 of an int4 one (whose even and odd inputs sit
// in separate halves of each 128-input block, as the weight's low and high nibbles do).
constexpr int64_t kQ8Pad = 128;

// `lane_bias` takes an unsigned weight's zero point back out of a dot product (vpdpbusd multiplies unsigned weight
// bytes by signed activations): minus the zero point (128 for int8, 8 for int4) times the sum of the lane's q. In
// per-row mode (`per_row`, for int8 weights with one scale per output row) a row has one bias, over all of k, and a
// dot product's int32 sum spans all of k (ld_lane 1).
struct QuantizedRows {
  const int8_t* q;           // [rows, padded k]
  const float* row_scale;    // [rows]
  const int32_t* lane_bias;  // [rows, lanes]
  int64_t ld_q, ld_lane;
  bool per_row;
};

// Every kernel's tile of NR weight rows is contiguous, and so are the next tiles': while a tile is read, the one
// whole tiles and at least this far ahead is requested, a slice per vector step. A row of an int8 [*, 4096] weight is
// one 4 KiB page, where the hardware prefetcher stops and restarts, so prefetching a fixed distance along each row
// leaves the next tile's rows cold and a GEMV bound by latency rather than bandwidth.
constexpr int64_t kPrefetchAheadBytes = 16384;

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

// Quantizes `rows` rows of x ([rows, k], ldx apart) for weights of type t, as QuantizedRows lays them out.
using QuantizeRowsFn = void (*)(WeightType t, bool per_row, const float* x, int64_t ldx, int64_t rows, int64_t k,
                                int8_t* q, float* row_scale, int32_t* lane_bias);

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
// avx2_kernels() with the integer dot products of isa_avx2_int.cpp.
IsaKernels avx2_integer_kernels();
// The activation quantization of every integer path (AVX2 code: every CPU with VNNI has AVX2).
void quantize_rows_avx2(WeightType t, bool per_row, const float* x, int64_t ldx, int64_t rows, int64_t k, int8_t* q,
                        float* row_scale, int32_t* lane_bias);

}  // namespace glmserve
