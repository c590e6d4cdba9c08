#include "core/fast_clock.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <random>
#include <cstdint>
#include <thread>
#include <vector>

namespace gpuswap {
namespace {

std::int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// floor(ticks * q / 2^32), computed in 128 bits: what scale_ticks must equal.
std::int64_t wide_scale(std::int64_t ticks, std::uint64_t q) {
  __extension__ using wide = __int128;
  return static_cast<std::int64_t>((static_cast<wide>(ticks) * static_cast<wide>(q)) >> 32);
}

// The TSC's ticks become ns in 64-bit integers, split in halves (Note [Fast clock]); a carry or
// sign slip at the split would make the clock jump or run backwards once every 2^32 ticks.
TEST(FastClock, ScalingTicksIsExactAcrossTheSplitAndForNegativeTicks) {
  using fast_clock_detail::scale_ticks;
  constexpr std::int64_t half = std::int64_t{1} << 32;
  constexpr std::int64_t far = std::int64_t{1} << 61;  // 35 years of a 2 GHz counter
  const std::uint64_t scales[] = {1, 2'045'222'520 /* 2.1 GHz */, 0xffff'ffffu};
  std::vector<std::int64_t> ticks = {0,         1,         -1,        half - 1,     half,
                                     half + 1,  -half,     -half - 1, -half + 1,    3 * half + 7,
                                     -5 * half - 3, far,   -far};
  std::mt19937_64 rng(5);
  std::uniform_int_distribution<std::int64_t> any(-far, far);
  for (int i = 0; i < 10'000; ++i) ticks.push_back(any(rng));
  for (std::uint64_t q : scales) {
    for (std::int64_t t : ticks) {
      ASSERT_EQ(scale_ticks(t, q), wide_scale(t, q)) << "ticks " << t << " scale " << q;
    }
    for (std::int64_t edge : {std::int64_t{0}, half, -half, 7 * half}) {
      for (std::int64_t t = edge - 3; t < edge + 3; ++t) {
        ASSERT_LE(scale_ticks(t, q), scale_ticks(t + 1, q)) << "ticks " << t << " scale " << q;
      }
    }
  }
}

TEST(FastClock, NeverGoesBackwardsOnOneThread) {
  std::int64_t last = fast_clock_ns();
  for (int i = 0; i < 1'000'000; ++i) {
    const std::int64_t now = fast_clock_ns();
    ASSERT_GE(now, last) << "read " << i;
    last = now;
  }
}

// The clock runs at steady_clock's rate: an interval bracketed by steady_clock reads measures
// the same on both, to the calibration's precision plus what the bracket itself lets through.
TEST(FastClock, RunsAtSteadyClocksRate) {
  const std::int64_t s0 = steady_ns();
  const std::int64_t f0 = fast_clock_ns();
  const std::int64_t s1 = steady_ns();
  std::this_thread::sleep_for(std::chrono::milliseconds(60));
  const std::int64_t s2 = steady_ns();
  const std::int64_t f1 = fast_clock_ns();
  const std::int64_t s3 = steady_ns();
  const std::int64_t fast = f1 - f0;
  // fast lies between the shortest and the longest interval the brackets allow, widened by
  // 0.1% for the rate (calibration is good to ~0.005%).
  const double slack = 0.001 * static_cast<double>(s3 - s0);
  EXPECT_GE(static_cast<double>(fast), static_cast<double>(s2 - s1) - slack);
  EXPECT_LE(static_cast<double>(fast), static_cast<double>(s3 - s0) + slack);
  RecordProperty("uses_tsc", fast_clock_uses_tsc() ? "yes" : "no");
}

// Threads on other cores read the same clock: a value one thread publishes is never later than
// what another reads after seeing it. Fails without the lfence before the TSC read (Note [Fast
// clock]), which lets the read run ahead of the load.
TEST(FastClock, IsConsistentAcrossThreads) {
  std::atomic<std::int64_t> published{0};
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    while (!stop.load(std::memory_order_relaxed)) {
      published.store(fast_clock_ns(), std::memory_order_release);
    }
  });
  std::int64_t worst = 0;  // the most a reader's clock was behind what it had seen
  for (int i = 0; i < 200'000; ++i) {
    const std::int64_t seen = published.load(std::memory_order_acquire);
    const std::int64_t now = fast_clock_ns();
    worst = std::max(worst, seen - now);
  }
  stop.store(true);
  writer.join();
  EXPECT_LE(worst, 0) << "ns behind a value published by another thread";
}

}  // namespace
}  // namespace gpuswap
