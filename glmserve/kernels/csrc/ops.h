// The ops one native call may compose (decoder_stack.cpp) as well as Python calls them: each is defined in the file
// named above it and bound in ops.cpp.
#pragma once
#include <torch/extension.h>

#include <tuple>

namespace glmserve {

// ops.cpp
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scales,
                  int64_t group_size, const c10::optional<at::Tensor>& bias, int64_t isa);

// One product's weight as `linear` takes it (any layout of kernels/reference.py).
struct LinearWeights {
  at::Tensor weight;
  c10::optional<at::Tensor> scales, bias;
  int64_t group_size = 0;

  at::Tensor operator()(const at::Tensor& x, int64_t isa) const {
    return linear(x, weight, scales, group_size, bias, isa);
  }
};

at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                       const at::Tensor& w13, const c10::optional<at::Tensor>& w13_scales, const at::Tensor& w2,
                       const c10::optional<at::Tensor>& w2_scales, int64_t group_size, int64_t isa);
// An MoE block: moe_experts plus, where given, the shared expert's SwiGLU (gate_up [2I, H], down [H, I]) added to it,
// its products run in the routed experts' two parallel regions; the same bits as moe_experts(...).add_(
// down(silu_and_mul(gate_up(x)))) with `linear`.
at::Tensor moe_block(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                     const at::Tensor& w13, const c10::optional<at::Tensor>& w13_scales, const at::Tensor& w2,
                     const c10::optional<at::Tensor>& w2_scales, int64_t group_size, const LinearWeights* shared_gate_up,
                     const LinearWeights* shared_down, int64_t isa);
bool tiles_beat_int_mm(int64_t rows, int64_t k);
at::Tensor router_logits(const at::Tensor& x, const at::Tensor& w, int64_t isa);
at::Tensor int8_channel_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                             const c10::optional<at::Tensor>& bias, int64_t isa, bool tiles,
                             const c10::optional<at::Tensor>& rows);
std::tuple<at::Tensor, at::Tensor> rms_norm_residual(const at::Tensor& x, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps);

// paged_attention.cpp
void paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, int64_t block_size, const at::Tensor& seq_lens,
                     const at::Tensor& query_start_loc, at::Tensor out, double scale,
                     double k_scale, double v_scale, int64_t isa);

// fused_step.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
void qk_norm_rope_(at::Tensor qkv, const at::Tensor& cos, const at::Tensor& sin,
                   const c10::optional<at::Tensor>& q_weight, const c10::optional<at::Tensor>& k_weight,
                   int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, int64_t rotary_dim, double eps);
at::Tensor silu_and_mul(const at::Tensor& x);
// out[c] = silu(gate[c]) * up[c] for n values (out may be gate), in AVX2 lanes where the CPU runs AVX2.
void silu_mul(const float* gate, const float* up, int64_t n, float* out);
std::tuple<at::Tensor, at::Tensor> router_topk(const at::Tensor& logits, const at::Tensor& bias, int64_t top_k,
                                               int64_t n_group, int64_t topk_group, bool renormalize,
                                               double scale);
at::Tensor embed_rows(const at::Tensor& table, const at::Tensor& scales, int64_t group_size, const at::Tensor& ids);

// moe_grouped.cpp
at::Tensor moe_grouped_int8(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                            int64_t first_expert, const at::Tensor& w13, const at::Tensor& w13_scale,
                            const at::Tensor& w2, const at::Tensor& w2_scale, int64_t group_size,
                            int64_t native_max_rows, int64_t isa, bool tiles);

}  // namespace glmserve
