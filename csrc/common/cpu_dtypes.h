// Storage dtypes of the CPU kernels and their conversions to and from the accumulation
// type. Portable C++ (no intrinsics): the scalar kernels use these directly, and the AVX2
// helpers (cpu_avx2.h) are tested bit for bit against them.
//
// BFloat16 and Half are storage-only: a kernel widens them to float, computes in float and
// rounds once on store. Rounding is to nearest, ties to even, exactly as c10::BFloat16 and
// c10::Half round, so a CPU kernel's output equals torch's rounding of the same float value:
//   float -> bfloat16: keep the high 16 bits after adding 0x7FFF + (lowest kept bit);
//                      NaN becomes the quiet NaN 0x7FC0 (c10's choice);
//   float -> float16:  IEEE binary16 round-to-nearest-even with overflow to inf and
//                      subnormals (the FP16 library's branch-free algorithm that c10 uses).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/dtype.h"

namespace fastllm {
namespace cpu {

struct BFloat16 {
  uint16_t bits;
};
struct Half {
  uint16_t bits;
};

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float to_float(BFloat16 h) { return float_of(uint32_t{h.bits} << 16); }

inline BFloat16 to_bfloat16(float f) {
  if (f != f) return BFloat16{0x7FC0};
  const uint32_t u = bits_of(f);
  return BFloat16{static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}

inline float to_float(Half h) {
  // Shift the half into the top of a float, rebias the exponent by a multiply (which
  // also turns half inf/NaN into float inf/NaN), and build subnormals with a magic add.
  const uint32_t w = uint32_t{h.bits} << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = two_w < (1u << 27) ? bits_of(denormalized) : bits_of(normalized);
  return float_of(sign | magnitude);
}

inline Half to_half(float f) {
  // Scale so that the float adder performs the round-to-nearest-even at half precision
  // (and overflow to inf), then read the half's exponent and mantissa off the sum.
  float base = std::fabs(f) * 0x1.0p+112f * 0x1.0p-110f;
  const uint32_t w = bits_of(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = float_of((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = bits_of(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return Half{static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

using fastllm::AccOf;  // double for double, float otherwise (common/dtype.h)

// Widen a stored value to its accumulation type / round an accumulated value to storage.
inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(BFloat16 v) { return to_float(v); }
inline float to_acc(Half v) { return to_float(v); }

template <class T>
T from_acc(AccOf<T> v);
template <>
inline float from_acc<float>(float v) { return v; }
template <>
inline double from_acc<double>(double v) { return v; }
template <>
inline BFloat16 from_acc<BFloat16>(float v) { return to_bfloat16(v); }
template <>
inline Half from_acc<Half>(float v) { return to_half(v); }

}  // namespace cpu

template <>
struct DTypeOf<cpu::BFloat16> : std::integral_constant<DType, DType::kBFloat16> {};
template <>
struct DTypeOf<cpu::Half> : std::integral_constant<DType, DType::kFloat16> {};

}  // namespace fastllm
