#include "core/fast_clock.hpp"

#include <chrono>

#if defined(__x86_64__)
#include <cpuid.h>
#include <x86intrin.h>
#endif

namespace gpuswap {

// Note [Fast clock]
// A traced allocation needs a timestamp, and on a GPU the allocator's hot path is ~100 ns, so the
// clock matters: steady_clock (clock_gettime through the vDSO) measured 58 ns a read on the
// development VM, reading the time-stamp counter 27 ns (on bare metal about 18 and 7). Where the
// CPU declares its TSC invariant (CPUID 0x80000007 EDX bit 8: constant rate, not stopped in
// sleep states, the property Linux needs before it uses the TSC as its clocksource) we read it
// and scale it by a ratio measured once against steady_clock, over 2 ms at first use (a clock
// read's jitter of ~100 ns over 2 ms: a rate error of about 5 parts in 10^5). Every host time
// the project reports comes from this one clock (device::host_time_ns), so a rate error never
// shows as two clocks disagreeing; it only stretches a trace by that much against a wall clock.
// Elsewhere steady_clock itself is used.

namespace {

std::int64_t steady_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct calibration {
  bool use_tsc = false;
  std::uint64_t tsc0 = 0;
  std::int64_t ns0 = 0;
  double ns_per_tick = 0;
};

#if defined(__x86_64__)
bool invariant_tsc() noexcept {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(0x80000000u, &a, &b, &c, &d) == 0 || a < 0x80000007u) return false;
  if (__get_cpuid(0x80000007u, &a, &b, &c, &d) == 0) return false;
  return (d & (1u << 8)) != 0;
}
#endif

calibration calibrate() noexcept {
  calibration c;
#if defined(__x86_64__)
  if (!invariant_tsc()) return c;
  constexpr std::int64_t span_ns = 2'000'000;
  const std::int64_t s0 = steady_ns();
  const std::uint64_t t0 = __rdtsc();
  std::int64_t s1 = s0;
  std::uint64_t t1 = t0;
  while (s1 - s0 < span_ns) {
    t1 = __rdtsc();
    s1 = steady_ns();
  }
  if (t1 <= t0) return c;  // a counter that did not move is no clock
  c.use_tsc = true;
  c.tsc0 = t1;
  c.ns0 = s1;
  c.ns_per_tick = static_cast<double>(s1 - s0) / static_cast<double>(t1 - t0);
#endif
  return c;
}

const calibration& clock_calibration() noexcept {
  static const calibration c = calibrate();
  return c;
}

}  // namespace

std::int64_t fast_clock_ns() noexcept {
  const calibration& c = clock_calibration();
#if defined(__x86_64__)
  if (c.use_tsc) {
    // Signed: a core whose counter trails the calibrating core's by a few ticks must not wrap.
    const auto ticks = static_cast<std::int64_t>(__rdtsc() - c.tsc0);
    return c.ns0 + static_cast<std::int64_t>(static_cast<double>(ticks) * c.ns_per_tick);
  }
#endif
  return steady_ns();
}

bool fast_clock_uses_tsc() noexcept { return clock_calibration().use_tsc; }

}  // namespace gpuswap
