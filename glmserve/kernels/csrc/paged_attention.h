// The contract between the torch-facing paged-attention op (paged_attention.cpp) and its per-ISA kernels
// (attention_isa_*.cpp, each compiling paged_attention_impl.h): plain pointers only, as gemm.h.
#pragma once
#include <cstdint>

namespace glmserve {

// How the KV cache stores a value (PagedKVCache's storage dtypes).
enum KvType : int { kKvF32, kKvBF16, kKvF8E4M3, kKvF8E5M2, kNumKvTypes };

// One attention layer's step: queries [T, H, D] fp32, the paged cache's K and V [slots, Hk, D] in their storage
// type, slot = block_tables[b][p / block_size] * block_size + p % block_size for key position p of sequence b.
struct PagedAttentionArgs {
  const float* q;
  const uint8_t* k;
  const uint8_t* v;
  const int64_t* block_tables;  // [B, max_blocks]
  int64_t max_blocks, block_size, block_shift;  // block_size = 1 << block_shift
  int64_t heads, kv_heads, head_dim;
  int64_t kv_elem_bytes;  // bytes of one stored value
  float qk_scale;         // softmax scale times the keys' storage scale
};

// One task: query rows of one sequence and KV heads kv_head..kv_head + kv_head_count - 1 over keys
// [key_begin, key_end). Its R = kv_head_count * num_queries * G rows (row (h * num_queries + i) * G + g: query i,
// head (kv_head + h) * G + g) leave an unnormalised partial result: running max m, sum l and accumulator acc
// (R x D), which the reduction merges across the sequence's splits. A row sees key p only when
// p <= first_position + i (causal); a row that sees no key of the split keeps m = -inf, l = 0.
struct AttentionTask {
  int64_t seq, kv_head, kv_head_count, key_begin, key_end;
  int64_t q_row;           // flat row of the sequence's first query
  int64_t num_queries;
  int64_t first_position;  // position of the first query
  float* m;                // [R]
  float* l;                // [R]
  float* acc;              // [R, D]
};

using AttendFn = void (*)(const PagedAttentionArgs&, const AttentionTask&);

struct AttentionKernels {
  AttendFn attend[kNumKvTypes];
};

// Each in its own translation unit with its own target attributes; call one only on a CPU that has them.
AttentionKernels portable_attention_kernels();
AttentionKernels avx2_attention_kernels();
AttentionKernels avx512_attention_kernels();

}  // namespace glmserve
