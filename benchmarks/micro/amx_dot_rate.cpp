// How fast the AMX tile unit multiplies, by element type and data, and what AVX-512 work beside
// it costs: the measurements behind two choices of the CPU attention kernel's 16-bit paths
// (csrc/attention/attention_cpu_amx.h, attention_cpu.cpp).
//
//   1. Product rate: C += A B on 16 x 32 tiles (tdpbf16ps, and tdpfp16ps where the CPU has
//      AMX-FP16), four independent accumulators, operands held in tile registers, on zero,
//      random normal and {0.5, 1} data. On the Granite Rapids-class Xeon of 2026-12-05 a
//      bfloat16 product took 13.1-13.2 TSC cycles (2.2 GHz TSC) whatever the data, a float16
//      one 17.1 on any nonzero data (13.0 on zeros); in a later hour, the core clocked
//      higher, 9.6 and 11.9 (9.6). float16 products take 1.24-1.31x the time of bfloat16
//      ones, so float16 attention, whose products are most of its time, runs ~15 % behind
//      bfloat16 on the same shapes.
//   2. Tile work beside vector work: products (operands in tiles), a tile load or a tile store
//      per iteration, alone and with 32 independent AVX-512 FMAs per iteration. There, 2
//      products (26.5 TSC cycles) took 34 with the FMAs (11.5 alone): they mostly overlap. A
//      tile load (6.2) took 23.9 with them and a tile store (11.8) 28.2, more than the two one
//      after the other (the later hour: FMAs 9.1, products 19.2 and 23.8 with them, a load
//      4.9 and 18.1, a store 9.1 and 22.0): no vector work runs beside a tile load or store
//      (each likely a microcoded sequence of 16 row accesses). So the kernel keeps its float32
//      softmax out of the products' way instead of interleaving the two (interleaving
//      measured 0.79-0.94x; prefetching the tiles' rows into L1 as well, slower still), and a
//      large part of a product's cost is its share of tile loads and stores: 1.5 loads and 0.5
//      stores per product in a 64-deep score product in two-set jobs (1 load in the pair jobs
//      of two strips), against ~1 load and few stores in a GEMM's long K.
//
// Build and run (x86-64 Linux, GCC >= 11; the measuring code carries its own target
// attributes, and the float16 product is written as its bytes, so no -m flags are needed), or
// through CMakeLists.txt (target amx_dot_rate, also run by ctest):
//   g++ -O2 -o /tmp/amx_dot_rate benchmarks/micro/amx_dot_rate.cpp && /tmp/amx_dot_rate
// The figures are cycles of the time-stamp counter (rdtsc), best of several runs, and GFLOP/s
// of wall time. A machine shared with other work moves them by a few %; its clock moved them
// by a third between two hours of 2026-12-05 (the ratios held).

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>

namespace {

bool cpu_has(unsigned leaf, unsigned subleaf, int reg, int bit) {
  unsigned r[4];
  if (!__get_cpuid_count(leaf, subleaf, &r[0], &r[1], &r[2], &r[3])) return false;
  return (r[reg] >> bit) & 1u;
}

// CPUID.(7,0):EDX[22] AMX-BF16, EDX[24] AMX-TILE; CPUID.(7,1):EAX[21] AMX-FP16.
bool has_amx_bf16() { return cpu_has(7, 0, 3, 22) && cpu_has(7, 0, 3, 24); }
bool has_amx_fp16() { return cpu_has(7, 1, 0, 21); }

}  // namespace

// The FMAs' results, stored where the compiler must keep them (external linkage).
float fma_results[16];

// Everything from here to main() is built for the AMX CPUs it measures; main() checks CPUID
// first, so that the program runs (and measures nothing) on any x86-64 CPU.
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,fma,f16c")

namespace {

// tdpfp16ps tmm(C), tmm(A), tmm(B): VEX.128.F2.0F38.W0 5C /r (attention_cpu_amx.h).
#define AMX_TDPFP16PS(C, A, B)                                                        \
  __asm__ volatile(".byte 0xc4, 0xe2, %c0, 0x5c, %c1" ::"i"(0x03 | ((~(B)&15) << 3)), \
                   "i"(0xc0 | ((C) << 3) | (A)))

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

alignas(64) uint16_t operand[4][512];  // tiles A0, A1, B0, B1: 16 rows of 32 elements
alignas(64) float sink[256];

enum class Type { kBFloat16, kFloat16 };
enum class Data { kZeros, kRandom, kHalvesAndOnes };

uint16_t bits_of(float x, Type type) {
  if (type == Type::kFloat16) return _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);  // to nearest even
}

void fill_and_load(Type type, Data data) {
  std::mt19937 gen(1);
  std::normal_distribution<float> normal;
  for (int t = 0; t < 4; ++t) {
    for (int i = 0; i < 512; ++i) {
      const float x = data == Data::kZeros    ? 0.0f
                      : data == Data::kRandom ? normal(gen)
                                              : (i % 2 ? 1.0f : 0.5f);
      operand[t][i] = bits_of(x, type);
    }
  }
  _tile_loadd(4, operand[0], 64);
  _tile_loadd(5, operand[1], 64);
  _tile_loadd(6, operand[2], 64);
  _tile_loadd(7, operand[3], 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

struct Timing {
  double tsc_cycles = 1e300;  // per unit of work, best run
  double seconds = 1e300;     // of the best run
};

template <class Body>
Timing best_of(int runs, long iterations, double units_per_iteration, Body body) {
  Timing best;
  for (int r = 0; r < runs; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    const uint64_t c0 = __rdtsc();
    body(iterations);
    const uint64_t c1 = __rdtsc();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double c = static_cast<double>(c1 - c0) / (iterations * units_per_iteration);
    if (c < best.tsc_cycles) best = {c, s};
  }
  return best;
}

constexpr double kFlopPerProduct = 2.0 * 16 * 16 * 32;

void product_rate(Type type, Data data) {
  fill_and_load(type, data);
  const long n = 1000000;
  const Timing t = best_of(5, n, 4, [type](long iterations) {
    if (type == Type::kFloat16) {
      for (long i = 0; i < iterations; ++i) {
        AMX_TDPFP16PS(0, 4, 6);
        AMX_TDPFP16PS(1, 4, 7);
        AMX_TDPFP16PS(2, 5, 6);
        AMX_TDPFP16PS(3, 5, 7);
      }
    } else {
      for (long i = 0; i < iterations; ++i) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, sink, 64);
  });
  const char* data_name = data == Data::kZeros    ? "zeros"
                          : data == Data::kRandom ? "random normal"
                                                  : "0.5 and 1";
  std::printf("  %-8s %-16s %6.2f TSC cycles per product  %7.0f GFLOP/s\n",
              type == Type::kFloat16 ? "float16" : "bfloat16", data_name, t.tsc_cycles,
              kFlopPerProduct * 4 * n / t.seconds * 1e-9);
}

// One iteration: `products` products (accumulators 0 and 1, operands in tiles), `loads` tile
// loads and `stores` tile stores (1 KiB each, L1-resident), and `fmas` FMAs on 8 independent
// zmm chains.
template <int fmas, int products, int loads, int stores>
__attribute__((noinline)) double tile_work_beside_fmas(__m512* acc) {
  __m512 a[8];
  for (int i = 0; i < 8; ++i) a[i] = acc[i];
  const __m512 mul = _mm512_set1_ps(1.0000001f), add = _mm512_set1_ps(1e-7f);
  const long n = 200000;
  const Timing t = best_of(5, n, 1, [&](long iterations) {
    for (long i = 0; i < iterations; ++i) {
      if (products > 0) _tile_dpbf16ps(0, 4, 6);
      if (products > 1) _tile_dpbf16ps(1, 5, 7);
      if (loads > 0) _tile_loadd(2, operand[i & 3], 64);
      if (stores > 0) _tile_stored(3, sink, 64);
#pragma GCC unroll 32
      for (int f = 0; f < fmas; ++f) a[f % 8] = _mm512_fmadd_ps(a[f % 8], mul, add);
    }
    _tile_stored(0, sink, 64);
  });
  for (int i = 0; i < 8; ++i) acc[i] = a[i];
  return t.tsc_cycles;
}

// Both measurements on this thread's tiles (the caller has the kernel's permission).
void measure() {
  static const TileConfig config;
  _tile_loadconfig(&config);

  std::printf("1. product rate (4 independent 16 x 16 accumulators, operands in tiles):\n");
  for (Data data : {Data::kZeros, Data::kRandom, Data::kHalvesAndOnes}) {
    product_rate(Type::kBFloat16, data);
  }
  if (has_amx_fp16()) {
    for (Data data : {Data::kZeros, Data::kRandom, Data::kHalvesAndOnes}) {
      product_rate(Type::kFloat16, data);
    }
  } else {
    std::printf("  float16: this CPU has no AMX-FP16\n");
  }

  std::printf("2. TSC cycles per iteration of tile work, alone and beside 32 AVX-512 FMAs:\n");
  fill_and_load(Type::kBFloat16, Data::kRandom);
  __m512 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
  const double fmas = tile_work_beside_fmas<32, 0, 0, 0>(acc);
  std::printf("  32 FMAs alone %.1f\n", fmas);
  std::printf("  2 products  %5.1f, with the FMAs %5.1f\n", tile_work_beside_fmas<0, 2, 0, 0>(acc),
              tile_work_beside_fmas<32, 2, 0, 0>(acc));
  std::printf("  1 tile load %5.1f, with the FMAs %5.1f\n", tile_work_beside_fmas<0, 0, 1, 0>(acc),
              tile_work_beside_fmas<32, 0, 1, 0>(acc));
  std::printf("  1 tile store%5.1f, with the FMAs %5.1f\n", tile_work_beside_fmas<0, 0, 0, 1>(acc),
              tile_work_beside_fmas<32, 0, 0, 1>(acc));
  __m512 total = acc[0];  // the FMAs' results, kept live
  for (int i = 1; i < 8; ++i) total = _mm512_add_ps(total, acc[i]);
  _mm512_storeu_ps(fma_results, total);
  _tile_release();
}

}  // namespace

#pragma GCC pop_options

int main() {
  if (!has_amx_bf16()) {
    std::printf("this CPU has no AMX-BF16: nothing to measure\n");
    return 0;
  }
  // Linux hands out the AMX tile state only on request: ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA.
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) {
    std::printf("the kernel refused the AMX tile state (arch_prctl): nothing to measure\n");
    return 0;
  }
  measure();
  return 0;
}
