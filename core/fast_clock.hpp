#pragma once
// fast_clock_ns(): a steady clock for timestamps taken on hot paths (the allocator's traced
// calls), cheaper to read than std::chrono::steady_clock. See Note [Fast clock].
#include <cstdint>

namespace gpuswap {

// Nanoseconds since an arbitrary origin fixed for the process. Monotonic, across threads too (a
// value read after seeing another thread's is not smaller), and runs at steady_clock's rate (to
// the calibration's precision, a part in 10^4 or better).
std::int64_t fast_clock_ns() noexcept;

// True when fast_clock_ns() reads the CPU's time-stamp counter, false when it falls back to
// steady_clock (a CPU without an invariant TSC, or not x86-64).
bool fast_clock_uses_tsc() noexcept;

}  // namespace gpuswap
