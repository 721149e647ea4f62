// Cache-line-aligned storage for the CPU kernels' own scratch buffers (packed tiles, score
// and output tiles). malloc aligns to 16 bytes only -- and a buffer large enough to be
// mmapped starts 16 bytes into its page -- so a std::vector's 64-byte rows would straddle
// two cache lines on every vector load and store and every AMX tile row, and where each
// buffer happened to start (which differs from process to process) decided how much of that
// a run paid. torch's tensors are already 64-byte aligned (c10's CPU allocator).
#pragma once

#include <cstddef>
#include <new>
#include <utility>
#include <vector>

namespace fastllm {
namespace cpu {

inline constexpr std::size_t kCacheLine = 64;

template <class T>
struct CacheLineAllocator {
  using value_type = T;

  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) noexcept {}

  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{kCacheLine}));
  }
  void deallocate(T* p, std::size_t) noexcept {
    ::operator delete(p, std::align_val_t{kCacheLine});
  }

  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const noexcept {
    return true;
  }
  template <class U>
  bool operator!=(const CacheLineAllocator<U>&) const noexcept {
    return false;
  }
};

// A std::vector whose data() is 64-byte aligned.
template <class T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

// CacheLineAllocator whose vectors leave trivial elements uninitialised when sized (vector(n),
// resize): for buffers whose every element read was written first, such as the attention
// kernels' packed tile caches. Those are sized for the whole key range -- a KV cache's capacity
// in decoding -- and zero-filling them took ~20 us of every call, more than one decoded
// token's attention itself.
template <class T>
struct UninitCacheLineAllocator : CacheLineAllocator<T> {
  UninitCacheLineAllocator() = default;
  template <class U>
  UninitCacheLineAllocator(const UninitCacheLineAllocator<U>&) noexcept {}

  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    if constexpr (sizeof...(Args) == 0) {
      ::new (static_cast<void*>(p)) U;  // default-initialisation: none for trivial types
    } else {
      ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
    }
  }
};

template <class T>
using UninitAlignedVector = std::vector<T, UninitCacheLineAllocator<T>>;

}  // namespace cpu
}  // namespace fastllm
