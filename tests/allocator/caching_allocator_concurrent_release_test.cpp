// Note [Bytes in flight] (allocator/caching_allocator.cpp): an allocation that finds the budget
// held by bytes another thread is releasing waits for them instead of failing.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <exception>
#include <thread>

#include "allocator/caching_allocator.hpp"
#include "allocator/reclaimer.hpp"
#include "core/errors.hpp"
#include "device/sim_device.hpp"
#include "support/expandable_segments.hpp"
#include "support/gate.hpp"
#include "support/small_sim.hpp"

namespace gpuswap {
namespace {

using testing_support::gate;

constexpr std::size_t MiB = std::size_t{1} << 20;

// Tells the test when an allocation has climbed its ladder to the reclaimers: past every rung
// that could have served it, with the other thread's release still held by the gate.
class signalling_reclaimer : public reclaimer {
 public:
  std::size_t reclaim(std::size_t, stream_t) override {
    called.store(true);
    called.notify_all();
    return 0;
  }
  std::atomic<bool> called{false};
};

void an_allocation_waits_for_a_release_in_flight(bool expandable_segments) {
  sim_device dev(testing_support::sim_with_capacity(256 * MiB));
  caching_allocator_options o = expandable_segments ? testing_support::expandable(32 * MiB)
                                                    : caching_allocator_options{};
  o.device_limit = 32 * MiB;
  caching_allocator alloc(dev, o);
  signalling_reclaimer signal;
  alloc.add_reclaimer(&signal);
  const stream_t s = dev.default_stream();
  const stream_t other = dev.create_stream(stream_priority::normal);

  void* a = alloc.allocate(24 * MiB, s);
  ASSERT_NE(a, nullptr);
  gate g;
  g.launch(dev, s);  // the stream that used `a` stays busy until the gate opens
  alloc.deallocate(a);

  // Releasing waits for s, so its 24 MiB stay in flight, out of the reserved figure.
  std::thread releaser([&] { alloc.empty_cache(); });
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (alloc.stats().reserved_bytes.all().current != 0 &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::yield();
  }
  ASSERT_EQ(alloc.stats().reserved_bytes.all().current, 0) << "the release never began";

  std::exception_ptr failure;
  void* b = nullptr;
  std::thread taker([&] {
    try {
      b = alloc.allocate(24 * MiB, other);
    } catch (...) {
      failure = std::current_exception();
    }
    // Also when it never reached the reclaimers, so that the test fails instead of hanging.
    signal.called.store(true);
    signal.called.notify_all();
  });
  signal.called.wait(false);  // the taker has nothing left to try but the bytes in flight
  g.open();
  taker.join();
  releaser.join();
  if (failure) {
    try {
      std::rethrow_exception(failure);
    } catch (const std::exception& e) {
      ADD_FAILURE() << "the allocation failed instead of waiting: " << e.what();
    }
  }
  EXPECT_NE(b, nullptr);
  alloc.deallocate(b);
  alloc.remove_reclaimer(&signal);
  dev.synchronize();
}

TEST(caching_allocator_concurrent_release, an_allocation_waits_for_segments_being_released) {
  an_allocation_waits_for_a_release_in_flight(false);
}

TEST(caching_allocator_concurrent_release, an_allocation_waits_for_pages_being_unmapped) {
  an_allocation_waits_for_a_release_in_flight(true);
}

}  // namespace
}  // namespace gpuswap
