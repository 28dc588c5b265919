// One paged-attention task (paged_attention.h) written once against an ISA's vector traits `V`: width, load /
// store / fma / max, horizontal sum and max, exp, a kWidth x kWidth transpose, and `load_kv<T>` (kWidth stored values
// widened to fp32, unscaled). Included inside each ISA's namespace after its `V` and weights.h.
//
// A tile of kTile keys is one small GEMM per block of MR query rows (queries x heads of the KV head: GQA): the tile's
// keys are transposed once into kt [D][kTile] (keys along the vector lanes, widened there from narrower storage),
// so each kt vector loaded feeds MR FMAs and a row's kTile scores come out as whole vectors, with no horizontal sum
// per key. Then each row's scores are folded into its running max / sum / accumulator (online softmax, fp32), and
// P x V runs with the values' dims along the lanes, each value vector loaded once for MR rows. Rows only mask keys
// in the tiles that hold positions past their own (the diagonal of a prefill chunk, the end of a context).

// The including file provides <algorithm>, <cmath>, <limits> and <vector> (std headers cannot be included inside
// a namespace).

constexpr int64_t kTile = 32;  // keys per tile: a multiple of every ISA's width
constexpr int64_t kKeyVectors = kTile / V::kWidth;

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

template <int T>
inline typename V::F load_stored(const uint8_t* row, int64_t d) {
  if constexpr (T == kKvF32)
    return V::load(reinterpret_cast<const float*>(row) + d);
  else
    return V::template load_kv<T>(row, d);
}

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

// kt[d * kTile + t] = key t's value d (fp32, unscaled) for the tile's kTile stored key rows.
template <int T>
inline void transpose_keys(const uint8_t* const* rows, int64_t d_total, float* kt) {
  typename V::F block[V::kWidth];
  int64_t d = 0;
  for (; d + V::kWidth <= d_total; d += V::kWidth)
    for (int64_t t0 = 0; t0 < kTile; t0 += V::kWidth) {
      for (int i = 0; i < V::kWidth; ++i) block[i] = load_stored<T>(rows[t0 + i], d);
      V::transpose(block);
      for (int j = 0; j < V::kWidth; ++j) V::store(kt + (d + j) * kTile + t0, block[j]);
    }
  for (; d < d_total; ++d)
    for (int64_t t = 0; t < kTile; ++t) kt[d * kTile + t] = KvFormat<T>::at(rows[t], d);
}

// The next tile's cache lines (K and V of each key, in order), requested a pair at a time from inside this tile's
// math (one pair per inner step of its scores and of P x V), so that memory stays busy while the math runs. They
// go to L2 (prefetcht1): into L1 (prefetcht0) they gained far less (BENCHMARKS.md, issue 23).
struct NextTileLines {
  const uint8_t* k = nullptr;
  const uint8_t* v = nullptr;
  const int64_t* offsets = nullptr;
  int64_t n = 0, lines = 0, t = 0, line = 0;
  inline void request() {
    if (t >= n) return;
    __builtin_prefetch(k + offsets[t] + 64 * line, 0, 2);
    __builtin_prefetch(v + offsets[t] + 64 * line, 0, 2);
    if (++line == lines) {
      line = 0;
      ++t;
    }
  }
};

// s[m * kTile + t] = q_m . key_t for MR query rows (D apart) against the transposed tile: MR x kKeyVectors
// accumulators, each kt vector loaded once for the MR rows, each query value broadcast once for the tile.
template <int MR>
inline void score_rows(const float* q, int64_t d_total, const float* kt, float* s, NextTileLines& next) {
  typename V::F acc[MR][kKeyVectors];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < kKeyVectors; ++v) acc[m][v] = V::zero();
  for (int64_t d = 0; d < d_total; ++d) {
    typename V::F k[kKeyVectors];
    for (int v = 0; v < kKeyVectors; ++v) k[v] = V::load(kt + d * kTile + v * V::kWidth);
    next.request();
    for (int m = 0; m < MR; ++m) {
      const typename V::F qm = V::set1(q[m * d_total + d]);
      for (int v = 0; v < kKeyVectors; ++v) acc[m][v] = V::fma(qm, k[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < kKeyVectors; ++v) V::store(s + m * kTile + v * V::kWidth, acc[m][v]);
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
  if (alpha != 1.f) {
    const typename V::F scale = V::set1(alpha);
    int64_t d = 0;
    for (; d + V::kWidth <= d_total; d += V::kWidth) V::store(acc + d, V::mul(V::load(acc + d), scale));
    for (; d < d_total; ++d) acc[d] *= alpha;
  }
  l = l * alpha + V::reduce(sum);
  m = m_new;
}

// acc_m[d..d + DV vectors) += sum over keys t < n of p_m[t] * value_t[...] for MR rows (accumulators D apart,
// weights kTile apart), from d on while DV whole vectors remain; returns the first d left. Each value vector is
// loaded once for the MR rows; the MR x DV accumulators stay in registers over the tile.
template <int MR, int DV>
inline int64_t accumulate_value_vectors(float* acc, const float* p, const float* const* values, int64_t n, int64_t d,
                                        int64_t d_total, NextTileLines& next) {
  constexpr int64_t kStep = DV * V::kWidth;
  for (; d + kStep <= d_total; d += kStep) {
    typename V::F a[MR][DV];
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < DV; ++j) a[m][j] = V::load(acc + m * d_total + d + j * V::kWidth);
    for (int64_t t = 0; t < n; ++t) {
      typename V::F value[DV];
      for (int j = 0; j < DV; ++j) value[j] = V::load(values[t] + d + j * V::kWidth);
      next.request();
      for (int m = 0; m < MR; ++m) {
        const typename V::F pm = V::set1(p[m * kTile + t]);
        for (int j = 0; j < DV; ++j) a[m][j] = V::fma(pm, value[j], a[m][j]);
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < DV; ++j) V::store(acc + m * d_total + d + j * V::kWidth, a[m][j]);
  }
  return d;
}

// acc_m[d] += sum over keys t < n of p_m[t] * value_t[d] for MR rows. Vectors go DV at a time so that MR x DV >= 8
// accumulators are independent FMA chains: with AVX2's two rows and one vector each, every FMA waited for the
// previous one's result (perf: most of the tile's time on that chain).
template <int MR>
inline void accumulate_values(float* acc, const float* p, const float* const* values, int64_t n, int64_t d_total,
                              NextTileLines& next) {
  constexpr int DV = MR >= 8 ? 1 : 8 / MR;
  int64_t d = accumulate_value_vectors<MR, DV>(acc, p, values, n, 0, d_total, next);
  if constexpr (DV > 1) d = accumulate_value_vectors<MR, 1>(acc, p, values, n, d, d_total, next);
  for (; d < d_total; ++d)
    for (int m = 0; m < MR; ++m)
      for (int64_t t = 0; t < n; ++t) acc[m * d_total + d] += p[m * kTile + t] * values[t][d];
}

// One tile (keys k0..k0 + n - 1, transposed in kt, values' rows in `values`) for rows r0..r0 + MR - 1 of the task.
// Row r (query r / group) sees key p when p <= first_position + r / group: only a tile holding a position past some
// row's own is masked, and rows that see none of it are left as they are.
template <int MR>
inline void tile_rows(const AttentionTask& task, const float* queries, int64_t r0, int64_t group, int64_t k0,
                      int64_t n, int64_t dim, const float* kt, const float* const* values, float* scores,
                      NextTileLines& next) {
  int64_t visible[MR], most = 0;
  for (int m = 0; m < MR; ++m) {
    visible[m] = std::clamp<int64_t>(task.first_position + (r0 + m) / group - k0 + 1, 0, n);
    most = std::max(most, visible[m]);
  }
  if (most == 0) return;
  score_rows<MR>(queries + r0 * dim, dim, kt, scores, next);
  for (int m = 0; m < MR; ++m) {
    float* row = scores + m * kTile;
    if (visible[m] == 0) {  // a later query's keys only: this row's state is unchanged
      std::fill(row, row + kTile, 0.f);
      continue;
    }
    std::fill(row + visible[m], row + kTile, -std::numeric_limits<float>::infinity());
    softmax_tile(row, task.m[r0 + m], task.l[r0 + m], task.acc + (r0 + m) * dim, dim);
  }
  accumulate_values<MR>(task.acc + r0 * dim, scores, values, most, dim, next);
}

// tile_rows for a block of `block` <= MR rows (the last block of a task).
template <int MR>
inline void tile_block(int block, const AttentionTask& task, const float* queries, int64_t r0, int64_t group,
                       int64_t k0, int64_t n, int64_t dim, const float* kt, const float* const* values,
                       float* scores, NextTileLines& next) {
  if constexpr (MR > 1)
    if (block < MR) return tile_block<MR - 1>(block, task, queries, r0, group, k0, n, dim, kt, values, scores, next);
  tile_rows<MR>(task, queries, r0, group, k0, n, dim, kt, values, scores, next);
}

// Loads one byte of every cache line of the tile's rows, in a loop of independent loads with nothing else in it, so
// that the lines the previous tile's prefetches did not bring (the first tile's, or any the core dropped) arrive
// with as many in flight as the core can track; the tile's math then finds them in cache. Lines first loaded by
// that math were far fewer in flight, and the KV was read markedly slower (BENCHMARKS.md, issue 23).
inline void touch_rows(const uint8_t* k, const uint8_t* v, const int64_t* offsets, int64_t n, int64_t lines) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t line = 0; line < lines; ++line) {
      const uint8_t kb = *reinterpret_cast<const volatile uint8_t*>(k + offsets[t] + 64 * line);
      const uint8_t vb = *reinterpret_cast<const volatile uint8_t*>(v + offsets[t] + 64 * line);
      asm volatile("" ::"r"(kb), "r"(vb));  // the loads are wanted for their effect on the cache alone
    }
}

// A task's KV heads are read from the same key rows tile by tile: a stored row holds every KV head of a position,
// so a task of all the heads reads whole rows, one contiguous run of a block, which the hardware prefetchers follow
// (a task of one head reads every other piece of each row).
template <int T>
void attend(const PagedAttentionArgs& a, const AttentionTask& task) {
  constexpr int MR = V::kScoreRows;
  const int64_t dim = a.head_dim, group = a.heads / a.kv_heads, rows = task.num_queries * group;  // per KV head
  const int64_t heads = task.kv_head_count, all_rows = heads * rows;
  const int64_t head_bytes = dim * a.kv_elem_bytes, row_bytes = a.kv_heads * head_bytes;
  const int64_t* table = a.block_tables + task.seq * a.max_blocks;
  std::vector<float> scratch(all_rows * dim + MR * kTile + dim * kTile + kTile * dim);
  float* queries = scratch.data();           // [heads, R, D], scaled
  float* scores = queries + all_rows * dim;  // [MR, kTile]
  float* kt = scores + MR * kTile;           // [D, kTile]
  float* widened_v = kt + dim * kTile;       // [kTile, D]
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t r = 0; r < rows; ++r) {
      const float* src =
          a.q + ((task.q_row + r / group) * a.heads + (task.kv_head + h) * group + r % group) * dim;
      for (int64_t d = 0; d < dim; ++d) queries[(h * rows + r) * dim + d] = src[d] * a.qk_scale;
    }
  std::fill(task.m, task.m + all_rows, -std::numeric_limits<float>::infinity());
  std::fill(task.l, task.l + all_rows, 0.f);
  std::fill(task.acc, task.acc + all_rows * dim, 0.f);
  int64_t offset_buffers[2][kTile];
  const uint8_t* key_rows[kTile];
  const float* value_rows[kTile];
  const int64_t mask = a.block_size - 1, task_lines = (heads * head_bytes + 63) / 64;
  const auto key_offset = [&](int64_t p) {
    return ((table[p >> a.block_shift] << a.block_shift) + (p & mask)) * row_bytes + task.kv_head * head_bytes;
  };
  const auto fill_offsets = [&](int64_t k0, int64_t* offsets) {
    const int64_t n = std::min(kTile, task.key_end - k0);
    for (int64_t t = 0; t < n; ++t) offsets[t] = key_offset(k0 + t);
    for (int64_t t = n; t < kTile; ++t) offsets[t] = offsets[0];  // scored, then masked
  };
  if (task.key_begin < task.key_end) fill_offsets(task.key_begin, offset_buffers[0]);
  for (int64_t k0 = task.key_begin, tile = 0; k0 < task.key_end; k0 += kTile, ++tile) {
    const int64_t n = std::min(kTile, task.key_end - k0);
    // The first row that sees a key of this tile (rows see more keys as r grows): the rows before see none.
    const int64_t first_row = std::max<int64_t>(0, k0 - task.first_position) * group;
    if (first_row >= rows) break;
    const int64_t* offsets = offset_buffers[tile & 1];
    NextTileLines next;
    if (k0 + kTile < task.key_end) {
      fill_offsets(k0 + kTile, offset_buffers[(tile + 1) & 1]);
      next = {a.k, a.v, offset_buffers[(tile + 1) & 1], std::min(kTile, task.key_end - k0 - kTile), task_lines};
    }
    touch_rows(a.k, a.v, offsets, n, task_lines);
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t t = 0; t < kTile; ++t) key_rows[t] = a.k + offsets[t] + h * head_bytes;
      for (int64_t t = 0; t < n; ++t) value_rows[t] = widen_row<T>(a.v + offsets[t] + h * head_bytes, dim,
                                                                  widened_v + t * dim);
      transpose_keys<T>(key_rows, dim, kt);
      AttentionTask head = task;  // this head's rows
      head.m += h * rows;
      head.l += h * rows;
      head.acc += h * rows * dim;
      for (int64_t r0 = first_row; r0 < rows; r0 += MR)
        tile_block<MR>(static_cast<int>(std::min<int64_t>(MR, rows - r0)), head, queries + h * rows * dim, r0,
                       group, k0, n, dim, kt, value_rows, scores, next);
    }
  }
}

inline AttentionKernels attention_kernel_table() {
  return {{&attend<kKvF32>, &attend<kKvBF16>, &attend<kKvF8E4M3>, &attend<kKvF8E5M2>}};
}
