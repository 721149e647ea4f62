// fastllm::DType, the element type every kernel family's params carry, shared by the CPU
// kernels, the CUDA kernels, the torch glue and the C++ tests. Torch-free and CUDA-free.
//
//   DType            the four storage dtypes: float32, bfloat16, float16, float64
//   dtype_name(d)    "float32", "bfloat16", "float16", "float64" (torch's names without
//                    the "torch." prefix), for messages
//   AccOf<T>         the accumulation type of storage type T: double for double, float
//                    otherwise (16-bit types are storage-only)
//   kDTypeOf<T>      the DType whose storage type is T. float and double are declared here;
//                    each device declares its 16-bit storage types where it defines them
//                    (common/cpu_dtypes.h: cpu::BFloat16 / cpu::Half; common/cuda_utils.cuh:
//                    __nv_bfloat16 / __half)
//   TypeTag<T>       an empty value that carries a type into a generic lambda (dispatch)
#pragma once

#include <cstdint>
#include <type_traits>

namespace fastllm {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

constexpr const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
    case DType::kFloat64: return "float64";
  }
  return "unknown dtype";
}

template <class T>
using AccOf = std::conditional_t<std::is_same_v<T, double>, double, float>;

// DTypeOf<T>::value: the DType stored as T (specialised per storage type).
template <class T>
struct DTypeOf;
template <>
struct DTypeOf<float> : std::integral_constant<DType, DType::kFloat32> {};
template <>
struct DTypeOf<double> : std::integral_constant<DType, DType::kFloat64> {};
template <class T>
inline constexpr DType kDTypeOf = DTypeOf<T>::value;

template <class T>
struct TypeTag {
  using type = T;
};

}  // namespace fastllm
