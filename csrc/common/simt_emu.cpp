// Runtime of the SIMT emulation (interface and model: simt_emu.h, docs/simt_emulation.md):
// fibers, the block scheduler, barriers, warp collectives, shared memory, asynchronous
// copies, fault handling and the launch loop.
//
// Structure: one Runner per OS thread executes blocks one at a time. run_block() makes a
// fiber per CUDA thread and switches into the first one; from then on control passes
// directly from fiber to fiber at scheduling points, and returns to run_block() when the
// last fiber exits or when something goes wrong (an error, a deadlock, or a memory fault
// caught by the SIGSEGV/SIGBUS handler, which siglongjmps back; SIGABRT too, so that an
// assert() of the host's <cassert> in a kernel is reported like CUDA's device-side assert).

// With _FORTIFY_SOURCE, glibc checks that siglongjmp does not jump to a "deeper" stack frame,
// which a jump from a fiber stack back to the OS thread's stack can look like.
#undef _FORTIFY_SOURCE

#include "common/simt_emu.h"

#include <omp.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <vector>

namespace fastllm {
namespace simt {
namespace {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr unsigned char kPoisonByte = 0xFF;  // NaN in every floating-point format
constexpr uint64_t kPoisonBits = ~uint64_t(0);
// The fake device: an sm_80 with 4 SMs (the glue passes num_sms = 4 as well).
constexpr int kComputeMajor = 8;
constexpr int kComputeMinor = 0;
constexpr int kMultiProcessors = 4;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kDefaultDynamicSharedBytes = 48 * 1024;
constexpr size_t kMaxDynamicSharedBytes = 166912;  // sm_80 opt-in limit (163 KiB)
// Writes this far below the start of dynamic shared memory are found by a check after
// the block (further below, the guard page faults).
constexpr size_t kUnderflowCheckBytes = 4096;
constexpr size_t kSignalStackBytes = 64 * 1024;
// Seeded schedules: a yielding fiber draws a new priority with probability 1 / this.
constexpr size_t kPriorityChangeOdds = 16;

// ---- process-wide settings -----------------------------------------------------------

std::optional<uint64_t> env_u64(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  char* end = nullptr;
  const unsigned long long parsed = std::strtoull(v, &end, 10);
  if (end == v || *end != '\0') {
    throw std::invalid_argument(std::string(name) + " must be a non-negative integer, got '" + v +
                                "'");
  }
  return parsed;
}

struct Settings {
  std::mutex mutex;
  std::optional<uint64_t> seed;
  uint64_t launches_since_seed = 0;
  int num_threads = 1;
  std::unordered_map<const void*, size_t> max_dynamic_smem;  // cudaFuncSetAttribute

  Settings() {
    seed = env_u64("FASTLLM_SIMT_SEED");
    num_threads = static_cast<int>(env_u64("FASTLLM_SIMT_THREADS").value_or(1));
  }
};

Settings& settings() {
  static Settings s;
  return s;
}

size_t page_size() {
  static const size_t size = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return size;
}

size_t round_up(size_t n, size_t multiple) { return (n + multiple - 1) / multiple * multiple; }

size_t fiber_stack_bytes() {
  static const size_t bytes =
      round_up(env_u64("FASTLLM_SIMT_STACK_KIB").value_or(64) * 1024, page_size());
  return bytes;
}

double timeout_seconds() {
  return static_cast<double>(env_u64("FASTLLM_SIMT_TIMEOUT_S").value_or(60));
}

thread_local cudaError_t tl_last_error = cudaSuccess;

std::string hex32(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", v);
  return buf;
}

std::string dim_str(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) +
         ")";
}
std::string dim_str(uint3 d) { return dim_str(dim3(d.x, d.y, d.z)); }

// splitmix64: seeds the per-block generators from (seed, launch, block).
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

struct Rng {
  uint64_t state = 0;
  uint64_t next() { return state = mix(state); }
  size_t below(size_t n) { return static_cast<size_t>(next() % n); }
};

// ---- memory with guard pages ---------------------------------------------------------

// An anonymous mapping of `guard_before + bytes + guard_after` bytes whose guard parts are
// inaccessible; data() is the start of the accessible part.
class GuardedMapping {
 public:
  GuardedMapping() = default;
  GuardedMapping(size_t bytes, size_t guard_before, size_t guard_after)
      : total_(guard_before + bytes + guard_after), guard_before_(guard_before), bytes_(bytes) {
    void* p = mmap(nullptr, total_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("SIMT emulation: mmap failed");
    base_ = static_cast<unsigned char*>(p);
    if ((guard_before > 0 && mprotect(base_, guard_before, PROT_NONE) != 0) ||
        (guard_after > 0 && mprotect(data() + bytes, guard_after, PROT_NONE) != 0)) {
      munmap(base_, total_);
      throw std::runtime_error("SIMT emulation: mprotect failed");
    }
  }
  GuardedMapping(GuardedMapping&& o) noexcept { *this = std::move(o); }
  GuardedMapping& operator=(GuardedMapping&& o) noexcept {
    std::swap(base_, o.base_);
    std::swap(total_, o.total_);
    std::swap(guard_before_, o.guard_before_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  ~GuardedMapping() {
    if (base_ != nullptr) munmap(base_, total_);
  }
  unsigned char* data() const { return base_ + guard_before_; }
  size_t size() const { return bytes_; }
  bool in_guard_before(const void* p) const {
    auto* c = static_cast<const unsigned char*>(p);
    return base_ != nullptr && c >= base_ && c < data();
  }
  bool in_guard_after(const void* p) const {
    auto* c = static_cast<const unsigned char*>(p);
    return base_ != nullptr && c >= data() + bytes_ && c < base_ + total_;
  }

 private:
  unsigned char* base_ = nullptr;
  size_t total_ = 0;
  size_t guard_before_ = 0;
  size_t bytes_ = 0;
};

// ---- fibers ---------------------------------------------------------------------------

enum class State : uint8_t { kReady, kRunning, kAtBarrier, kInWarpOp, kExited };

struct PendingCopy {
  unsigned char* dst;
  int bytes;
  unsigned char data[16];  // read from the source when the copy was issued
};

struct Fiber {
  ucontext_t context{};
  GuardedMapping stack;  // guard page below: an overflow faults
  BuiltinVariables vars{};
  unsigned warp = 0;
  unsigned lane = 0;
  State state = State::kReady;
  uint64_t priority = 0;  // seeded schedules: the ready fiber with the highest runs next
  // What a blocked fiber waits in (barrier or warp collective), for the deadlock report.
  const char* op = nullptr;
  // The warp collective this fiber takes part in while state == kInWarpOp.
  unsigned op_mask = 0;
  WarpExchangeFn op_combine = nullptr;
  const void* op_in = nullptr;
  void* op_out = nullptr;
  std::deque<std::vector<PendingCopy>> copy_groups;  // committed, oldest first
  std::vector<PendingCopy> open_copies;              // issued, not yet committed
};

struct LaunchState {
  detail::LaunchConfig config;
  detail::KernelBody body;
  const void* closure;
  bool randomized;
  std::chrono::steady_clock::duration block_timeout;
};

class Runner;
thread_local Runner* tl_active = nullptr;  // the runner executing fibers on this thread
// OS threads currently inside fibers: lets the fault handler ignore faults elsewhere
// without touching thread-local storage.
std::atomic<int> g_threads_in_fibers{0};

class Runner {
 public:
  Runner()
      : smem_(round_up(kMaxDynamicSharedBytes, page_size()), page_size(), page_size()) {
    std::memset(smem_.data(), kPoisonByte, smem_.size());
    // A stack overflow faults on the fiber's guard page; the handler then needs a stack.
    stack_t current;
    if (sigaltstack(nullptr, &current) == 0 && (current.ss_flags & SS_DISABLE)) {
      signal_stack_ = GuardedMapping(kSignalStackBytes, page_size(), 0);
      stack_t ss{};
      ss.ss_sp = signal_stack_.data();
      ss.ss_size = signal_stack_.size();
      if (sigaltstack(&ss, nullptr) != 0) signal_stack_ = GuardedMapping();
    }
  }
  ~Runner() {
    if (signal_stack_.data() != nullptr) {
      stack_t current;
      if (sigaltstack(nullptr, &current) == 0 && current.ss_sp == signal_stack_.data()) {
        stack_t off{};
        off.ss_flags = SS_DISABLE;
        sigaltstack(&off, nullptr);
      }
    }
  }
  Runner(const Runner&) = delete;
  Runner& operator=(const Runner&) = delete;

  // Executes one block; returns "" on success, else what went wrong.
  std::string run_block(const LaunchState& launch, uint3 block_idx, uint64_t schedule_seed);

  // ---- called from fibers (through the detail:: functions) ----
  Fiber& current() { return *current_; }
  void warp_exchange(const char* op, unsigned mask, const void* in, void* out,
                     WarpExchangeFn combine);
  int block_barrier(const char* op, int predicate);
  void scheduling_point();
  unsigned existing_lanes(unsigned warp) const {
    const unsigned first = warp * kWarpSize;
    const unsigned count = std::min(kWarpSize, num_threads_ - first);
    return count == kWarpSize ? kFullMask : (1u << count) - 1u;
  }
  unsigned active_lanes(unsigned warp) const {
    unsigned lanes = 0;
    for (unsigned rest = existing_lanes(warp); rest != 0; rest &= rest - 1) {
      const unsigned lane = static_cast<unsigned>(__builtin_ctz(rest));
      if (fibers_[warp * kWarpSize + lane]->state != State::kExited) lanes |= 1u << lane;
    }
    return lanes;
  }
  unsigned char* dynamic_smem() const { return smem_ptr_; }
  void async_copy(void* dst, const void* src, int bytes, bool zero_fill);
  void async_copy_commit();
  void async_copy_wait(int max_pending_groups);
  [[noreturn]] void fail(const std::string& what);  // an error of the current thread

  // ---- fault handler ----
  bool executing_fibers() const { return executing_fibers_; }
  sigjmp_buf& fault_jump() { return fault_jump_; }
  void record_fault(int signal, void* address, int is_write) {
    fault_signal_ = signal;
    fault_address_ = address;
    fault_is_write_ = is_write;
  }

 private:
  static void fiber_main();
  void run_current_fiber();
  [[noreturn]] void exit_current();
  [[noreturn]] void stop(std::string error);  // back to run_block with an error
  Fiber* take_next();
  void switch_to(Fiber* next);
  void wait();  // the current fiber is blocked: run another one
  void yield();
  void tick();
  void wake(Fiber& f);           // f's collective (barrier, warp op) is complete: f may run
  void resume_after_collective(Fiber& self);  // the same for the fiber that completed it
  void ensure_fibers(unsigned count);
  void prepare_dynamic_smem(size_t bytes);
  std::string check_dynamic_smem() const;
  std::string describe_fault() const;
  std::string deadlock_report() const;
  std::string thread_name(const Fiber& f) const;

  const LaunchState* launch_ = nullptr;
  std::vector<std::unique_ptr<Fiber>> fibers_;  // stable addresses: ucontext_t must not move
  unsigned num_threads_ = 0;
  uint3 block_idx_{};
  std::deque<Fiber*> ready_;
  Fiber* current_ = nullptr;
  ucontext_t main_context_;
  sigjmp_buf fault_jump_;
  volatile bool executing_fibers_ = false;
  volatile int fault_signal_ = 0;
  void* volatile fault_address_ = nullptr;
  volatile int fault_is_write_ = -1;  // -1: unknown
  Rng rng_;
  unsigned barrier_arrived_ = 0;
  int barrier_count_ = 0;
  int barrier_result_ = 0;
  unsigned exited_ = 0;
  uint64_t ticks_ = 0;
  std::chrono::steady_clock::time_point deadline_;
  std::string error_;
  GuardedMapping smem_;  // dynamic shared memory: the block's buffer ends at the guard
  unsigned char* smem_ptr_ = nullptr;
  size_t smem_bytes_ = 0;
  GuardedMapping signal_stack_;
};

Runner& this_thread_runner() {
  thread_local std::unique_ptr<Runner> runner;
  if (!runner) runner = std::make_unique<Runner>();
  return *runner;
}

Runner& active_runner(const char* what) {
  Runner* r = tl_active;
  if (r == nullptr) {
    throw std::logic_error(std::string("SIMT emulation: ") + what +
                           " used outside a kernel launched with FASTLLM_LAUNCH_KERNEL");
  }
  return *r;
}

// ---- block execution -----------------------------------------------------------------

void Runner::ensure_fibers(unsigned count) {
  while (fibers_.size() < count) {
    auto f = std::make_unique<Fiber>();
    f->stack = GuardedMapping(fiber_stack_bytes(), page_size(), 0);
    if (getcontext(&f->context) != 0) throw std::runtime_error("SIMT emulation: getcontext failed");
    fibers_.push_back(std::move(f));
  }
}

void Runner::prepare_dynamic_smem(size_t bytes) {
  // The buffer ends at the guard page (rounded to 16 bytes, CUDA's minimum alignment of
  // dynamic shared memory); everything around it is poison, checked after the block.
  const size_t rounded = round_up(bytes, 16);
  smem_bytes_ = bytes;
  smem_ptr_ = smem_.data() + smem_.size() - rounded;
  const size_t below = std::min(kUnderflowCheckBytes, smem_.size() - rounded);
  std::memset(smem_ptr_ - below, kPoisonByte, below + rounded);
}

std::string Runner::check_dynamic_smem() const {
  const unsigned char* end = smem_.data() + smem_.size();
  for (const unsigned char* p = smem_ptr_ + smem_bytes_; p < end; ++p) {
    if (*p != kPoisonByte) {
      return "a thread of block " + dim_str(block_idx_) +
             " wrote past the end of dynamic shared memory (byte " +
             std::to_string(p - smem_ptr_) + " of a " + std::to_string(smem_bytes_) +
             "-byte buffer; found after the block, accesses further out fault at once)";
    }
  }
  const size_t below =
      std::min(kUnderflowCheckBytes, static_cast<size_t>(smem_ptr_ - smem_.data()));
  for (const unsigned char* p = smem_ptr_ - below; p < smem_ptr_; ++p) {
    if (*p != kPoisonByte) {
      return "a thread of block " + dim_str(block_idx_) +
             " wrote before the start of dynamic shared memory (byte offset " +
             std::to_string(p - smem_ptr_) + ")";
    }
  }
  return "";
}

std::string Runner::run_block(const LaunchState& launch, uint3 block_idx, uint64_t schedule_seed) {
  const dim3 block = launch.config.block;
  num_threads_ = block.x * block.y * block.z;
  ensure_fibers(num_threads_);
  launch_ = &launch;
  block_idx_ = block_idx;
  rng_.state = schedule_seed;
  ready_.clear();
  barrier_arrived_ = 0;
  barrier_count_ = 0;
  exited_ = 0;
  ticks_ = 0;
  deadline_ = std::chrono::steady_clock::now() + launch.block_timeout;
  error_.clear();
  fault_signal_ = 0;
  prepare_dynamic_smem(launch.config.dynamic_smem_bytes);

  for (unsigned i = 0; i < num_threads_; ++i) {
    Fiber& f = *fibers_[i];
    f.warp = i / kWarpSize;
    f.lane = i % kWarpSize;
    f.vars.thread_idx = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
    f.vars.block_idx = block_idx;
    f.vars.block_dim = block;
    f.vars.grid_dim = launch.config.grid;
    f.state = State::kReady;
    f.priority = rng_.next();
    f.op = nullptr;
    f.copy_groups.clear();
    f.open_copies.clear();
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = &main_context_;
    makecontext(&f.context, &Runner::fiber_main, 0);
    ready_.push_back(&f);
  }

  tl_active = this;
  g_threads_in_fibers.fetch_add(1);
  if (sigsetjmp(fault_jump_, 1) == 0) {
    executing_fibers_ = true;
    current_ = take_next();
    current_->state = State::kRunning;
    swapcontext(&main_context_, &current_->context);
  } else {
    error_ = describe_fault();
  }
  executing_fibers_ = false;
  g_threads_in_fibers.fetch_sub(1);
  tl_active = nullptr;
  current_ = nullptr;
  launch_ = nullptr;
  if (error_.empty()) error_ = check_dynamic_smem();
  return error_;
}

void Runner::fiber_main() { tl_active->run_current_fiber(); }

void Runner::run_current_fiber() {
  std::string escaped;
  try {
    launch_->body(launch_->closure);
  } catch (const std::exception& e) {
    escaped = e.what();
  } catch (...) {
    escaped = "unknown exception";
  }
  // Not inside the catch block: fail() never returns, and a handler left mid-way would
  // stay on this OS thread's stack of caught exceptions.
  if (!escaped.empty()) fail("an exception escaped the kernel: " + escaped);
  exit_current();
}

void Runner::exit_current() {
  // Copies this thread never waited for do not land: nobody could rely on them.
  Fiber& f = *current_;
  f.state = State::kExited;
  ++exited_;
  if (exited_ == num_threads_) setcontext(&main_context_);
  Fiber* next = take_next();
  if (next == nullptr) stop(deadlock_report());
  current_ = next;
  next->state = State::kRunning;
  setcontext(&next->context);
  std::abort();  // setcontext does not return
}

void Runner::stop(std::string error) {
  error_ = std::move(error);
  setcontext(&main_context_);
  std::abort();
}

void Runner::fail(const std::string& what) { stop(thread_name(*current_) + ": " + what); }

// Seeded schedules follow PCT (Burckhardt et al., "A randomized scheduler with probabilistic
// guarantees of finding bugs", 2010): random priorities, highest ready first, re-drawn now
// and then in yield(). Unlike a uniform draw at every step, this lets whole warps run far
// ahead of a starved thread, which is what exposes a missing barrier before shared memory
// is overwritten (write-after-read), not only before it is read.
Fiber* Runner::take_next() {
  if (ready_.empty()) return nullptr;
  Fiber* next;
  if (launch_->randomized) {
    size_t best = 0;
    for (size_t i = 1; i < ready_.size(); ++i) {
      if (ready_[i]->priority > ready_[best]->priority) best = i;
    }
    next = ready_[best];
    ready_[best] = ready_.back();
    ready_.pop_back();
  } else {
    next = ready_.front();
    ready_.pop_front();
  }
  return next;
}

void Runner::switch_to(Fiber* next) {
  Fiber* self = current_;
  next->state = State::kRunning;
  if (next == self) return;
  current_ = next;
  swapcontext(&self->context, &next->context);
}

void Runner::wait() {
  Fiber* next = take_next();
  if (next == nullptr) stop(deadlock_report());
  switch_to(next);
}

void Runner::yield() {
  if (launch_->randomized && rng_.below(kPriorityChangeOdds) == 0) {
    current_->priority = rng_.next();
  }
  if (ready_.empty()) return;
  current_->state = State::kReady;
  ready_.push_back(current_);
  switch_to(take_next());
}

void Runner::wake(Fiber& f) {
  f.state = State::kReady;
  f.op = nullptr;
  ready_.push_back(&f);
}

// Under a random schedule the completing fiber may also give way to the ones it woke.
void Runner::resume_after_collective(Fiber& self) {
  self.state = State::kRunning;
  self.op = nullptr;
  if (launch_->randomized) yield();
}

void Runner::tick() {
  if ((++ticks_ & 1023) == 0 && std::chrono::steady_clock::now() > deadline_) {
    stop("block " + dim_str(block_idx_) + " did not finish within " +
         std::to_string(static_cast<int>(timeout_seconds())) +
         " s (FASTLLM_SIMT_TIMEOUT_S). A thread may be spinning on a value that another block "
         "writes: the emulation runs the blocks of a grid one after another.");
  }
}

void Runner::scheduling_point() {
  tick();
  yield();
}

int Runner::block_barrier(const char* op, int predicate) {
  Fiber& self = *current_;
  self.state = State::kAtBarrier;
  self.op = op;
  barrier_count_ += predicate;
  ++barrier_arrived_;
  tick();
  if (barrier_arrived_ < num_threads_) {
    wait();
    // Safe to read: the next barrier cannot complete before this thread arrives at it.
    return barrier_result_;
  }
  barrier_result_ = barrier_count_;
  barrier_count_ = 0;
  barrier_arrived_ = 0;
  for (unsigned i = 0; i < num_threads_; ++i) {
    Fiber& f = *fibers_[i];
    if (&f != &self && f.state == State::kAtBarrier) wake(f);
  }
  resume_after_collective(self);
  return barrier_result_;
}

void Runner::warp_exchange(const char* op, unsigned mask, const void* in, void* out,
                           WarpExchangeFn combine) {
  Fiber& self = *current_;
  const unsigned self_bit = 1u << self.lane;
  if ((mask & self_bit) == 0) {
    fail(std::string(op) + " called with mask " + hex32(mask) +
         ", which does not include the calling lane " + std::to_string(self.lane));
  }
  const unsigned lanes = mask & existing_lanes(self.warp);
  self.state = State::kInWarpOp;
  self.op = op;
  self.op_mask = mask;
  self.op_combine = combine;
  self.op_in = in;
  self.op_out = out;
  tick();

  const unsigned base = self.warp * kWarpSize;
  bool all_arrived = true;
  for (unsigned rest = lanes & ~self_bit; rest != 0; rest &= rest - 1) {
    const Fiber& other = *fibers_[base + static_cast<unsigned>(__builtin_ctz(rest))];
    if (other.state != State::kInWarpOp) {
      all_arrived = false;
    } else if (other.op != op || other.op_mask != mask || other.op_combine != combine) {
      // `other` waits for this lane in its own collective, this lane waits for `other` here.
      if (other.op_mask & self_bit) {
        fail(std::string(op) + " (mask " + hex32(mask) + ") meets lane " +
             std::to_string(other.lane) + " of the same warp waiting in " + other.op +
             " (mask " + hex32(other.op_mask) +
             "): every lane named in a mask must execute the same warp collective");
      }
      all_arrived = false;
    }
  }
  if (!all_arrived) {
    wait();  // the last lane to arrive runs the exchange and wakes this one
    return;
  }

  WarpExchange exchange;
  exchange.lanes = lanes;
  for (unsigned rest = lanes; rest != 0; rest &= rest - 1) {
    const unsigned lane = static_cast<unsigned>(__builtin_ctz(rest));
    const Fiber& f = *fibers_[base + lane];
    exchange.in[lane] = f.op_in;
    exchange.out[lane] = f.op_out;
  }
  combine(exchange);
  for (unsigned rest = lanes & ~self_bit; rest != 0; rest &= rest - 1) {
    wake(*fibers_[base + static_cast<unsigned>(__builtin_ctz(rest))]);
  }
  resume_after_collective(self);
}

// ---- asynchronous copies ----

void Runner::async_copy(void* dst, const void* src, int bytes, bool zero_fill) {
  if (bytes != 4 && bytes != 8 && bytes != 16) {
    fail("cp.async copies 4, 8 or 16 bytes, got " + std::to_string(bytes));
  }
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 ||
      (!zero_fill && reinterpret_cast<uintptr_t>(src) % bytes != 0)) {
    std::ostringstream os;
    os << "cp.async of " << bytes << " bytes needs " << bytes
       << "-byte aligned addresses, got shared " << dst << " and global " << src;
    fail(os.str());
  }
  PendingCopy copy;
  copy.dst = static_cast<unsigned char*>(dst);
  copy.bytes = bytes;
  if (zero_fill) {
    std::memset(copy.data, 0, sizeof(copy.data));
  } else {
    std::memcpy(copy.data, src, static_cast<size_t>(bytes));
  }
  // Until a wait covers the copy, its destination holds no valid data.
  std::memset(dst, kPoisonByte, static_cast<size_t>(bytes));
  current_->open_copies.push_back(copy);
}

void Runner::async_copy_commit() {
  Fiber& f = *current_;
  f.copy_groups.push_back(std::move(f.open_copies));  // an empty group counts too, as in PTX
  f.open_copies.clear();
}

void Runner::async_copy_wait(int max_pending_groups) {
  Fiber& f = *current_;
  if (max_pending_groups < 0) {
    async_copy_commit();
    max_pending_groups = 0;
  }
  while (f.copy_groups.size() > static_cast<size_t>(max_pending_groups)) {
    for (const PendingCopy& c : f.copy_groups.front()) {
      std::memcpy(c.dst, c.data, static_cast<size_t>(c.bytes));
    }
    f.copy_groups.pop_front();
  }
}

// ---- reports ----

std::string Runner::thread_name(const Fiber& f) const {
  return "thread " + dim_str(f.vars.thread_idx) + " (warp " + std::to_string(f.warp) +
         ", lane " + std::to_string(f.lane) + ") of block " + dim_str(block_idx_);
}

std::string Runner::deadlock_report() const {
  auto status = [](const Fiber& f) -> std::string {
    switch (f.state) {
      case State::kAtBarrier: return std::string("waiting at ") + f.op;
      case State::kInWarpOp:
        return std::string("waiting in ") + f.op + " (mask " + hex32(f.op_mask) + ")";
      case State::kExited: return "exited";
      default: return "runnable";
    }
  };
  std::ostringstream os;
  os << "deadlock in block " << dim_str(block_idx_) << ": no thread can continue.";
  const dim3 block = launch_->config.block;
  if (block.y * block.z > 1) {
    os << " (threads numbered x + y * blockDim.x + z * blockDim.x * blockDim.y)";
  }
  bool at_barrier = false, in_warp_op = false, exited = false;
  constexpr int kMaxLines = 24;
  int lines = 0;
  for (unsigned i = 0; i < num_threads_;) {
    const std::string s = status(*fibers_[i]);
    unsigned j = i + 1;
    while (j < num_threads_ && status(*fibers_[j]) == s) ++j;
    at_barrier |= fibers_[i]->state == State::kAtBarrier;
    in_warp_op |= fibers_[i]->state == State::kInWarpOp;
    exited |= fibers_[i]->state == State::kExited;
    if (lines++ < kMaxLines) {
      if (j - 1 > i) {
        os << "\n  threads " << i << ".." << j - 1 << ": " << s;
      } else {
        os << "\n  thread " << i << ": " << s;
      }
    }
    i = j;
  }
  if (lines > kMaxLines) os << "\n  ... (" << lines - kMaxLines << " more groups)";
  if (at_barrier && exited) {
    os << "\nEvery thread of a block must reach each __syncthreads(); exited threads never will.";
  }
  if (at_barrier && in_warp_op) {
    os << "\nSome threads wait at a block barrier while others wait in a warp collective that "
          "needs them (or the other way round).";
  }
  if (in_warp_op && !at_barrier) {
    os << "\nA warp collective waits for every lane named in its mask (exited lanes never "
          "arrive).";
  }
  return os.str();
}

std::string Runner::describe_fault() const {
  const void* address = fault_address_;
  const char* access = fault_is_write_ == 1 ? "write" : fault_is_write_ == 0 ? "read" : "access";
  const std::string who =
      current_ != nullptr ? thread_name(*current_) : "block " + dim_str(block_idx_);
  std::ostringstream os;
  os << who << ": ";
  for (unsigned i = 0; i < num_threads_; ++i) {
    if (fibers_[i]->stack.in_guard_before(address)) {
      os << "stack overflow: the thread needs more than " << fiber_stack_bytes() / 1024
         << " KiB of stack (raise FASTLLM_SIMT_STACK_KIB; on a GPU this is local memory)";
      return os.str();
    }
  }
  if (fault_signal_ == SIGABRT) {
    os << "the thread called abort(): a failed assert()? (its message is on stderr)";
    return os.str();
  }
  const auto* a = static_cast<const unsigned char*>(address);
  if (smem_.in_guard_after(address)) {
    os << "out-of-bounds " << access << " of dynamic shared memory at byte " << (a - smem_ptr_)
       << " of a " << smem_bytes_ << "-byte buffer";
  } else if (smem_.in_guard_before(address)) {
    os << "out-of-bounds " << access << " of dynamic shared memory at byte offset "
       << (a - smem_ptr_) << " (before its start)";
  } else {
    os << "invalid memory " << access << " at address " << address << " ("
       << (fault_signal_ == SIGBUS ? "SIGBUS" : "SIGSEGV") << ")";
  }
  return os.str();
}

// ---- fault handling ------------------------------------------------------------------

struct sigaction g_previous_segv;
struct sigaction g_previous_bus;
struct sigaction g_previous_abrt;

struct sigaction& previous_action(int signal) {
  return signal == SIGBUS ? g_previous_bus : signal == SIGABRT ? g_previous_abrt : g_previous_segv;
}

void on_fault(int signal, siginfo_t* info, void* context) {
  if (g_threads_in_fibers.load(std::memory_order_relaxed) > 0) {
    Runner* r = tl_active;
    if (r != nullptr && r->executing_fibers()) {
      int is_write = -1;
#if defined(__x86_64__)
      if (signal == SIGSEGV) {
        // Page-fault error code: bit 1 is set for a write.
        is_write = (static_cast<ucontext_t*>(context)->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;
      }
#endif
      r->record_fault(signal, info->si_addr, is_write);
      siglongjmp(r->fault_jump(), 1);
    }
  }
  // Not a kernel's fault: hand it to whoever handled it before us.
  const struct sigaction& previous = previous_action(signal);
  if (previous.sa_flags & SA_SIGINFO) {
    previous.sa_sigaction(signal, info, context);
  } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
    previous.sa_handler(signal);
  } else {
    // Default action: restore it and return; the faulting instruction faults again (and
    // abort() raises SIGABRT again once a handler returned).
    sigaction(signal, &previous, nullptr);
  }
}

void install_fault_handlers() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction action {};
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    // glibc's abort() holds no lock while it raises SIGABRT, so jumping out is safe.
    for (int signal : {SIGSEGV, SIGBUS, SIGABRT}) {
      sigaction(signal, &action, &previous_action(signal));
    }
  });
}

// ---- warp collective combine functions -------------------------------------------------

struct ShuffleArgs {
  uint64_t bits;
  int lane_arg;  // srcLane, delta or laneMask
  int width;
};

// PTX shfl.sync semantics, with CUDA's c operand ((32 - width) << 8 | clamp): a lane reads
// lane j of its width-sized segment; out-of-range j reads the lane's own value; a source
// lane that does not take part gives an undefined value (here: all bits set, NaN).
template <detail::ShuffleMode kMode>
void shuffle_combine(const WarpExchange& ex) {
  using detail::ShuffleMode;
  for (unsigned rest = ex.lanes; rest != 0; rest &= rest - 1) {
    const int lane = __builtin_ctz(rest);
    const ShuffleArgs& a = *static_cast<const ShuffleArgs*>(ex.in[lane]);
    const int segment_mask = kWarpSize - a.width;
    const int b = a.lane_arg & 31;
    const int min_lane = lane & segment_mask;
    const int max_lane = min_lane | ((kMode == ShuffleMode::kUp ? 0 : 31) & ~segment_mask);
    int j = lane;
    bool in_range = true;
    switch (kMode) {
      case ShuffleMode::kIdx: j = min_lane | (b & ~segment_mask); in_range = j <= max_lane; break;
      case ShuffleMode::kUp: j = lane - b; in_range = j >= max_lane; break;
      case ShuffleMode::kDown: j = lane + b; in_range = j <= max_lane; break;
      case ShuffleMode::kXor: j = lane ^ b; in_range = j <= max_lane; break;
    }
    if (!in_range) j = lane;
    const uint64_t value =
        (ex.lanes >> j) & 1u ? static_cast<const ShuffleArgs*>(ex.in[j])->bits : kPoisonBits;
    *static_cast<uint64_t*>(ex.out[lane]) = value;
  }
}

void ballot_combine(const WarpExchange& ex) {
  unsigned ballot = 0;
  for (unsigned rest = ex.lanes; rest != 0; rest &= rest - 1) {
    const int lane = __builtin_ctz(rest);
    if (*static_cast<const int*>(ex.in[lane]) != 0) ballot |= 1u << lane;
  }
  for (unsigned rest = ex.lanes; rest != 0; rest &= rest - 1) {
    *static_cast<unsigned*>(ex.out[__builtin_ctz(rest)]) = ballot;
  }
}

struct ReduceArgs {
  detail::ReduceOp op;
  bool is_signed;
  uint32_t value;
};

void reduce_combine(const WarpExchange& ex) {
  using detail::ReduceOp;
  const int first = __builtin_ctz(ex.lanes);
  const ReduceOp op = static_cast<const ReduceArgs*>(ex.in[first])->op;
  const bool is_signed = static_cast<const ReduceArgs*>(ex.in[first])->is_signed;
  uint32_t acc = static_cast<const ReduceArgs*>(ex.in[first])->value;
  for (unsigned rest = ex.lanes & (ex.lanes - 1); rest != 0; rest &= rest - 1) {
    const uint32_t v = static_cast<const ReduceArgs*>(ex.in[__builtin_ctz(rest)])->value;
    const bool less = is_signed ? static_cast<int32_t>(v) < static_cast<int32_t>(acc) : v < acc;
    const bool greater = is_signed ? static_cast<int32_t>(v) > static_cast<int32_t>(acc) : v > acc;
    switch (op) {
      case ReduceOp::kAdd: acc += v; break;
      case ReduceOp::kMin: acc = less ? v : acc; break;
      case ReduceOp::kMax: acc = greater ? v : acc; break;
      case ReduceOp::kAnd: acc &= v; break;
      case ReduceOp::kOr: acc |= v; break;
      case ReduceOp::kXor: acc ^= v; break;
    }
  }
  for (unsigned rest = ex.lanes; rest != 0; rest &= rest - 1) {
    *static_cast<uint32_t*>(ex.out[__builtin_ctz(rest)]) = acc;
  }
}

// ---- launch ----------------------------------------------------------------------------

cudaError_t check_config(const detail::LaunchConfig& c) {
  const dim3 b = c.block;
  const dim3 g = c.grid;
  if (b.x == 0 || b.y == 0 || b.z == 0 || b.x > 1024 || b.y > 1024 || b.z > 64 ||
      uint64_t(b.x) * b.y * b.z > kMaxThreadsPerBlock) {
    return cudaErrorInvalidConfiguration;
  }
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 2147483647u || g.y > 65535 || g.z > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  size_t limit = kDefaultDynamicSharedBytes;
  {
    Settings& s = settings();
    std::lock_guard<std::mutex> lock(s.mutex);
    auto it = s.max_dynamic_smem.find(c.kernel);
    if (it != s.max_dynamic_smem.end()) limit = it->second;
  }
  if (c.dynamic_smem_bytes > limit) return cudaErrorInvalidValue;
  return cudaSuccess;
}

}  // namespace

// ---- public controls -------------------------------------------------------------------

void set_schedule_seed(std::optional<uint64_t> seed) {
  Settings& s = settings();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.seed = seed;
  s.launches_since_seed = 0;
}

std::optional<uint64_t> schedule_seed() {
  Settings& s = settings();
  std::lock_guard<std::mutex> lock(s.mutex);
  return s.seed;
}

void set_num_threads(int num_threads) {
  if (num_threads < 0) {
    throw std::invalid_argument("set_num_threads: num_threads must be >= 0, got " +
                                std::to_string(num_threads));
  }
  Settings& s = settings();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.num_threads = num_threads;
}

int num_threads() {
  Settings& s = settings();
  std::lock_guard<std::mutex> lock(s.mutex);
  return s.num_threads > 0 ? s.num_threads : omp_get_max_threads();
}

namespace detail {

cudaError_t launch(const LaunchConfig& config, KernelBody body, const void* closure) {
  if (tl_active != nullptr) {
    tl_active->fail(std::string("launch of `") + config.kernel_name +
                    "` from inside a kernel: dynamic parallelism is not emulated");
  }
  const cudaError_t config_error = check_config(config);
  if (config_error != cudaSuccess) {
    tl_last_error = config_error;
    return config_error;
  }
  install_fault_handlers();

  std::optional<uint64_t> seed;
  uint64_t launch_index = 0;
  {
    Settings& s = settings();
    std::lock_guard<std::mutex> lock(s.mutex);
    seed = s.seed;
    launch_index = s.launches_since_seed++;
  }
  const LaunchState state{config, body, closure, seed.has_value(),
                          std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                              std::chrono::duration<double>(timeout_seconds()))};
  const dim3 grid = config.grid;
  const int64_t num_blocks = int64_t(grid.x) * grid.y * grid.z;
  const uint64_t launch_seed = seed ? mix(*seed ^ mix(launch_index)) : 0;

  // A seeded schedule also runs the blocks in a random order.
  std::vector<int64_t> order;
  if (seed) {
    order.resize(static_cast<size_t>(num_blocks));
    for (int64_t i = 0; i < num_blocks; ++i) order[static_cast<size_t>(i)] = i;
    Rng rng{launch_seed};
    for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng.below(i)]);
  }

  const int workers = static_cast<int>(std::min<int64_t>(num_threads(), num_blocks));
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  int64_t error_block = num_blocks;
  std::string error;
#pragma omp parallel for num_threads(workers) schedule(dynamic, 1) if (workers > 1)
  for (int64_t i = 0; i < num_blocks; ++i) {
    if (failed.load(std::memory_order_relaxed)) continue;
    const int64_t b = order.empty() ? i : order[static_cast<size_t>(i)];
    const uint3 block_idx{static_cast<unsigned>(b % grid.x),
                          static_cast<unsigned>((b / grid.x) % grid.y),
                          static_cast<unsigned>(b / (int64_t(grid.x) * grid.y))};
    std::string block_error;
    try {
      block_error = this_thread_runner().run_block(state, block_idx, mix(launch_seed ^ mix(b)));
    } catch (const std::exception& e) {
      block_error = e.what();
    }
    if (!block_error.empty()) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (b < error_block) {  // report the first failing block that ran
        error_block = b;
        error = std::move(block_error);
      }
      failed.store(true, std::memory_order_relaxed);
    }
  }
  if (failed.load()) {
    throw KernelError("SIMT emulation of kernel `" + std::string(config.kernel_name) +
                      "` (grid " + dim_str(grid) + ", block " + dim_str(config.block) +
                      ", dynamic shared memory " + std::to_string(config.dynamic_smem_bytes) +
                      " bytes) launched in " + config.launch_site + ":\n" + error);
  }
  return cudaSuccess;
}

cudaError_t set_max_dynamic_shared_memory(const void* kernel, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > kMaxDynamicSharedBytes) {
    tl_last_error = cudaErrorInvalidValue;
    return cudaErrorInvalidValue;
  }
  Settings& s = settings();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.max_dynamic_smem[kernel] = static_cast<size_t>(bytes);
  return cudaSuccess;
}

const BuiltinVariables& builtins() { return active_runner("threadIdx/blockIdx").current().vars; }

unsigned lane_id() { return active_runner("lane_id").current().lane; }

void warp_exchange(const char* op, unsigned mask, const void* in, void* out,
                   WarpExchangeFn combine) {
  active_runner(op).warp_exchange(op, mask, in, out, combine);
}

int block_barrier(const char* op, int predicate) {
  return active_runner(op).block_barrier(op, predicate);
}

void scheduling_point() { active_runner("an atomic").scheduling_point(); }

unsigned existing_lanes() {
  Runner& r = active_runner("a warp vote");
  return r.existing_lanes(r.current().warp);
}

unsigned active_lanes() {
  Runner& r = active_runner("__activemask");
  return r.active_lanes(r.current().warp);
}

void device_fault(const std::string& what) {
  Runner* r = tl_active;
  if (r == nullptr) throw std::logic_error("SIMT emulation: " + what + " outside a kernel");
  r->fail(what);
}

void device_assert_fail(const char* expr, const char* file, int line) {
  const std::string what = std::string("device-side assertion `") + expr + "` failed at " + file +
                           ":" + std::to_string(line);
  if (tl_active == nullptr) {  // host code after simt_emu.h: behave like assert
    std::fprintf(stderr, "%s\n", what.c_str());
    std::abort();
  }
  tl_active->fail(what);
}

unsigned char* dynamic_shared_memory() {
  return active_runner("dynamic shared memory").dynamic_smem();
}

void async_copy(void* smem_dst, const void* gmem_src, int bytes, bool zero_fill) {
  active_runner("cp_async").async_copy(smem_dst, gmem_src, bytes, zero_fill);
}
void async_copy_commit() { active_runner("cp_async_commit").async_copy_commit(); }
void async_copy_wait(int max_pending_groups) {
  active_runner("cp_async_wait").async_copy_wait(max_pending_groups);
}

uint64_t shuffle(ShuffleMode mode, unsigned mask, uint64_t bits, int lane_arg, int width) {
  static constexpr const char* kNames[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                           "__shfl_xor_sync"};
  static constexpr WarpExchangeFn kCombine[] = {
      shuffle_combine<ShuffleMode::kIdx>, shuffle_combine<ShuffleMode::kUp>,
      shuffle_combine<ShuffleMode::kDown>, shuffle_combine<ShuffleMode::kXor>};
  const int m = static_cast<int>(mode);
  Runner& r = active_runner(kNames[m]);
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    r.fail(std::string(kNames[m]) + ": width must be a power of 2 in [1, 32], got " +
           std::to_string(width));
  }
  const ShuffleArgs args{bits, lane_arg, width};
  uint64_t result = 0;
  r.warp_exchange(kNames[m], mask, &args, &result, kCombine[m]);
  return result;
}

unsigned vote_ballot(const char* op, unsigned mask, int predicate) {
  unsigned result = 0;
  active_runner(op).warp_exchange(op, mask, &predicate, &result, ballot_combine);
  return result;
}

uint32_t reduce(ReduceOp op, bool is_signed, unsigned mask, uint32_t value) {
  static constexpr const char* kNames[] = {"__reduce_add_sync", "__reduce_min_sync",
                                           "__reduce_max_sync", "__reduce_and_sync",
                                           "__reduce_or_sync",  "__reduce_xor_sync"};
  const char* name = kNames[static_cast<int>(op)];
  const ReduceArgs args{op, is_signed, value};
  uint32_t result = 0;
  active_runner(name).warp_exchange(name, mask, &args, &result, reduce_combine);
  return result;
}

}  // namespace detail

// ---- CUDA runtime stand-ins ------------------------------------------------------------
namespace runtime {

cudaError_t get_last_error() {
  const cudaError_t e = tl_last_error;
  tl_last_error = cudaSuccess;
  return e;
}

cudaError_t peek_at_last_error() { return tl_last_error; }

const char* get_error_string(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "unknown error (SIMT emulation)";
  }
}

const char* get_error_name(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaErrorUnknown";
  }
}

cudaError_t memset_async(void* ptr, int value, size_t bytes, cudaStream_t) {
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}

cudaError_t memcpy_async(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}

cudaError_t stream_synchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t device_synchronize() { return cudaSuccess; }

cudaError_t get_device(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) {
    tl_last_error = cudaErrorInvalidDevice;
    return cudaErrorInvalidDevice;
  }
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = kMultiProcessors; break;
    case cudaDevAttrComputeCapabilityMajor: *value = kComputeMajor; break;
    case cudaDevAttrComputeCapabilityMinor: *value = kComputeMinor; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = kMaxThreadsPerBlock; break;
    case cudaDevAttrWarpSize: *value = kWarpSize; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = kDefaultDynamicSharedBytes; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = kMaxDynamicSharedBytes; break;
    default:
      tl_last_error = cudaErrorInvalidValue;
      return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

}  // namespace runtime
}  // namespace simt
}  // namespace fastllm
