// The torch-facing ops: argument checks, the ISA a call runs on, and the split of work over torch's intra-op
// threads (at::parallel_for, so torch.set_num_threads governs these kernels too).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "gemm.h"
#include "int8_gemm_amx.h"
#include "isa.h"
#include "ops.h"

namespace glmserve {

bool cpu_runs_isa(int64_t isa) {
  switch (isa) {
    case 0:
      return true;
    case 1:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case 2:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && cpu_runs_isa(1);
    case 3:
      return __builtin_cpu_supports("avx512vnni") && cpu_runs_isa(2);
    default:
      return false;
  }
}

namespace {

// The ISAs in the order `kernels.native` names them; higher is faster where the CPU has it.
const char* const kIsaNames[] = {"portable", "avx2", "avx512", "avx512_vnni"};
constexpr int64_t kNumIsas = 4;
constexpr int64_t kRowsPerTask = 16;  // output rows handed out at a time; a multiple of every ISA's tile width

// Each table is built on first use and only for an ISA this CPU runs: building one runs that ISA's code.
const IsaKernels& kernels_for(int64_t isa) {
  TORCH_CHECK(isa >= 0 && isa < kNumIsas && cpu_runs_isa(isa), "glmserve kernels: ISA ", isa,
              " is not available here");
  switch (isa) {
    case 0: { static const IsaKernels table = portable_kernels(); return table; }
    case 1: { static const IsaKernels table = avx2_integer_kernels(); return table; }
    case 2: { static const IsaKernels table = avx512_kernels(); return table; }
    default: { static const IsaKernels table = avx512_vnni_kernels(); return table; }
  }
}

WeightType weight_type(const at::Tensor& w) {
  switch (w.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kFloat8_e4m3fn: return kF8E4M3;
    case at::kChar: return kI8;
    case at::kByte: return kI4;
    default: TORCH_CHECK(false, "glmserve kernels: no layout for weights of dtype ", w.scalar_type());
  }
}

bool is_scaled(WeightType t) { return t == kF8E4M3 || t == kI8 || t == kI4; }

// One weight matrix's view for GemmArgs: its format, inputs per row, and group geometry, checked against x.
struct WeightView {
  WeightType type;
  int64_t rows, k, group_size, groups, row_bytes;
};

WeightView view_weight(const at::Tensor& w, const c10::optional<at::Tensor>& scales, int64_t k, int64_t group_size,
                       int64_t rows, int64_t stored_cols) {
  WeightView v{weight_type(w), rows, k, 0, 1, 0};
  TORCH_CHECK(stored_cols == (v.type == kI4 ? k / 2 : k) && (v.type != kI4 || k % 2 == 0),
              "glmserve kernels: weights of ", stored_cols, " stored columns for ", k, " inputs");
  v.row_bytes = stored_cols * w.element_size();
  if (!is_scaled(v.type)) return v;
  v.group_size = group_size > 0 ? group_size : k;
  TORCH_CHECK(v.type != kI4 || v.group_size % 2 == 0, "glmserve kernels: int4 groups must be even");
  v.groups = (k + v.group_size - 1) / v.group_size;
  TORCH_CHECK(scales.has_value(), "glmserve kernels: ", w.scalar_type(), " weights need their scales");
  TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->is_contiguous() && scales->dim() == w.dim() &&
                  (w.dim() == 2 || scales->size(0) == w.size(0)) && scales->size(-1) == v.groups &&
                  scales->size(-2) == rows,
              "glmserve kernels: scales must be contiguous fp32 [", w.dim() == 3 ? "experts, " : "", "rows, ",
              v.groups, "], got ", scales->sizes());
  return v;
}

GemmArgs gemm_args(const WeightView& v, const void* w, const float* scales, const float* x, int64_t ldx,
                   int64_t rows, float* y, int64_t ldy) {
  return GemmArgs{x, ldx, rows, w, scales, v.k, v.group_size, v.groups, nullptr, y, ldy, nullptr};
}

// Whether the ISA has an integer-dot-product kernel for this weight and its scales line up with the kernels'
// lanes (isa_avx512_vnni.cpp, isa_avx2_int.cpp): groups of 32, 64 (int4), multiples of a vector's inputs, or one
// group per row.
bool takes_q8(const IsaKernels& table, const WeightView& v) {
  if (table.gemm_q8[v.type] == nullptr) return false;
  const int64_t g = v.group_size;
  return v.groups == 1 || g == 32 || (v.type == kI4 ? g == 64 || g % 128 == 0 : g % 64 == 0);
}

// x quantized for a gemm_q8 kernel: the buffers, and the view of them that GemmArgs::qx points to.
struct QuantizedX {
  at::Tensor q, row_scale, lane_bias;
  QuantizedRows rows;

  QuantizedRows from_row(int64_t row0) const {
    return {rows.q + row0 * rows.ld_q, rows.row_scale + row0, rows.lane_bias + row0 * rows.ld_lane, rows.ld_q,
            rows.ld_lane, rows.per_row};
  }
};

// Activations are quantized with one scale per row (benchmarks/activation_quant_accuracy.py measures what that
// costs a whole model); against an int8 weight with one scale per row the kernel's int32 sums span all of k.
bool per_row_sums(const WeightView& v) { return v.type == kI8 && v.groups == 1 && v.k <= kQ8PerRowMaxK; }

// `gather`: the rows of x to quantize, in order (default: rows 0..rows-1), read where they lie.
QuantizedX quantize_x(const IsaKernels& table, const WeightView& v, const float* x, int64_t ldx, int64_t rows,
                      const int64_t* gather = nullptr) {
  const bool per_row = per_row_sums(v);
  const int64_t padded = (v.k + kQ8Pad - 1) / kQ8Pad * kQ8Pad;
  const int64_t lanes = per_row ? 1 : padded / q8_lane_inputs(v.type);
  QuantizedX out{at::empty({rows, padded}, at::kChar), at::empty({rows}, at::kFloat),
                 at::empty({rows, lanes}, at::kInt), {}};
  out.rows = {out.q.data_ptr<int8_t>(), out.row_scale.data_ptr<float>(), out.lane_bias.data_ptr<int32_t>(), padded,
              lanes, per_row};
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    if (gather == nullptr)
      return table.quantize_rows(v.type, per_row, x + begin * ldx, ldx, end - begin, v.k,
                                 out.q.data_ptr<int8_t>() + begin * padded, out.row_scale.data_ptr<float>() + begin,
                                 out.lane_bias.data_ptr<int32_t>() + begin * lanes);
    for (int64_t r = begin; r < end; ++r)
      table.quantize_rows(v.type, per_row, x + gather[r] * ldx, ldx, 1, v.k, out.q.data_ptr<int8_t>() + r * padded,
                          out.row_scale.data_ptr<float>() + r, out.lane_bias.data_ptr<int32_t>() + r * lanes);
  });
  return out;
}

// Enough rows per task that a task's work outweighs handing it out.
int64_t grain_for(int64_t k, int64_t rows) { return std::max<int64_t>(1, 32768 / (k * rows * kRowsPerTask)); }

// (Looked at before converting: a conversion is a dispatched op even where it changes nothing, and a decode step
// makes dozens of these calls.)
c10::optional<at::Tensor> contiguous_fp32(const c10::optional<at::Tensor>& t) {
  if (!t || (t->scalar_type() == at::kFloat && t->is_contiguous())) return t;
  return t->to(at::kFloat).contiguous();
}

// One product set up once, as `linear` and an MoE block's shared expert run it: the weight in its kernel's view, the
// kernel (a q8 one over x's rows quantized here, where the ISA has one for this layout), and its output rows handed
// out in tasks of `task_rows` (a multiple of kRowsPerTask: whole tiles, so an output's bits do not depend on how the
// tasks are grouped).
struct Product {
  at::Tensor w;
  c10::optional<at::Tensor> scales, bias;
  GemmFn fn;
  GemmArgs args;
  QuantizedX qx;
  int64_t n, task_rows, tasks;

  Product(const IsaKernels& table, const LinearWeights& weights, const float* x, int64_t k, int64_t rows, float* y,
          int64_t task_rows)
      : w(weights.weight.contiguous()), scales(contiguous_fp32(weights.scales)), bias(contiguous_fp32(weights.bias)),
        n(w.size(0)), task_rows(task_rows), tasks((n + task_rows - 1) / task_rows) {
    TORCH_CHECK(w.dim() == 2, "glmserve kernels: weights must be [N, K]");
    const WeightView v = view_weight(w, scales, k, weights.group_size, n, w.size(1));
    TORCH_CHECK(!bias || bias->numel() == n, "glmserve kernels: bias must be [N]");
    args = gemm_args(v, w.data_ptr(), is_scaled(v.type) ? scales->data_ptr<float>() : nullptr, x, k, rows, y, n);
    args.bias = bias ? bias->data_ptr<float>() : nullptr;
    fn = table.gemm[v.type];
    if (takes_q8(table, v)) {
      qx = quantize_x(table, v, x, k, rows);
      args.qx = &qx.rows;
      fn = table.gemm_q8[v.type];
    }
  }
  Product(const Product&) = delete;  // args.qx points into qx

  // Output rows of tasks [begin, end).
  void run(int64_t begin, int64_t end) const { fn(args, begin * task_rows, std::min(end * task_rows, n)); }
};

}  // namespace

// x [..., K] of any strides, as F.linear takes it, -> [..., N]: the reshapes and copies are done here rather than in
// the Python wrapper, where they cost more than a small product's own time at batch 1.
at::Tensor linear(const at::Tensor& x_in, const at::Tensor& w_in, const c10::optional<at::Tensor>& scales_in,
                  int64_t group_size, const c10::optional<at::Tensor>& bias_in, int64_t isa) {
  TORCH_CHECK(x_in.dim() >= 1 && x_in.scalar_type() == at::kFloat, "glmserve kernels: x must be fp32 [..., K]");
  TORCH_CHECK(w_in.dim() == 2, "glmserve kernels: weights must be [N, K]");
  const at::Tensor x = (x_in.dim() == 2 ? x_in : x_in.reshape({-1, x_in.size(-1)})).contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  std::vector<int64_t> out_sizes = x_in.sizes().vec();
  out_sizes.back() = w_in.size(0);
  at::Tensor y = at::empty(out_sizes, x.options());
  const Product product(kernels_for(isa), {w_in, scales_in, bias_in, group_size}, x.data_ptr<float>(), k, m,
                        y.data_ptr<float>(), kRowsPerTask);
  if (m == 0 || product.n == 0) return y;
  at::parallel_for(0, product.tasks, grain_for(k, m),
                   [&](int64_t begin, int64_t end) { product.run(begin, end); });
  return y;
}

bool tiles_beat_int_mm(int64_t rows, int64_t k) { return k <= 1024 || rows >= 256; }

// A router's logits [T, E] from fp32 rows [T, H] and its fp32 weight [E, H]: the native kernel for a decode's rows,
// torch's GEMM (oneDNN) from kRouterGemmRows, where the native kernel, which walks the few weight rows once per
// block of activation rows, was the slower on every router shape measured (BENCHMARKS.md, session 30).
constexpr int64_t kRouterGemmRows = 128;

at::Tensor router_logits(const at::Tensor& x, const at::Tensor& w, int64_t isa) {
  if (x.size(0) >= kRouterGemmRows) return at::linear(x, w);
  return linear(x, w, c10::nullopt, 0, c10::nullopt, isa);
}

// x [M, K] fp32 @ W.T (+ bias) for an int8 W [N, K] with one scale per row, as torch's int8 GEMM (at::_int_mm,
// oneDNN, blocked for cache) or, with `tiles`, int8_gemm_amx.cpp's AMX GEMM, over x quantized as the integer
// kernels quantize it (the tiles scale their own sums, in the same steps). Its int32 sums are
// scaled in their own buffer, each step rounded as the VNNI kernel rounds it, so a product gives the same bits on
// either path; with a bias not always (at 5, 9, 13, 17 and 33 rows the bias's addition differed in the last bit).
// Torch ops around _int_mm took 2-4x the GEMM's own time (a pass, and often a fresh buffer, each).
// `rows` (int64 [M], optional): the rows of x to multiply, read where they lie, instead of all of x.
at::Tensor int8_channel_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                             const c10::optional<at::Tensor>& bias_in, int64_t isa, bool tiles,
                             const c10::optional<at::Tensor>& rows) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "glmserve kernels: int8_channel_gemm takes contiguous fp32 [M, K] rows");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.size(1) == x.size(1),
              "glmserve kernels: int8_channel_gemm takes int8 weights [N, K]");
  TORCH_CHECK(!rows || (rows->dim() == 1 && rows->scalar_type() == at::kLong && rows->is_contiguous()),
              "glmserve kernels: int8_channel_gemm's rows are contiguous int64 [M]");
  const int64_t m = rows ? rows->size(0) : x.size(0), k = x.size(1), n = w.size(0);
  const int64_t* gather = rows ? rows->data_ptr<int64_t>() : nullptr;
  for (int64_t r = 0; gather != nullptr && r < m; ++r)
    TORCH_CHECK(gather[r] >= 0 && gather[r] < x.size(0), "glmserve kernels: row ", gather[r], " is not in x");
  const at::Tensor col_scale = scales.to(at::kFloat).contiguous();
  TORCH_CHECK(col_scale.numel() == n, "glmserve kernels: int8_channel_gemm takes one scale per weight row");
  const c10::optional<at::Tensor> bias = contiguous_fp32(bias_in);
  if (bias) TORCH_CHECK(bias->numel() == n, "glmserve kernels: bias must be [N]");
  const IsaKernels& table = kernels_for(isa);
  TORCH_CHECK(table.quantize_rows != nullptr, "glmserve kernels: ISA ", isa, " quantizes no activations");
  if (m == 0 || n == 0) return at::zeros({m, n}, x.options());
  const WeightView v{kI8, n, k, k, 1, k};
  const QuantizedX qx = quantize_x(table, v, x.data_ptr<float>(), k, m, gather);
  if (tiles) {
    TORCH_CHECK(amx_int8_ready(), "glmserve kernels: this CPU has no AMX int8 tiles for int8_channel_gemm");
    TORCH_CHECK(w.is_contiguous(), "glmserve kernels: int8_channel_gemm's tiles read contiguous weights");
    at::Tensor y = at::empty({m, n}, x.options());
    int8_channel_gemm_amx({qx.q.data_ptr<int8_t>(), qx.q.size(1), qx.row_scale.data_ptr<float>(), m,
                           w.data_ptr<int8_t>(), k, n, col_scale.data_ptr<float>(),
                           bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>()});
    return y;
  }
  at::Tensor sums = at::_int_mm(qx.q.narrow(1, 0, k), w.t());
  TORCH_CHECK(sums.is_contiguous(), "glmserve kernels: _int_mm returned strided sums");
  int32_t* out = sums.data_ptr<int32_t>();
  const float* row_scale = qx.row_scale.data_ptr<float>();
  const float* w_scale = col_scale.data_ptr<float>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
    std::vector<float> scaled(n);  // a row's floats, copied over its int32 sums (distinct buffers: vectorized)
    float* y = scaled.data();
    for (int64_t r = begin; r < end; ++r) {
      const float s = row_scale[r];
      const int32_t* row = out + r * n;
      for (int64_t c = 0; c < n; ++c) y[c] = static_cast<float>(row[c]) * (s * w_scale[c]);
      if (b != nullptr)
        for (int64_t c = 0; c < n; ++c) y[c] += b[c];
      std::memcpy(out + r * n, y, n * sizeof(float));
    }
  });
  return sums.view(at::kFloat);
}

namespace {

// One task of an MoE phase: output rows [begin, end) of one expert's product.
struct ExpertTask {
  int64_t expert, begin, end;
};

std::vector<ExpertTask> expert_tasks(const std::vector<int64_t>& counts, int64_t out_rows) {
  std::vector<ExpertTask> tasks;
  for (int64_t e = 0; e < static_cast<int64_t>(counts.size()); ++e)
    for (int64_t r = 0; counts[e] > 0 && r < out_rows; r += kRowsPerTask)
      tasks.push_back({e, r, std::min(r + kRowsPerTask, out_rows)});
  return tasks;
}

}  // namespace

at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                       const at::Tensor& w13, const c10::optional<at::Tensor>& w13_scales, const at::Tensor& w2,
                       const c10::optional<at::Tensor>& w2_scales, int64_t group_size, int64_t isa) {
  return moe_block(x, topk_weights, topk_ids, w13, w13_scales, w2, w2_scales, group_size, nullptr, nullptr, isa);
}

at::Tensor moe_block(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                     const at::Tensor& w13, const c10::optional<at::Tensor>& w13_scales, const at::Tensor& w2,
                     const c10::optional<at::Tensor>& w2_scales, int64_t group_size, const LinearWeights* shared_gate_up,
                     const LinearWeights* shared_down, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "glmserve kernels: x must be "
              "contiguous fp32 [T, H]");
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.is_contiguous() && w2.is_contiguous() &&
                  w13.scalar_type() == w2.scalar_type(),
              "glmserve kernels: w13 [E, 2I, H] and w2 [E, H, I] must be contiguous, of one dtype");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.sizes() == topk_weights.sizes() && topk_ids.size(0) == x.size(0),
              "glmserve kernels: topk_ids and topk_weights must both be [T, k]");
  const int64_t tokens = x.size(0), hidden = x.size(1), top_k = topk_ids.size(1), experts = w13.size(0);
  const int64_t inter = w13.size(1) / 2;
  TORCH_CHECK(w13.size(1) == 2 * inter && w2.size(0) == experts && w2.size(1) == hidden,
              "glmserve kernels: expert weights of mismatched shapes");
  const WeightView v13 = view_weight(w13, w13_scales, hidden, group_size, 2 * inter, w13.size(2));
  const WeightView v2 = view_weight(w2, w2_scales, inter, group_size, hidden, w2.size(2));
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous(), weights = topk_weights.to(at::kFloat).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();

  // Route: each (token, slot) with an expert gets a row of its expert's block; ids < 0 are skipped.
  std::vector<int64_t> counts(experts, 0), first(experts + 1, 0), slot_row(tokens * top_k, -1);
  for (int64_t i = 0; i < tokens * top_k; ++i) {
    TORCH_CHECK(id[i] < experts, "glmserve kernels: expert id ", id[i], " of ", experts, " experts");
    if (id[i] >= 0) ++counts[id[i]];
  }
  for (int64_t e = 0; e < experts; ++e) first[e + 1] = first[e] + counts[e];
  std::vector<int64_t> filled(first.begin(), first.end() - 1);
  const int64_t assigned = first[experts];
  std::vector<int64_t> row_token(assigned);
  for (int64_t i = 0; i < tokens * top_k; ++i)
    if (id[i] >= 0) {
      slot_row[i] = filled[id[i]]++;
      row_token[slot_row[i]] = i / top_k;
    }

  const IsaKernels& table = kernels_for(isa);
  const bool q8_13 = takes_q8(table, v13), q8_2 = takes_q8(table, v2);
  const GemmFn fn13 = (q8_13 ? table.gemm_q8 : table.gemm)[v13.type];
  const GemmFn fn2 = (q8_2 ? table.gemm_q8 : table.gemm)[v2.type];
  QuantizedX qx13, qx2;
  // A q8 kernel reads only the quantized rows, quantized in parallel from their tokens' rows where they lie; the
  // fp32 rows are gathered into experts' blocks only for a float product (a serial copy of top_k rows a token).
  at::Tensor xg;
  if (q8_13) {
    qx13 = quantize_x(table, v13, x.data_ptr<float>(), hidden, assigned, row_token.data());
  } else {
    xg = at::empty({assigned, hidden}, x.options());
    for (int64_t r = 0; r < assigned; ++r)
      std::memcpy(xg.data_ptr<float>() + r * hidden, x.data_ptr<float>() + row_token[r] * hidden,
                  hidden * sizeof(float));
  }
  const auto* w13_bytes = static_cast<const uint8_t*>(w13.data_ptr());
  const auto* w2_bytes = static_cast<const uint8_t*>(w2.data_ptr());
  const float* s13 = is_scaled(v13.type) ? w13_scales->data_ptr<float>() : nullptr;
  const float* s2 = is_scaled(v2.type) ? w2_scales->data_ptr<float>() : nullptr;

  // The shared expert's gate_up runs in the routed gate/up phase and its down in the down phase, as tasks after the
  // routed ones: the block then takes two parallel regions, not four.
  TORCH_CHECK((shared_gate_up == nullptr) == (shared_down == nullptr),
              "glmserve kernels: a shared expert has both gate_up and down");
  std::optional<Product> shared1, shared2;
  at::Tensor shared_gate_up_out, shared_act, shared_out;
  int64_t shared_inter = 0;
  if (shared_gate_up != nullptr) {
    TORCH_CHECK(shared_gate_up->weight.size(0) % 2 == 0, "glmserve kernels: a shared gate_up is [2I, H], gate first");
    // (Its K is checked by the products; the down's N sizes the rows it writes into shared_out.)
    TORCH_CHECK(shared_down->weight.dim() == 2 && shared_down->weight.size(0) == hidden,
                "glmserve kernels: a shared down is [H, I]");
    shared_inter = shared_gate_up->weight.size(0) / 2;
    shared_gate_up_out = at::empty({tokens, 2 * shared_inter}, x.options());
    shared_out = at::empty({tokens, hidden}, x.options());
    // (A routed gate/up task reads kRowsPerTask rows of gate and of up: a shared task as many, so that the
    // threads' equal runs of tasks are equal work.)
    shared1.emplace(table, *shared_gate_up, x.data_ptr<float>(), hidden, tokens, shared_gate_up_out.data_ptr<float>(),
                    2 * kRowsPerTask);
  }

  // Gate and up of the same rows in one task, so SiLU(gate) * up is formed while both are in cache.
  at::Tensor gate = at::empty({assigned, inter}, x.options()), up = at::empty({assigned, inter}, x.options());
  const std::vector<ExpertTask> tasks13 = expert_tasks(counts, inter);
  const int64_t routed13 = static_cast<int64_t>(tasks13.size());
  at::parallel_for(0, routed13 + (shared1 ? shared1->tasks : 0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (t >= routed13) {
        shared1->run(t - routed13, t - routed13 + 1);
        continue;
      }
      const ExpertTask& task = tasks13[t];
      const int64_t row0 = first[task.expert], rows = counts[task.expert];
      const uint8_t* w = w13_bytes + task.expert * 2 * inter * v13.row_bytes;
      const float* s = s13 ? s13 + task.expert * 2 * inter * v13.groups : nullptr;
      float* g = gate.data_ptr<float>() + row0 * inter;
      float* u = up.data_ptr<float>() + row0 * inter;
      const float* xe = q8_13 ? nullptr : xg.data_ptr<float>() + row0 * hidden;
      const QuantizedRows expert_qx = q8_13 ? qx13.from_row(row0) : QuantizedRows{};
      GemmArgs args = gemm_args(v13, w, s, xe, hidden, rows, g, inter);
      args.qx = q8_13 ? &expert_qx : nullptr;
      fn13(args, task.begin, task.end);
      args.w = w + inter * v13.row_bytes;
      args.scales = s ? s + inter * v13.groups : nullptr;
      args.y = u;
      fn13(args, task.begin, task.end);
      for (int64_t r = 0; r < rows; ++r)
        silu_mul(g + r * inter + task.begin, u + r * inter + task.begin, task.end - task.begin,
                 g + r * inter + task.begin);
    }
  });

  if (q8_2) qx2 = quantize_x(table, v2, gate.data_ptr<float>(), inter, assigned);
  if (shared1) {
    shared_act = silu_and_mul(shared_gate_up_out);
    shared2.emplace(table, *shared_down, shared_act.data_ptr<float>(), shared_inter, tokens,
                    shared_out.data_ptr<float>(), kRowsPerTask);
  }
  at::Tensor down = at::empty({assigned, hidden}, x.options());
  const std::vector<ExpertTask> tasks2 = expert_tasks(counts, hidden);
  const int64_t routed2 = static_cast<int64_t>(tasks2.size());
  at::parallel_for(0, routed2 + (shared2 ? shared2->tasks : 0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (t >= routed2) {
        shared2->run(t - routed2, t - routed2 + 1);
        continue;
      }
      const ExpertTask& task = tasks2[t];
      const int64_t row0 = first[task.expert];
      GemmArgs args = gemm_args(v2, w2_bytes + task.expert * hidden * v2.row_bytes,
                                s2 ? s2 + task.expert * hidden * v2.groups : nullptr,
                                gate.data_ptr<float>() + row0 * inter, inter, counts[task.expert],
                                down.data_ptr<float>() + row0 * hidden, hidden);
      const QuantizedRows expert_qx = q8_2 ? qx2.from_row(row0) : QuantizedRows{};
      args.qx = q8_2 ? &expert_qx : nullptr;
      fn2(args, task.begin, task.end);
    }
  });

  // The weighted sum per token, in slot order (no atomics: one task owns a token's row).
  at::Tensor out = at::zeros({tokens, hidden}, x.options());
  const float* wt = weights.data_ptr<float>();
  at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tok = begin; tok < end; ++tok)
      for (int64_t j = 0; j < top_k; ++j) {
        const int64_t row = slot_row[tok * top_k + j];
        if (row < 0) continue;
        const float* src = down.data_ptr<float>() + row * hidden;
        float* dst = out.data_ptr<float>() + tok * hidden;
        const float scale = wt[tok * top_k + j];
        for (int64_t c = 0; c < hidden; ++c) dst[c] += scale * src[c];
      }
  });
  if (shared2) out.add_(shared_out);  // after the routed sum, as the modules add the shared expert's output
  return out;
}

// (x + residual, RMSNorm(x + residual) * weight) in one pass over each row: the sum is formed, stored and squared
// while in cache. fp32 throughout, as F.rms_norm on fp32 rows.
std::tuple<at::Tensor, at::Tensor> rms_norm_residual(const at::Tensor& x, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.sizes() == residual.sizes() && x.scalar_type() == at::kFloat &&
                  residual.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                  weight.numel() == x.size(1) && x.is_contiguous() && residual.is_contiguous() &&
                  weight.is_contiguous(),
              "glmserve kernels: rms_norm_residual takes contiguous fp32 x, residual [T, H] and weight [H]");
  const int64_t rows = x.size(0), h = x.size(1);
  at::Tensor sum = at::empty_like(x), out = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *rp = residual.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float *sp = sum.data_ptr<float>(), *op = out.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float squares = 0.f;
      for (int64_t c = 0; c < h; ++c) {
        const float v = xp[r * h + c] + rp[r * h + c];
        sp[r * h + c] = v;
        squares += v * v;
      }
      const float inverse = 1.f / std::sqrt(squares / static_cast<float>(h) + static_cast<float>(eps));
      for (int64_t c = 0; c < h; ++c) op[r * h + c] = sp[r * h + c] * inverse * wp[c];
    }
  });
  return {out, sum};
}

namespace {

// GCC vector types: 4 fp32 lanes on every x86-64 (this file is compiled for the baseline), so the row scans below
// compare 16 values per step without intrinsics.
typedef float Floats4 __attribute__((vector_size(16)));
typedef int32_t Ints4 __attribute__((vector_size(16)));

Floats4 load4(const float* p) {
  Floats4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The first index of a row's maximum, a NaN counting as the maximum (torch.argmax's rule): one pass for the
// maximum and whether there is a NaN, 16 values a step, then a scan for the first index holding it.
int64_t argmax_row(const float* row, int64_t v) {
  const float ninf = -std::numeric_limits<float>::infinity();
  Floats4 m0 = {ninf, ninf, ninf, ninf}, m1 = m0, m2 = m0, m3 = m0;
  Ints4 nan = {0, 0, 0, 0};
  const int64_t body = v / 16 * 16;
  for (int64_t c = 0; c < body; c += 16) {
    const Floats4 a = load4(row + c), b = load4(row + c + 4), d = load4(row + c + 8), e = load4(row + c + 12);
    m0 = a > m0 ? a : m0;
    m1 = b > m1 ? b : m1;
    m2 = d > m2 ? d : m2;
    m3 = e > m3 ? e : m3;
    nan |= (a != a) | (b != b) | (d != d) | (e != e);
  }
  m0 = m1 > m0 ? m1 : m0;
  m2 = m3 > m2 ? m3 : m2;
  m0 = m2 > m0 ? m2 : m0;
  float top = ninf;
  bool any_nan = false;
  for (int j = 0; j < 4; ++j) {
    top = m0[j] > top ? m0[j] : top;
    any_nan |= nan[j] != 0;
  }
  for (int64_t c = body; c < v; ++c) {
    any_nan |= row[c] != row[c];
    top = row[c] > top ? row[c] : top;
  }
  if (any_nan)
    for (int64_t c = 0; c < v; ++c)
      if (row[c] != row[c]) return c;
  const Floats4 t = {top, top, top, top};
  int64_t c = 0;
  for (; c < body; c += 16) {
    const Ints4 hit = (load4(row + c) == t) | (load4(row + c + 4) == t) | (load4(row + c + 8) == t) |
                      (load4(row + c + 12) == t);
    if (hit[0] | hit[1] | hit[2] | hit[3]) break;
  }
  for (; c < v; ++c)
    if (row[c] == top) return c;
  return 0;  // every value -inf: the first
}

at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "glmserve kernels: argmax takes contiguous fp32 [B, V] logits");
  const int64_t rows = logits.size(0), v = logits.size(1);
  TORCH_CHECK(v > 0, "glmserve kernels: argmax of an empty row");
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* lp = logits.data_ptr<float>();
  int64_t* idx = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) idx[r] = argmax_row(lp + r * v, v);
  });
  return out;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (int64_t isa = 0; isa < kNumIsas; ++isa)
    if (cpu_runs_isa(isa)) names.emplace_back(kIsaNames[isa]);
  return names;
}

// How many of torch's threads at::parallel_for runs `items` items on: 1 if the extension was compiled without
// OpenMP, where its header-only loop runs serially.
int64_t parallel_threads(int64_t items) {
  std::vector<char> ran(std::max(1, at::get_num_threads()), 0);
  at::parallel_for(0, items, 1, [&](int64_t, int64_t) { ran[at::get_thread_num()] = 1; });
  return std::count(ran.begin(), ran.end(), 1);
}

// The wrapping sum of x's memory as 64-bit words, read once over torch's threads in 1 MiB runs: the reference
// bandwidth of glmserve.bench.roofline (torch's own `sum` can read slower than our GEMVs). Each run is read as four
// streams a quarter of it apart, side by side (more cache lines in flight than one stream), with eight partial
// sums a stream so the compiler keeps them in vector lanes.
int64_t stream_read(const at::Tensor& x) {
  TORCH_CHECK(x.is_cpu() && x.is_contiguous() && x.nbytes() % 8 == 0,
              "glmserve stream_read: a contiguous CPU tensor of whole 64-bit words");
  const auto* words = static_cast<const uint64_t*>(x.data_ptr());
  const int64_t n = static_cast<int64_t>(x.nbytes() / 8);
  constexpr int64_t kWordsPerTask = 1 << 17;  // 1 MiB runs
  const int64_t tasks = (n + kWordsPerTask - 1) / kWordsPerTask;
  std::vector<uint64_t> task_sums(tasks, 0);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first = t * kWordsPerTask, last = std::min(n, first + kWordsPerTask);
      const int64_t quarter = (last - first) / 32 * 8;
      uint64_t part[4][8] = {};
      for (int64_t i = first; i < first + quarter; i += 8)
        for (int s = 0; s < 4; ++s)
          for (int j = 0; j < 8; ++j) part[s][j] += words[i + s * quarter + j];
      uint64_t sum = 0;
      for (int64_t i = first + 4 * quarter; i < last; ++i) sum += words[i];
      for (int s = 0; s < 4; ++s)
        for (int j = 0; j < 8; ++j) sum += part[s][j];
      task_sums[t] = sum;
    }
  });
  uint64_t total = 0;
  for (uint64_t s : task_sums) total += s;
  return static_cast<int64_t>(total);
}

}  // namespace

// decoder_stack.cpp
void bind_decoder_stack(pybind11::module& m);

}  // namespace glmserve

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Every op that reads tensors lets go of the GIL, as torch's own ops do, so that the server's event loop runs
  // meanwhile: even the per-layer ops (SiLU, the norms, the router) take milliseconds over a prefill chunk.
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("available_isas", &glmserve::available_isas, "the ISA paths this CPU can run, slowest first");
  m.def("linear", &glmserve::linear, "x [..., K] fp32 @ W.T (+ bias) for W in any layout of kernels/reference.py",
        no_gil);
  m.def("int8_channel_gemm", &glmserve::int8_channel_gemm,
        "x @ W.T (+ bias) for per-channel int8 W through torch's int8 GEMM or AMX tiles, as "
        "int8_channel_gemm_reference (x[rows] with rows)", no_gil);
  m.def("tiles_beat_int_mm", &glmserve::tiles_beat_int_mm, "whether AMX tiles beat _int_mm on rows x k inputs");
  m.def("router_logits", &glmserve::router_logits, "a router's fp32 logits: the native kernel or torch's GEMM",
        no_gil);
  m.def("moe_grouped_int8", &glmserve::moe_grouped_int8,
        "a prefill chunk's routed experts with per-channel int8 weights, as FusedExperts._add_expert_by_expert",
        no_gil);
  m.def("amx_int8_ready", &glmserve::amx_int8_ready, "whether this CPU has AMX int8 tiles this process may use");
  m.def("moe_experts", &glmserve::moe_experts, "the routed experts of one MoE block, as moe_experts_reference",
        no_gil);
  m.def("moe_block",
        [](const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids, const at::Tensor& w13,
           const c10::optional<at::Tensor>& w13_scales, const at::Tensor& w2,
           const c10::optional<at::Tensor>& w2_scales, int64_t group_size, const glmserve::LinearWeights& gate_up,
           const glmserve::LinearWeights& down, int64_t isa) {
          return glmserve::moe_block(x, topk_weights, topk_ids, w13, w13_scales, w2, w2_scales, group_size, &gate_up,
                                     &down, isa);
        },
        "an MoE block with its shared expert (the decoder stack's), as moe_experts(...) + its SwiGLU", no_gil);
  m.def("rms_norm_residual", &glmserve::rms_norm_residual, "(RMSNorm(x + residual) * weight, x + residual)", no_gil);
  m.def("argmax", &glmserve::argmax_rows, "each row's first maximum (NaN counts as the maximum)", no_gil);
  m.def("rms_norm", &glmserve::rms_norm, "RMSNorm(x) * weight", no_gil);
  m.def("qk_norm_rope_", &glmserve::qk_norm_rope_, "QK-norm and partial RoPE of the QKV rows, in place", no_gil);
  m.def("silu_and_mul", &glmserve::silu_and_mul, "silu(gate) * up of [T, 2I] rows", no_gil);
  m.def("router_topk", &glmserve::router_topk, "the GLM-4.5 router's expert weights and ids from its logits", no_gil);
  m.def("embed_rows", &glmserve::embed_rows, "the dequantized rows of an int8 / int4 embedding table", no_gil);
  m.def("stream_read", &glmserve::stream_read, "the wrapping sum of x's 64-bit words: a plain read of its memory",
        no_gil);
  m.def("parallel_threads", &glmserve::parallel_threads, "threads at::parallel_for spreads n items over");
  m.def("paged_attention", &glmserve::paged_attention, "causal attention of query rows over the paged KV cache",
        no_gil);
  glmserve::bind_decoder_stack(m);
}
