// A step's decoder layers in one native call: the ops each layer's modules call (ops.h), in the same order on the
// same tensors, so the result is theirs bit for bit (tests/kernels/test_decoder_stack.py holds it to them). What it
// saves is the Python and torch dispatch between the kernels, which a small decode step spent more time in than in
// the kernels themselves. The layers' weights and KV caches are handed over once (model/native_stack.py); a step
// passes its rows, their RoPE rows and the attention metadata.
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "ops.h"

namespace glmserve {
namespace {

// One decoder layer: attention (QKV, QK-norm + partial RoPE, the paged cache, o_proj) and its MLP, dense or MoE
// (router, routed experts, shared expert). Field names follow the modules of model/glm4_moe.py.
struct DecoderLayer {
  at::Tensor input_norm, post_attention_norm;
  double input_norm_eps = 0, post_attention_norm_eps = 0;

  LinearWeights qkv, o_proj;
  c10::optional<at::Tensor> q_norm, k_norm;  // none without QK-norm
  double qk_norm_eps = 0;
  int64_t num_heads = 0, num_kv_heads = 0, head_dim = 0, rotary_dim = 0;
  double attention_scale = 0;
  at::Tensor k_cache, v_cache;  // [slots, Hk, D] in their storage dtype
  double k_scale = 1, v_scale = 1;

  LinearWeights gate_up, down;  // the dense MLP, or the MoE block's shared expert
  bool moe = false;
  at::Tensor router_weight, router_bias;
  int64_t top_k = 0, n_group = 0, topk_group = 0;
  bool renormalize = false;
  double routed_scaling_factor = 1;
  at::Tensor w13, w2;
  c10::optional<at::Tensor> w13_scales, w2_scales;
  int64_t expert_group_size = 0;
};

// Rows [T, width] of src (row stride ld) into the cache slots `slots` names, as PagedKVCache.write stores them:
// divided by the scale when it is not 1; in a one-byte format saturated to its range before rounding.
template <typename Stored>
void store_rows(at::Tensor& cache, const float* src, int64_t ld, int64_t width, const int64_t* slots, int64_t rows,
                double scale_in, bool saturate) {
  Stored* base = static_cast<Stored*>(cache.data_ptr());
  const float scale = static_cast<float>(scale_in);
  const float limit = saturate ? static_cast<float>(std::numeric_limits<Stored>::max()) : 0.f;
  for (int64_t t = 0; t < rows; ++t) {
    const float* row = src + t * ld;
    Stored* dst = base + slots[t] * width;
    for (int64_t c = 0; c < width; ++c) {
      float value = scale_in != 1.0 ? row[c] / scale : row[c];
      if (saturate) value = std::min(std::max(value, -limit), limit);
      dst[c] = static_cast<Stored>(value);
    }
  }
}

void write_cache(at::Tensor& cache, const float* src, int64_t ld, const at::Tensor& slot_mapping, double scale) {
  const int64_t width = cache.size(1) * cache.size(2), rows = slot_mapping.numel();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  switch (cache.scalar_type()) {
    case at::kFloat:
      if (scale == 1.0) {
        for (int64_t t = 0; t < rows; ++t)
          std::memcpy(cache.data_ptr<float>() + slots[t] * width, src + t * ld, width * sizeof(float));
      } else {
        store_rows<float>(cache, src, ld, width, slots, rows, scale, false);
      }
      return;
    case at::kBFloat16: return store_rows<c10::BFloat16>(cache, src, ld, width, slots, rows, scale, false);
    case at::kFloat8_e4m3fn: return store_rows<c10::Float8_e4m3fn>(cache, src, ld, width, slots, rows, scale, true);
    case at::kFloat8_e5m2: return store_rows<c10::Float8_e5m2>(cache, src, ld, width, slots, rows, scale, true);
    default: TORCH_CHECK(false, "glmserve decoder_stack: KV cache dtype ", cache.scalar_type());
  }
}

// The attention metadata of one step (layers/attention: AttentionMetadata and cpu_native's NativePlan).
struct StepAttention {
  const at::Tensor &block_tables, &seq_lens, &query_start_loc, &slot_mapping;
  int64_t block_size, isa;
};

at::Tensor attention(const DecoderLayer& layer, const at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin,
                     const StepAttention& step, int64_t isa) {
  const int64_t rows = h.size(0), q_width = layer.num_heads * layer.head_dim;
  const int64_t kv_width = layer.num_kv_heads * layer.head_dim;
  at::Tensor qkv = layer.qkv(h, isa);
  qk_norm_rope_(qkv, cos, sin, layer.q_norm, layer.k_norm, layer.num_heads, layer.num_kv_heads, layer.head_dim,
                layer.rotary_dim, layer.qk_norm_eps);
  TORCH_CHECK(step.slot_mapping.numel() == rows, "glmserve decoder_stack: one cache slot per row");
  at::Tensor k_cache = layer.k_cache, v_cache = layer.v_cache;
  const float* qkv_rows = qkv.data_ptr<float>();
  write_cache(k_cache, qkv_rows + q_width, qkv.size(1), step.slot_mapping, layer.k_scale);
  write_cache(v_cache, qkv_rows + q_width + kv_width, qkv.size(1), step.slot_mapping, layer.v_scale);
  const at::Tensor q = qkv.narrow(1, 0, q_width).reshape({rows, layer.num_heads, layer.head_dim}).contiguous();
  at::Tensor out = at::empty_like(q);
  paged_attention(q, k_cache, v_cache, step.block_tables, step.block_size, step.seq_lens, step.query_start_loc, out,
                  layer.attention_scale, layer.k_scale, layer.v_scale, step.isa);
  return layer.o_proj(out.view({rows, q_width}), isa);
}

at::Tensor mlp(const DecoderLayer& layer, const at::Tensor& h, int64_t isa) {
  if (!layer.moe) return layer.down(silu_and_mul(layer.gate_up(h, isa)), isa);
  const at::Tensor logits = router_logits(h, layer.router_weight, isa);
  const auto [weights, ids] = router_topk(logits, layer.router_bias, layer.top_k, layer.n_group, layer.topk_group,
                                          layer.renormalize, layer.routed_scaling_factor);
  return moe_block(h, weights, ids, layer.w13, layer.w13_scales, layer.w2, layer.w2_scales, layer.expert_group_size,
                   &layer.gate_up, &layer.down, isa);
}

class DecoderStack {
 public:
  explicit DecoderStack(std::vector<DecoderLayer> layers) : layers_(std::move(layers)) {}

  // x [T, hidden] (the embedded rows) -> the last layer's output plus the residual stream, as Glm4MoeModel.forward
  // returns it. cos, sin: [T, head_dim] rows of this step's positions.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                     const at::Tensor& slot_mapping, int64_t block_size, int64_t isa, int64_t attention_isa) const {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && !layers_.empty(),
                "glmserve decoder_stack: x must be contiguous fp32 [T, hidden]");
    const StepAttention step{block_tables, seq_lens, query_start_loc, slot_mapping, block_size, attention_isa};
    at::Tensor hidden = x, residual;
    for (const DecoderLayer& layer : layers_) {
      at::Tensor h;
      if (residual.defined()) {
        std::tie(h, residual) = rms_norm_residual(hidden, residual, layer.input_norm, layer.input_norm_eps);
      } else {
        h = rms_norm(hidden, layer.input_norm, layer.input_norm_eps);
        residual = hidden;
      }
      std::tie(h, residual) = rms_norm_residual(attention(layer, h, cos, sin, step, isa), residual,
                                                layer.post_attention_norm, layer.post_attention_norm_eps);
      hidden = mlp(layer, h, isa);
    }
    return hidden.add_(residual);
  }

 private:
  std::vector<DecoderLayer> layers_;
};

}  // namespace

void bind_decoder_stack(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<LinearWeights>(m, "LinearWeights", py::module_local())  // (two builds may share a process: A/B runs)
      .def(py::init<at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>, int64_t>(), py::arg("weight"),
           py::arg("scales"), py::arg("bias"), py::arg("group_size"));
  py::class_<DecoderLayer>(m, "DecoderLayer")
      .def(py::init<>())
      .def_readwrite("input_norm", &DecoderLayer::input_norm)
      .def_readwrite("post_attention_norm", &DecoderLayer::post_attention_norm)
      .def_readwrite("input_norm_eps", &DecoderLayer::input_norm_eps)
      .def_readwrite("post_attention_norm_eps", &DecoderLayer::post_attention_norm_eps)
      .def_readwrite("qkv", &DecoderLayer::qkv)
      .def_readwrite("o_proj", &DecoderLayer::o_proj)
      .def_readwrite("q_norm", &DecoderLayer::q_norm)
      .def_readwrite("k_norm", &DecoderLayer::k_norm)
      .def_readwrite("qk_norm_eps", &DecoderLayer::qk_norm_eps)
      .def_readwrite("num_heads", &DecoderLayer::num_heads)
      .def_readwrite("num_kv_heads", &DecoderLayer::num_kv_heads)
      .def_readwrite("head_dim", &DecoderLayer::head_dim)
      .def_readwrite("rotary_dim", &DecoderLayer::rotary_dim)
      .def_readwrite("attention_scale", &DecoderLayer::attention_scale)
      .def_readwrite("k_cache", &DecoderLayer::k_cache)
      .def_readwrite("v_cache", &DecoderLayer::v_cache)
      .def_readwrite("k_scale", &DecoderLayer::k_scale)
      .def_readwrite("v_scale", &DecoderLayer::v_scale)
      .def_readwrite("gate_up", &DecoderLayer::gate_up)
      .def_readwrite("down", &DecoderLayer::down)
      .def_readwrite("moe", &DecoderLayer::moe)
      .def_readwrite("router_weight", &DecoderLayer::router_weight)
      .def_readwrite("router_bias", &DecoderLayer::router_bias)
      .def_readwrite("top_k", &DecoderLayer::top_k)
      .def_readwrite("n_group", &DecoderLayer::n_group)
      .def_readwrite("topk_group", &DecoderLayer::topk_group)
      .def_readwrite("renormalize", &DecoderLayer::renormalize)
      .def_readwrite("routed_scaling_factor", &DecoderLayer::routed_scaling_factor)
      .def_readwrite("w13", &DecoderLayer::w13)
      .def_readwrite("w2", &DecoderLayer::w2)
      .def_readwrite("w13_scales", &DecoderLayer::w13_scales)
      .def_readwrite("w2_scales", &DecoderLayer::w2_scales)
      .def_readwrite("expert_group_size", &DecoderLayer::expert_group_size);
  py::class_<DecoderStack>(m, "DecoderStack")
      .def(py::init<std::vector<DecoderLayer>>())
      .def("forward", &DecoderStack::forward, "a step's decoder layers in one call",
           py::call_guard<py::gil_scoped_release>());
}

}  // namespace glmserve
