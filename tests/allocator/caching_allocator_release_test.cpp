// Giving cached segments back to the device waits for the work still using them
// (Note [Work in flight on released segments] in caching_allocator.cpp).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <thread>

#include "allocator/caching_allocator.hpp"
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

}  // namespace
}  // namespace gpuswap
