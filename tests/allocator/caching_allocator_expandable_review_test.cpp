// Adversarial review of expandable segments (Note [Expandable segments]): bugs found in the
// review, each with a test that fails until it is fixed, and tests of the risky paths (a failed
// wait while unmapping, a failed map half way through a placement, pending blocks next to
// unmapped space, destruction with live blocks, concurrent release and use of one stream).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <future>
#include <memory>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "allocator/caching_allocator.hpp"
#include "core/errors.hpp"
#include "device/sim_device.hpp"
#include "support/expandable_segments.hpp"
#include "support/gate.hpp"

namespace gpuswap {
namespace {

constexpr std::size_t MiB = std::size_t{1} << 20;
constexpr std::size_t GiB = std::size_t{1} << 30;

using testing_support::expandable;
using testing_support::gate;
using testing_support::reserved;

sim_options sim(sim_backing backing = sim_backing::phantom) {
  return testing_support::expandable_sim(backing);
}
// --- bugs -------------------------------------------------------------------------------------

// BUG: grow_expandable ignores max_split_size. A free block of max_split_size or more is kept
// whole by best_fit for requests below it, so search_locked misses; grow_expandable then finds a
// placement of cost 0 inside that very block and take_block_locked hands the whole block out
// (should_split is false for blocks above max_split_size): a 24 MiB request gets 100 MiB.
TEST(CachingAllocatorExpandableReview, max_split_size_does_not_hand_out_a_whole_large_block) {
  sim_device dev(sim());
  const stream_t s = dev.default_stream();
  caching_allocator_options o = expandable(256 * MiB);
  o.max_split_size = 32 * MiB;
  caching_allocator alloc(dev, o);
  alloc.deallocate(alloc.allocate(100 * MiB, s));  // one free, mapped 100 MiB block

  void* p = alloc.allocate(24 * MiB, s);
  EXPECT_EQ(alloc.allocated_size(p), 24 * MiB) << "a request below max_split_size";
  EXPECT_EQ(alloc.stats().allocated_bytes.all().current, static_cast<std::int64_t>(24 * MiB));
  EXPECT_EQ(alloc.validate(), "");
  alloc.deallocate(p);

  // And at or above max_split_size: best_fit refuses a block wasting a large segment or more.
  void* q = alloc.allocate(40 * MiB, s);
  EXPECT_EQ(alloc.allocated_size(q), 40 * MiB) << "a request above max_split_size";
  EXPECT_EQ(alloc.validate(), "");
  alloc.deallocate(q);
}

// BUG: every reservation is reservation_budgets (4) budgets of address space, and when the
// device has no room for that, grow_expandable gives up (out of memory) instead of reserving
// what the request needs. The simulator reserves 64 capacities of address space, so with no
// device_limit the 17th stream with a live large block gets out_of_memory on a device with
// almost all of its memory free; a 1 TiB phantom device (gpuswap simulate's unlimited run)
// serves four streams, and under ThreadSanitizer (a smaller region) maybe none.
TEST(CachingAllocatorExpandableReview, many_streams_do_not_run_out_of_address_space) {
  sim_device dev(sim());
  caching_allocator alloc(dev, expandable(0));  // the budget is the capacity: 1 GiB
  std::vector<stream_t> streams;
  std::vector<void*> live;
  for (int i = 0; i < 20; ++i) {
    streams.push_back(dev.create_stream(stream_priority::normal));
    void* p = nullptr;
    EXPECT_NO_THROW(p = alloc.allocate(4 * MiB, streams.back()))
        << "stream " << i << ": " << alloc.stats().reserved_bytes.all().current
        << " bytes reserved of 1 GiB";
    if (p != nullptr) live.push_back(p);
  }
  EXPECT_EQ(alloc.validate(), "");
  for (void* p : live) alloc.deallocate(p);
  alloc.empty_cache();
  for (stream_t s : streams) dev.destroy_stream(s);
}

// BUG (a stall on the allocation path): find_placement only tries the start and the end of a
// run, so a free block in the middle of unmapped address space is never extended. Here the
// 20 MiB request needs only 4 MiB mapped after the free 16 MiB block, which the headroom
// allows, but the start of the run costs 16 MiB and the end 20: the OOM ladder waits for the
// stream's work, unmaps the 16 MiB block and maps 20 MiB at the start of the run.
TEST(CachingAllocatorExpandableReview, a_free_block_between_unmapped_space_is_extended) {
  sim_device dev(sim());
  const stream_t s = dev.default_stream();
  const stream_t other = dev.create_stream(stream_priority::normal);
  caching_allocator alloc(dev, expandable(32 * MiB));
  void* a = alloc.allocate(16 * MiB, s);
  void* b = alloc.allocate(16 * MiB, s);
  ASSERT_EQ(reinterpret_cast<std::uintptr_t>(b) - reinterpret_cast<std::uintptr_t>(a), 16 * MiB);
  alloc.deallocate(a);
  alloc.empty_cache();  // [unmapped 16 MiB][b][unmapped ...]
  void* elsewhere = alloc.allocate(12 * MiB, other);
  alloc.deallocate(b);  // a free 16 MiB block between unmapped address space; 4 MiB headroom
  ASSERT_EQ(reserved(alloc), static_cast<std::int64_t>(28 * MiB));
  const std::uint64_t unmaps_before = alloc.stats().num_device_frees;

  dev.launch(s, kernel_cost{0, 0, 5e6}, [] {}, {});  // 5 ms of work still enqueued on s
  const double host_before = dev.now_ns();
  void* big = alloc.allocate(20 * MiB, s);
  EXPECT_EQ(alloc.stats().num_device_frees, unmaps_before) << "the free block was unmapped";
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(big), reinterpret_cast<std::uintptr_t>(b))
      << "not placed on the free block";
  EXPECT_LT(dev.now_ns(), host_before + 5e6) << "the allocation waited for the stream's work";
  EXPECT_EQ(alloc.validate(), "");
  alloc.deallocate(big);
  alloc.deallocate(elsewhere);
  alloc.empty_cache();
  dev.destroy_stream(other);
}

// --- risky paths that hold --------------------------------------------------------------------

// A wait that fails while free pages are being unmapped (a kernel on the stream failed, so
// synchronize_event throws): the blocks are put back as they were, mapped and free, the books
// exact, and a later release unmaps them.
TEST(CachingAllocatorExpandableReview, a_failed_wait_while_unmapping_puts_the_blocks_back) {
  sim_device dev(sim(sim_backing::real));  // kernels run their functions only with real bytes
  const stream_t s = dev.create_stream(stream_priority::normal);
  caching_allocator alloc(dev, expandable(64 * MiB));
  void* live = alloc.allocate(3 * MiB, s);  // shares its second page with the next block
  void* p = alloc.allocate(13 * MiB, s);
  dev.launch(s, kernel_cost{0, 0, 1e6}, [] { throw std::runtime_error("kernel failed"); }, {});
  alloc.deallocate(p);
  const std::int64_t reserved_before = reserved(alloc);
  const std::size_t mapped_before = dev.counters().vm_mapped;
  const std::uint64_t frees_before = alloc.stats().num_device_frees;

  EXPECT_THROW(alloc.empty_cache(), device_error);
  EXPECT_EQ(alloc.validate(), "");
  EXPECT_EQ(reserved(alloc), reserved_before);
  EXPECT_EQ(dev.counters().vm_mapped, mapped_before);
  EXPECT_EQ(alloc.stats().num_device_frees, frees_before);
  // The free block is whole again and serves a request of its size without mapping anything.
  void* again = alloc.allocate(13 * MiB, s);
  EXPECT_EQ(again, p);
  EXPECT_EQ(dev.counters().vm_mapped, mapped_before);
  alloc.deallocate(again);

  alloc.empty_cache();  // the error was reported once: this wait succeeds
  EXPECT_EQ(alloc.validate(), "");
  EXPECT_EQ(reserved(alloc), static_cast<std::int64_t>(4 * MiB)) << "the live block's pages";
  EXPECT_EQ(dev.counters().vm_mapped, 4 * MiB);
  alloc.deallocate(live);
  alloc.empty_cache();
  EXPECT_EQ(dev.counters().vm_mapped, 0u);
  EXPECT_EQ(alloc.stats().segment.all().current, 0);
  dev.destroy_stream(s);
}

// A failed event record while unmapping falls back to a device-wide synchronize, and the pages
// are still unmapped only after the stream's work.
TEST(CachingAllocatorExpandableReview, a_failed_event_record_while_unmapping_waits_for_the_device) {
  sim_device dev(sim());
  const stream_t s = dev.create_stream(stream_priority::normal);
  caching_allocator alloc(dev, expandable(64 * MiB));
  void* p = alloc.allocate(16 * MiB, s);
  dev.launch(s, kernel_cost{0, 0, 5e6}, [] {}, {});
  const double kernel_end = dev.stream_tail_ns(s);
  alloc.deallocate(p);
  dev.fail_always(sim_call::event_record);
  alloc.empty_cache();
  dev.clear_faults();
  EXPECT_GE(dev.now_ns(), kernel_end);
  EXPECT_EQ(reserved(alloc), 0);
  EXPECT_EQ(dev.counters().vm_mapped, 0u);
  EXPECT_EQ(alloc.validate(), "");
  dev.destroy_stream(s);
}

// A placement that needs two separate pieces mapped, the second of which the device refuses:
// the first is unmapped again and nothing is lost (try_allocate, so that no ladder retries).
TEST(CachingAllocatorExpandableReview, a_map_failing_half_way_through_a_placement_loses_nothing) {
  sim_device dev(sim());
  const stream_t s = dev.default_stream();
  caching_allocator alloc(dev, expandable(64 * MiB));
  void* a = alloc.allocate(4 * MiB, s);
  void* b = alloc.allocate(4 * MiB, s);
  void* c = alloc.allocate(4 * MiB, s);
  alloc.deallocate(a);
  alloc.deallocate(c);
  alloc.empty_cache();  // [unmapped 4 MiB][b][unmapped ...]
  alloc.deallocate(b);  // free between two unmapped runs
  ASSERT_EQ(dev.counters().vm_mapped, 4 * MiB);
  const std::uint64_t maps_before = dev.calls(sim_call::vm_map);

  // 16 MiB at the start of the run maps [0, 4) and [8, 16) MiB: two calls; the second fails.
  dev.fail_nth(sim_call::vm_map, 2);
  EXPECT_EQ(alloc.try_allocate(16 * MiB, s), nullptr);
  EXPECT_EQ(dev.calls(sim_call::vm_map), maps_before + 2);
  EXPECT_EQ(dev.counters().vm_mapped, 4 * MiB) << "the first piece was not unmapped";
  EXPECT_EQ(reserved(alloc), static_cast<std::int64_t>(4 * MiB));
  EXPECT_EQ(alloc.validate(), "");

  void* big = alloc.try_allocate(16 * MiB, s);
  ASSERT_NE(big, nullptr);
  EXPECT_EQ(dev.counters().vm_mapped, 16 * MiB);
  EXPECT_EQ(alloc.validate(), "");
  alloc.deallocate(big);
  alloc.empty_cache();
  EXPECT_EQ(dev.counters().vm_mapped, 0u);
}

// A block freed with record_stream uses stays pending while its neighbours' pages are unmapped
// by the OOM ladder, and its pages stay mapped: the other stream's kernel writes into it after
// the ladder is done (real backing: an unmapped page would fault).
TEST(CachingAllocatorExpandableReview, a_pending_block_next_to_unmapped_space_stays_mapped) {
  sim_device dev(sim(sim_backing::real));
  const stream_t s = dev.default_stream();
  const stream_t other = dev.create_stream(stream_priority::normal);
  caching_allocator alloc(dev, expandable(32 * MiB));
  void* a = alloc.allocate(16 * MiB, s);
  void* b = alloc.allocate(8 * MiB, s);
  ASSERT_EQ(reinterpret_cast<std::uintptr_t>(b) - reinterpret_cast<std::uintptr_t>(a), 16 * MiB);
  alloc.record_stream(b, other);
  gate g;
  std::shared_future<void> opened = g.future();
  std::atomic<bool> wrote{false};
  const touched_buffer touched{b, 8 * MiB};
  // Held back in real time; modelled as 1 s, so b's event is not complete by the host's clock.
  dev.launch(
      other, kernel_cost{0, 0, 1e9},
      [opened, b, &wrote] {
        opened.wait_for(std::chrono::seconds(5));
        std::memset(b, 0x5a, 8 * MiB);
        wrote = true;
      },
      {&touched, 1});
  alloc.deallocate(a);  // free at once
  alloc.deallocate(b);  // pending on `other`
  // 20 MiB fits only after a's pages are unmapped (16 MiB live or pending + 20 > 32).
  void* big = alloc.allocate(20 * MiB, s);
  EXPECT_FALSE(wrote.load());
  EXPECT_EQ(alloc.validate(), "");
  const nlohmann::json snap = alloc.snapshot();
  bool pending_seen = false;
  for (const auto& seg : snap["segments"]) {
    for (const auto& blk : seg["blocks"]) {
      if (blk["address"] == reinterpret_cast<std::uintptr_t>(b)) {
        pending_seen = blk["state"] == "active_pending_free";
      }
    }
  }
  EXPECT_TRUE(pending_seen);
  g.open();
  dev.synchronize();
  EXPECT_TRUE(wrote.load());
  alloc.deallocate(big);
  alloc.empty_cache();
  EXPECT_EQ(alloc.validate(), "");
  EXPECT_EQ(reserved(alloc), 0);
  dev.destroy_stream(other);
}

// Destroying the allocator with live and pending blocks in expandable segments unmaps every
// page and gives back every reservation (run under ASan: no block is read after it is gone).
TEST(CachingAllocatorExpandableReview, destruction_with_live_blocks_unmaps_and_releases_all) {
  sim_device dev(sim(sim_backing::real));
  const stream_t s = dev.default_stream();
  const stream_t other = dev.create_stream(stream_priority::normal);
  {
    caching_allocator alloc(dev, expandable(64 * MiB));
    void* a = alloc.allocate(3 * MiB, s);
    void* b = alloc.allocate(5 * MiB, s);
    void* c = alloc.allocate(9 * MiB, other);  // a second reservation
    void* d = alloc.allocate(12 * MiB, s);
    alloc.deallocate(b);
    alloc.empty_cache();  // b's whole pages unmapped: live blocks on both sides of a hole
    alloc.record_stream(d, other);
    dev.launch(other, kernel_cost{0, 0, 1e6}, [] {}, {});
    alloc.deallocate(d);  // pending at destruction
    EXPECT_EQ(alloc.validate(), "");
    EXPECT_GT(dev.counters().vm_reserved, 0u);
    (void)a;
    (void)c;
  }
  EXPECT_EQ(dev.counters().vm_mapped, 0u);
  EXPECT_EQ(dev.counters().vm_reserved, 0u);
  EXPECT_EQ(dev.counters().device_used, 0u);
  dev.destroy_stream(other);
}

// The window of Note [Expandable segments] where the lock is dropped: one thread's empty_cache
// waits (a kernel on the stream is held back) with the free block's whole pages set aside,
// while this thread frees both neighbours, takes the sliver left next to them and maps pages
// right after the block being unmapped. Nothing may merge with the unmapping block, the books
// must hold throughout, and after the wait exactly its pages are unmapped.
TEST(CachingAllocatorExpandableReview, unmapping_window_concurrency_with_neighbours_changing) {
  sim_device dev(sim(sim_backing::real));
  const stream_t s = dev.create_stream(stream_priority::normal);
  caching_allocator alloc(dev, expandable(64 * MiB));
  auto at = [](void* p, std::size_t offset) {
    return reinterpret_cast<void*>(reinterpret_cast<std::uintptr_t>(p) + offset);
  };
  constexpr std::size_t half = MiB / 2;
  void* a = alloc.allocate(2 * MiB + half, s);   // [0, 2.5)
  void* v = alloc.allocate(13 * MiB + half, s);  // [2.5, 16): pages [4, 16) are whole
  void* n = alloc.allocate(8 * MiB, s);          // [16, 24)
  ASSERT_EQ(v, at(a, 2 * MiB + half));
  ASSERT_EQ(n, at(a, 16 * MiB));
  alloc.deallocate(v);
  gate g;
  std::shared_future<void> opened = g.future();
  dev.launch(s, kernel_cost{0, 0, 1e6}, [opened] { opened.wait_for(std::chrono::seconds(5)); },
             {});
  std::thread releaser([&] { alloc.empty_cache(); });
  // Set aside: out of reserved_bytes (24 MiB mapped, 12 of them being unmapped).
  while (reserved(alloc) != static_cast<std::int64_t>(12 * MiB)) std::this_thread::yield();
  EXPECT_EQ(alloc.validate(), "");
  EXPECT_TRUE(dev.owns(at(a, 4 * MiB))) << "unmapped before the stream's work was done";

  alloc.deallocate(n);  // free next to the unmapping block: must not merge with it
  alloc.deallocate(a);  // merges with the free sliver [2.5, 4)
  void* front = alloc.allocate(4 * MiB, s);
  EXPECT_EQ(front, a) << "the free front block [0, 4) serves 4 MiB";
  void* back = alloc.allocate(20 * MiB, s);  // [16, 36): n's pages and 12 MiB mapped now
  EXPECT_EQ(back, n);
  EXPECT_EQ(alloc.validate(), "");
  EXPECT_EQ(dev.counters().vm_mapped, 4 * MiB + 12 * MiB + 20 * MiB) << "the window's pages";

  g.open();
  releaser.join();
  EXPECT_EQ(alloc.validate(), "");
  EXPECT_EQ(dev.counters().vm_mapped, 24 * MiB);
  EXPECT_FALSE(dev.owns(at(a, 4 * MiB)));
  EXPECT_FALSE(dev.owns(at(a, 15 * MiB)));
  EXPECT_TRUE(dev.owns(at(a, 3 * MiB)));
  EXPECT_TRUE(dev.owns(at(a, 16 * MiB)));
  EXPECT_EQ(reserved(alloc), static_cast<std::int64_t>(24 * MiB));
  alloc.deallocate(front);
  alloc.deallocate(back);
  alloc.empty_cache();
  EXPECT_EQ(dev.counters().vm_mapped, 0u);
  EXPECT_EQ(alloc.validate(), "");
  dev.destroy_stream(s);
}

// Threads sharing one stream allocate, free (some with record_stream) and empty the cache at
// once under a budget that keeps the ladder busy: unmapping waits with the lock dropped while
// others map, merge and free next to the blocks being unmapped. CI runs this under TSan.
TEST(CachingAllocatorExpandableReview, shared_stream_concurrency_with_empty_cache) {
  sim_device dev(sim());
  const stream_t s = dev.create_stream(stream_priority::normal);
  const stream_t other = dev.create_stream(stream_priority::normal);
  caching_allocator alloc(dev, expandable(96 * MiB));
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t) + 11);
      std::vector<void*> mine;
      for (int op = 0; op < 1000; ++op) {
        if (mine.size() < 3 && rng() % 3 != 0) {
          try {
            void* p = alloc.allocate((1 + rng() % 12) * MiB + (rng() % 4) * 512 * 1024, s);
            if (rng() % 4 == 0) alloc.record_stream(p, other);
            mine.push_back(p);
          } catch (const out_of_memory&) {
          }
        } else if (!mine.empty()) {
          alloc.deallocate(mine.back());
          mine.pop_back();
        }
      }
      for (void* p : mine) alloc.deallocate(p);
    });
  }
  std::thread releaser([&] {
    while (!stop.load()) {
      alloc.empty_cache();
      std::this_thread::yield();
    }
  });
  for (std::thread& t : threads) t.join();
  stop = true;
  releaser.join();
  EXPECT_EQ(alloc.validate(), "");
  EXPECT_GT(alloc.stats().num_device_frees, 0u) << "nothing was unmapped: the window untested";
  alloc.empty_cache();
  EXPECT_EQ(reserved(alloc), 0);
  EXPECT_EQ(dev.counters().vm_mapped, 0u);
  dev.destroy_stream(other);
  dev.destroy_stream(s);
}

}  // namespace
}  // namespace gpuswap
