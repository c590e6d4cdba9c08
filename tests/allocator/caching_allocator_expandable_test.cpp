// caching_allocator with expandable_segments (Note [Expandable segments]): large requests are
// served from scattered free memory, reserved bytes are mapped pages, unmapping waits for the
// stream's work, a failed map loses nothing, and the books stay exact under random and
// concurrent use.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "allocator/caching_allocator.hpp"
#include "core/errors.hpp"
#include "device/sim_device.hpp"
#include "support/expandable_segments.hpp"

namespace gpuswap {
namespace {

constexpr std::size_t MiB = std::size_t{1} << 20;
constexpr std::size_t GiB = std::size_t{1} << 30;
constexpr std::size_t page = 2 * MiB;  // the simulator's default vm_page_size

using testing_support::expandable;
using testing_support::reserved;

sim_options sim(sim_backing backing = sim_backing::phantom) {
  return testing_support::expandable_sim(backing);
}
// Eight 8 MiB blocks cut from one 64 MiB block (a whole 64 MiB budget), then every other one
// freed: 32 MiB free, in 8 MiB holes between live blocks of one segment.
std::vector<void*> checkerboard(caching_allocator& alloc, stream_t s) {
  alloc.deallocate(alloc.allocate(64 * MiB, s));
  std::vector<void*> blocks;
  for (int i = 0; i < 8; ++i) blocks.push_back(alloc.allocate(8 * MiB, s));
  std::vector<void*> kept;
  for (int i = 0; i < 8; ++i) {
    if (i % 2 == 0) {
      alloc.deallocate(blocks[i]);
    } else {
      kept.push_back(blocks[i]);
    }
  }
  return kept;
}

TEST(CachingAllocatorExpandable, serves_a_large_request_from_free_memory_in_holes) {
  sim_device dev(sim());
  const stream_t s = dev.default_stream();

  // The plain segments cannot: no hole holds 24 MiB and no segment is wholly free.
  {
    caching_allocator_options o = expandable(64 * MiB);
    o.expandable_segments = false;
    caching_allocator plain(dev, o);
    std::vector<void*> kept = checkerboard(plain, s);
    EXPECT_THROW(plain.allocate(24 * MiB, s), out_of_memory);
    for (void* p : kept) plain.deallocate(p);
  }

  caching_allocator alloc(dev, expandable(64 * MiB));
  ASSERT_TRUE(alloc.expandable_segments());
  std::vector<void*> kept = checkerboard(alloc, s);
  void* big = alloc.allocate(24 * MiB, s);
  ASSERT_NE(big, nullptr);
  EXPECT_EQ(alloc.validate(), "");
  EXPECT_LE(reserved(alloc), static_cast<std::int64_t>(64 * MiB));
  EXPECT_EQ(alloc.stats().num_ooms, 0u);
  // The holes were unmapped and the same memory mapped where 24 MiB of address space is free.
  EXPECT_GT(alloc.stats().num_device_frees, 0u);
  alloc.deallocate(big);
  for (void* p : kept) alloc.deallocate(p);
  EXPECT_EQ(alloc.validate(), "");
}

TEST(CachingAllocatorExpandable, reserved_bytes_are_the_mapped_pages) {
  sim_device dev(sim());
  const stream_t s = dev.default_stream();
  const std::size_t free_before = dev.memory().free_bytes;
  caching_allocator alloc(dev, expandable(64 * MiB));
  void* a = alloc.allocate(3 * MiB, s);
  EXPECT_EQ(reserved(alloc), static_cast<std::int64_t>(2 * page));
  EXPECT_EQ(dev.memory().free_bytes, free_before - 2 * page);
  EXPECT_EQ(alloc.stats().segment.all().current, 1);
  alloc.deallocate(a);
  EXPECT_EQ(alloc.validate(), "");
  alloc.empty_cache();
  EXPECT_EQ(reserved(alloc), 0);
  EXPECT_EQ(alloc.stats().segment.all().current, 0);
  EXPECT_EQ(dev.memory().free_bytes, free_before);
  EXPECT_EQ(alloc.validate(), "");
}

TEST(CachingAllocatorExpandable, a_block_next_to_a_live_one_shares_its_page) {
  sim_device dev(sim());
  const stream_t s = dev.default_stream();
  caching_allocator alloc(dev, expandable(64 * MiB));
  // 4.5 MiB maps three pages and leaves 1.5 MiB of the third free; the next 3 MiB starts
  // there and maps one more page, not two.
  void* a = alloc.allocate(4 * MiB + 512 * 1024, s);
  EXPECT_EQ(reserved(alloc), static_cast<std::int64_t>(3 * page));
  void* b = alloc.allocate(3 * MiB, s);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(b) - reinterpret_cast<std::uintptr_t>(a),
            4 * MiB + 512 * 1024);
  EXPECT_EQ(reserved(alloc), static_cast<std::int64_t>(4 * page));
  EXPECT_EQ(alloc.validate(), "");
  alloc.deallocate(a);
  alloc.deallocate(b);
  alloc.empty_cache();
  EXPECT_EQ(reserved(alloc), 0);
  EXPECT_EQ(alloc.validate(), "");
}

TEST(CachingAllocatorExpandable, snapshot_shows_the_unmapped_address_space) {
  sim_device dev(sim());
  caching_allocator alloc(dev, expandable(64 * MiB));
  void* a = alloc.allocate(4 * MiB, dev.default_stream());
  const nlohmann::json snap = alloc.snapshot();
  ASSERT_EQ(snap["segments"].size(), 1u);
  const nlohmann::json& seg = snap["segments"][0];
  EXPECT_EQ(seg["expandable"], true);
  EXPECT_EQ(seg["mapped"], 4 * MiB);
  EXPECT_EQ(seg["size"], 4 * 64 * MiB) << "four budgets of address space";
  ASSERT_EQ(seg["blocks"].size(), 2u);
  EXPECT_EQ(seg["blocks"][0]["state"], "active_allocated");
  EXPECT_EQ(seg["blocks"][1]["state"], "unmapped");
  alloc.deallocate(a);
}

// Unmapping pulls the memory from under the device, and the driver does not wait for work
// enqueued on it: the allocator must. Removing the wait before unmap_pages makes the host's
// modelled clock read earlier than the kernel's end.
TEST(CachingAllocatorExpandable, unmapping_waits_for_the_blocks_stream) {
  sim_device dev(sim());
  const stream_t s = dev.create_stream(stream_priority::normal);
  caching_allocator alloc(dev, expandable(64 * MiB));
  void* a = alloc.allocate(16 * MiB, s);
  const kernel_cost long_kernel{0, 0, 5e6};  // 5 ms on the modelled clock
  const touched_buffer touched{a, 16 * MiB};
  dev.launch(s, long_kernel, [] {}, {&touched, 1});
  const double kernel_end = dev.stream_tail_ns(s);
  alloc.deallocate(a);  // reusable on s at once; its pages are still in use until kernel_end
  EXPECT_LT(dev.now_ns(), kernel_end);
  alloc.empty_cache();
  EXPECT_GE(dev.now_ns(), kernel_end);
  EXPECT_EQ(reserved(alloc), 0);
  dev.destroy_stream(s);
}

TEST(CachingAllocatorExpandable, the_ladder_unmaps_only_what_the_request_needs) {
  sim_device dev(sim());
  const stream_t s = dev.default_stream();
  caching_allocator alloc(dev, expandable(64 * MiB));
  std::vector<void*> kept = checkerboard(alloc, s);  // four 8 MiB holes
  void* big = alloc.allocate(16 * MiB, s);
  // 32 MiB live + 16 MiB new + at most the holes not needed: two of the four holes stay mapped.
  EXPECT_EQ(reserved(alloc), static_cast<std::int64_t>(64 * MiB));
  alloc.deallocate(big);
  for (void* p : kept) alloc.deallocate(p);
  EXPECT_EQ(alloc.validate(), "");
}

TEST(CachingAllocatorExpandable, a_failed_map_loses_nothing) {
  sim_device dev(sim());
  const stream_t s = dev.default_stream();
  const std::size_t free_before = dev.memory().free_bytes;
  caching_allocator alloc(dev, expandable(64 * MiB));
  void* a = alloc.allocate(8 * MiB, s);
  dev.fail_always(sim_call::vm_map);
  EXPECT_THROW(alloc.allocate(16 * MiB, s), out_of_memory);
  EXPECT_EQ(alloc.validate(), "");
  EXPECT_EQ(reserved(alloc), static_cast<std::int64_t>(8 * MiB));
  EXPECT_EQ(dev.memory().free_bytes, free_before - 8 * MiB);
  dev.clear_faults();
  void* b = alloc.allocate(16 * MiB, s);
  EXPECT_NE(b, nullptr);
  // One failure on the way: the ladder releases and retries, and the request is served.
  dev.fail_nth(sim_call::vm_map, 1);
  void* c = alloc.allocate(16 * MiB, s);
  EXPECT_NE(c, nullptr);
  EXPECT_EQ(alloc.validate(), "");
  for (void* p : {a, b, c}) alloc.deallocate(p);
  alloc.empty_cache();
  EXPECT_EQ(dev.memory().free_bytes, free_before);
}

TEST(CachingAllocatorExpandable, live_bytes_survive_unmapping_and_mapping_around_them) {
  sim_device dev(sim(sim_backing::real));
  const stream_t s = dev.default_stream();
  caching_allocator alloc(dev, expandable(64 * MiB));
  std::vector<void*> kept = checkerboard(alloc, s);
  std::vector<std::vector<unsigned char>> patterns;
  for (std::size_t i = 0; i < kept.size(); ++i) {
    std::vector<unsigned char> bytes(8 * MiB);
    for (std::size_t j = 0; j < bytes.size(); ++j) bytes[j] = static_cast<unsigned char>(i * 7 + j);
    dev.copy_async(kept[i], bytes.data(), bytes.size(), copy_kind::host_to_device, s);
    patterns.push_back(std::move(bytes));
  }
  dev.synchronize();
  void* big = alloc.allocate(24 * MiB, s);  // unmaps the holes between the live blocks
  std::vector<unsigned char> fill(24 * MiB, 0xab);
  dev.copy_async(big, fill.data(), fill.size(), copy_kind::host_to_device, s);
  for (std::size_t i = 0; i < kept.size(); ++i) {
    std::vector<unsigned char> back(8 * MiB);
    dev.copy_async(back.data(), kept[i], back.size(), copy_kind::device_to_host, s);
    dev.synchronize();
    EXPECT_EQ(back, patterns[i]) << "block " << i;
  }
  alloc.deallocate(big);
  for (void* p : kept) alloc.deallocate(p);
}

// Random large requests and frees under a tight budget: the books stay exact, the budget holds,
// and a request is served whenever the live blocks' pages leave room for it (which plain
// segments cannot promise).
TEST(CachingAllocatorExpandable, random_use_keeps_the_books_and_never_strands_memory) {
  sim_device dev(sim());
  const stream_t s = dev.default_stream();
  constexpr std::size_t budget = 256 * MiB;
  caching_allocator alloc(dev, expandable(budget));
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<std::size_t> size_of(2 * 1024, 40 * 1024);  // KiB
  struct live_block {
    void* p;
    std::size_t size;
  };
  std::vector<live_block> live;
  std::size_t served_beyond_plain = 0;
  for (int op = 0; op < 3000; ++op) {
    const bool do_alloc = live.empty() || rng() % 2 == 0;
    if (do_alloc) {
      const std::size_t bytes = size_of(rng) * 1024;
      // Each live block holds its bytes plus at most a page on each side.
      std::size_t pages_needed = 0;
      for (const live_block& b : live) pages_needed += b.size + 2 * page;
      pages_needed += bytes + 2 * page;
      try {
        void* p = alloc.allocate(bytes, s);
        live.push_back({p, alloc.allocated_size(p)});
        if (pages_needed > budget) ++served_beyond_plain;
      } catch (const out_of_memory&) {
        ASSERT_GT(pages_needed, budget) << "op " << op << ": refused although the pages fit";
      }
    } else {
      const std::size_t i = rng() % live.size();
      alloc.deallocate(live[i].p);
      live.erase(live.begin() + static_cast<std::ptrdiff_t>(i));
    }
    if (op % 100 == 0) {
      ASSERT_EQ(alloc.validate(), "") << "op " << op;
    }
    ASSERT_LE(reserved(alloc), static_cast<std::int64_t>(budget));
  }
  for (const live_block& b : live) alloc.deallocate(b.p);
  alloc.empty_cache();
  EXPECT_EQ(alloc.validate(), "");
  EXPECT_EQ(reserved(alloc), 0);
}

TEST(CachingAllocatorExpandable, a_device_without_virtual_memory_gets_plain_segments) {
  sim_options o = sim();
  o.vm_page_size = 0;
  sim_device dev(o);
  caching_allocator alloc(dev, expandable(64 * MiB));
  EXPECT_FALSE(alloc.expandable_segments());
  void* a = alloc.allocate(8 * MiB, dev.default_stream());
  EXPECT_EQ(reserved(alloc), static_cast<std::int64_t>(20 * MiB)) << "one large segment";
  alloc.deallocate(a);
  EXPECT_EQ(alloc.validate(), "");
}

// Four threads, each on its own stream, allocate and free large blocks under a budget that
// forces unmapping and mapping; CI runs this under ThreadSanitizer.
TEST(CachingAllocatorExpandable, expandable_concurrency) {
  sim_device dev(sim());
  caching_allocator alloc(dev, expandable(192 * MiB));
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      const stream_t s = dev.create_stream(stream_priority::normal);
      std::mt19937 rng(static_cast<unsigned>(t) + 1);
      std::vector<void*> mine;
      for (int op = 0; op < 400; ++op) {
        if (mine.size() < 3 && rng() % 3 != 0) {
          try {
            mine.push_back(alloc.allocate((2 + rng() % 14) * MiB, s));
          } catch (const out_of_memory&) {
            // Other threads hold the budget: free ours and go on.
          }
        } else if (!mine.empty()) {
          alloc.deallocate(mine.back());
          mine.pop_back();
        }
      }
      for (void* p : mine) alloc.deallocate(p);
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(alloc.validate(), "");
  alloc.empty_cache();
  EXPECT_EQ(reserved(alloc), 0);
}

}  // namespace
}  // namespace gpuswap
