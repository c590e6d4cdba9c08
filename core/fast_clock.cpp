#include "core/fast_clock.hpp"

#include <chrono>
#include <cmath>
#include <cstdint>

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
// and scale it by a ratio measured once against steady_clock at first use: over 8 ms, from
// TSC reads bracketed tightly by steady_clock reads, checked by two 4 ms halves agreeing to 1
// part in 10^4 (else measured again, and after three tries steady_clock is used). Every host time
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

#if defined(__x86_64__)
// One (steady_clock, TSC) pair: the TSC read between two steady_clock reads, the closest
// bracket of a few tries, its time taken as the bracket's middle. A thread preempted inside a
// bracket (a loaded VM deschedules vCPUs for milliseconds) makes that bracket wide, not the
// pair wrong.
struct clock_pair {
  std::int64_t ns = 0;
  std::uint64_t tsc = 0;
  std::int64_t width = 0;
};

clock_pair tight_pair() noexcept {
  clock_pair best;
  best.width = INT64_MAX;
  for (int i = 0; i < 16; ++i) {
    const std::int64_t a = steady_ns();
    const std::uint64_t t = __rdtsc();
    const std::int64_t b = steady_ns();
    if (b - a < best.width) best = {a + (b - a) / 2, t, b - a};
  }
  return best;
}

void spin_until(std::int64_t ns) noexcept {
  while (steady_ns() < ns) {
  }
}
#endif

calibration calibrate() noexcept {
  calibration c;
#if defined(__x86_64__)
  if (!invariant_tsc()) return c;
  // Two back-to-back 4 ms intervals must give the same rate to 1 part in 10^4, or the
  // measurement was disturbed and is taken again; after three tries steady_clock is used.
  constexpr std::int64_t span_ns = 4'000'000;
  constexpr double agreement = 1e-4;
  for (int attempt = 0; attempt < 3; ++attempt) {
    const clock_pair p0 = tight_pair();
    spin_until(p0.ns + span_ns);
    const clock_pair p1 = tight_pair();
    spin_until(p1.ns + span_ns);
    const clock_pair p2 = tight_pair();
    if (p1.tsc <= p0.tsc || p2.tsc <= p1.tsc) return c;  // a counter that does not move
    const double r1 = static_cast<double>(p1.ns - p0.ns) / static_cast<double>(p1.tsc - p0.tsc);
    const double r2 = static_cast<double>(p2.ns - p1.ns) / static_cast<double>(p2.tsc - p1.tsc);
    if (r1 <= 0 || std::abs(r1 - r2) > agreement * r1) continue;
    c.use_tsc = true;
    c.tsc0 = p2.tsc;
    c.ns0 = p2.ns;
    c.ns_per_tick = static_cast<double>(p2.ns - p0.ns) / static_cast<double>(p2.tsc - p0.tsc);
    return c;
  }
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
    // The lfence keeps the read from running ahead of the loads before it (the vDSO's
    // steady_clock does the same): without it a thread that loaded another's timestamp could
    // read a TSC value older than it, by up to 2.7 us as measured on the development VM.
    // Signed: a core whose counter trails the calibrating core's by a few ticks must not wrap.
    _mm_lfence();
    const auto ticks = static_cast<std::int64_t>(__rdtsc() - c.tsc0);
    return c.ns0 + static_cast<std::int64_t>(static_cast<double>(ticks) * c.ns_per_tick);
  }
#endif
  return steady_ns();
}

bool fast_clock_uses_tsc() noexcept { return clock_calibration().use_tsc; }

}  // namespace gpuswap
