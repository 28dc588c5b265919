// A prefill chunk's routed experts with per-channel int8 weights, in one call: what FusedExperts.
// _add_expert_by_expert computes with ScaledMethod.expert, expert after expert through the same products and in the
// same order, so the same bits, without a Python round trip around every product and with the GIL let go for the
// whole block. An expert's rows are quantized from their tokens' rows where they lie (no gathered copy), and its
// output rows, scaled by their routing weights, are added into their tokens' rows (no scaled copy).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "ops.h"

namespace glmserve {
namespace {

// out[tokens[r]] += y[r] * weights[r], the product rounded before the sum, as `rows.mul_(w)` then `index_add_`
// round them (this file is built for the baseline ISA, so no fused multiply-add joins the two). An expert sees a
// token once, so its rows land in distinct rows of out.
void add_weighted_rows(at::Tensor& out, const at::Tensor& y, const std::vector<int64_t>& tokens,
                       const std::vector<float>& weights) {
  const int64_t hidden = out.size(1);
  float* o = out.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(tokens.size()), std::max<int64_t>(1, 16384 / hidden),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       float* row = o + tokens[r] * hidden;
                       const float* src = yp + r * hidden;
                       const float w = weights[r];
                       for (int64_t c = 0; c < hidden; ++c) {
                         const float scaled = src[c] * w;
                         row[c] += scaled;
                       }
                     }
                   });
}

}  // namespace

// x [T, H] fp32; flat_weights [T * k] fp32 (routing weights, token-major); choices int64 [n]: flat (token, k)
// indices sorted by expert; counts int64 [E]: each expert's run of choices. An expert with more than
// native_max_rows rows multiplies through int8_channel_gemm (AMX tiles where `tiles` and tiles_beat_int_mm), one
// with fewer through the native kernel (`linear`), as ScaledMethod's products choose.
at::Tensor moe_grouped_int8(const at::Tensor& x, const at::Tensor& flat_weights, const at::Tensor& choices,
                            const at::Tensor& counts, int64_t top_k, const at::Tensor& w13,
                            const at::Tensor& w13_scale, const at::Tensor& w2, const at::Tensor& w2_scale,
                            int64_t group_size, int64_t native_max_rows, int64_t isa, bool tiles) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "glmserve kernels: moe_grouped_int8 takes contiguous fp32 [T, H] rows");
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.scalar_type() == at::kChar && w2.scalar_type() == at::kChar &&
                  w13.size(0) == w2.size(0) && w13.size(2) == x.size(1) && w2.size(1) == x.size(1) &&
                  w13.size(1) == 2 * w2.size(2),
              "glmserve kernels: moe_grouped_int8 takes int8 w13 [E, 2I, H] and w2 [E, H, I]");
  TORCH_CHECK(counts.dim() == 1 && counts.scalar_type() == at::kLong && counts.size(0) == w13.size(0) &&
                  choices.dim() == 1 && choices.scalar_type() == at::kLong && choices.is_contiguous(),
              "glmserve kernels: moe_grouped_int8 takes int64 choices [n] and counts [E]");
  TORCH_CHECK(flat_weights.dim() == 1 && flat_weights.scalar_type() == at::kFloat && flat_weights.is_contiguous() &&
                  flat_weights.size(0) == x.size(0) * top_k,
              "glmserve kernels: moe_grouped_int8 takes fp32 routing weights [T * k]");
  const at::Tensor count = counts.contiguous();
  const int64_t experts = w13.size(0), hidden = x.size(1), inter = w2.size(2), n = choices.size(0);
  const int64_t* choice = choices.data_ptr<int64_t>();
  const float* routing = flat_weights.data_ptr<float>();
  at::Tensor out = at::zeros_like(x);
  int64_t start = 0;
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t rows = count.data_ptr<int64_t>()[e];
    if (rows == 0) continue;
    TORCH_CHECK(rows > 0 && start + rows <= n, "glmserve kernels: the counts add up to more than the choices");
    std::vector<int64_t> tokens(rows);
    std::vector<float> weights(rows);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t c = choice[start + r];
      TORCH_CHECK(c >= 0 && c < flat_weights.size(0), "glmserve kernels: choice ", c, " is out of range");
      tokens[r] = c / top_k;
      weights[r] = routing[c];
    }
    start += rows;
    const at::Tensor token_rows = at::from_blob(tokens.data(), {rows}, at::kLong);
    at::Tensor y;
    if (rows > native_max_rows) {
      const at::Tensor gate_up = int8_channel_gemm(x, w13[e], w13_scale[e], c10::nullopt, isa,
                                                   tiles && tiles_beat_int_mm(rows, hidden), token_rows);
      y = int8_channel_gemm(silu_and_mul(gate_up), w2[e], w2_scale[e], c10::nullopt, isa,
                            tiles && tiles_beat_int_mm(rows, inter), c10::nullopt);
    } else {
      const at::Tensor gate_up = linear(x.index_select(0, token_rows), w13[e], w13_scale[e].contiguous(),
                                        group_size, c10::nullopt, isa);
      y = linear(silu_and_mul(gate_up), w2[e], w2_scale[e].contiguous(), group_size, c10::nullopt, isa);
    }
    add_weighted_rows(out, y, tokens, weights);
  }
  return out;
}

}  // namespace glmserve
