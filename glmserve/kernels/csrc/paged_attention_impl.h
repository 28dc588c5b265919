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

// Scores of MR query rows (ld apart) against 4 keys: out[m * out_ld + j] = q_m . key_j. Each key vector loaded
// feeds MR FMAs and each query vector 4; one reduce4 per row turns its 4 accumulators into 4 scores.
template <int MR>
inline void score_block(const float* q, int64_t ld, const float* const* keys, int64_t d_total, float* out,
                        int64_t out_ld) {
  typename V::F acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = V::zero();
  int64_t d = 0;
  for (; d + V::kWidth <= d_total; d += V::kWidth) {
    const typename V::F k0 = V::load(keys[0] + d), k1 = V::load(keys[1] + d), k2 = V::load(keys[2] + d),
                        k3 = V::load(keys[3] + d);
    for (int m = 0; m < MR; ++m) {
      const typename V::F qv = V::load(q + m * ld + d);
      acc[m][0] = V::fma(qv, k0, acc[m][0]);
      acc[m][1] = V::fma(qv, k1, acc[m][1]);
      acc[m][2] = V::fma(qv, k2, acc[m][2]);
      acc[m][3] = V::fma(qv, k3, acc[m][3]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    float s[4];
    V::reduce4(acc[m][0], acc[m][1], acc[m][2], acc[m][3], s);
    for (int64_t e = d; e < d_total; ++e)
      for (int j = 0; j < 4; ++j) s[j] += q[m * ld + e] * keys[j][e];
    for (int j = 0; j < 4; ++j) out[m * out_ld + j] = s[j];
  }
}

// Folds one row's tile of scores (kTile, -inf past its visible keys, at least one visible) into its running max and
// sum: the scores become their weights exp(s - m_new), and the accumulator is rescaled if the max moved.
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

// acc_m[d] += sum over keys t < n of p_m[t] * value_t[d] for MR rows (accumulators D apart, weights kTile apart),
// each value vector loaded once for the MR rows, the accumulators kept in registers over the tile.
template <int MR>
inline void accumulate_values(float* acc, const float* p, const float* const* values, int64_t n, int64_t d_total) {
  int64_t d = 0;
  for (; d + V::kWidth <= d_total; d += V::kWidth) {
    typename V::F a[MR];
    for (int m = 0; m < MR; ++m) a[m] = V::load(acc + m * d_total + d);
    for (int64_t t = 0; t < n; ++t) {
      const typename V::F value = V::load(values[t] + d);
      for (int m = 0; m < MR; ++m) a[m] = V::fma(V::set1(p[m * kTile + t]), value, a[m]);
    }
    for (int m = 0; m < MR; ++m) V::store(acc + m * d_total + d, a[m]);
  }
  for (; d < d_total; ++d)
    for (int m = 0; m < MR; ++m)
      for (int64_t t = 0; t < n; ++t) acc[m * d_total + d] += p[m * kTile + t] * values[t][d];
}

template <int T>
void attend(const PagedAttentionArgs& a, const AttentionTask& task) {
  constexpr int MR = V::kScoreRows;
  const int64_t dim = a.head_dim, group = a.heads / a.kv_heads, rows = task.num_queries * group;
  const int64_t row_bytes = a.kv_heads * dim * a.kv_elem_bytes, head_offset = task.kv_head * dim * a.kv_elem_bytes;
  const int64_t* table = a.block_tables + task.seq * a.max_blocks;
  constexpr float kMinusInf = -std::numeric_limits<float>::infinity();
  std::vector<float> scratch(rows * dim + rows * kTile + 2 * kTile * dim);
  float* queries = scratch.data();       // [R, D], scaled
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
  int64_t visible[MR];
  for (int64_t k0 = task.key_begin; k0 < task.key_end; k0 += kTile) {
    const int64_t n = std::min(kTile, task.key_end - k0), mask = a.block_size - 1;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t p = k0 + t;
      const int64_t offset = ((table[p >> a.block_shift] << a.block_shift) + (p & mask)) * row_bytes + head_offset;
      key_rows[t] = widen_row<T>(a.k + offset, dim, widened_k + t * dim);
      value_rows[t] = widen_row<T>(a.v + offset, dim, widened_v + t * dim);
    }
    for (int64_t t = n; t < (n + 3) / 4 * 4; ++t) key_rows[t] = key_rows[0];  // scored, then masked
    // Query i sees keys up to first_position + i: a row block scores the whole tile, then each row masks the
    // keys past its own position (and past n) with -inf and folds what it sees into its softmax.
    for (int64_t r0 = 0; r0 < rows; r0 += MR) {
      const int block = static_cast<int>(std::min<int64_t>(MR, rows - r0));
      for (int64_t t = 0; t < n; t += 4)
        if (block == MR)
          score_block<MR>(queries + r0 * dim, dim, key_rows + t, dim, scores + r0 * kTile + t, kTile);
        else
          for (int m = 0; m < block; ++m)
            score_block<1>(queries + (r0 + m) * dim, dim, key_rows + t, dim, scores + (r0 + m) * kTile + t, kTile);
      int64_t most = 0;
      for (int m = 0; m < MR; ++m) {
        float* row = scores + (r0 + m) * kTile;
        visible[m] = m < block ? std::clamp<int64_t>(task.first_position + (r0 + m) / group - k0 + 1, 0, n) : 0;
        most = std::max(most, visible[m]);
        if (m >= block) continue;
        std::fill(row + visible[m], row + kTile, kMinusInf);
        if (visible[m] > 0)
          softmax_tile(row, task.m[r0 + m], task.l[r0 + m], task.acc + (r0 + m) * dim, dim);
        else
          std::fill(row, row + kTile, 0.f);  // a later query's keys only: this row's state is unchanged
      }
      if (block == MR)
        accumulate_values<MR>(task.acc + r0 * dim, scores + r0 * kTile, value_rows, most, dim);
      else
        for (int m = 0; m < block; ++m)
          accumulate_values<1>(task.acc + (r0 + m) * dim, scores + (r0 + m) * kTile, value_rows, visible[m], dim);
    }
  }
}

inline AttentionKernels attention_kernel_table() {
  return {{&attend<kKvF32>, &attend<kKvBF16>, &attend<kKvF8E4M3>, &attend<kKvF8E5M2>}};
}
