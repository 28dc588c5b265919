// Prefill's per-channel int8 GEMM on AMX tiles (Intel Sapphire Rapids and later): int32 sums of activations
// quantized per row (QuantizedRows' layout, zero-padded to kQ8Pad inputs) times int8 weights [N, K] with one scale
// per row, scaled as int8_channel_gemm scales torch's sums, so both give the same bits. torch's _int_mm, which
// int8_channel_gemm uses elsewhere, is slower on prefill's shapes here (BENCHMARKS.md).
//
// A tile multiply (tdpbssd) takes A as 16 rows of 64 int8 inputs, which the quantized activation rows already are,
// and B as 16 rows of 16 weight rows' 4 consecutive inputs each: a 16 x 16 transpose of 4-byte groups. The weights
// are packed so on every call, a slab of blocks of 32 rows at a time (kept in L2), and each block of 32 activation
// rows (kept in L1) walks the slab. Each step holds a 2 x 2 block of 16 x 16 int32 sums (tiles 0-3) over two A
// tiles (4, 5) and two B tiles (6, 7). Tile loads, not multiplies, bound it: the next packed tiles are prefetched.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <ATen/Parallel.h>
#include <cpuid.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "int8_gemm_amx.h"

namespace glmserve {
namespace {

constexpr int64_t kBlock = 32;             // weight rows (and activation rows) per 2 x 2 block of tiles
constexpr int64_t kStep = 64;              // inputs per tile multiply
constexpr int64_t kTileBytes = 16 * 64;    // one tile
constexpr int64_t kSlabBytes = 1 << 20;    // packed weights walked by every activation block: kept in L2

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool request_tile_data() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = (d >> 24) & 1, int8 = (d >> 25) & 1;
  // Linux hands out the tiles' 8 KiB of register state only to a process that asks for it (ARCH_REQ_XCOMP_PERM,
  // XFEATURE_XTILEDATA); without it the first tile instruction faults.
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return tile && int8 && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq")

#include "transpose_avx512.h"

// Weight rows [n0, n0 + 32) as B tiles: packed[(step * 2 + half) * kTileBytes], row j of a tile holding inputs
// 4j..4j+3 of the step for each of its 16 weight rows; rows past n and inputs past k are zeros.
void pack_weight_block(const int8_t* w, int64_t n, int64_t k, int64_t n0, int64_t steps, int8_t* packed) {
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t k0 = s * kStep;
    const __mmask64 inputs = k - k0 >= kStep ? ~__mmask64{0} : (__mmask64{1} << (k - k0)) - 1;
    for (int64_t half = 0; half < 2; ++half) {
      __m512 r[16];  // 16 weight rows' 16 groups of 4 inputs, moved as 32-bit lanes
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t row = n0 + half * 16 + i;
        const __m512i bytes = row < n ? _mm512_maskz_loadu_epi8(inputs, w + row * k + k0) : _mm512_setzero_si512();
        r[i] = _mm512_castsi512_ps(bytes);
      }
      transpose_16x16(r);
      int8_t* tile = packed + (s * 2 + half) * kTileBytes;
      for (int64_t j = 0; j < 16; ++j) _mm512_storeu_ps(tile + j * 64, r[j]);
    }
  }
}

// One 16 x 16 tile of sums into y's rows [m0, m0 + rows) and columns [n0, n0 + cols), scaled as int8_channel_gemm
// scales torch's sums: float(sum) * (row scale * weight scale), then + bias. The rounding intrinsics keep the
// compiler from fusing the two into one FMA, which would round once instead of twice.
void scale_tile(const int32_t* sums, const Int8GemmArgs& a, int64_t m0, int64_t rows, int64_t n0, int64_t cols) {
  const __mmask16 mask = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
  const __m512 w_scale = _mm512_maskz_loadu_ps(mask, a.w_scale + n0);
  const __m512 bias = a.bias != nullptr ? _mm512_maskz_loadu_ps(mask, a.bias + n0) : _mm512_setzero_ps();
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t i = 0; i < rows; ++i) {
    const __m512 scale = _mm512_mul_round_ps(_mm512_set1_ps(a.row_scale[m0 + i]), w_scale, kRound);
    __m512 v = _mm512_mul_round_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(sums + i * 16)), scale, kRound);
    if (a.bias != nullptr) v = _mm512_add_round_ps(v, bias, kRound);
    _mm512_mask_storeu_ps(a.y + (m0 + i) * a.n + n0, mask, v);
  }
}

// The 2 x 2 tiles of activation rows [m0, m0 + 32) (read from `x`, rows a.ldq apart) and the packed weight block at
// n0, over `steps` input steps, scaled into y.
void block_product(const Int8GemmArgs& a, const int8_t* x, int64_t m0, int64_t n0, const int8_t* packed,
                   int64_t steps, int32_t* sums) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < steps; ++s) {
    // The packed weights two steps ahead (the next block's at the end) into L1: the tile loads wait on L2 otherwise.
    const char* ahead = reinterpret_cast<const char*>(packed + (s + 2) * 2 * kTileBytes);
    for (int64_t line = 0; line < 2 * kTileBytes; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    _tile_loadd(4, x + s * kStep, a.ldq);
    _tile_loadd(5, x + 16 * a.ldq + s * kStep, a.ldq);
    _tile_loadd(6, packed + (s * 2) * kTileBytes, 64);
    _tile_loadd(7, packed + (s * 2 + 1) * kTileBytes, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  _tile_stored(0, sums, 64);
  _tile_stored(1, sums + 256, 64);
  _tile_stored(2, sums + 512, 64);
  _tile_stored(3, sums + 768, 64);
  const int64_t rows = std::min<int64_t>(kBlock, a.m - m0), cols = std::min<int64_t>(kBlock, a.n - n0);
  for (int64_t i = 0; i < 2; ++i)
    for (int64_t j = 0; j < 2; ++j)
      if (rows > i * 16 && cols > j * 16)
        scale_tile(sums + (i * 2 + j) * 256, a, m0 + i * 16, std::min<int64_t>(16, rows - i * 16), n0 + j * 16,
                   std::min<int64_t>(16, cols - j * 16));
}

void load_tile_config() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
}

void gemm_amx(const Int8GemmArgs& a) {
  const int64_t steps = (a.k + kStep - 1) / kStep, block_bytes = steps * 2 * kTileBytes;
  const int64_t blocks = (a.n + kBlock - 1) / kBlock, m_blocks = (a.m + kBlock - 1) / kBlock;
  const int64_t slab_blocks = std::max<int64_t>(1, kSlabBytes / block_bytes);
  std::vector<int8_t> packed(std::min(blocks, slab_blocks) * block_bytes);
  for (int64_t b0 = 0; b0 < blocks; b0 += slab_blocks) {
    const int64_t slab = std::min(blocks - b0, slab_blocks);
    at::parallel_for(0, slab, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        pack_weight_block(a.w, a.n, a.k, (b0 + b) * kBlock, steps, packed.data() + b * block_bytes);
    });
    // Tasks run activation block by activation block, each over the slab's weight blocks: a task's activation
    // rows stay in L1 while the packed weights stream past them from L2.
    at::parallel_for(0, m_blocks * slab, slab, [&](int64_t begin, int64_t end) {
      load_tile_config();
      alignas(64) int32_t sums[4 * 256];
      std::vector<int8_t> tail;  // the last rows, zero-padded to a whole block
      for (int64_t t = begin; t < end; ++t) {
        const int64_t m0 = t / slab * kBlock, b = t % slab;
        const int8_t* x = a.q + m0 * a.ldq;
        if (m0 + kBlock > a.m) {
          if (tail.empty()) {
            tail.assign(kBlock * a.ldq, 0);
            std::memcpy(tail.data(), x, (a.m - m0) * a.ldq);
          }
          x = tail.data();
        }
        block_product(a, x, m0, (b0 + b) * kBlock, packed.data() + b * block_bytes, steps, sums);
      }
      _tile_release();
    });
  }
}

#pragma GCC pop_options

}  // namespace

bool amx_int8_ready() {
  static const bool ready = request_tile_data();
  return ready;
}

void int8_channel_gemm_amx(const Int8GemmArgs& args) {
  if (args.m > 0 && args.n > 0) gemm_amx(args);
}

}  // namespace glmserve
