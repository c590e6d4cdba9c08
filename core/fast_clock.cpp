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
// clock matters. Where the CPU declares its TSC invariant (CPUID 0x80000007 EDX bit 8: constant
// rate, not stopped in sleep states, the property Linux needs before it uses the TSC as its
// clocksource) we read it and scale it by a ratio measured once against steady_clock at first
// use: over 8 ms, from TSC reads bracketed tightly by steady_clock reads, checked by two 4 ms
// halves agreeing to 1 part in 10^4 (else measured again, and after three tries steady_clock is
// used). Every host time the project reports comes from this one clock (device::host_time_ns),
// so a rate error never shows as two clocks disagreeing; it only stretches a trace by that much
// against a wall clock. Elsewhere steady_clock itself is used.
//
// What a read costs: `gpuswap bench alloc` prints it (Note [Clock reads], tools/bench_alloc.cpp).
// On the development VM (a KVM guest), alone: steady_clock 22-30 ns, lfence+rdtsc 18-24,
// bare rdtsc 13-16, rdtscp 17-22; fast_clock_ns was 4-10 ns above lfence+rdtsc while it was an
// out-of-line call scaling through double (the conversions' latency sits behind the next read's
// lfence), and is 1-4 above it inline with the integer scaling of scale_ticks. After a load that
// misses the cache, every one of them costs about the miss (100-250 ns on that VM): there a TSC
// read, fenced or not, waits for the loads in flight before it. That, not the read's latency, is
// what the allocator bench's "on, wall" column pays at 10,000 and 100,000 live blocks, where the
// allocator keeps misses in flight on purpose (Note [Pipelined frees]).
//
// Variants measured in that column (medians of 10 runs alternating the binaries, +% over no
// hooks at 1,000 / 10,000 / 100,000 live blocks): lfence+rdtsc +91/+120/+135, bare rdtsc
// +80/+110/+131, rdtscp +89/+118/+134. The bare read would save about a tenth and give up what
// the lfence is for (a free on one thread stamped before the allocation on another that it
// follows), so the lfence stays; rdtscp, which waits for earlier loads too but not for later
// instructions, costs the same here and needs a CPUID check, so it is not used either.

namespace fast_clock_detail {
std::atomic<int> mode{uncalibrated};
tsc_scale scale;
}  // namespace fast_clock_detail

namespace {

std::int64_t steady_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

#if defined(__x86_64__)
bool invariant_tsc() noexcept {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(0x80000000u, &a, &b, &c, &d) == 0 || a < 0x80000007u) return false;
  if (__get_cpuid(0x80000007u, &a, &b, &c, &d) == 0) return false;
  return (d & (1u << 8)) != 0;
}

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

// Fills fast_clock_detail::scale and returns the mode fast_clock_ns() is to use.
fast_clock_detail::clock_mode calibrate() noexcept {
  using namespace fast_clock_detail;
#if defined(__x86_64__)
  if (!invariant_tsc()) return use_steady;
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
    if (p1.tsc <= p0.tsc || p2.tsc <= p1.tsc) return use_steady;  // a counter that does not move
    const double r1 = static_cast<double>(p1.ns - p0.ns) / static_cast<double>(p1.tsc - p0.tsc);
    const double r2 = static_cast<double>(p2.ns - p1.ns) / static_cast<double>(p2.tsc - p1.tsc);
    if (r1 <= 0 || std::abs(r1 - r2) > agreement * r1) continue;
    const double ns_per_tick =
        static_cast<double>(p2.ns - p0.ns) / static_cast<double>(p2.tsc - p0.tsc);
    // The fixed-point scale needs a counter faster than 1 GHz (every invariant TSC we know of).
    if (!(ns_per_tick < 1.0)) return use_steady;
    scale.tsc0 = p2.tsc;
    scale.ns0 = p2.ns;
    scale.ns_per_tick_q32 = static_cast<std::uint64_t>(std::llround(ns_per_tick * 0x1p32));
    return use_tsc;
  }
#endif
  return use_steady;
}

}  // namespace

namespace fast_clock_detail {

std::int64_t slow_ns() noexcept {
  // The first caller calibrates; concurrent first callers wait here until it is done.
  static const bool calibrated = [] {
    mode.store(calibrate(), std::memory_order_release);
    return true;
  }();
  (void)calibrated;
  if (mode.load(std::memory_order_acquire) == use_tsc) return fast_clock_ns();
  return steady_ns();
}

}  // namespace fast_clock_detail

bool fast_clock_uses_tsc() noexcept {
  fast_clock_detail::slow_ns();  // calibrated
  return fast_clock_detail::mode.load(std::memory_order_acquire) == fast_clock_detail::use_tsc;
}

}  // namespace gpuswap
