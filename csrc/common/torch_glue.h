// The torch glue every kernel family shares: argument checks, the per-device launch
// plumbing, and the pattern that registers a family's implementations. Torch on one side,
// the torch-free kernel params (csrc/<family>/<family>.h) on the other.
//
// A family's glue has the same three parts in every family (norm, cross_entropy, attention;
// a new family copies one):
//   - <family>_glue.h: checks the arguments, allocates the outputs, fills the kernel params
//     and holds the schema-shaped entry points (csrc/schemas.h), each a template over a
//     device's `Kernels`, plus register_<family>_ops<Kernels>(m), which m.impl()s them all;
//   - <family>_ops.cpp: FASTLLM_CPU_LIBRARY_IMPL(m) (the CPU dispatch key of `fastllm`)
//     registering the entry points with CpuKernels<the family's CPU forward, backward>;
//   - <family>_cuda_ops.cpp: FASTLLM_CUDA_LIBRARY_IMPL(m) registering them with
//     CudaKernels<the family's CUDA launchers> (or a struct derived from it where a launch
//     needs more, e.g. a workspace): the CUDA dispatch key of `fastllm` on a GPU build, and,
//     in the SIMT emulation build (FASTLLM_SIMT_EMU, tests only), the CPU dispatch key of
//     `fastllm_emu`, so that the very same implementation runs the CUDA kernels on CPU
//     tensors. Without CUDA and outside the emulation the file compiles to nothing.
// A `Kernels` struct holds static functions only: what the family's entry points need from a
// device, at least
//   static void check_dtype(const char* op, const char* arg, DType dtype);  // refuse a dtype
//   static void fwd(const char* op, FwdParams& p, const at::Tensor& like);  // run forward
//   static void bwd(const char* op, BwdParams& p, const at::Tensor& like);  // run backward
// (`like`: a tensor on the device the kernel runs on). CpuKernels and CudaKernels below are
// the common ones.
//
// Messages name the op, the argument, and the expected and actual value
// ("layer_norm: weight must have shape [1000] (normalized_shape), got [999]"); the CUDA
// ones add " (emulated CUDA)" after the op name in the emulation build.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "common/cpu_output_cache.h"
#include "common/dtype.h"

#if defined(FASTLLM_WITH_CUDA) || defined(FASTLLM_SIMT_EMU)
#define FASTLLM_GLUE_HAS_CUDA 1
#include "common/cuda_compat.h"
#if !defined(FASTLLM_SIMT_EMU)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif
#endif

namespace fastllm {

// ---- argument checks ------------------------------------------------------------------

inline std::string shape_str(at::IntArrayRef shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

inline DType to_fastllm_dtype(at::ScalarType t, const char* op, const char* arg) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    case at::kDouble: return DType::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", arg,
                       " must be float32, bfloat16, float16 or float64, got ", t);
  }
  return DType::kFloat32;
}

// The accumulation dtype of an input dtype: double for float64, float otherwise.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_same_device(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                              const char* name, const char* op) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref_name,
              "'s device ", ref.device(), ", got ", t.device());
}

// `t` must have `ref`'s shape, dtype and device.
inline void check_like(const char* op, const at::Tensor& ref, const char* ref_name,
                       const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.sizes().equals(ref.sizes()), op, ": ", name, " must have the shape of ", ref_name,
              " ", shape_str(ref.sizes()), ", got ", shape_str(t.sizes()));
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ",
                   ref_name, " ", ref.scalar_type(), ", got ", t.scalar_type());
  check_same_device(ref, ref_name, t, name, op);
}

// ---- layouts --------------------------------------------------------------------------

// View `t` as (rows, cols) with unit column stride, copying only when no such view exists.
inline at::Tensor as_rows(const at::Tensor& t, int64_t cols) {
  if (t.dim() == 2 && t.size(1) == cols && (cols == 1 || t.stride(1) == 1)) return t;
  at::Tensor r = t.reshape({-1, cols});
  if (cols > 1 && r.stride(1) != 1) r = r.contiguous();
  return r;
}

inline int64_t row_stride(const at::Tensor& r) { return r.size(0) > 1 ? r.stride(0) : r.size(1); }

// ---- outputs ---------------------------------------------------------------------------

// torch's view of cpu::OutputCache (common/cpu_output_cache.h): a storage allocated here
// holds a cached block when it is large enough and the cache is on, else torch's own CPU
// memory; freeing the storage gives the block back. A storage resized later allocates here
// again, so it may move between the two.
class CpuOutputAllocator final : public c10::Allocator {
 public:
  static CpuOutputAllocator* get() {
    static CpuOutputAllocator allocator;
    return &allocator;
  }

  c10::DataPtr allocate(size_t n) override {
    if (static_cast<int64_t>(n) >= cpu::kOutputCacheMinBytes) {
      if (void* p = cpu::OutputCache::instance().take(static_cast<int64_t>(n))) {
        return {p, p, &give_back, c10::Device(c10::DeviceType::CPU)};
      }
    }
    return c10::GetCPUAllocator()->allocate(n);
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static void give_back(void* p) { cpu::OutputCache::instance().give_back(p); }
};

// An output of `shape` and `options`' dtype and device, contiguous: on the CPU, outputs of
// cpu::kOutputCacheMinBytes and more come from the output cache. `op` names the op in the
// error for a bad FASTLLM_CPU_OUTPUT_CACHE_MB.
inline at::Tensor empty_output(const char* op, at::IntArrayRef shape,
                               const at::TensorOptions& options) {
  const int64_t numel = c10::multiply_integers(shape);
  if (options.device().is_cpu() &&
      numel * static_cast<int64_t>(c10::elementSize(options.dtype().toScalarType())) >=
          cpu::kOutputCacheMinBytes) {
    int64_t limit = 0;
    try {
      limit = cpu::output_cache_limit();
    } catch (const std::invalid_argument& e) {
      TORCH_CHECK_VALUE(false, op, ": ", e.what());
    }
    if (limit > 0) {
      return at::detail::empty_generic(shape, CpuOutputAllocator::get(),
                                       c10::DispatchKeySet(c10::DispatchKey::CPU),
                                       options.dtype().toScalarType(),
                                       at::MemoryFormat::Contiguous);
    }
  }
  return at::empty(shape, options.memory_format(at::MemoryFormat::Contiguous));
}

// An output with `like`'s shape and options, contiguous (empty_output).
inline at::Tensor empty_contiguous_like(const char* op, const at::Tensor& like) {
  return empty_output(op, like.sizes(), like.options());
}

// ---- CPU kernels ----------------------------------------------------------------------

// Runs a CPU kernel entry point; the std::invalid_argument it throws for a problem it
// cannot run becomes a torch error naming the op.
template <class Kernel>
void call_cpu_kernel(const char* op, Kernel&& kernel) {
  try {
    kernel();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, op, ": ", e.what());
  }
}

// The CPU `Kernels` of a family whose torch-free CPU entry points are kFwd(params) and
// kBwd(params) (e.g. norm_fwd_cpu / norm_bwd_cpu): the CPU needs no stream, guard or
// workspace, so running a kernel is calling it.
template <auto kFwd, auto kBwd>
struct CpuKernels {
  // The CPU kernels take every dtype of DType.
  static void check_dtype(const char* /*op*/, const char* /*arg*/, DType /*dtype*/) {}
  template <class Params>
  static void fwd(const char* op, Params& p, const at::Tensor& /*like*/) {
    call_cpu_kernel(op, [&] { kFwd(p); });
  }
  template <class Params>
  static void bwd(const char* op, Params& p, const at::Tensor& /*like*/) {
    call_cpu_kernel(op, [&] { kBwd(p); });
  }
};

// ---- registration ---------------------------------------------------------------------

// FASTLLM_CPU_LIBRARY_IMPL(m) { ... }: TORCH_LIBRARY_IMPL(fastllm, CPU, m), except in the
// SIMT emulation build, where the CPU dispatch key belongs to the emulated CUDA
// implementations (FASTLLM_CUDA_LIBRARY_IMPL): there the block is compiled but registers
// nothing.
#if defined(FASTLLM_SIMT_EMU)
#define FASTLLM_CPU_LIBRARY_IMPL(m)                                                   \
  [[maybe_unused]] static void C10_CONCATENATE(fastllm_cpu_impls_not_registered_, \
                                               C10_UID)(torch::Library & m)
#else
#define FASTLLM_CPU_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(fastllm, CPU, m)
#endif

// ---- CUDA kernels (a GPU build, or its SIMT emulation) --------------------------------

#if defined(FASTLLM_GLUE_HAS_CUDA)

#if defined(FASTLLM_SIMT_EMU)
inline constexpr const char* kCudaBackend = " (emulated CUDA)";
// The emulated CUDA implementations are registered for CPU tensors in `fastllm_emu`.
#define FASTLLM_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(fastllm_emu, CPU, m)
#else
inline constexpr const char* kCudaBackend = "";
#define FASTLLM_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(fastllm, CUDA, m)
#endif

#if defined(FASTLLM_SIMT_EMU)
// Test-only control of the emulated GPU (fastllm_emu_ext.set_grid_cap, fastllm._emu.grid_cap):
// the most blocks a launcher may give a grid whose blocks loop over their share of the rows
// (grid-stride or chunked); 0: no cap but CUDA's. With a small cap every such block loops
// more than once on test-sized inputs, which a GPU does only when rows outnumber blocks, so
// the barriers that guard shared memory from one iteration to the next are exercised.
inline std::atomic<int64_t> emulated_grid_cap{0};
#endif

// Where a launch on `like`'s device runs: the device guard, its current stream, its SM
// count and the most blocks a row-looping grid may have. The emulation has one stream
// (nullptr) and a small, fixed "GPU" of 4 SMs, so that launchers that size their grid by the
// SM count take their multi-block paths on small inputs too.
class CudaLaunch {
 public:
  explicit CudaLaunch(const at::Tensor& like)
#if !defined(FASTLLM_SIMT_EMU)
      : guard_(like.device())
#endif
  {
    (void)like;
  }

  cudaStream_t stream() const {
#if defined(FASTLLM_SIMT_EMU)
    return nullptr;
#else
    return at::cuda::getCurrentCUDAStream();  // of the guarded device
#endif
  }

  int num_sms() const {
#if defined(FASTLLM_SIMT_EMU)
    return 4;
#else
    return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
#endif
  }

  // CUDA's grid.x limit; in the emulation, emulated_grid_cap when a test sets one.
  int64_t max_blocks() const {
#if defined(FASTLLM_SIMT_EMU)
    const int64_t cap = emulated_grid_cap.load();
    if (cap > 0) return cap;
#endif
    return 2147483647;
  }

 private:
#if !defined(FASTLLM_SIMT_EMU)
  c10::cuda::CUDAGuard guard_;
#endif
};

// float64 has no CUDA kernels: `arg` (the input that sets the dtype) is refused by name.
inline void check_cuda_dtype(const char* op, const char* arg, DType dtype) {
  TORCH_CHECK_TYPE(dtype != DType::kFloat64, op, kCudaBackend, ": ", arg,
                   " must be float32, bfloat16 or float16 on CUDA, got float64");
}

// A launcher's result: cudaSuccess, or an error naming the op.
inline void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, kCudaBackend, ": kernel launch failed: ",
              cudaGetErrorString(err));
}

// Scratch memory of a launch on `like`'s device.
inline at::Tensor cuda_workspace(const at::Tensor& like, int64_t numel, at::ScalarType dtype) {
  return at::empty({numel}, like.options().dtype(dtype));
}

// The CUDA `Kernels` of a family whose torch-free launchers are kLaunchFwd(params, stream)
// and kLaunchBwd(params, stream) (e.g. launch_cross_entropy_fwd_cuda): float64 refused,
// `like`'s device and stream, the launch checked. A family whose backward needs more (a
// workspace) derives from it and defines its own bwd (kLaunchBwd = nullptr).
template <auto kLaunchFwd, auto kLaunchBwd>
struct CudaKernels {
  static void check_dtype(const char* op, const char* arg, DType dtype) {
    check_cuda_dtype(op, arg, dtype);
  }
  template <class Params>
  static void fwd(const char* op, Params& p, const at::Tensor& like) {
    const CudaLaunch launch(like);
    check_launch(op, kLaunchFwd(p, launch.stream()));
  }
  template <class Params>
  static void bwd(const char* op, Params& p, const at::Tensor& like) {
    const CudaLaunch launch(like);
    check_launch(op, kLaunchBwd(p, launch.stream()));
  }
};

#endif  // FASTLLM_GLUE_HAS_CUDA

}  // namespace fastllm
