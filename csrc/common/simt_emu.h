// SIMT emulation: the host build of fastllm's CUDA kernels. Included (through
// common/cuda_compat.h) only when FASTLLM_SIMT_EMU is defined, i.e. when a .cu file is
// compiled by the host C++ compiler for the tests. The kernels then execute on the CPU with
// CUDA's semantics, so indexing, barrier and warp-exchange bugs show up in CI without a GPU.
//
// Model (details in docs/simt_emulation.md):
//   - A launch runs the blocks of the grid one after another on the calling thread, or
//     spread over OpenMP threads (set_num_threads); a block stays on one OS thread.
//   - The threads of a block are fibers (ucontext) on that OS thread. A fiber runs until it
//     reaches a scheduling point: a barrier, a warp collective (shuffle, vote, __syncwarp,
//     mma, ldmatrix), an atomic, or its end. __syncthreads() waits for every thread of the
//     block; a warp collective waits for every lane named in its mask and then exchanges
//     the values of all lanes at once, as the hardware does.
//   - Schedule: in order (thread 0, 1, ...) by default; with a schedule seed
//     (set_schedule_seed or FASTLLM_SIMT_SEED) fibers get random priorities (re-drawn now
//     and then) and the highest ready one runs next, so a missing barrier or a wrong
//     shuffle partner changes the answer.
//   - Static __shared__ arrays are `static thread_local`: one instance per OS thread, hence
//     per running block; like on a GPU they start with what the previous block left (write
//     `alignas(16) __shared__ T x[N]`: g++ rejects `__shared__ alignas(16)`). Dynamic shared
//     memory (FASTLLM_EXTERN_SHARED) is a per-OS-thread
//     buffer, filled with 0xFF bytes (NaN for floating point) at the start of every block and
//     followed by a guard page: an access past its end is reported as an error.
//   - Errors in a kernel (deadlock: a barrier or warp collective that some thread can never
//     reach; an invalid memory access; a stack overflow; a device-side assert; a misaligned
//     async copy ...) throw fastllm::simt::KernelError from the launch, naming the kernel,
//     the block and the threads involved. Launch configuration errors are returned through
//     cudaGetLastError() as on a GPU.
//
// Not emulated: timing, TMA / cp.async.bulk, wgmma, thread-block clusters, inter-block
// waiting (blocks may run one after another), memory-model effects between two scheduling
// points (two plain accesses of one thread are never interleaved with another thread's).
#pragma once

#if !defined(FASTLLM_SIMT_EMU)
#error "common/simt_emu.h is the host (SIMT emulation) build only: include common/cuda_compat.h"
#endif

// CUDA's own half / bfloat16 headers are host-capable; they also bring dim3, uint3, the
// vector types (float4 ...), cudaError_t and cudaStream_t.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cassert>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- CUDA qualifiers -------------------------------------------------------------------
// __global__, __device__, __host__, __constant__ and __forceinline__ come from CUDA's
// crt/host_defines.h (empty or GCC attributes in a host compilation).
//
// All fibers of a block run on one OS thread and every OS thread runs one block at a time,
// so a thread_local static is exactly "one instance per block".
#undef __shared__
#define __shared__ static thread_local
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace fastllm {
namespace simt {

// A fault while a kernel executed (deadlock, invalid access, device assert ...).
class KernelError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// ---- controls (process-wide) -----------------------------------------------------------

// std::nullopt: threads run in order 0, 1, 2 ... between scheduling points (the default,
// overridden by the environment variable FASTLLM_SIMT_SEED). A seed: a random schedule
// (random thread priorities, re-drawn at random scheduling points; blocks in a random
// order); the draws restart from the seed when it is set, so a run is reproducible.
void set_schedule_seed(std::optional<uint64_t> seed);
std::optional<uint64_t> schedule_seed();
// OS threads that run blocks in parallel: 1 (the default; FASTLLM_SIMT_THREADS) runs them
// one after another on the launching thread, 0 means OpenMP's default. More threads rarely
// pay off: fibers switch cheaply, OpenMP workers that wait for work do not.
void set_num_threads(int num_threads);
int num_threads();

// The kernel-visible state of one emulated thread.
struct BuiltinVariables {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

// ---- building blocks for intrinsics (also used by common/mma.h) ----------------------

// All lanes of a warp collective, handed to its combine function once every lane named in
// the mask has arrived. in[l] / out[l] point into lane l's stack (valid for l in `lanes`).
struct WarpExchange {
  unsigned lanes;  // the mask, restricted to the lanes the block has
  const void* in[32];
  void* out[32];
};
using WarpExchangeFn = void (*)(const WarpExchange&);

namespace detail {

const BuiltinVariables& builtins();
unsigned lane_id();

// Blocks the calling lane until every lane in `mask` called warp_exchange with the same
// op and mask, then runs combine once for all of them. `op` names the intrinsic in errors.
void warp_exchange(const char* op, unsigned mask, const void* in, void* out,
                   WarpExchangeFn combine);
// __syncthreads and friends: waits for every thread of the block; returns the number of
// threads that passed a non-zero predicate.
int block_barrier(const char* op, int predicate);
// Lets other threads run (atomics, __nanosleep): races between atomics show.
void scheduling_point();
// Lanes of the caller's warp that exist in the block and have not exited.
unsigned active_lanes();
// Reports a kernel error from the calling thread; does not return.
[[noreturn]] void device_fault(const std::string& what);
[[noreturn]] void device_assert_fail(const char* expr, const char* file, int line);
unsigned char* dynamic_shared_memory();

// Asynchronous copies (cp.async): issued copies land in shared memory at the issuing
// thread's wait that covers their group (never, without one); until then the destination
// holds 0xFF bytes.
void async_copy(void* smem_dst, const void* gmem_src, int bytes, bool zero_fill);
void async_copy_commit();
void async_copy_wait(int max_pending_groups);  // < 0: wait for all, committed or not

enum class ShuffleMode : int { kIdx, kUp, kDown, kXor };
uint64_t shuffle(ShuffleMode mode, unsigned mask, uint64_t bits, int lane_arg, int width);
unsigned vote_ballot(const char* op, unsigned mask, int predicate);
// Lanes of the caller's warp that the block has (all 32 unless blockDim is not a multiple
// of 32 and this is the last warp).
unsigned existing_lanes();
enum class ReduceOp : int { kAdd, kMin, kMax, kAnd, kOr, kXor };
uint32_t reduce(ReduceOp op, bool is_signed, unsigned mask, uint32_t value);

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                "warp shuffles move values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <class T>
inline T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// ---- launch ----

struct LaunchConfig {
  const char* kernel_name;  // as written at the launch site
  const char* launch_site;  // the function that launched it
  const void* kernel;       // identity, for cudaFuncSetAttribute
  dim3 grid;
  dim3 block;
  size_t dynamic_smem_bytes;
};
using KernelBody = void (*)(const void* closure);
// Runs the grid. Returns a configuration error (also recorded for cudaGetLastError) or
// cudaSuccess; throws KernelError when the kernel faulted.
cudaError_t launch(const LaunchConfig& config, KernelBody body, const void* closure);

cudaError_t set_max_dynamic_shared_memory(const void* kernel, int bytes);

}  // namespace detail

// What FASTLLM_LAUNCH_KERNEL expands to. The arguments are converted to the kernel's
// parameter types once, at launch, like CUDA's <<<...>>> does; every thread gets a copy.
template <class... Params, class... Args>
void launch_kernel(const char* kernel_name, const char* launch_site, void (*kernel)(Params...),
                   dim3 grid, dim3 block, size_t dynamic_smem_bytes, cudaStream_t /*stream*/,
                   Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args),
                "FASTLLM_LAUNCH_KERNEL: the number of arguments must match the kernel's");
  using ParamTuple = std::tuple<std::decay_t<Params>...>;
  struct Closure {
    void (*kernel)(Params...);
    ParamTuple params;
  };
  const Closure closure{kernel, ParamTuple(std::forward<Args>(args)...)};
  const detail::LaunchConfig config{kernel_name, launch_site,
                                    reinterpret_cast<const void*>(kernel), grid, block,
                                    dynamic_smem_bytes};
  detail::launch(
      config,
      [](const void* c) {
        const Closure& cl = *static_cast<const Closure*>(c);
        std::apply(cl.kernel, cl.params);
      },
      &closure);
}

// ---- the few CUDA runtime calls launchers use (a fake sm_80 device with 4 SMs) ----------
namespace runtime {

cudaError_t get_last_error();
cudaError_t peek_at_last_error();
const char* get_error_string(cudaError_t error);
const char* get_error_name(cudaError_t error);
cudaError_t memset_async(void* ptr, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t memcpy_async(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                         cudaStream_t stream = nullptr);
cudaError_t stream_synchronize(cudaStream_t stream);
cudaError_t device_synchronize();
cudaError_t get_device(int* device);
cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device);

template <class Kernel>
cudaError_t func_set_attribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    return detail::set_max_dynamic_shared_memory(reinterpret_cast<const void*>(kernel), value);
  }
  return cudaSuccess;  // hints (carveout, cluster shapes ...) change nothing here
}

}  // namespace runtime
}  // namespace simt
}  // namespace fastllm

#define cudaGetLastError ::fastllm::simt::runtime::get_last_error
#define cudaPeekAtLastError ::fastllm::simt::runtime::peek_at_last_error
#define cudaGetErrorString ::fastllm::simt::runtime::get_error_string
#define cudaGetErrorName ::fastllm::simt::runtime::get_error_name
#define cudaMemsetAsync ::fastllm::simt::runtime::memset_async
#define cudaMemcpyAsync ::fastllm::simt::runtime::memcpy_async
#define cudaStreamSynchronize ::fastllm::simt::runtime::stream_synchronize
#define cudaDeviceSynchronize ::fastllm::simt::runtime::device_synchronize
#define cudaGetDevice ::fastllm::simt::runtime::get_device
#define cudaDeviceGetAttribute ::fastllm::simt::runtime::device_get_attribute
#define cudaFuncSetAttribute ::fastllm::simt::runtime::func_set_attribute

// The contract of common/cuda_compat.h.
#define FASTLLM_LAUNCH_KERNEL(kernel, grid, block, smem_bytes, stream, ...)                  \
  ::fastllm::simt::launch_kernel(#kernel, __PRETTY_FUNCTION__, kernel, grid, block, smem_bytes, \
                                 stream, ##__VA_ARGS__)
// Function scope only (the buffer belongs to the running block).
#define FASTLLM_EXTERN_SHARED(type, name) \
  type* const name = reinterpret_cast<type*>(::fastllm::simt::detail::dynamic_shared_memory())

// ---- built-in variables ----------------------------------------------------------------

#define threadIdx (::fastllm::simt::detail::builtins().thread_idx)
#define blockIdx (::fastllm::simt::detail::builtins().block_idx)
#define blockDim (::fastllm::simt::detail::builtins().block_dim)
#define gridDim (::fastllm::simt::detail::builtins().grid_dim)
constexpr int warpSize = 32;

// ---- barriers, fences ------------------------------------------------------------------

inline void __syncthreads() { ::fastllm::simt::detail::block_barrier("__syncthreads()", 0); }
inline int __syncthreads_count(int predicate) {
  return ::fastllm::simt::detail::block_barrier("__syncthreads_count()", predicate != 0);
}
inline int __syncthreads_and(int predicate) {
  return ::fastllm::simt::detail::block_barrier("__syncthreads_and()", predicate != 0) ==
         static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
}
inline int __syncthreads_or(int predicate) {
  return ::fastllm::simt::detail::block_barrier("__syncthreads_or()", predicate != 0) > 0;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::fastllm::simt::detail::warp_exchange("__syncwarp", mask, nullptr, nullptr,
                                         [](const ::fastllm::simt::WarpExchange&) {});
}
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) { ::fastllm::simt::detail::scheduling_point(); }
[[noreturn]] inline void __trap() { ::fastllm::simt::detail::device_fault("__trap() called"); }

// A failed device-side assert is a kernel error (CUDA: cudaErrorAssert), not an abort of the
// process. Effective for code after this header; a later <cassert> restores the host macro.
#undef assert
#if defined(NDEBUG)
#define assert(expr) static_cast<void>(0)
#else
#define assert(expr)                                                                 \
  (static_cast<bool>(expr)                                                           \
       ? static_cast<void>(0)                                                        \
       : ::fastllm::simt::detail::device_assert_fail(#expr, __FILE__, __LINE__))
#endif

// ---- warp shuffles and votes -----------------------------------------------------------

template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  using ::fastllm::simt::detail::ShuffleMode;
  namespace d = ::fastllm::simt::detail;
  return d::from_bits<T>(d::shuffle(ShuffleMode::kIdx, mask, d::to_bits(var), src_lane, width));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  using ::fastllm::simt::detail::ShuffleMode;
  namespace d = ::fastllm::simt::detail;
  return d::from_bits<T>(d::shuffle(ShuffleMode::kUp, mask, d::to_bits(var),
                                    static_cast<int>(delta), width));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  using ::fastllm::simt::detail::ShuffleMode;
  namespace d = ::fastllm::simt::detail;
  return d::from_bits<T>(d::shuffle(ShuffleMode::kDown, mask, d::to_bits(var),
                                    static_cast<int>(delta), width));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  using ::fastllm::simt::detail::ShuffleMode;
  namespace d = ::fastllm::simt::detail;
  return d::from_bits<T>(d::shuffle(ShuffleMode::kXor, mask, d::to_bits(var), lane_mask, width));
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return ::fastllm::simt::detail::vote_ballot("__ballot_sync", mask, predicate);
}
inline int __any_sync(unsigned mask, int predicate) {
  return ::fastllm::simt::detail::vote_ballot("__any_sync", mask, predicate) != 0;
}
inline int __all_sync(unsigned mask, int predicate) {
  return ::fastllm::simt::detail::vote_ballot("__all_sync", mask, predicate) ==
         (mask & ::fastllm::simt::detail::existing_lanes());
}
// The warp's lanes that have not exited (the emulation has no notion of divergence).
inline unsigned __activemask() { return ::fastllm::simt::detail::active_lanes(); }

inline unsigned __reduce_add_sync(unsigned mask, unsigned value) {
  using ::fastllm::simt::detail::ReduceOp;
  return ::fastllm::simt::detail::reduce(ReduceOp::kAdd, false, mask, value);
}
inline int __reduce_add_sync(unsigned mask, int value) {
  using ::fastllm::simt::detail::ReduceOp;
  return static_cast<int>(
      ::fastllm::simt::detail::reduce(ReduceOp::kAdd, true, mask, static_cast<uint32_t>(value)));
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned value) {
  using ::fastllm::simt::detail::ReduceOp;
  return ::fastllm::simt::detail::reduce(ReduceOp::kMin, false, mask, value);
}
inline int __reduce_min_sync(unsigned mask, int value) {
  using ::fastllm::simt::detail::ReduceOp;
  return static_cast<int>(
      ::fastllm::simt::detail::reduce(ReduceOp::kMin, true, mask, static_cast<uint32_t>(value)));
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned value) {
  using ::fastllm::simt::detail::ReduceOp;
  return ::fastllm::simt::detail::reduce(ReduceOp::kMax, false, mask, value);
}
inline int __reduce_max_sync(unsigned mask, int value) {
  using ::fastllm::simt::detail::ReduceOp;
  return static_cast<int>(
      ::fastllm::simt::detail::reduce(ReduceOp::kMax, true, mask, static_cast<uint32_t>(value)));
}
inline unsigned __reduce_and_sync(unsigned mask, unsigned value) {
  using ::fastllm::simt::detail::ReduceOp;
  return ::fastllm::simt::detail::reduce(ReduceOp::kAnd, false, mask, value);
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned value) {
  using ::fastllm::simt::detail::ReduceOp;
  return ::fastllm::simt::detail::reduce(ReduceOp::kOr, false, mask, value);
}
inline unsigned __reduce_xor_sync(unsigned mask, unsigned value) {
  using ::fastllm::simt::detail::ReduceOp;
  return ::fastllm::simt::detail::reduce(ReduceOp::kXor, false, mask, value);
}

// ---- atomics ---------------------------------------------------------------------------
// Each atomic is a scheduling point (so the order of atomics varies with the schedule) and
// a real atomic operation (blocks of a grid may run on several OS threads).

namespace fastllm {
namespace simt {
namespace detail {
template <class T, class Update>
inline T atomic_update(T* address, Update update) {
  scheduling_point();
  T old;
  __atomic_load(address, &old, __ATOMIC_RELAXED);
  T desired;
  do {
    desired = update(old);
  } while (!__atomic_compare_exchange(address, &old, &desired, false, __ATOMIC_SEQ_CST,
                                      __ATOMIC_RELAXED));
  return old;
}
}  // namespace detail
}  // namespace simt
}  // namespace fastllm

#define FASTLLM_SIMT_ATOMIC(name, T, expr)                                                  \
  inline T name(T* address, T val) {                                                        \
    return ::fastllm::simt::detail::atomic_update(address, [val](T old) -> T {                \
      static_cast<void>(old);                                                                 \
      return expr;                                                                            \
    });                                                                                       \
  }
FASTLLM_SIMT_ATOMIC(atomicAdd, int, old + val)
FASTLLM_SIMT_ATOMIC(atomicAdd, unsigned, old + val)
FASTLLM_SIMT_ATOMIC(atomicAdd, unsigned long long, old + val)
FASTLLM_SIMT_ATOMIC(atomicAdd, float, old + val)
FASTLLM_SIMT_ATOMIC(atomicAdd, double, old + val)
FASTLLM_SIMT_ATOMIC(atomicSub, int, old - val)
FASTLLM_SIMT_ATOMIC(atomicSub, unsigned, old - val)
FASTLLM_SIMT_ATOMIC(atomicExch, int, val)
FASTLLM_SIMT_ATOMIC(atomicExch, unsigned, val)
FASTLLM_SIMT_ATOMIC(atomicExch, unsigned long long, val)
FASTLLM_SIMT_ATOMIC(atomicExch, float, val)
FASTLLM_SIMT_ATOMIC(atomicMax, int, old > val ? old : val)
FASTLLM_SIMT_ATOMIC(atomicMax, unsigned, old > val ? old : val)
FASTLLM_SIMT_ATOMIC(atomicMax, long long, old > val ? old : val)
FASTLLM_SIMT_ATOMIC(atomicMax, unsigned long long, old > val ? old : val)
FASTLLM_SIMT_ATOMIC(atomicMin, int, old < val ? old : val)
FASTLLM_SIMT_ATOMIC(atomicMin, unsigned, old < val ? old : val)
FASTLLM_SIMT_ATOMIC(atomicMin, long long, old < val ? old : val)
FASTLLM_SIMT_ATOMIC(atomicMin, unsigned long long, old < val ? old : val)
FASTLLM_SIMT_ATOMIC(atomicAnd, int, old & val)
FASTLLM_SIMT_ATOMIC(atomicAnd, unsigned, old & val)
FASTLLM_SIMT_ATOMIC(atomicAnd, unsigned long long, old & val)
FASTLLM_SIMT_ATOMIC(atomicOr, int, old | val)
FASTLLM_SIMT_ATOMIC(atomicOr, unsigned, old | val)
FASTLLM_SIMT_ATOMIC(atomicOr, unsigned long long, old | val)
FASTLLM_SIMT_ATOMIC(atomicXor, int, old ^ val)
FASTLLM_SIMT_ATOMIC(atomicXor, unsigned, old ^ val)
FASTLLM_SIMT_ATOMIC(atomicXor, unsigned long long, old ^ val)
FASTLLM_SIMT_ATOMIC(atomicInc, unsigned, old >= val ? 0u : old + 1u)
FASTLLM_SIMT_ATOMIC(atomicDec, unsigned, (old == 0u || old > val) ? val : old - 1u)
#undef FASTLLM_SIMT_ATOMIC

#define FASTLLM_SIMT_ATOMIC_CAS(T)                                                  \
  inline T atomicCAS(T* address, T compare, T val) {                                \
    return ::fastllm::simt::detail::atomic_update(                                  \
        address, [compare, val](T old) -> T { return old == compare ? val : old; }); \
  }
FASTLLM_SIMT_ATOMIC_CAS(int)
FASTLLM_SIMT_ATOMIC_CAS(unsigned)
FASTLLM_SIMT_ATOMIC_CAS(unsigned long long)
FASTLLM_SIMT_ATOMIC_CAS(unsigned short)
#undef FASTLLM_SIMT_ATOMIC_CAS

// ---- math intrinsics -------------------------------------------------------------------
// Fast-math intrinsics are computed with the accurate libm function: the emulation checks
// logic, not the last bits of an approximation.

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / std::cbrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __log10f(float x) { return std::log10(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline void __sincosf(float x, float* s, float* c) {
  *s = std::sin(x);
  *c = std::cos(x);
}
inline float __tanhf(float x) { return std::tanh(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / std::sqrt(x); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __fmaf_rn(float x, float y, float z) { return std::fma(x, y, z); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline double __drcp_rn(double x) { return 1.0 / x; }

namespace fastllm {
namespace simt {
namespace detail {
template <class To, class From>
inline To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast: sizes differ");
  To r;
  std::memcpy(&r, &v, sizeof(To));
  return r;
}
}  // namespace detail
}  // namespace simt
}  // namespace fastllm

inline int __float_as_int(float x) { return ::fastllm::simt::detail::bit_cast<int>(x); }
inline unsigned __float_as_uint(float x) { return ::fastllm::simt::detail::bit_cast<unsigned>(x); }
inline float __int_as_float(int x) { return ::fastllm::simt::detail::bit_cast<float>(x); }
inline float __uint_as_float(unsigned x) { return ::fastllm::simt::detail::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) {
  return ::fastllm::simt::detail::bit_cast<long long>(x);
}
inline double __longlong_as_double(long long x) {
  return ::fastllm::simt::detail::bit_cast<double>(x);
}
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(std::floor(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(std::ceil(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}

// CUDA's min / max accept mixed arithmetic types (std::min does not).
template <class A, class B,
          class = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class A, class B,
          class = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

// Cache-hinted loads and stores: plain accesses here.
template <class T>
inline T __ldg(const T* p) { return *p; }
template <class T>
inline T __ldca(const T* p) { return *p; }
template <class T>
inline T __ldcg(const T* p) { return *p; }
template <class T>
inline T __ldcs(const T* p) { return *p; }
template <class T>
inline T __ldlu(const T* p) { return *p; }
template <class T>
inline T __ldcv(const T* p) { return *p; }
template <class T>
inline void __stwb(T* p, T v) { *p = v; }
template <class T>
inline void __stcg(T* p, T v) { *p = v; }
template <class T>
inline void __stcs(T* p, T v) { *p = v; }
template <class T>
inline void __stwt(T* p, T v) { *p = v; }
