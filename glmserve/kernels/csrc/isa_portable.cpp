// The portable path: plain C++ for CPUs without AVX2 (and the reference point for the vector paths' tests).
#include <cstdint>

#include "gemm.h"

namespace glmserve {
namespace portable {

#include "weights.h"

struct V {
  using F = float;
  static constexpr int kWidth = 1, kTileRows = 4, kTileCols = 4;
  static constexpr bool kNonTemporalStreams = false;
  static F zero() { return 0.f; }
  static F load(const float* p) { return *p; }
  static F set1(float v) { return v; }
  static F mul(F a, F b) { return a * b; }
  static F fma(F a, F b, F c) { return a * b + c; }
  static float reduce(F a) { return a; }
  static void reduce4(const F* a, float* out) {
    for (int r = 0; r < 4; ++r) out[r] = a[r];
  }
  template <int T>
  static F load_w(const uint8_t* row, int64_t k) { return WeightFormat<T>::at(row, k); }
};

#include "gemm_impl.h"

}  // namespace portable

IsaKernels portable_kernels() { return portable::kernel_table(); }

}  // namespace glmserve
