#pragma once
// fast_clock_ns(): a steady clock for timestamps taken on hot paths (the allocator's traced
// calls), cheaper to read than std::chrono::steady_clock. See Note [Fast clock].
#include <atomic>
#include <cstdint>

#if defined(__x86_64__)
#include <x86intrin.h>
#endif

namespace gpuswap {

// Nanoseconds since an arbitrary origin fixed for the process. Monotonic, across threads too (a
// value read after seeing another thread's is not smaller), and runs at steady_clock's rate (to
// the calibration's precision, a part in 10^4 or better). Inline, so that a traced call pays
// for the read and not for a call (Note [Fast clock]).
inline std::int64_t fast_clock_ns() noexcept;

// True when fast_clock_ns() reads the CPU's time-stamp counter, false when it falls back to
// steady_clock (a CPU without an invariant TSC, or not x86-64).
bool fast_clock_uses_tsc() noexcept;

namespace fast_clock_detail {

// How TSC ticks become nanoseconds: ns = ns0 + (ticks - tsc0) * ns_per_tick_q32 / 2^32. Written
// once by the calibration (fast_clock.cpp) before `mode` says use_tsc (release), so a reader
// that loads use_tsc (acquire) sees it whole.
struct tsc_scale {
  std::uint64_t tsc0 = 0;
  std::int64_t ns0 = 0;
  std::uint64_t ns_per_tick_q32 = 0;  // below 2^32: calibration takes the TSC only above 1 GHz
};
enum clock_mode : int { uncalibrated = 0, use_tsc = 1, use_steady = 2 };
extern std::atomic<int> mode;
extern tsc_scale scale;

// Calibrates on the first call (from any thread; the others wait), then reads the clock.
std::int64_t slow_ns() noexcept;

// floor(ticks * q32 / 2^32), exactly, for q32 < 2^32 and |ticks| below 2^62: the high half of
// ticks times q32 cannot overflow, the low half times q32 stays below 2^64. Integer because
// the double conversions it replaces cost ~4 ns a read behind the lfence.
constexpr std::int64_t scale_ticks(std::int64_t ticks, std::uint64_t q32) noexcept {
  const std::int64_t high = ticks >> 32;  // arithmetic shift: floor for negative ticks
  const auto low = static_cast<std::uint64_t>(ticks) & 0xffff'ffffu;
  return high * static_cast<std::int64_t>(q32) + static_cast<std::int64_t>((low * q32) >> 32);
}

}  // namespace fast_clock_detail

inline std::int64_t fast_clock_ns() noexcept {
#if defined(__x86_64__)
  using namespace fast_clock_detail;
  if (mode.load(std::memory_order_acquire) == use_tsc) [[likely]] {
    // The lfence keeps the read from running ahead of the loads before it (the vDSO's
    // steady_clock does the same): without it a thread that loaded another's timestamp could
    // read a TSC value older than it, by up to 2.7 us as measured on the development VM.
    // Signed: a core whose counter trails the calibrating core's by a few ticks must not wrap.
    _mm_lfence();
    const auto ticks = static_cast<std::int64_t>(__rdtsc() - scale.tsc0);
    return scale.ns0 + scale_ticks(ticks, scale.ns_per_tick_q32);
  }
#endif
  return fast_clock_detail::slow_ns();
}

}  // namespace gpuswap
