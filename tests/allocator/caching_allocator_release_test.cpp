// Giving cached segments back to the device waits for the work still using them
// (Note [Work in flight on released segments] in caching_allocator.cpp).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>

#include "allocator/caching_allocator.hpp"
#include "core/errors.hpp"
#include "device/sim_device.hpp"

namespace gpuswap {
namespace {

TEST(caching_allocator_release, empty_cache_waits_for_kernels_still_using_a_freed_block) {
  sim_options o;
  o.device_capacity = std::size_t{64} << 20;
  sim_device dev(o);
  caching_allocator alloc(dev, caching_allocator_options{});
  stream_t s = dev.create_stream(stream_priority::normal);
  const std::size_t n = std::size_t{4} << 20;
  void* p = alloc.allocate(n, s);
  auto done = std::make_shared<std::atomic<bool>>(false);
  touched_buffer t{p, n};
  dev.launch(s, kernel_cost{},
             [p, n, done] {
               std::this_thread::sleep_for(std::chrono::milliseconds(50));
               std::memset(p, 0x42, n);
               done->store(true);
             },
             {&t, 1});
  // Free on its own stream: reusable at once by later work on s, while the kernel runs.
  alloc.deallocate(p);
  alloc.empty_cache();
  EXPECT_TRUE(done->load()) << "the segment went back to the device under a running kernel";
  EXPECT_EQ(alloc.stats().reserved_bytes.all().current, 0);
}

constexpr std::size_t MiB = std::size_t{1} << 20;

sim_options phantom(std::size_t capacity) {
  sim_options o;
  o.backing = sim_backing::phantom;
  o.device_capacity = capacity;
  return o;
}

// The wait covers the released segments' own streams only: a long kernel enqueued on another
// stream after the freed block's kernel is not waited for (on the modelled clock, so the check
// does not depend on the machine's speed). With the device-wide synchronize this used to be,
// the host would end at the other kernel's end, 1 s later.
TEST(caching_allocator_release, waits_for_the_segments_stream_not_the_whole_device) {
  sim_device dev(phantom(256 * MiB));
  caching_allocator alloc(dev, caching_allocator_options{});
  const stream_t s = dev.create_stream(stream_priority::normal);
  const stream_t other = dev.create_stream(stream_priority::normal);
  void* p = alloc.allocate(4 * MiB, s);
  touched_buffer t{p, 4 * MiB};
  const double start = dev.host_time_ns();
  dev.launch(s, kernel_cost{0, 0, 1e6}, nullptr, {&t, 1});       // 1 ms, using the block
  dev.launch(other, kernel_cost{0, 0, 1e9}, nullptr, {});         // 1 s, unrelated
  alloc.deallocate(p);
  alloc.empty_cache();
  EXPECT_EQ(alloc.stats().reserved_bytes.all().current, 0);
  const double waited = dev.host_time_ns() - start;
  EXPECT_GE(waited, 1e6) << "released before the kernel using the block ended";
  EXPECT_LT(waited, 5e8) << "waited for another stream's work";
  dev.synchronize();
}

// Note [Releasing just enough]: under the budget, a request that needs one new segment
// releases the smallest unused segment that makes room, not the whole cache.
TEST(caching_allocator_release, the_oom_ladder_releases_just_enough_before_everything) {
  sim_device dev(phantom(1024 * MiB));
  caching_allocator_options opts;
  opts.device_limit = 64 * MiB;
  caching_allocator alloc(dev, opts);
  // Three cached 20 MiB segments, one per stream (blocks never cross streams).
  for (int i = 0; i < 3; ++i) {
    const stream_t s = dev.create_stream(stream_priority::normal);
    alloc.deallocate(alloc.allocate(3 * MiB, s));
  }
  ASSERT_EQ(alloc.stats().reserved_bytes.all().current, static_cast<std::int64_t>(60 * MiB));
  const std::uint64_t frees_before = alloc.stats().num_device_frees;
  // 12 MiB on a fourth stream: 60 + 12 > 64, so one 20 MiB segment has to go.
  const stream_t s4 = dev.create_stream(stream_priority::normal);
  void* p = alloc.allocate(12 * MiB, s4);
  EXPECT_EQ(alloc.stats().num_device_frees - frees_before, 1u);
  EXPECT_EQ(alloc.stats().reserved_bytes.all().current, static_cast<std::int64_t>(52 * MiB));
  EXPECT_EQ(alloc.validate(), "");
  alloc.deallocate(p);
  alloc.empty_cache();
  EXPECT_EQ(alloc.stats().reserved_bytes.all().current, 0);
}

// A wait that fails (here: the stream's kernel failed, reported at the next synchronisation)
// leaves the segments cached and counted as before; the next release goes through.
TEST(caching_allocator_release, a_failed_wait_puts_the_segments_back) {
  sim_options o;
  o.device_capacity = 64 * MiB;
  sim_device dev(o);
  caching_allocator alloc(dev, caching_allocator_options{});
  const stream_t s = dev.create_stream(stream_priority::normal);
  void* p = alloc.allocate(4 * MiB, s);
  dev.launch(s, kernel_cost{}, [] { throw std::runtime_error("kernel failed"); }, {});
  alloc.deallocate(p);
  const auto reserved = alloc.stats().reserved_bytes.all().current;
  EXPECT_THROW(alloc.empty_cache(), device_error);
  EXPECT_EQ(alloc.stats().reserved_bytes.all().current, reserved);
  EXPECT_EQ(alloc.validate(), "");
  void* q = alloc.allocate(4 * MiB, s);  // the cached segment serves it
  EXPECT_EQ(q, p);
  alloc.deallocate(q);
  alloc.empty_cache();
  EXPECT_EQ(alloc.stats().reserved_bytes.all().current, 0);
}

// Without an event (record_event fails) the release falls back to waiting for the whole
// device, and still never gives memory back under a running kernel.
TEST(caching_allocator_release, without_an_event_it_waits_for_the_whole_device) {
  sim_device dev(phantom(256 * MiB));
  caching_allocator alloc(dev, caching_allocator_options{});
  const stream_t s = dev.create_stream(stream_priority::normal);
  const stream_t other = dev.create_stream(stream_priority::normal);
  void* p = alloc.allocate(4 * MiB, s);
  touched_buffer t{p, 4 * MiB};
  const double start = dev.host_time_ns();
  dev.launch(s, kernel_cost{0, 0, 1e6}, nullptr, {&t, 1});
  dev.launch(other, kernel_cost{0, 0, 1e9}, nullptr, {});
  alloc.deallocate(p);
  dev.fail_always(sim_call::event_record);
  alloc.empty_cache();
  dev.clear_faults();
  EXPECT_EQ(alloc.stats().reserved_bytes.all().current, 0);
  EXPECT_GE(dev.host_time_ns() - start, 1e9) << "the fallback is the device-wide synchronize";
}

}  // namespace
}  // namespace gpuswap
