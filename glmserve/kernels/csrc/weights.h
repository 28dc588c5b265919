// One weight's value from its stored form, in plain C++: the portable path's loads, and every path's tails.
// Included inside each ISA's namespace, so each translation unit keeps its own copy (no shared inline symbols
// compiled for different targets).
#pragma once

template <int T>
struct WeightFormat;

template <>
struct WeightFormat<kF32> {
  static constexpr bool kScaled = false;
  static constexpr int64_t row_bytes(int64_t k) { return 4 * k; }
  static float at(const uint8_t* row, int64_t k) {
    float v;
    __builtin_memcpy(&v, row + 4 * k, 4);
    return v;
  }
};

inline float float_from_bits(uint32_t bits) {
  float v;
  __builtin_memcpy(&v, &bits, 4);
  return v;
}

template <>
struct WeightFormat<kF16> {
  static constexpr bool kScaled = false;
  static constexpr int64_t row_bytes(int64_t k) { return 2 * k; }
  static float at(const uint8_t* row, int64_t k) {
    uint16_t h;
    __builtin_memcpy(&h, row + 2 * k, 2);
    const uint32_t sign = uint32_t(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    if (exponent == 0x1F) return float_from_bits(sign | 0x7F800000u | (mantissa << 13));  // inf / nan
    if (exponent != 0) return float_from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
    const float subnormal = float(mantissa) * 5.9604644775390625e-8f;  // 2^-24
    return sign ? -subnormal : subnormal;
  }
};

template <>
struct WeightFormat<kBF16> {
  static constexpr bool kScaled = false;
  static constexpr int64_t row_bytes(int64_t k) { return 2 * k; }
  static float at(const uint8_t* row, int64_t k) {
    uint16_t h;
    __builtin_memcpy(&h, row + 2 * k, 2);
    return float_from_bits(uint32_t(h) << 16);
  }
};

// e4m3fn's exponent and mantissa placed in an fp32's, times 2^120 to move the bias from 127 to 7; e4m3fn's
// subnormals land on fp32 subnormals, which the same product makes exact. Its one NaN (0x7F) reads as 480.
constexpr float kFp8Rebias = 1.329227995784916e36f;  // 2^120

template <>
struct WeightFormat<kF8E4M3> {
  static constexpr bool kScaled = true;
  static constexpr int64_t row_bytes(int64_t k) { return k; }
  static float at(const uint8_t* row, int64_t k) {
    const uint32_t b = row[k];
    return float_from_bits(((b & 0x80) << 24) | ((b & 0x7F) << 20)) * kFp8Rebias;
  }
};

template <>
struct WeightFormat<kI8> {
  static constexpr bool kScaled = true;
  static constexpr int64_t row_bytes(int64_t k) { return k; }
  static float at(const uint8_t* row, int64_t k) { return float(int8_t(row[k])); }
};

// Two inputs a byte: input 2j in the low nibble, 2j + 1 in the high one, each stored as q + 8.
template <>
struct WeightFormat<kI4> {
  static constexpr bool kScaled = true;
  static constexpr int64_t row_bytes(int64_t k) { return k / 2; }
  static float at(const uint8_t* row, int64_t k) {
    const int nibble = (k & 1) ? row[k >> 1] >> 4 : row[k >> 1] & 0x0F;
    return float(nibble - 8);
  }
};
