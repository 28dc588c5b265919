// One paged-attention task (paged_attention.h) written once against an ISA's vector traits `V`: width, load /
// store / fma / max, horizontal sum and max, exp, and `load_kv<T>` (kWidth stored values widened to fp32, unscaled).
// Included inside each ISA's namespace after its `V` and weights.h.
//
// Keys go kTile at a time: each key row is read from the cache once (widened to fp32 if stored narrower) and
// scored against all R = queries x G query rows of its KV head (GQA), then the tile's softmax is folded into each
// row's running max / sum / accumulator (online softmax, fp32), and each value row is read once for all R rows.

// The including file provides <algorithm>, <cmath>, <limits> and <vector> (std headers cannot be included inside
// a namespace).

constexpr int64_t kTile = 32;  // keys scored together: a multiple of every ISA's width

template <int T>
struct KvFormat;
template <>
struct KvFormat<kKvF32> : WeightFormat<kF32> {};
template <>
struct KvFormat<kKvBF16> : WeightFormat<kBF16> {};
template <>
struct KvFormat<kKvF8E4M3> : WeightFormat<kF8E4M3> {};
template <>
struct KvFormat<kKvF8E5M2> {  // e5m2 is the high byte of an fp16
  static float at(const uint8_t* row, int64_t d) {
    const uint8_t half[2] = {0, row[d]};
    return WeightFormat<kF16>::at(half, 0);
  }
};

// A stored row of D values as fp32: the row itself for fp32 storage, else widened into `buffer`.
template <int T>
inline const float* widen_row(const uint8_t* row, int64_t d_total, float* buffer) {
  if constexpr (T == kKvF32) {
    return reinterpret_cast<const float*>(row);
  } else {
    int64_t d = 0;
    for (; d + V::kWidth <= d_total; d += V::kWidth) V::store(buffer + d, V::template load_kv<T>(row, d));
    for (; d < d_total; ++d) buffer[d] = KvFormat<T>::at(row, d);
    return buffer;
  }
}

// Dot products of 4 query rows (ld apart) with one key row.
inline void dot4(const float* q, int64_t ld, const float* key, int64_t d_total, float* out, int64_t out_ld) {
  typename V::F a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
  int64_t d = 0;
  for (; d + V::kWidth <= d_total; d += V::kWidth) {
    const typename V::F kv = V::load(key + d);
    a0 = V::fma(V::load(q + d), kv, a0);
    a1 = V::fma(V::load(q + ld + d), kv, a1);
    a2 = V::fma(V::load(q + 2 * ld + d), kv, a2);
    a3 = V::fma(V::load(q + 3 * ld + d), kv, a3);
  }
  float s[4] = {V::reduce(a0), V::reduce(a1), V::reduce(a2), V::reduce(a3)};
  for (; d < d_total; ++d)
    for (int j = 0; j < 4; ++j) s[j] += q[j * ld + d] * key[d];
  for (int j = 0; j < 4; ++j) out[j * out_ld] = s[j];
}

inline float dot1(const float* q, const float* key, int64_t d_total) {
  typename V::F a = V::zero();
  int64_t d = 0;
  for (; d + V::kWidth <= d_total; d += V::kWidth) a = V::fma(V::load(q + d), V::load(key + d), a);
  float s = V::reduce(a);
  for (; d < d_total; ++d) s += q[d] * key[d];
  return s;
}

// Folds one row's tile of scores (kTile, -inf past its visible keys) into its running max and sum: the scores
// become their weights exp(s - m_new), and the accumulator is rescaled if the max moved.
inline void softmax_tile(float* s, float& m, float& l, float* acc, int64_t d_total) {
  typename V::F mv = V::load(s);
  for (int64_t t = V::kWidth; t < kTile; t += V::kWidth) mv = V::max(mv, V::load(s + t));
  const float m_new = std::max(m, V::reduce_max(mv));
  const typename V::F shift = V::set1(m_new);
  typename V::F sum = V::zero();
  for (int64_t t = 0; t < kTile; t += V::kWidth) {
    const typename V::F p = V::exp(V::sub(V::load(s + t), shift));
    V::store(s + t, p);
    sum = V::add(sum, p);
  }
  const float alpha = m == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(m - m_new);
  if (alpha != 1.f)
    for (int64_t d = 0; d < d_total; ++d) acc[d] *= alpha;
  l = l * alpha + V::reduce(sum);
  m = m_new;
}

// acc[d] += sum over the tile's keys t < n of p[t] * value_t[d], the accumulator kept in registers over the tile.
inline void accumulate_values(float* acc, const float* p, const float* const* values, int64_t n, int64_t d_total) {
  int64_t d = 0;
  for (; d + V::kWidth <= d_total; d += V::kWidth) {
    typename V::F a = V::load(acc + d);
    for (int64_t t = 0; t < n; ++t) a = V::fma(V::set1(p[t]), V::load(values[t] + d), a);
    V::store(acc + d, a);
  }
  for (; d < d_total; ++d)
    for (int64_t t = 0; t < n; ++t) acc[d] += p[t] * values[t][d];
}

template <int T>
void attend(const PagedAttentionArgs& a, const AttentionTask& task) {
  const int64_t dim = a.head_dim, group = a.heads / a.kv_heads, rows = task.num_queries * group;
  const int64_t row_bytes = a.kv_heads * dim * a.kv_elem_bytes, head_offset = task.kv_head * dim * a.kv_elem_bytes;
  const int64_t* table = a.block_tables + task.seq * a.max_blocks;
  constexpr float kMinusInf = -std::numeric_limits<float>::infinity();
  std::vector<float> scratch(rows * dim + rows * kTile + 2 * kTile * dim);
  float* queries = scratch.data();     // [R, D], scaled
  float* scores = queries + rows * dim;  // [R, kTile]
  float* widened_k = scores + rows * kTile;
  float* widened_v = widened_k + kTile * dim;
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = a.q + ((task.q_row + r / group) * a.heads + task.kv_head * group + r % group) * dim;
    for (int64_t d = 0; d < dim; ++d) queries[r * dim + d] = src[d] * a.qk_scale;
    task.m[r] = kMinusInf;
    task.l[r] = 0.f;
  }
  std::fill(task.acc, task.acc + rows * dim, 0.f);
  const float* key_rows[kTile];
  const float* value_rows[kTile];
  for (int64_t k0 = task.key_begin; k0 < task.key_end; k0 += kTile) {
    const int64_t n = std::min(kTile, task.key_end - k0);
    for (int64_t t = 0; t < n; ++t) {
      const int64_t p = k0 + t, slot = table[p / a.block_size] * a.block_size + p % a.block_size;
      key_rows[t] = widen_row<T>(a.k + slot * row_bytes + head_offset, dim, widened_k + t * dim);
    }
    // Query i sees keys up to first_position + i: its rows score that many of the tile's keys, -inf after.
    int64_t r = 0;
    const int64_t all_visible = task.first_position - k0 + 1 >= n ? rows : 0;  // every row sees the whole tile
    for (; r + 4 <= all_visible; r += 4)
      for (int64_t t = 0; t < n; ++t) dot4(queries + r * dim, dim, key_rows[t], dim, scores + r * kTile + t, kTile);
    for (; r < rows; ++r) {
      const int64_t visible = std::clamp<int64_t>(task.first_position + r / group - k0 + 1, 0, n);
      for (int64_t t = 0; t < visible; ++t) scores[r * kTile + t] = dot1(queries + r * dim, key_rows[t], dim);
      std::fill(scores + r * kTile + visible, scores + (r + 1) * kTile, kMinusInf);
    }
    if (n < kTile)
      for (int64_t q = 0; q < all_visible; ++q) std::fill(scores + q * kTile + n, scores + (q + 1) * kTile, kMinusInf);
    for (int64_t t = 0; t < n; ++t) {
      const int64_t p = k0 + t, slot = table[p / a.block_size] * a.block_size + p % a.block_size;
      value_rows[t] = widen_row<T>(a.v + slot * row_bytes + head_offset, dim, widened_v + t * dim);
    }
    for (r = 0; r < rows; ++r) {
      const int64_t visible = std::clamp<int64_t>(task.first_position + r / group - k0 + 1, 0, n);
      if (visible == 0) continue;  // a later query's key: this row's state is unchanged
      softmax_tile(scores + r * kTile, task.m[r], task.l[r], task.acc + r * dim, dim);
      accumulate_values(task.acc + r * dim, scores + r * kTile, value_rows, visible, dim);
    }
  }
}

inline AttentionKernels attention_kernel_table() {
  return {{&attend<kKvF32>, &attend<kKvBF16>, &attend<kKvF8E4M3>, &attend<kKvF8E5M2>}};
}
