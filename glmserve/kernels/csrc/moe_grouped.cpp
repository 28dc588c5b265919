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

// The flat (token, k) choices of this rank's experts (ids first_expert .. first_expert + experts - 1), grouped by
// expert in the order they come: FusedExperts._sort_choices' stable argsort, as a counting sort.
std::vector<std::vector<int64_t>> choices_by_expert(const at::Tensor& ids, int64_t first_expert, int64_t experts) {
  std::vector<std::vector<int64_t>> by_expert(experts);
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t c = 0; c < ids.numel(); ++c) {
    const int64_t local = id[c] - first_expert;
    if (local >= 0 && local < experts) by_expert[local].push_back(c);
  }
  return by_expert;
}

}  // namespace

// x [T, H] fp32; topk_weights fp32 and topk_ids int64 [T, k], the router's; this rank holds experts first_expert
// onwards (w13 [E, 2I, H], w2 [E, H, I]; another rank's choices add nothing here). An expert with more than
// native_max_rows rows multiplies through int8_channel_gemm (AMX tiles where `tiles` and tiles_beat_int_mm), one
// with fewer through the native kernel (`linear`), as ScaledMethod's products choose.
at::Tensor moe_grouped_int8(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                            int64_t first_expert, const at::Tensor& w13, const at::Tensor& w13_scale,
                            const at::Tensor& w2, const at::Tensor& w2_scale, int64_t group_size,
                            int64_t native_max_rows, int64_t isa, bool tiles) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "glmserve kernels: moe_grouped_int8 takes contiguous fp32 [T, H] rows");
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.scalar_type() == at::kChar && w2.scalar_type() == at::kChar &&
                  w13.size(0) == w2.size(0) && w13.size(2) == x.size(1) && w2.size(1) == x.size(1) &&
                  w13.size(1) == 2 * w2.size(2),
              "glmserve kernels: moe_grouped_int8 takes int8 w13 [E, 2I, H] and w2 [E, H, I]");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.scalar_type() == at::kLong && topk_ids.is_contiguous() &&
                  topk_ids.sizes() == topk_weights.sizes() && topk_weights.scalar_type() == at::kFloat &&
                  topk_weights.is_contiguous() && topk_ids.size(0) == x.size(0),
              "glmserve kernels: moe_grouped_int8 takes contiguous fp32 weights and int64 ids, both [T, k]");
  const int64_t experts = w13.size(0), hidden = x.size(1), inter = w2.size(2), top_k = topk_ids.size(1);
  const float* routing = topk_weights.data_ptr<float>();
  at::Tensor out = at::zeros_like(x);
  const auto by_expert = choices_by_expert(topk_ids, first_expert, experts);
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t rows = static_cast<int64_t>(by_expert[e].size());
    if (rows == 0) continue;
    std::vector<int64_t> tokens(rows);
    std::vector<float> weights(rows);
    for (int64_t r = 0; r < rows; ++r) {
      tokens[r] = by_expert[e][r] / top_k;
      weights[r] = routing[by_expert[e][r]];
    }
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
