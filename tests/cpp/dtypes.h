// The storage dtypes of the C++ kernel tests and one table of what a test needs to know
// about each: its fastllm::DType and name, and how much one rounding to it may move a
// value. Each family's test states its own tolerances per dtype with per_dtype().
#pragma once

#include <type_traits>

#include "check.h"
#include "common/cpu_dtypes.h"
#include "common/dtype.h"

namespace fastllm_test {

using fastllm::AccOf;
using fastllm::DType;
using fastllm::cpu::BFloat16;
using fastllm::cpu::from_acc;
using fastllm::cpu::Half;
using fastllm::cpu::to_acc;

// A value per storage type T, listed in the order float32, bfloat16, float16, float64.
template <class T>
constexpr double per_dtype(double f32, double bf16, double f16, double f64) {
  if constexpr (std::is_same_v<T, float>) {
    return f32;
  } else if constexpr (std::is_same_v<T, BFloat16>) {
    return bf16;
  } else if constexpr (std::is_same_v<T, Half>) {
    return f16;
  } else {
    static_assert(std::is_same_v<T, double>, "T must be a storage type of common/cpu_dtypes.h");
    return f64;
  }
}

template <class T>
struct DTypeInfo {
  static constexpr DType kDType = fastllm::kDTypeOf<T>;
  static constexpr const char* kName = fastllm::dtype_name(kDType);
  // Rounding a value to T moves it by at most one unit in the last place of T relative to
  // the value (kRoundRtol) plus, for float16, its subnormal spacing (kRoundAtol).
  static constexpr double kRoundRtol = per_dtype<T>(0x1p-23, 0x1p-8, 0x1p-10, 0x1p-52);
  static constexpr double kRoundAtol = per_dtype<T>(0, 0, 0x1p-24, 0);
};

}  // namespace fastllm_test

// Four test cases, name_float32 ... name_float64, each running fn<T>() for its storage type.
#define TEST_CASE_PER_DTYPE(name, fn)                                      \
  TEST_CASE(name##_float32) { fn<float>(); }                               \
  TEST_CASE(name##_bfloat16) { fn<::fastllm_test::BFloat16>(); }           \
  TEST_CASE(name##_float16) { fn<::fastllm_test::Half>(); }                \
  TEST_CASE(name##_float64) { fn<double>(); }
