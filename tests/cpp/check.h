// A minimal test harness for the C++ unit tests (no test framework can be downloaded here):
// TEST_CASE registers a function, CHECK records a failure with its location and a printf-style
// message without stopping the test, and main() runs every test and ends with the line
// "N passed, N failed" (tests, not checks), exiting non-zero if any test failed.
#pragma once

#include <cstdarg>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

namespace fastllm_test {

struct State {
  std::vector<std::pair<const char*, void (*)()>> tests;
  long failed_checks = 0;  // in the running test
};

inline State& state() {
  static State s;
  return s;
}

struct Registrar {
  Registrar(const char* name, void (*fn)()) { state().tests.emplace_back(name, fn); }
};

// Prints at most kMaxReports failures per test; the rest are only counted.
inline constexpr long kMaxReports = 20;

#if defined(__GNUC__)
__attribute__((format(printf, 4, 5)))
#endif
inline void report_failure(const char* file, int line, const char* expr, const char* fmt, ...) {
  if (++state().failed_checks > kMaxReports) return;
  std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", file, line, expr);
  va_list args;
  va_start(args, fmt);
  std::vfprintf(stderr, fmt, args);
  va_end(args);
  std::fputc('\n', stderr);
}

inline int run_all() {
  int passed = 0, failed = 0;
  for (const auto& [name, fn] : state().tests) {
    state().failed_checks = 0;
    fn();
    const long f = state().failed_checks;
    if (f == 0) {
      ++passed;
      std::printf("[ ok ] %s\n", name);
    } else {
      ++failed;
      std::printf("[FAIL] %s (%ld failed checks)\n", name, f);
    }
    std::fflush(stdout);
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace fastllm_test

#define TEST_CASE(name)                                                  \
  static void name();                                                    \
  static const fastllm_test::Registrar name##_registrar(#name, &name);   \
  static void name()

// CHECK(cond, "format", args...): on failure prints the location, the condition and the message.
#define CHECK(cond, ...)                                                            \
  do {                                                                              \
    if (!(cond)) fastllm_test::report_failure(__FILE__, __LINE__, #cond, __VA_ARGS__); \
  } while (0)

#define TEST_MAIN() \
  int main() { return fastllm_test::run_all(); }
