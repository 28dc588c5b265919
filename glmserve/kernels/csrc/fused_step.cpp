// The small per-layer ops of a decode step, each one native call instead of several torch ops (their torch
// references are in kernels/reference.py): RMSNorm, QK-norm + partial RoPE in place, SiLU(gate) * up, the
// GLM-4.5 router's choice of experts from its logits, and the quantized embedding rows of a step's tokens. fp32
// throughout, as the torch ops on fp32 tensors.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "isa.h"
#include "ops.h"
#include "silu.h"

namespace glmserve {
namespace {

constexpr int64_t kMinElementsPerTask = 16384;  // below this a row range runs on the calling thread

int64_t grain(int64_t per_item) { return std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, per_item)); }

// 1 / rms(row) with the sum of squares in 8 partial sums (so the compiler keeps them in vector lanes).
float inverse_rms(const float* row, int64_t n, float eps) {
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t c = 0;
  for (; c + 8 <= n; c += 8)
    for (int j = 0; j < 8; ++j) part[j] += row[c + j] * row[c + j];
  float squares = 0.f;
  for (; c < n; ++c) squares += row[c] * row[c];
  for (int j = 0; j < 8; ++j) squares += part[j];
  return 1.f / std::sqrt(squares / static_cast<float>(n) + eps);
}

void check_rows(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "glmserve kernels: ", what,
              " takes contiguous fp32 [T, H] rows");
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == x.size(1),
              "glmserve kernels: rms_norm's weight must be contiguous fp32 [H]");
  const int64_t h = x.size(1);
  at::Tensor out = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.size(0), grain(h), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float inverse = inverse_rms(xp + r * h, h, static_cast<float>(eps));
      for (int64_t c = 0; c < h; ++c) op[r * h + c] = xp[r * h + c] * inverse * wp[c];
    }
  });
  return out;
}

// qkv [T, >= (Hq + Hkv) * D] (the QKV projection's output, v after q and k): each q head and then each k head is
// RMS-normalized over its D dims and scaled by q_weight / k_weight (when given), then rotated NeoX-style on its first
// rotary_dim dims with this token's cos / sin rows [T, D] in the widened form of layers/rotary.py (sin signed,
// cos 1 and sin 0 past rotary_dim): out[d] = x[d] cos[d] + x[partner(d)] sin[d], partner swapping the two halves.
void qk_norm_rope_(at::Tensor qkv, const at::Tensor& cos, const at::Tensor& sin,
                   const c10::optional<at::Tensor>& q_weight, const c10::optional<at::Tensor>& k_weight,
                   int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, int64_t rotary_dim, double eps) {
  check_rows(qkv, "qk_norm_rope_");
  const int64_t tokens = qkv.size(0), heads = num_q_heads + num_kv_heads, d = head_dim, half = rotary_dim / 2;
  TORCH_CHECK(qkv.size(1) >= heads * d && rotary_dim % 2 == 0 && rotary_dim <= d && d <= 1024,
              "glmserve kernels: qk_norm_rope_ got rows of ", qkv.size(1), " for ", heads, " heads of ", d,
              " (rotary ", rotary_dim, ")");
  for (const at::Tensor* table : {&cos, &sin})
    TORCH_CHECK(table->scalar_type() == at::kFloat && table->is_contiguous() && table->dim() == 2 &&
                    table->size(0) == tokens && table->size(1) == d,
                "glmserve kernels: cos and sin must be contiguous fp32 [T, D] rows");
  TORCH_CHECK(q_weight.has_value() == k_weight.has_value(), "glmserve kernels: q and k norm weights go together");
  const bool norm = q_weight.has_value();
  if (norm)
    for (const at::Tensor* w : {&*q_weight, &*k_weight})
      TORCH_CHECK(w->scalar_type() == at::kFloat && w->is_contiguous() && w->numel() == d,
                  "glmserve kernels: QK-norm weights must be contiguous fp32 [D]");
  float* base = qkv.data_ptr<float>();
  const int64_t stride = qkv.size(1);
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const float* qw = norm ? q_weight->data_ptr<float>() : nullptr;
  const float* kw = norm ? k_weight->data_ptr<float>() : nullptr;
  at::parallel_for(0, tokens * heads, grain(d), [&](int64_t begin, int64_t end) {
    float normed[1024];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / heads, h = i % heads;
      float* x = base + t * stride + h * d;
      const float* w = h < num_q_heads ? qw : kw;
      const float inverse = norm ? inverse_rms(x, d, static_cast<float>(eps)) : 1.f;
      for (int64_t c = 0; c < d; ++c) normed[c] = norm ? x[c] * inverse * w[c] : x[c];
      const float *ct = cp + t * d, *st = sp + t * d;
      for (int64_t c = 0; c < half; ++c) x[c] = normed[c] * ct[c] + normed[c + half] * st[c];
      for (int64_t c = half; c < rotary_dim; ++c) x[c] = normed[c] * ct[c] + normed[c - half] * st[c];
      for (int64_t c = rotary_dim; c < d; ++c) x[c] = normed[c];
    }
  });
}

void silu_mul(const float* gate, const float* up, int64_t n, float* out) {
  static const bool avx2 = cpu_runs_isa(1);
  if (avx2) return silu_mul_avx2(gate, up, n, out);
  for (int64_t c = 0; c < n; ++c) out[c] = gate[c] / (1.f + std::exp(-gate[c])) * up[c];
}

// x [T, 2I] (gate then up) -> silu(gate) * up [T, I].
at::Tensor silu_and_mul(const at::Tensor& x) {
  check_rows(x, "silu_and_mul");
  TORCH_CHECK(x.size(1) % 2 == 0, "glmserve kernels: silu_and_mul takes [T, 2I] rows");
  const int64_t inter = x.size(1) / 2;
  at::Tensor out = at::empty({x.size(0), inter}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.size(0), grain(inter), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = xp + r * 2 * inter;
      silu_mul(gate, gate + inter, inter, op + r * inter);
    }
  });
  return out;
}

// GLM-4.5's router (DeepSeek-V3 noaux_tc) from its logits [T, E]: sigmoid scores; the experts are chosen on
// scores + bias, within the topk_group groups (of n_group) whose two best choices sum highest; the chosen experts'
// unbiased scores, divided by their sum when renormalize, times scale, weight them. Ties go to the lower index.
std::tuple<at::Tensor, at::Tensor> router_topk(const at::Tensor& logits, const at::Tensor& bias, int64_t top_k,
                                               int64_t n_group, int64_t topk_group, bool renormalize,
                                               double scale) {
  check_rows(logits, "router_topk");
  const int64_t tokens = logits.size(0), experts = logits.size(1);
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == experts,
              "glmserve kernels: the router's bias must be contiguous fp32 [E]");
  TORCH_CHECK(n_group >= 1 && experts % n_group == 0 && topk_group >= 1 && topk_group <= n_group && top_k >= 1 &&
                  top_k <= experts / n_group * topk_group && experts / n_group >= 2,
              "glmserve kernels: router_topk cannot choose ", top_k, " of ", experts, " experts in ", topk_group,
              " of ", n_group, " groups");
  at::Tensor weights = at::empty({tokens, top_k}, logits.options());
  at::Tensor ids = at::empty({tokens, top_k}, logits.options().dtype(at::kLong));
  const float *lp = logits.data_ptr<float>(), *bp = bias.data_ptr<float>();
  float* wp = weights.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t per_group = experts / n_group;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, tokens, grain(experts * 8), [&](int64_t begin, int64_t end) {
    std::vector<float> scores(experts), choice(experts), group_score(n_group);
    std::vector<char> taken(std::max(experts, n_group));
    // The index of the largest value not yet taken (the first one on ties): the order torch.topk gives.
    auto best_untaken = [&](const std::vector<float>& v, int64_t n) {
      int64_t best = -1;
      for (int64_t e = 0; e < n; ++e)
        if (!taken[e] && (best < 0 || v[e] > v[best])) best = e;
      return best;
    };
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t e = 0; e < experts; ++e) {
        scores[e] = 1.f / (1.f + std::exp(-lp[t * experts + e]));
        choice[e] = scores[e] + bp[e];
      }
      if (topk_group < n_group) {
        for (int64_t g = 0; g < n_group; ++g) {
          float first = kNegInf, second = kNegInf;
          for (int64_t e = g * per_group; e < (g + 1) * per_group; ++e) {
            if (choice[e] > first) {
              second = first;
              first = choice[e];
            } else if (choice[e] > second) {
              second = choice[e];
            }
          }
          group_score[g] = first + second;
        }
        std::fill(taken.begin(), taken.end(), 0);
        std::vector<char> kept(n_group, 0);
        for (int64_t j = 0; j < topk_group; ++j) {
          const int64_t g = best_untaken(group_score, n_group);
          taken[g] = kept[g] = 1;
        }
        for (int64_t e = 0; e < experts; ++e)
          if (!kept[e / per_group]) choice[e] = kNegInf;
      }
      std::fill(taken.begin(), taken.end(), 0);
      float sum = 0.f;
      for (int64_t j = 0; j < top_k; ++j) {
        const int64_t e = best_untaken(choice, experts);
        taken[e] = 1;
        ip[t * top_k + j] = e;
        wp[t * top_k + j] = scores[e];
        sum += scores[e];
      }
      for (int64_t j = 0; j < top_k; ++j) {
        float w = wp[t * top_k + j];
        if (renormalize) w /= sum + 1e-20f;
        wp[t * top_k + j] = w * static_cast<float>(scale);
      }
    }
  });
  return {weights, ids};
}

// The rows `ids` of an int8 or int4 (two to a byte, low nibble first, stored q + 8) embedding table [V, H] with
// fp32 scales [V, ceil(H / group_size)], dequantized: q * the scale of its group, as reference.dequantize.
at::Tensor embed_rows(const at::Tensor& table, const at::Tensor& scales, int64_t group_size, const at::Tensor& ids) {
  const bool int4 = table.scalar_type() == at::kByte;
  TORCH_CHECK((int4 || table.scalar_type() == at::kChar) && table.dim() == 2 && table.is_contiguous() &&
                  scales.scalar_type() == at::kFloat && scales.dim() == 2 && scales.is_contiguous() &&
                  scales.size(0) == table.size(0) && ids.scalar_type() == at::kLong && ids.is_contiguous() &&
                  group_size > 0,
              "glmserve kernels: embed_rows takes a contiguous int8 / int4 table, fp32 scales and int64 ids");
  const int64_t vocab = table.size(0), hidden = int4 ? 2 * table.size(1) : table.size(1), groups = scales.size(1);
  TORCH_CHECK(groups == (hidden + group_size - 1) / group_size, "glmserve kernels: embed_rows: scales per group");
  const int64_t rows = ids.numel();
  at::Tensor out = at::empty({rows, hidden}, scales.options());
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(id[r] >= 0 && id[r] < vocab, "glmserve kernels: embed_rows: token id ", id[r], " of ", vocab);
  const auto* bytes = static_cast<const uint8_t*>(table.data_ptr());
  const float* sp = scales.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, grain(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* row = bytes + id[r] * table.size(1);
      const float* s = sp + id[r] * groups;
      float* o = op + r * hidden;
      // A group at a time, the format chosen outside the loop: int8's loop vectorizes.
      for (int64_t g = 0; g < groups; ++g) {
        const float scale = s[g];
        const int64_t first = g * group_size, last = std::min(hidden, first + group_size);
        if (int4)
          for (int64_t c = first; c < last; ++c)
            o[c] = static_cast<float>(((row[c / 2] >> (4 * (c % 2))) & 0x0F) - 8) * scale;
        else
          for (int64_t c = first; c < last; ++c) o[c] = static_cast<float>(static_cast<int8_t>(row[c])) * scale;
      }
    }
  });
  std::vector<int64_t> shape = ids.sizes().vec();  // ids' shape, then hidden
  shape.push_back(hidden);
  return out.view(shape);
}

}  // namespace glmserve
