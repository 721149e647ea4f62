// Entry point of fastllm_emu_ext, the test-only host build of fastllm's CUDA kernels
// (SIMT emulation; built and loaded by fastllm/_emu.py):
//   - TORCH_LIBRARY(fastllm_emu): every fastllm schema (csrc/schemas.h), as
//     csrc/registration.cpp defines them in `fastllm`, so the emulated CUDA implementations
//     (registered for CPU tensors by each family's glue under FASTLLM_SIMT_EMU) are called
//     exactly like torch.ops.fastllm.*;
//   - the Python module: the emulation's controls (schedule seed, threads, grid cap).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "common/simt_emu.h"
#include "common/torch_glue.h"
#include "schemas.h"

#define FASTLLM_EMU_DEF(schema) m.def(schema);

TORCH_LIBRARY(fastllm_emu, m) {
  FASTLLM_ALL_SCHEMAS(FASTLLM_EMU_DEF)
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "fastllm's CUDA kernels compiled for the CPU against the SIMT emulation "
      "(csrc/common/simt_emu.h); ops in torch.ops.fastllm_emu and torch.ops.fastllm_emu_test.";
  m.def("set_schedule_seed", &fastllm::simt::set_schedule_seed, pybind11::arg("seed"),
        "None: threads run in order between scheduling points (default). An int: a random "
        "schedule (random thread priorities, re-drawn at random scheduling points; blocks in "
        "a random order), reproducible: the draws restart from the seed.");
  m.def("schedule_seed", &fastllm::simt::schedule_seed, "The current seed, or None.");
  m.def("set_num_threads", &fastllm::simt::set_num_threads, pybind11::arg("num_threads"),
        "OS threads that run blocks in parallel (default 1: one after another on the "
        "calling thread; 0: OpenMP's default).");
  m.def("num_threads", &fastllm::simt::num_threads);
  m.def(
      "set_grid_cap",
      [](std::optional<int64_t> blocks) {
        if (blocks && *blocks < 1) {
          throw pybind11::value_error("grid cap must be None or >= 1, got " +
                                      std::to_string(*blocks));
        }
        fastllm::emulated_grid_cap.store(blocks.value_or(0));
      },
      pybind11::arg("blocks"),
      "None: launchers size their grids as on a GPU (default). An int: the most blocks a "
      "launcher may give a grid whose blocks loop over rows (CudaLaunch::max_blocks in "
      "csrc/common/torch_glue.h), so that every such block loops on small inputs.");
  m.def(
      "grid_cap",
      []() -> std::optional<int64_t> {
        const int64_t cap = fastllm::emulated_grid_cap.load();
        return cap > 0 ? std::optional<int64_t>(cap) : std::nullopt;
      },
      "The current grid cap, or None.");
}
