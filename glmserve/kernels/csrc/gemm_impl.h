// The small-M GEMM over every weight format, written once against an ISA's vector traits `V` (width, tile shape,
// load / fma / reduce, and `load_w<T>`: kWidth weights of format T widened to fp32, unscaled). Included inside
// each ISA's namespace after its `V`.
//
// A tile is kTileRows activation rows x kTileCols weight rows: the weights are widened in registers once per
// activation block and each one feeds kTileRows FMAs. The column tile is the outer loop, so a tile's weights come
// from memory once and from cache for the other row blocks. A vector never straddles two scale groups: each group
// runs whole vectors, then its tail one input at a time. A tile's sums are reduced four at a time (V::reduce4), so
// the horizontal adds cost a quarter of one per output. The tile kPrefetchAheadBytes ahead (gemm.h) is requested a
// slice per vector step, into L2 (prefetcht1; into L1 the fp32 and bf16 lm_head GEMVs gained less); where the ISA's
// V::kNonTemporalStreams says so, a product of one row block (each tile read once) fetches it non-temporally
// instead, so that the weights it streams do not evict the rest of the step from L2 / L3.

template <int T, int MB, int NR>
inline void gemm_tile(const GemmArgs& a, int64_t m0, int64_t n0) {
  using W = WeightFormat<T>;
  using F = typename V::F;
  const int64_t row_bytes = W::row_bytes(a.k);
  const uint8_t* w[NR];
  const float* s[NR];
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    w[r] = static_cast<const uint8_t*>(a.w) + (n0 + r) * row_bytes;
    s[r] = W::kScaled ? a.scales + (n0 + r) * a.groups : nullptr;
  }
  const float* x[MB];
  #pragma GCC unroll 16
  for (int m = 0; m < MB; ++m) x[m] = a.x + (m0 + m) * a.ldx;
  const int64_t tiles_ahead = (kPrefetchAheadBytes + NR * row_bytes - 1) / (NR * row_bytes);
  const char* next_tile = reinterpret_cast<const char*>(w[0] + tiles_ahead * NR * row_bytes);
  constexpr int64_t kSliceBytes = NR * W::row_bytes(V::kWidth);  // of the next tile, per vector step
  const bool streaming = V::kNonTemporalStreams && a.rows <= V::kTileRows;  // each tile read once
  F acc[MB][NR];
  float tail[MB][NR];
  #pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      acc[m][r] = V::zero();
      tail[m][r] = 0.f;
    }
  const int64_t group = W::kScaled ? a.group_size : a.k;
  for (int64_t k0 = 0, g = 0; k0 < a.k; k0 += group, ++g) {
    const int64_t k1 = k0 + group < a.k ? k0 + group : a.k;
    float scale[NR];
    F scale_v[NR];
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      scale[r] = W::kScaled ? s[r][g] : 1.f;
      scale_v[r] = V::set1(scale[r]);
    }
    int64_t k = k0;
    for (; k + V::kWidth <= k1; k += V::kWidth) {
      const char* slice = next_tile + k / V::kWidth * kSliceBytes;
      for (int64_t line = 0; line < kSliceBytes; line += 64) {
        if (streaming) {
          __builtin_prefetch(slice + line, 0, 0);
        } else {
          __builtin_prefetch(slice + line, 0, 2);
        }
      }
      F xv[MB];
      #pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) xv[m] = V::load(x[m] + k);
      #pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        F wv = V::template load_w<T>(w[r], k);
        if (W::kScaled) wv = V::mul(wv, scale_v[r]);
        #pragma GCC unroll 16
        for (int m = 0; m < MB; ++m) acc[m][r] = V::fma(wv, xv[m], acc[m][r]);
      }
    }
    for (; k < k1; ++k)
      #pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        const float wv = W::at(w[r], k) * scale[r];
        #pragma GCC unroll 16
        for (int m = 0; m < MB; ++m) tail[m][r] += wv * x[m][k];
      }
  }
  #pragma GCC unroll 16
  for (int m = 0; m < MB; ++m) {
    float sums[NR];
    if constexpr (NR == 4) {
      V::reduce4(acc[m], sums);
    } else {
      #pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) sums[r] = V::reduce(acc[m][r]);
    }
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r)
      a.y[(m0 + m) * a.ldy + n0 + r] = sums[r] + tail[m][r] + (a.bias ? a.bias[n0 + r] : 0.f);
  }
}

// Weight rows [n0, n0 + NR) for every activation row: whole row blocks, then the rest as one shorter block.
template <int T, int NR>
inline void gemm_columns(const GemmArgs& a, int64_t n0) {
  int64_t m0 = 0;
  for (; m0 + V::kTileRows <= a.rows; m0 += V::kTileRows) gemm_tile<T, V::kTileRows, NR>(a, m0, n0);
  switch (a.rows - m0) {
    case 0: break;
    case 1: gemm_tile<T, 1, NR>(a, m0, n0); break;
    case 2: if constexpr (V::kTileRows > 2) gemm_tile<T, 2, NR>(a, m0, n0); break;
    case 3: if constexpr (V::kTileRows > 3) gemm_tile<T, 3, NR>(a, m0, n0); break;
    default: static_assert(V::kTileRows <= 4, "row remainders above 3 are not dispatched");
  }
}

template <int T>
void gemm(const GemmArgs& a, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  // One activation row (a decode GEMV) walks one weight row at a time: a thread then reads a single sequential
  // stream rather than a tile's kTileCols rows side by side, which read slower or level on every shape measured
  // (BENCHMARKS.md, session 32), as the VNNI int8 GEMV found.
  if (a.rows == 1) {
    for (; n < n_end; ++n) gemm_columns<T, 1>(a, n);
    return;
  }
  for (; n + V::kTileCols <= n_end; n += V::kTileCols) gemm_columns<T, V::kTileCols>(a, n);
  for (; n < n_end; ++n) gemm_columns<T, 1>(a, n);
}

inline IsaKernels kernel_table() {
  return {{&gemm<kF32>, &gemm<kF16>, &gemm<kBF16>, &gemm<kF8E4M3>, &gemm<kI8>, &gemm<kI4>}, {}, nullptr};
}
