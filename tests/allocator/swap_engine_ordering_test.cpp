// The two cross-stream orderings a swap depends on, each checked with its guard and, where the
// run is not a sanitizer's, without it (through the engine's unsafe testing hooks) to show that
// the check catches the corruption the guard prevents (Note [Swap ordering] in swap_engine.cpp).
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <thread>

#include "allocator/swap_engine.hpp"
#include "device/sim_device.hpp"

#include "support/sanitizers.hpp"

namespace gpuswap {
namespace {

constexpr std::size_t mib = std::size_t{1} << 20;

sim_options options() {
  sim_options o;
  o.device_capacity = 128 * mib;
  o.host_capacity = 128 * mib;
  return o;
}

void hold_stream(sim_device& dev, stream_t s, int ms) {
  dev.launch(s, kernel_cost{}, [ms] { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }, {});
}

std::size_t count_not(const unsigned char* p, std::size_t n, unsigned char v) {
  std::size_t bad = 0;
  for (std::size_t i = 0; i < n; ++i) bad += p[i] != v;
  return bad;
}

// One engine on a small real-backed simulator, with the unsafe hooks the test sets.
struct rig {
  explicit rig(const swap_engine_options& eo)
      : dev(options()),
        alloc(dev, caching_allocator_options{}),
        pool(dev, pinned_host_pool_options{}),
        engine(dev, alloc, pool, eo),
        compute(dev.create_stream(stream_priority::normal)) {}

  // A resident, idle buffer of n bytes, each `value`.
  buffer_id filled(std::size_t n, unsigned char value) {
    const buffer_id id = engine.create(n, compute);
    std::memset(engine.acquire(id, compute), value, n);
    engine.release(id, compute);
    dev.synchronize();
    return id;
  }

  sim_device dev;
  caching_allocator alloc;
  pinned_host_pool pool;
  swap_engine engine;
  stream_t compute;
};

// Swap a buffer out while its D2H is held back, then let a new allocation on the compute stream
// take device memory and overwrite it. With the guard the new allocation cannot get the block
// before the D2H has read it; the bytes that come back are the buffer's.
std::size_t reuse_before_copy_out(bool guarded) {
  swap_engine_options eo;
  eo.unsafe_testing.skip_copy_guard_on_free = !guarded;
  rig r(eo);
  auto& [dev, alloc, pool, engine, compute] = r;
  const std::size_t n = 8 * mib;
  const buffer_id id = r.filled(n, 0x5A);

  hold_stream(dev, engine.d2h_stream(), 60);  // the D2H will really run late
  if (!engine.swap_out(id, compute)) return n;
  auto* other = static_cast<unsigned char*>(alloc.allocate(n, compute));
  touched_buffer t{other, n};
  dev.launch(compute, kernel_cost{}, [other, n] { std::memset(other, 0xA5, n); }, {&t, 1});
  alloc.deallocate(other);
  dev.synchronize();

  auto* back = static_cast<unsigned char*>(engine.acquire(id, compute));
  dev.synchronize();
  const std::size_t bad = count_not(back, n, 0x5A);
  engine.release(id, compute);
  engine.destroy(id);
  return bad;
}

TEST(swap_engine_ordering, swapped_out_block_is_not_reused_before_its_copy_finished) {
  EXPECT_EQ(reuse_before_copy_out(true), 0u);
#ifndef GPUSWAP_TSAN
  EXPECT_GT(reuse_before_copy_out(false), 0u)
      << "without the guard the D2H should have copied the new owner's bytes";
#endif
}

// Prefetch a buffer while its H2D is held back and consume it at once. With the wait the
// consumer kernel reads the buffer's bytes; without it, whatever the block held before.
std::size_t consume_before_copy_in(bool guarded) {
  swap_engine_options eo;
  eo.unsafe_testing.skip_consumer_wait = !guarded;
  rig r(eo);
  auto& [dev, alloc, pool, engine, compute] = r;
  const std::size_t n = 8 * mib;
  const buffer_id id = r.filled(n, 0x3C);
  if (!engine.swap_out(id, compute)) return n;
  engine.synchronize();
  // Leave garbage in the memory the buffer will come back to.
  auto* junk = static_cast<unsigned char*>(alloc.allocate(n, compute));
  std::memset(junk, 0xFF, n);
  alloc.deallocate(junk);

  hold_stream(dev, engine.h2d_stream(), 60);
  if (!engine.prefetch(id)) return n;
  auto* p = static_cast<unsigned char*>(engine.acquire(id, compute));
  auto bad = std::make_shared<std::size_t>(0);
  touched_buffer t{p, n};
  dev.launch(compute, kernel_cost{}, [p, n, bad] { *bad = count_not(p, n, 0x3C); }, {&t, 1});
  engine.release(id, compute);
  dev.synchronize();
  engine.destroy(id);
  return *bad;
}

TEST(swap_engine_ordering, prefetched_buffer_is_not_consumed_before_its_copy_event) {
  EXPECT_EQ(consume_before_copy_in(true), 0u);
#ifndef GPUSWAP_TSAN
  EXPECT_GT(consume_before_copy_in(false), 0u)
      << "without the wait the consumer should have read the block's old bytes";
#endif
}

// A block freed on the home stream is reused at once there, while kernels enqueued before the
// free may still read it. A swap-in that takes that block must wait for them (Note [Home
// stream]) or its H2D overwrites what they read.
std::size_t swap_in_over_a_block_still_read(bool guarded) {
  swap_engine_options eo;
  eo.unsafe_testing.skip_home_stream_wait = !guarded;
  rig r(eo);
  auto& [dev, alloc, pool, engine, compute] = r;
  const std::size_t n = 8 * mib;
  // B goes to the host and will come back into whatever block is free on compute.
  const buffer_id b = r.filled(n, 0x77);
  if (!engine.swap_out(b, compute)) return n;
  engine.synchronize();
  // A is read by a slow kernel, then destroyed: its block is free on compute at once.
  const buffer_id a = engine.create(n, compute);
  auto* pa = static_cast<unsigned char*>(engine.acquire(a, compute));
  std::memset(pa, 0x11, n);
  auto bad = std::make_shared<std::size_t>(0);
  touched_buffer t{pa, n};
  dev.launch(compute, kernel_cost{},
             [pa, n, bad] {
               std::this_thread::sleep_for(std::chrono::milliseconds(60));
               *bad = count_not(pa, n, 0x11);
             },
             {&t, 1});
  engine.release(a, compute);
  engine.destroy(a);
  if (!engine.prefetch(b)) return n;  // takes A's block
  dev.synchronize();
  engine.destroy(b);
  return *bad;
}

TEST(swap_engine_ordering, swap_in_waits_for_earlier_readers_of_its_block) {
  EXPECT_EQ(swap_in_over_a_block_still_read(true), 0u);
#ifndef GPUSWAP_TSAN
  EXPECT_GT(swap_in_over_a_block_still_read(false), 0u)
      << "without the wait the H2D should have overwritten the block under the kernel";
#endif
}

}  // namespace
}  // namespace gpuswap
