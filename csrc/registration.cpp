// The one TORCH_LIBRARY(fastllm, m): every op's schema. Implementations are registered
// per device next to each family's glue (csrc/<family>/<family>_ops.cpp); autograd and
// fake (meta) implementations are registered in Python (fastllm/ops/).
#include <Python.h>
#include <torch/library.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "common/cpu_kernel_paths.h"
#include "common/cpu_memory.h"
#include "common/cpu_output_cache.h"
#include "common/torch_glue.h"
#include "schemas.h"

#define FASTLLM_DEF(schema) m.def(schema);

namespace {

// f(), with the std::invalid_argument it throws (a bad argument or environment value) raised
// as torch's ValueError (TORCH_CHECK_VALUE).
template <class F>
auto value_error_on_invalid(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

// The path `family`'s CPU kernels run for `dtype` in this process (common/cpu_kernel_paths.h).
std::string cpu_kernel_path_op(c10::string_view family, c10::ScalarType dtype) {
  const fastllm::DType d = fastllm::to_fastllm_dtype(dtype, "cpu_kernel_path", "dtype");
  return value_error_on_invalid([&] {
    return fastllm::cpu::cpu_kernel_path(std::string_view(family.data(), family.size()), d);
  });
}

// How the CPU kernels treat the pages of their large fresh outputs in this process
// (common/cpu_memory.h).
std::string cpu_fresh_pages_op() {
  return value_error_on_invalid(
      [] { return std::string(fastllm::cpu::huge_pages_description(fastllm::cpu::huge_pages())); });
}

// How the CPU kernels store their large outputs in this process (common/cpu_memory.h).
std::string cpu_output_stores_op() {
  return value_error_on_invalid(
      [] { return fastllm::cpu::stream_stores_description(fastllm::cpu::stream_stores()); });
}

// The CPU output cache's counters (common/cpu_output_cache.h): limit, free and live bytes and
// blocks, hits, misses.
std::vector<int64_t> cpu_output_cache_op() {
  const auto s =
      value_error_on_invalid([] { return fastllm::cpu::OutputCache::instance().stats(); });
  return {s.limit_bytes, s.free_bytes, s.free_blocks, s.live_bytes, s.live_blocks, s.hits,
          s.misses};
}

// Unmaps the CPU output cache's free blocks; the bytes given back to the system.
int64_t empty_cpu_output_cache_op() {
  return value_error_on_invalid([] { return fastllm::cpu::OutputCache::instance().release(); });
}

}  // namespace

TORCH_LIBRARY(fastllm, m) {
  FASTLLM_ALL_SCHEMAS(FASTLLM_DEF)
  // Not a kernel (no tensors, no fake or autograd rule): which CPU path each family takes.
  m.def("cpu_kernel_path(str family, ScalarType dtype) -> str", &cpu_kernel_path_op);
  m.def("cpu_fresh_pages() -> str", &cpu_fresh_pages_op);
  m.def("cpu_output_stores() -> str", &cpu_output_stores_op);
  m.def("cpu_output_cache() -> int[]", &cpu_output_cache_op);
  m.def("empty_cpu_output_cache() -> int", &empty_cpu_output_cache_op);
}

// `import fastllm._C` loads the library (running the registrations above); the module
// itself is empty — every op is reached through torch.ops.fastllm.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
