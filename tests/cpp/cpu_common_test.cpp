// The CPU building blocks under the kernels: bfloat16 / float16 conversions (cpu_dtypes.h)
// against independent definitions, the AVX2 loads / stores / tails (cpu_avx2.h) bit for bit
// against the scalar conversions, the AVX2 exp against exp in double, and the
// FASTLLM_CPU_ISA switch (cpu_features.h), the huge-page decision for fresh outputs
// (cpu_memory.h: FASTLLM_CPU_HUGE_PAGES and the free page reporting check, on a made-up sysfs)
// and the non-temporal stores' (FASTLLM_CPU_STREAM_STORES, the cache size from a made-up
// sysfs, the residency samples).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "check.h"
#include "common/cpu_dtypes.h"
#include "common/cpu_features.h"
#include "common/cpu_memory.h"
#if defined(__x86_64__) || defined(__i386__)
#include "common/cpu_avx2.h"
#include "common/cpu_avx2_even_odd.h"
#endif

namespace {

using fastllm::cpu::BFloat16;
using fastllm::cpu::bits_of;
using fastllm::cpu::float_of;
using fastllm::cpu::Half;

// Float bit patterns to test conversions on: a stride through all 2^32 patterns, every
// bfloat16 rounding tie (low half exactly 0x8000) and its neighbours, and special values.
std::vector<uint32_t> sample_float_bits() {
  std::vector<uint32_t> bits;
  for (uint64_t u = 0; u < (uint64_t{1} << 32); u += 4099) bits.push_back(static_cast<uint32_t>(u));
  for (uint32_t hi = 0; hi < 0x10000; hi += 7) {
    for (uint32_t lo : {0x7FFFu, 0x8000u, 0x8001u, 0x0001u, 0xFFFFu}) bits.push_back((hi << 16) | lo);
  }
  for (uint32_t special : {0x00000000u, 0x80000000u, 0x7F800000u, 0xFF800000u, 0x7FC00000u,
                           0xFFC00000u, 0x7F800001u, 0xFF800001u, 0x7F7FFFFFu, 0x00000001u,
                           0x477FF000u, 0x477FE000u, 0x33000000u, 0x33000001u, 0x387FC000u}) {
    bits.push_back(special);
  }
  return bits;
}

// Round to nearest even, defined directly: the two bfloat16 neighbours of f and the nearer
// one (the even one on a tie); above the largest finite value the upper neighbour is inf.
uint16_t bfloat16_reference(float f) {
  if (std::isnan(f)) return 0x7FC0;
  const uint32_t u = bits_of(f);
  const uint32_t lo = u & 0xFFFF0000u;
  const uint32_t hi = lo + 0x10000u;
  auto value = [](uint32_t b) {
    if ((b & 0x7FFFFFFFu) == 0x7F800000u) return std::copysign(std::ldexp(1.0, 128), b >> 31 ? -1.0 : 1.0);
    return static_cast<double>(float_of(b));
  };
  const double d_lo = std::fabs(static_cast<double>(f) - value(lo));
  const double d_hi = std::fabs(value(hi) - static_cast<double>(f));
  if (d_lo < d_hi) return static_cast<uint16_t>(lo >> 16);
  if (d_hi < d_lo) return static_cast<uint16_t>(hi >> 16);
  return static_cast<uint16_t>(((lo >> 16) & 1u) == 0 ? lo >> 16 : hi >> 16);
}

TEST_CASE(bfloat16_to_float_is_exact) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = fastllm::cpu::to_float(BFloat16{static_cast<uint16_t>(h)});
    CHECK(bits_of(f) == h << 16, "bfloat16 0x%04x -> float bits 0x%08x", h, bits_of(f));
  }
}

TEST_CASE(float_to_bfloat16_rounds_to_nearest_even) {
  for (uint32_t u : sample_float_bits()) {
    const uint16_t got = fastllm::cpu::to_bfloat16(float_of(u)).bits;
    const uint16_t want = bfloat16_reference(float_of(u));
    CHECK(got == want, "float 0x%08x -> bfloat16 0x%04x, want 0x%04x", u, got, want);
  }
}

#if defined(__FLT16_MAX__)
// GCC's _Float16 conversions (libgcc's soft-float or the hardware's) are the reference.
TEST_CASE(float16_matches_Float16) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    _Float16 ref;
    const uint16_t h16 = static_cast<uint16_t>(h);
    std::memcpy(&ref, &h16, sizeof(ref));
    const float got = fastllm::cpu::to_float(Half{h16});
    const float want = static_cast<float>(ref);
    CHECK(bits_of(got) == bits_of(want) || (std::isnan(got) && std::isnan(want)),
          "float16 0x%04x -> %g, want %g", h, got, want);
  }
  for (uint32_t u : sample_float_bits()) {
    const float f = float_of(u);
    const uint16_t got = fastllm::cpu::to_half(f).bits;
    const _Float16 ref = static_cast<_Float16>(f);
    uint16_t want;
    std::memcpy(&want, &ref, sizeof(want));
    const bool both_nan = std::isnan(f) && (got & 0x7C00u) == 0x7C00u && (got & 0x03FFu) != 0;
    CHECK(got == want || both_nan, "float 0x%08x -> float16 0x%04x, want 0x%04x", u, got, want);
  }
}
#endif

// Puts an environment variable back as it was (set or unset) at the end of a scope.
class RestoredEnv {
 public:
  explicit RestoredEnv(const char* name) : name_(name) {
    const char* value = std::getenv(name);
    was_set_ = value != nullptr;
    if (was_set_) value_ = value;
  }
  ~RestoredEnv() {
    if (was_set_) {
      setenv(name_, value_.c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }
  RestoredEnv(const RestoredEnv&) = delete;
  RestoredEnv& operator=(const RestoredEnv&) = delete;

 private:
  const char* name_;
  bool was_set_ = false;
  std::string value_;
};

// Whether f() throws std::invalid_argument whose message names value (quoted).
template <class F>
bool throws_naming(F f, const std::string& value) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return std::string(e.what()).find("'" + value + "'") != std::string::npos;
  }
  return false;
}

TEST_CASE(cpu_isa_switch) {
  const RestoredEnv restore("FASTLLM_CPU_ISA");
  using fastllm::cpu::CpuIsa;
  setenv("FASTLLM_CPU_ISA", "scalar", 1);
  CHECK(fastllm::cpu::detect_cpu_isa() == CpuIsa::kScalar, "FASTLLM_CPU_ISA=scalar not honoured");
  setenv("FASTLLM_CPU_ISA", "avx2", 1);
  const CpuIsa best = fastllm::cpu::cpu_has_avx2_fma_f16c() ? CpuIsa::kAvx2 : CpuIsa::kScalar;
  CHECK(fastllm::cpu::detect_cpu_isa() == best, "FASTLLM_CPU_ISA=avx2 must mean the best available");
  setenv("FASTLLM_CPU_ISA", "avx512", 1);
  CHECK(fastllm::cpu::detect_cpu_isa() == best, "FASTLLM_CPU_ISA=avx512 must keep AVX2");
  CHECK(fastllm::cpu::detect_cpu_avx512() == fastllm::cpu::cpu_has_avx512_bf16(),
        "FASTLLM_CPU_ISA=avx512 must allow AVX-512 where the CPU has it");
  CHECK(!fastllm::cpu::detect_cpu_amx(), "FASTLLM_CPU_ISA=avx512 must exclude AMX");
  CHECK(!fastllm::cpu::detect_cpu_avx512_dot(),
        "FASTLLM_CPU_ISA=avx512 must exclude the vdpbf16ps products");
  setenv("FASTLLM_CPU_ISA", "avx512bf16", 1);
  CHECK(fastllm::cpu::detect_cpu_avx512_dot() == fastllm::cpu::cpu_has_avx512_bf16(),
        "FASTLLM_CPU_ISA=avx512bf16 must allow the vdpbf16ps products where the CPU has them");
  CHECK(!fastllm::cpu::detect_cpu_amx(), "FASTLLM_CPU_ISA=avx512bf16 must exclude AMX");
  setenv("FASTLLM_CPU_ISA", "avx2", 1);
  CHECK(!fastllm::cpu::detect_cpu_avx512(), "FASTLLM_CPU_ISA=avx2 must exclude AVX-512");
  CHECK(!fastllm::cpu::detect_cpu_avx512_dot(), "FASTLLM_CPU_ISA=avx2 must exclude vdpbf16ps");
  setenv("FASTLLM_CPU_ISA", "amx", 1);
  CHECK(fastllm::cpu::detect_cpu_avx512() == fastllm::cpu::cpu_has_avx512_bf16(),
        "FASTLLM_CPU_ISA=amx must allow AVX-512 where the CPU has it");
  // Unset or amx: the vdpbf16ps products only on CPUs without AMX-BF16 (there the tiles win).
  CHECK(fastllm::cpu::detect_cpu_avx512_dot() ==
            (fastllm::cpu::cpu_has_avx512_bf16() && !fastllm::cpu::cpu_has_amx_bf16()),
        "FASTLLM_CPU_ISA=amx must take the vdpbf16ps products exactly on AVX512-BF16 CPUs "
        "without AMX-BF16");
  setenv("FASTLLM_CPU_ISA", "avx1024", 1);
  CHECK(throws_naming([] { fastllm::cpu::detect_cpu_isa(); }, "avx1024"),
        "FASTLLM_CPU_ISA=avx1024 must throw std::invalid_argument naming the value");
}

#if defined(__linux__)
// A made-up sysfs under a temporary directory: the virtio_balloon driver's directory with one
// bound device whose features file holds `features` ("" = no device), removed at the end.
class FakeSysfs {
 public:
  explicit FakeSysfs(const std::string& features) {
    char tmpl[] = "/tmp/fastllm_sysfs_XXXXXX";
    root_ = mkdtemp(tmpl);
    driver_ = root_ + "/bus/virtio/drivers/virtio_balloon";
    run("mkdir -p '" + driver_ + "'");
    std::ofstream(driver_ + "/uevent") << "";  // a file beside the devices, skipped
    if (!features.empty()) {
      run("mkdir -p '" + driver_ + "/virtio3'");
      std::ofstream(driver_ + "/virtio3/features") << features << "\n";
    }
  }
  ~FakeSysfs() { run("rm -rf '" + root_ + "'"); }
  FakeSysfs(const FakeSysfs&) = delete;
  FakeSysfs& operator=(const FakeSysfs&) = delete;
  const std::string& root() const { return root_; }

 private:
  static void run(const std::string& command) {
    if (std::system(command.c_str()) != 0) std::fprintf(stderr, "failed: %s\n", command.c_str());
  }
  std::string root_, driver_;
};

TEST_CASE(free_page_reporting_from_sysfs) {
  using fastllm::cpu::free_page_reporting;
  // This machine's feature string (bits 1, 2, 5, 7: stats, deflate on OOM, reporting, ...).
  const std::string reporting = "0110010100000000000000000000000010000000";
  const std::string no_reporting = "0110000100000000000000000000000010000000";
  CHECK(free_page_reporting(FakeSysfs(reporting).root()), "bit 5 set must mean reporting");
  CHECK(!free_page_reporting(FakeSysfs(no_reporting).root()), "bit 5 clear: no reporting");
  CHECK(!free_page_reporting(FakeSysfs("01100").root()), "a short features string: no bit 5");
  CHECK(!free_page_reporting(FakeSysfs("").root()), "a driver without devices: no reporting");
  CHECK(!free_page_reporting("/nonexistent/sysfs"), "no virtio_balloon driver: no reporting");
}

TEST_CASE(huge_pages_switch) {
  const RestoredEnv restore("FASTLLM_CPU_HUGE_PAGES");
  using fastllm::cpu::detect_huge_pages;
  using fastllm::cpu::HugePages;
  const FakeSysfs reporting("0110010100");
  const FakeSysfs quiet("0110000100");
  unsetenv("FASTLLM_CPU_HUGE_PAGES");
  CHECK(detect_huge_pages(quiet.root()) == HugePages::kAdvised, "unset: advised");
  CHECK(detect_huge_pages(reporting.root()) == HugePages::kFreePageReporting,
        "unset under free page reporting: left to the system");
  for (const char* automatic : {"", "auto"}) {
    setenv("FASTLLM_CPU_HUGE_PAGES", automatic, 1);
    CHECK(detect_huge_pages(quiet.root()) == HugePages::kAdvised, "'%s': advised", automatic);
    CHECK(detect_huge_pages(reporting.root()) == HugePages::kFreePageReporting,
          "'%s' under free page reporting: left to the system", automatic);
  }
  setenv("FASTLLM_CPU_HUGE_PAGES", "1", 1);
  CHECK(detect_huge_pages(reporting.root()) == HugePages::kForced, "=1 advises anyway");
  setenv("FASTLLM_CPU_HUGE_PAGES", "0", 1);
  CHECK(detect_huge_pages(quiet.root()) == HugePages::kOff, "=0 never advises");
  setenv("FASTLLM_CPU_HUGE_PAGES", "yes", 1);
  CHECK(throws_naming([&] { detect_huge_pages(quiet.root()); }, "yes"),
        "FASTLLM_CPU_HUGE_PAGES=yes must throw std::invalid_argument naming the value");
}

// A made-up sysfs cache description for cpu 0: one indexN directory per (level, size) entry.
class FakeCacheSysfs {
 public:
  explicit FakeCacheSysfs(const std::vector<std::pair<int, std::string>>& caches) {
    char tmpl[] = "/tmp/fastllm_sysfs_XXXXXX";
    root_ = mkdtemp(tmpl);
    for (size_t i = 0; i < caches.size(); ++i) {
      const std::string dir = root_ + "/devices/system/cpu/cpu0/cache/index" + std::to_string(i);
      if (std::system(("mkdir -p '" + dir + "'").c_str()) != 0) std::fprintf(stderr, "mkdir\n");
      std::ofstream(dir + "/level") << caches[i].first << "\n";
      std::ofstream(dir + "/size") << caches[i].second << "\n";
    }
  }
  ~FakeCacheSysfs() {
    if (std::system(("rm -rf '" + root_ + "'").c_str()) != 0) std::fprintf(stderr, "rm\n");
  }
  FakeCacheSysfs(const FakeCacheSysfs&) = delete;
  FakeCacheSysfs& operator=(const FakeCacheSysfs&) = delete;
  const std::string& root() const { return root_; }

 private:
  std::string root_;
};

TEST_CASE(last_level_cache_from_sysfs) {
  using fastllm::cpu::last_level_cache_bytes;
  using fastllm::cpu::stream_stores_min_bytes_for;
  constexpr int64_t kMiB = int64_t{1} << 20;
  // The Zen 4 guest's: L1d, L1i, L2, L3 (glibc's sysconf said 320 MiB for the last).
  const FakeCacheSysfs zen4({{1, "32K"}, {1, "32K"}, {2, "1024K"}, {3, "32768K"}});
  CHECK(last_level_cache_bytes(zen4.root()) == 32 * kMiB, "got %lld",
        static_cast<long long>(last_level_cache_bytes(zen4.root())));
  const FakeCacheSysfs l2_only({{1, "48K"}, {2, "2048K"}});
  CHECK(last_level_cache_bytes(l2_only.root()) == 2 * kMiB, "no L3: the L2");
  const FakeCacheSysfs units({{3, "8M"}, {2, "512"}});
  CHECK(last_level_cache_bytes(units.root()) == 8 * kMiB, "an M suffix, a level out of order");
  const FakeCacheSysfs broken({{3, "none"}});
  CHECK(last_level_cache_bytes(broken.root()) == 0, "an unreadable size: unknown");
  CHECK(last_level_cache_bytes("/nonexistent/sysfs") == 0, "no cache directory: unknown");
  CHECK(stream_stores_min_bytes_for(32 * kMiB) == 16 * kMiB, "half a 32 MiB L3");
  CHECK(stream_stores_min_bytes_for(8 * kMiB) == 4 * kMiB, "half an 8 MiB L3");
  CHECK(stream_stores_min_bytes_for(320 * kMiB) == 16 * kMiB, "at most 16 MiB");
  CHECK(stream_stores_min_bytes_for(0) == 16 * kMiB, "unknown: 16 MiB");
}

TEST_CASE(stream_stores_switch) {
  const RestoredEnv restore("FASTLLM_CPU_STREAM_STORES");
  using fastllm::cpu::detect_stream_stores;
  using fastllm::cpu::StreamStores;
  unsetenv("FASTLLM_CPU_STREAM_STORES");
  CHECK(detect_stream_stores() == StreamStores::kAuto, "unset: auto");
  for (const char* automatic : {"", "auto"}) {
    setenv("FASTLLM_CPU_STREAM_STORES", automatic, 1);
    CHECK(detect_stream_stores() == StreamStores::kAuto, "'%s': auto", automatic);
  }
  setenv("FASTLLM_CPU_STREAM_STORES", "1", 1);
  CHECK(detect_stream_stores() == StreamStores::kOn, "=1: on");
  setenv("FASTLLM_CPU_STREAM_STORES", "0", 1);
  CHECK(detect_stream_stores() == StreamStores::kOff, "=0: off");
  setenv("FASTLLM_CPU_STREAM_STORES", "always", 1);
  CHECK(throws_naming([] { detect_stream_stores(); }, "always"),
        "FASTLLM_CPU_STREAM_STORES=always must throw std::invalid_argument naming the value");
}

// pages_resident's samples, and what auto (the process's setting, decided at first use)
// makes of fresh, touched and misaligned buffers.
TEST_CASE(stream_outputs_on_fresh_and_reused_pages) {
  using fastllm::cpu::pages_resident;
  using fastllm::cpu::stream_outputs;
  const int64_t page = sysconf(_SC_PAGESIZE);
  const int64_t bytes = std::max<int64_t>(fastllm::cpu::stream_stores_min_bytes(), 64 * page);
  void* mapped = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(mapped != MAP_FAILED, "mmap of %lld bytes", static_cast<long long>(bytes));
  if (mapped == MAP_FAILED) return;
  char* buffer = static_cast<char*>(mapped);
  CHECK(!pages_resident(buffer, bytes), "a fresh mapping is not resident");
  buffer[0] = 1;
  CHECK(!pages_resident(buffer, bytes), "only the first page touched: not resident");
  buffer[bytes / 2 - 1] = 1;  // the two pages around the middle
  buffer[bytes / 2] = 1;
  CHECK(!pages_resident(buffer, bytes), "the last page untouched: not resident");
  buffer[bytes - 1] = 1;
  CHECK(pages_resident(buffer, bytes), "first, middle and last pages touched: resident");
  CHECK(!pages_resident(nullptr, bytes) && !pages_resident(buffer, 0), "nothing to sample");
  if (fastllm::cpu::stream_stores() == fastllm::cpu::StreamStores::kAuto) {
    std::memset(buffer, 1, bytes);
    CHECK(stream_outputs({buffer}, bytes), "a large resident output streams");
    CHECK(stream_outputs({buffer, nullptr}, bytes), "absent outputs are skipped");
    CHECK(!stream_outputs({buffer + 32}, bytes - 64), "a misaligned output does not");
    CHECK(!stream_outputs({buffer}, page), "a small output does not");
    const int64_t half = fastllm::cpu::stream_stores_min_bytes() / 2 / 64 * 64;
    CHECK(!stream_outputs({buffer, buffer + half}, half),
          "two outputs of half the size each do not: the size is per output");
    CHECK(!stream_outputs({}, bytes) && !stream_outputs({nullptr}, bytes), "no output");
    CHECK(madvise(buffer, bytes, MADV_DONTNEED) == 0, "madvise(MADV_DONTNEED)");
    CHECK(!stream_outputs({buffer}, bytes), "fresh pages again: plain stores");
  }
  munmap(mapped, bytes);
}
#endif

TEST_CASE(amx_emulation_switch) {
  const RestoredEnv restore_isa("FASTLLM_CPU_ISA");
  const RestoredEnv restore_emulation("FASTLLM_CPU_EMULATE_AMX");
  unsetenv("FASTLLM_CPU_ISA");
  unsetenv("FASTLLM_CPU_EMULATE_AMX");
  CHECK(!fastllm::cpu::detect_amx_emulation(), "the AMX emulation must be off when unset");
  setenv("FASTLLM_CPU_EMULATE_AMX", "0", 1);
  CHECK(!fastllm::cpu::detect_amx_emulation(), "FASTLLM_CPU_EMULATE_AMX=0 must mean off");
  setenv("FASTLLM_CPU_EMULATE_AMX", "1", 1);
  CHECK(fastllm::cpu::detect_amx_emulation() == fastllm::cpu::cpu_has_avx512_bf16(),
        "FASTLLM_CPU_EMULATE_AMX=1 must turn the emulation on exactly where AVX-512 runs");
  setenv("FASTLLM_CPU_ISA", "avx512", 1);
  CHECK(!fastllm::cpu::detect_amx_emulation(),
        "FASTLLM_CPU_ISA=avx512 (FMAs only) must keep the emulation off");
  unsetenv("FASTLLM_CPU_ISA");
  setenv("FASTLLM_CPU_EMULATE_AMX", "yes", 1);
  CHECK(throws_naming([] { fastllm::cpu::detect_amx_emulation(); }, "yes"),
        "FASTLLM_CPU_EMULATE_AMX=yes must throw std::invalid_argument naming the value");
}

#if defined(__x86_64__) || defined(__i386__)
FASTLLM_AVX2_BEGIN

void check_avx2_conversions() {
  namespace avx2 = fastllm::cpu::avx2;
  const std::vector<uint32_t> bits = sample_float_bits();
  for (size_t i = 0; i + 8 <= bits.size(); i += 8) {
    float in[8];
    for (int k = 0; k < 8; ++k) in[k] = float_of(bits[i + k]);
    BFloat16 bf[8];
    Half hf[8];
    avx2::store(bf, avx2::load(in));
    avx2::store(hf, avx2::load(in));
    float bf_back[8], hf_back[8];
    avx2::store(bf_back, avx2::load(bf));
    avx2::store(hf_back, avx2::load(hf));
    for (int k = 0; k < 8; ++k) {
      const uint16_t want_bf = fastllm::cpu::to_bfloat16(in[k]).bits;
      CHECK(bf[k].bits == want_bf, "avx2 float 0x%08x -> bfloat16 0x%04x, want 0x%04x",
            bits[i + k], bf[k].bits, want_bf);
      CHECK(bits_of(bf_back[k]) == bits_of(fastllm::cpu::to_float(bf[k])), "avx2 bfloat16 load");
      const uint16_t want_h = fastllm::cpu::to_half(in[k]).bits;
      const bool nan_ok = std::isnan(in[k]) && std::isnan(fastllm::cpu::to_float(hf[k]));
      CHECK(hf[k].bits == want_h || nan_ok, "avx2 float 0x%08x -> float16 0x%04x, want 0x%04x",
            bits[i + k], hf[k].bits, want_h);
      const float want_back = fastllm::cpu::to_float(hf[k]);
      CHECK(bits_of(hf_back[k]) == bits_of(want_back) || (std::isnan(hf_back[k]) && std::isnan(want_back)),
            "avx2 float16 0x%04x load", hf[k].bits);
    }
  }
}

void check_avx2_tails() {
  namespace avx2 = fastllm::cpu::avx2;
  const float src[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  const double src_d[4] = {1, 2, 3, 4};
  for (int n = 1; n <= 8; ++n) {
    float lanes[8];
    avx2::store(lanes, avx2::loadn(src, n));
    for (int k = 0; k < 8; ++k) {
      CHECK(lanes[k] == (k < n ? src[k] : 0.0f), "loadn(float, %d) lane %d = %g", n, k, lanes[k]);
    }
    float dst[9];
    std::fill(dst, dst + 9, -1.0f);
    avx2::storen(dst, avx2::load(src), n);
    for (int k = 0; k < 9; ++k) {
      CHECK(dst[k] == (k < n ? src[k] : -1.0f), "storen(float, %d) element %d = %g", n, k, dst[k]);
    }
    avx2::store(lanes, avx2::keep_first(avx2::load(src), n));
    for (int k = 0; k < 8; ++k) {
      CHECK(lanes[k] == (k < n ? src[k] : 0.0f), "keep_first(float, %d) lane %d = %g", n, k, lanes[k]);
    }
    BFloat16 bsrc[8], bdst[9];
    for (int k = 0; k < 8; ++k) bsrc[k] = fastllm::cpu::to_bfloat16(src[k]);
    std::fill(bdst, bdst + 9, BFloat16{0xFFFF});
    avx2::storen(bdst, avx2::loadn(bsrc, n), n);
    for (int k = 0; k < 9; ++k) {
      CHECK(bdst[k].bits == (k < n ? bsrc[k].bits : 0xFFFF), "bfloat16 loadn/storen(%d) element %d", n, k);
    }
  }
  for (int n = 1; n <= 4; ++n) {
    double lanes[4];
    avx2::store(lanes, avx2::keep_first(avx2::loadn(src_d, n), n));
    for (int k = 0; k < 4; ++k) {
      CHECK(lanes[k] == (k < n ? src_d[k] : 0.0), "loadn/keep_first(double, %d) lane %d", n, k);
    }
  }
  CHECK(avx2::hsum(avx2::load(src)) == 36.0f, "hsum(float)");
  CHECK(avx2::hsum(avx2::load(src_d)) == 10.0, "hsum(double)");
}

// The even/odd layout (cpu_avx2_even_odd.h): loads and stores of bfloat16 bit for bit as
// the scalar conversions, in element order (the even/odd split undone by the store), tails,
// keep_first, the order to_even_odd writes a float array in, and hsum.
void check_avx2_even_odd() {
  namespace eo = fastllm::cpu::avx2_even_odd;
  std::vector<uint32_t> bits = sample_float_bits();
  while (bits.size() % 16 != 0) bits.push_back(0);  // whole blocks: the specials come last
  for (size_t i = 0; i + 16 <= bits.size(); i += 16) {
    float in[16];
    for (int k = 0; k < 16; ++k) in[k] = float_of(bits[i + k]);
    // float -> bfloat16 through the layout: load the floats in even/odd order, store.
    eo::EvenOddFloat ordered[16];
    eo::to_even_odd(in, 16, ordered);
    BFloat16 bf[16];
    eo::store(bf, eo::load(ordered));
    for (int k = 0; k < 16; ++k) {
      const uint16_t want = fastllm::cpu::to_bfloat16(in[k]).bits;
      CHECK(bf[k].bits == want, "even/odd float 0x%08x -> bfloat16 0x%04x, want 0x%04x",
            bits[i + k], bf[k].bits, want);
    }
    // bfloat16 -> float: the even elements in .even, the odd ones in .odd, exactly.
    const eo::Vec16 back = eo::load(bf);
    float even[8], odd[8];
    _mm256_storeu_ps(even, back.even);
    _mm256_storeu_ps(odd, back.odd);
    for (int k = 0; k < 16; ++k) {
      const float got = k % 2 == 0 ? even[k / 2] : odd[k / 2];
      CHECK(bits_of(got) == bits_of(fastllm::cpu::to_float(bf[k])), "even/odd bfloat16 load %d", k);
    }
  }
  BFloat16 src[16];
  float values[16];
  for (int k = 0; k < 16; ++k) {
    values[k] = static_cast<float>(k + 1);
    src[k] = fastllm::cpu::to_bfloat16(values[k]);
  }
  for (int n = 1; n <= 16; ++n) {
    BFloat16 dst[17];
    std::fill(dst, dst + 17, BFloat16{0xFFFF});
    eo::storen(dst, eo::loadn(src, n), n);
    for (int k = 0; k < 17; ++k) {
      CHECK(dst[k].bits == (k < n ? src[k].bits : 0xFFFF), "even/odd loadn/storen(%d) element %d",
            n, k);
    }
    BFloat16 kept[16];
    eo::store(kept, eo::keep_first(eo::load(src), n));
    for (int k = 0; k < 16; ++k) {
      CHECK(fastllm::cpu::to_float(kept[k]) == (k < n ? values[k] : 0.0f),
            "even/odd keep_first(%d) element %d", n, k);
    }
    // A float array of n elements: padded to a block with zeros, read in the rows' order.
    eo::EvenOddFloat ordered[16];
    std::fill(ordered, ordered + 16, eo::EvenOddFloat{-1.0f});
    eo::to_even_odd(values, n, ordered);
    BFloat16 row[16];
    eo::store(row, eo::loadn(ordered, n));
    for (int k = 0; k < 16; ++k) {
      CHECK(fastllm::cpu::to_float(row[k]) == (k < n ? values[k] : 0.0f),
            "to_even_odd(%d) element %d", n, k);
    }
  }
  CHECK(eo::even_odd_size(1) == 16 && eo::even_odd_size(16) == 16 && eo::even_odd_size(17) == 32,
        "even_odd_size");
  CHECK(eo::hsum(eo::load(src)) == 136.0f, "even/odd hsum");
  CHECK(eo::hsum(-eo::load(src)) == -136.0f, "even/odd negation");
}

// avx2::exp_ps against exp in double: within 2 ulp over the sampled floats whose exp is a
// normal float (every float in (-87.33, 88.37) measured 1.999 at most), exactly 1 at 0, 0 for
// -inf and below -87.68 (2^n's biased exponent no longer positive), a denormal within 2^-147
// between, NaN for NaN, and the largest result (x clamped at 88.38) for anything above.
void check_avx2_exp() {
  namespace avx2 = fastllm::cpu::avx2;
  auto exp8 = [](float x) {
    float out[8];
    _mm256_storeu_ps(out, avx2::exp_ps(_mm256_set1_ps(x)));
    return out[0];
  };
  for (uint32_t b : sample_float_bits()) {
    const float x = float_of(b);
    if (std::isnan(x)) {
      CHECK(std::isnan(exp8(x)), "exp_ps(NaN 0x%08x) is not NaN", b);
      continue;
    }
    const float got = exp8(x);
    const double want = std::exp(static_cast<double>(x));
    if (x > -87.33f && x <= 88.3762626647949f) {
      int e = 0;
      std::frexp(want, &e);
      const double ulps = std::fabs(got - want) / std::ldexp(1.0, e - 24);
      CHECK(ulps <= 2.0, "exp_ps(%.9g) = %.9g, exp %.9g: %.3f ulp", x, got, want, ulps);
    } else if (x > 88.3762626647949f) {
      CHECK(got == exp8(88.3762626647949f) && std::isfinite(got), "exp_ps(%.9g) = %.9g", x, got);
    } else if (x < -87.68f) {
      CHECK(got == 0.0f, "exp_ps(%.9g) = %.9g, not 0", x, got);
    } else {
      CHECK(std::fabs(got - want) <= std::ldexp(1.0, -147), "exp_ps(%.9g) = %.9g, exp %.9g", x,
            got, want);
    }
  }
  CHECK(exp8(0.0f) == 1.0f && exp8(-0.0f) == 1.0f, "exp_ps(0) is not 1");
  CHECK(exp8(-std::numeric_limits<float>::infinity()) == 0.0f, "exp_ps(-inf) is not 0");
  CHECK(exp8(-100.5f) == 0.0f && exp8(-87.7f) == 0.0f, "exp_ps below -87.68 is not 0");
}

FASTLLM_AVX2_END

TEST_CASE(avx2_conversions_match_scalar) {
  if (fastllm::cpu::cpu_has_avx2_fma_f16c()) check_avx2_conversions();
}

TEST_CASE(avx2_partial_vectors) {
  if (fastllm::cpu::cpu_has_avx2_fma_f16c()) check_avx2_tails();
}

TEST_CASE(avx2_even_odd_bfloat16) {
  if (fastllm::cpu::cpu_has_avx2_fma_f16c()) check_avx2_even_odd();
}

TEST_CASE(avx2_exp) {
  if (fastllm::cpu::cpu_has_avx2_fma_f16c()) check_avx2_exp();
}
#endif

}  // namespace

TEST_MAIN()
