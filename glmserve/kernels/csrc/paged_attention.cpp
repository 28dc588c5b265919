// The torch-facing paged-attention op: argument checks, the split of each sequence's keys into tasks (flash-decoding:
// a long context is cut into key ranges so one sequence keeps every thread busy), the tasks run with
// at::parallel_for, and the reduction that merges each query row's partial results across its splits.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "isa.h"
#include "ops.h"
#include "paged_attention.h"

namespace glmserve {
namespace {

constexpr int64_t kTasksPerThread = 4;  // enough tasks that uneven ones still balance
// Keys a range holds at least. A decode step reads its few hundred keys from memory (the weights before it evicted
// them), so splitting them over the threads pays from short contexts on (BENCHMARKS.md, session 33).
constexpr int64_t kMinSplitKeys = 64;
constexpr int64_t kRowsPerTask = 128;   // query rows (queries x heads of a KV head) a prefill task keeps in cache
// Query rows of every KV head together up to which one task takes them all (it reads whole cache rows; impl.h).
constexpr int64_t kRowsAllHeads = 512;

KvType kv_type(const at::Tensor& cache) {
  switch (cache.scalar_type()) {
    case at::kFloat: return kKvF32;
    case at::kBFloat16: return kKvBF16;
    case at::kFloat8_e4m3fn: return kKvF8E4M3;
    case at::kFloat8_e5m2: return kKvF8E5M2;
    default: TORCH_CHECK(false, "glmserve paged_attention: no kernel for a KV cache of dtype ", cache.scalar_type());
  }
}

// VNNI adds nothing here. Each table is built on first use and only for an ISA this CPU runs (isa.h).
const AttentionKernels& attention_kernels_for(int64_t isa) {
  TORCH_CHECK(isa >= 0 && isa <= 3 && cpu_runs_isa(isa), "glmserve paged_attention: ISA ", isa,
              " is not available here");
  switch (std::min<int64_t>(isa, 2)) {
    case 0: { static const AttentionKernels table = portable_attention_kernels(); return table; }
    case 1: { static const AttentionKernels table = avx2_attention_kernels(); return table; }
    default: { static const AttentionKernels table = avx512_attention_kernels(); return table; }
  }
}

}  // namespace

// out = causal attention of q's rows over the sequence's cached keys; q, out
// [T, H, D] fp32; k_cache, v_cache [slots, Hk, D]; block_tables [B, max_blocks], seq_lens [B] and query_start_loc
// [B + 1] int64 (query rows of sequence b: query_start_loc[b]..[b + 1], at positions ending at seq_lens[b] - 1).
void paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, int64_t block_size, const at::Tensor& seq_lens,
                     const at::Tensor& query_start_loc, at::Tensor out, double scale,
                     double k_scale, double v_scale, int64_t isa) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous() && out.sizes() == q.sizes() &&
                  out.scalar_type() == at::kFloat && out.is_contiguous(),
              "glmserve paged_attention: q and out must be contiguous fp32 [T, H, D]");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type() &&
                  k_cache.size(2) == q.size(2) && q.size(1) % k_cache.size(1) == 0,
              "glmserve paged_attention: K and V caches must be contiguous [slots, Hk, D] of one dtype, Hk | H");
  for (const at::Tensor* t : {&block_tables, &seq_lens, &query_start_loc})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->device().is_cpu(),
                "glmserve paged_attention: block tables, lengths and indices must be contiguous int64 on the CPU");
  const int64_t batch = seq_lens.numel(), max_blocks = block_tables.size(1);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == batch && query_start_loc.numel() == batch + 1 &&
                  block_size > 0 && (block_size & (block_size - 1)) == 0 && k_cache.size(0) % block_size == 0,
              "glmserve paged_attention: block_tables [B, max_blocks], query_start_loc [B + 1] for B sequences, "
              "and a cache of whole blocks of a power of two");
  const int64_t heads = q.size(1), kv_heads = k_cache.size(1), dim = q.size(2), group = heads / kv_heads;
  const int64_t num_blocks = k_cache.size(0) / block_size;
  const int64_t *lens = seq_lens.data_ptr<int64_t>(), *starts = query_start_loc.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();

  // Check what the tasks will read: a wrong block id would read outside the cache.
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t queries = starts[b + 1] - starts[b];
    TORCH_CHECK(queries > 0 && starts[b] >= 0 && starts[b + 1] <= q.size(0) && lens[b] >= queries &&
                    (lens[b] + block_size - 1) / block_size <= max_blocks,
                "glmserve paged_attention: sequence ", b, " has ", queries, " queries, ", lens[b], " keys");
    for (int64_t j = 0; j < (lens[b] + block_size - 1) / block_size; ++j)
      TORCH_CHECK(tables[b * max_blocks + j] >= 0 && tables[b * max_blocks + j] < num_blocks,
                  "glmserve paged_attention: block id ", tables[b * max_blocks + j], " of ", num_blocks);
  }

  // Each sequence's queries go in blocks of about kRowsPerTask rows (a prefill chunk is many blocks, a decode or a
  // verification one), each block over the keys up to its last query's position (the causal bound), its keys
  // split into ranges of about an even share of every thread's work (flash-decoding: one long context, every
  // thread).
  struct QueryBlock {
    int64_t seq, first, count, keys;  // first query (index within the sequence), queries, keys its rows see
  };
  const int64_t block_queries = std::max<int64_t>(1, kRowsPerTask / group);
  std::vector<QueryBlock> blocks;
  int64_t total_work = 0;  // keys x query rows, over every block and KV head
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t queries = starts[b + 1] - starts[b];
    for (int64_t first = 0; first < queries; first += block_queries) {
      const int64_t count = std::min(block_queries, queries - first), keys = lens[b] - queries + first + count;
      blocks.push_back({b, first, count, keys});
      total_work += keys * count * heads;
    }
  }
  const int64_t threads = at::get_num_threads(), wanted_tasks = kTasksPerThread * threads;
  std::vector<AttentionTask> tasks;
  std::vector<int64_t> first_task;  // per (query block, KV heads): its tasks are first_task[i]..first_task[i + 1]
  int64_t partial_rows = 0;
  for (const QueryBlock& block : blocks) {
    const int64_t head_rows = block.count * group;
    const int64_t heads_per_task = head_rows * kv_heads <= kRowsAllHeads ? kv_heads : 1;
    const int64_t rows = head_rows * heads_per_task;
    const int64_t target = std::max(kMinSplitKeys, (total_work + wanted_tasks - 1) / wanted_tasks / rows);
    int64_t splits = std::max<int64_t>(1, block.keys / target);
    if (splits > threads) splits -= splits % threads;  // at::parallel_for hands each thread an equal run of tasks
    for (int64_t h = 0; h < kv_heads; h += heads_per_task) {
      first_task.push_back(static_cast<int64_t>(tasks.size()));
      for (int64_t s = 0; s < splits; ++s) {
        // Even ranges, cut at whole tiles of the kernel's keys (32).
        const int64_t k0 = s * block.keys / splits / 32 * 32;
        const int64_t k1 = s + 1 == splits ? block.keys : (s + 1) * block.keys / splits / 32 * 32;
        tasks.push_back({block.seq, h, heads_per_task, k0, k1,
                         starts[block.seq] + block.first, block.count,
                         lens[block.seq] - (starts[block.seq + 1] - starts[block.seq]) + block.first,
                         nullptr, nullptr, nullptr});
        partial_rows += rows;
      }
    }
  }
  first_task.push_back(static_cast<int64_t>(tasks.size()));
  at::Tensor stats = at::empty({2, partial_rows}, q.options()), acc = at::empty({partial_rows, dim}, q.options());
  for (int64_t t = 0, row = 0; t < static_cast<int64_t>(tasks.size()); ++t) {
    tasks[t].m = stats.data_ptr<float>() + row;
    tasks[t].l = stats.data_ptr<float>() + partial_rows + row;
    tasks[t].acc = acc.data_ptr<float>() + row * dim;
    row += tasks[t].kv_head_count * tasks[t].num_queries * group;
  }

  const PagedAttentionArgs args{q.data_ptr<float>(), static_cast<const uint8_t*>(k_cache.data_ptr()),
                                static_cast<const uint8_t*>(v_cache.data_ptr()), tables, max_blocks, block_size,
                                __builtin_ctzll(static_cast<uint64_t>(block_size)),
                                heads, kv_heads, dim, k_cache.element_size(),
                                static_cast<float>(scale * k_scale)};
  const AttendFn attend = attention_kernels_for(isa).attend[kv_type(k_cache)];
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) attend(args, tasks[t]);
  });

  // Merge: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s over the splits s a row saw keys in.
  float* o = out.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(first_task.size()) - 1, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(dim);
    for (int64_t pair = begin; pair < end; ++pair) {
      const AttentionTask& first = tasks[first_task[pair]];
      const int64_t head_rows = first.num_queries * group;
      for (int64_t r = 0; r < first.kv_head_count * head_rows; ++r) {
        float m = -std::numeric_limits<float>::infinity(), l = 0.f;
        for (int64_t t = first_task[pair]; t < first_task[pair + 1]; ++t) m = std::max(m, tasks[t].m[r]);
        std::fill(row.begin(), row.end(), 0.f);
        for (int64_t t = first_task[pair]; t < first_task[pair + 1]; ++t) {
          if (tasks[t].l[r] == 0.f) continue;  // the row saw none of this split's keys
          const float w = std::exp(tasks[t].m[r] - m);
          l += w * tasks[t].l[r];
          for (int64_t d = 0; d < dim; ++d) row[d] += w * tasks[t].acc[r * dim + d];
        }
        const float norm = static_cast<float>(v_scale) / l;
        const int64_t kv_head = first.kv_head + r / head_rows, head_row = r % head_rows;  // impl.h's row order
        float* dst = o + ((first.q_row + head_row / group) * heads + kv_head * group + head_row % group) * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] = row[d] * norm;
      }
    }
  });
}

}  // namespace glmserve
