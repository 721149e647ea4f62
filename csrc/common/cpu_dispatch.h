// The dtype switch of every CPU kernel entry point: maps a fastllm::DType to its storage
// type (float, BFloat16, Half, double) and calls the typed kernel, so each family states
// only what it does per type.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cpu_dtypes.h"
#include "common/dtype.h"

namespace fastllm {
namespace cpu {

// Calls fn(TypeTag<T>{}) with T the storage type of `dtype`; an unknown dtype throws
// std::invalid_argument naming the entry point `fn_name`.
template <class Fn>
void dispatch_dtype(DType dtype, const char* fn_name, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(TypeTag<float>{});
    case DType::kBFloat16: return fn(TypeTag<BFloat16>{});
    case DType::kFloat16: return fn(TypeTag<Half>{});
    case DType::kFloat64: return fn(TypeTag<double>{});
  }
  throw std::invalid_argument(std::string(fn_name) +
                              ": dtype must be one of kFloat32, kBFloat16, kFloat16, kFloat64, "
                              "got " + std::to_string(static_cast<int32_t>(dtype)));
}

}  // namespace cpu
}  // namespace fastllm
