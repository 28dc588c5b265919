// The portable paged-attention path: plain C++ (and the reference point for the vector paths' tests).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "gemm.h"
#include "paged_attention.h"

namespace glmserve {
namespace portable_attention {

#include "weights.h"

struct V {
  using F = float;
  static constexpr int kWidth = 1, kScoreRows = 2;  // query rows scored together
  static F zero() { return 0.f; }
  static F load(const float* p) { return *p; }
  static void store(float* p, F v) { *p = v; }
  static F set1(float v) { return v; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F max(F a, F b) { return a > b ? a : b; }
  static F mul(F a, F b) { return a * b; }
  static F fma(F a, F b, F c) { return a * b + c; }
  static float reduce(F a) { return a; }
  static void transpose(F*) {}  // one lane: a 1 x 1 block is its own transpose
  static float reduce_max(F a) { return a; }
  static F exp(F a) { return std::exp(a); }
  template <int T>
  static F load_kv(const uint8_t* row, int64_t d);
};

#include "paged_attention_impl.h"

template <int T>
float V::load_kv(const uint8_t* row, int64_t d) { return KvFormat<T>::at(row, d); }

}  // namespace portable_attention

AttentionKernels portable_attention_kernels() { return portable_attention::attention_kernel_table(); }

}  // namespace glmserve
