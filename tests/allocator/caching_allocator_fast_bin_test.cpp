// caching_allocator's fast bins (Note [Deferred coalescing], caching_allocator.cpp): a freed
// small-pool block waits unmerged for a request of its exact size on its stream; a miss,
// a segment release and the OOM ladder consolidate. Each test distinguishes deferred from eager
// coalescing (or a broken consolidation) by where a block lands or whether a segment is
// obtained or released.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "allocator/caching_allocator.hpp"
#include "device/sim_device.hpp"
#include "support/small_sim.hpp"

namespace gpuswap {
namespace {

constexpr std::size_t KiB = std::size_t{1} << 10;
constexpr std::size_t MiB = std::size_t{1} << 20;

using testing_support::sim_with_capacity;

caching_allocator_options fast_bins(std::size_t limit) {
  caching_allocator_options o;
  o.fast_bin_limit = limit;
  return o;
}

std::vector<std::string> states_of_segment(const caching_allocator& a, std::size_t index) {
  std::vector<std::string> out;
  const nlohmann::json snap = a.snapshot();  // kept: the loop must not outlive it
  for (const auto& b : snap["segments"][index]["blocks"]) {
    out.push_back(b["state"].get<std::string>());
  }
  return out;
}

class caching_allocator_fast_bin_test : public ::testing::Test {
 protected:
  sim_device dev{sim_with_capacity()};
  stream_t s0 = dev.default_stream();

  void expect_valid(const caching_allocator& a) { EXPECT_EQ(a.validate(), ""); }

  // One 2 MiB segment tiled exactly by [z 4 KiB][x 4 KiB][rest1 1 MiB][rest2 1 MiB - 8 KiB],
  // so that no free block is left beside the ones a test frees.
  struct tiled {
    void* z;
    void* x;
    void* rest1;
    void* rest2;
  };
  tiled fill_segment(caching_allocator& a, stream_t s) {
    tiled t{};
    t.z = a.allocate(4 * KiB, s);
    t.x = a.allocate(4 * KiB, s);
    t.rest1 = a.allocate(MiB, s);
    t.rest2 = a.allocate(MiB - 8 * KiB, s);
    EXPECT_EQ(static_cast<char*>(t.x), static_cast<char*>(t.z) + 4 * KiB);
    EXPECT_EQ(a.stats().segment.all().current, 1);
    EXPECT_EQ(a.stats().inactive_split.all().current, 0);
    return t;
  }
};

TEST_F(caching_allocator_fast_bin_test, same_size_reuses_the_last_freed_block_unmerged) {
  caching_allocator a(dev, {});
  tiled t = fill_segment(a, s0);
  a.deallocate(t.z);
  a.deallocate(t.x);
  // Both wait unmerged: eager coalescing would have made one 8 KiB block.
  EXPECT_EQ(states_of_segment(a, 0),
            (std::vector<std::string>{"inactive", "inactive", "active_allocated",
                                      "active_allocated"}));
  auto st = a.stats();
  EXPECT_EQ(st.allocation.all().current, 2);
  EXPECT_EQ(st.active.all().current, 2);
  EXPECT_EQ(st.allocated_bytes.all().current, static_cast<std::int64_t>(2 * MiB - 8 * KiB));
  EXPECT_EQ(st.requested_bytes.all().current, static_cast<std::int64_t>(2 * MiB - 8 * KiB));
  EXPECT_EQ(st.inactive_split.all().current, 2);  // free memory, in PyTorch's terms
  EXPECT_EQ(st.inactive_split_bytes[stat_pool::small].current,
            static_cast<std::int64_t>(8 * KiB));
  expect_valid(a);
  // The last one freed comes back first; merged, the request would be carved at z.
  void* p = a.allocate(4 * KiB - 100, s0);  // rounds to the same 4 KiB
  EXPECT_EQ(p, t.x);
  EXPECT_EQ(a.stats().requested_bytes.all().current,
            static_cast<std::int64_t>(2 * MiB - 8 * KiB + 4 * KiB - 100));
  void* q = a.allocate(4 * KiB, s0);
  EXPECT_EQ(q, t.z);
  EXPECT_EQ(a.stats().inactive_split.all().current, 0);
  EXPECT_EQ(a.stats().num_device_allocs, 1u);
  expect_valid(a);
  for (void* r : {p, q, t.rest1, t.rest2}) a.deallocate(r);
  expect_valid(a);
  a.empty_cache();
  EXPECT_EQ(a.stats().reserved_bytes.all().current, 0);
}

TEST_F(caching_allocator_fast_bin_test, another_size_consolidates_instead_of_a_new_segment) {
  caching_allocator a(dev, {});
  tiled t = fill_segment(a, s0);
  a.deallocate(t.z);
  a.deallocate(t.x);
  // 8 KiB: no fast bin has it and no merged block fits, so the fast bins are merged and the
  // request fits where z and x were, in the segment already held.
  void* p = a.allocate(8 * KiB, s0);
  EXPECT_EQ(p, t.z);
  EXPECT_EQ(a.allocated_size(p), 8 * KiB);
  EXPECT_EQ(a.stats().num_device_allocs, 1u);
  EXPECT_EQ(a.stats().segment.all().current, 1);
  expect_valid(a);
  for (void* r : {p, t.rest1, t.rest2}) a.deallocate(r);
  expect_valid(a);
}

TEST_F(caching_allocator_fast_bin_test, consolidation_merges_with_free_and_deferred_neighbours) {
  caching_allocator a(dev, fast_bins(2));
  tiled t = fill_segment(a, s0);
  a.deallocate(t.z);      // deferred
  a.deallocate(t.rest1);  // deferred (the bins are now full)
  a.deallocate(t.x);      // free at once, but not merged with its deferred neighbours
  EXPECT_EQ(states_of_segment(a, 0),
            (std::vector<std::string>{"inactive", "inactive", "inactive", "active_allocated"}));
  expect_valid(a);
  // 8 KiB: no fast bin has it and the free x is too small; consolidation merges z, x and
  // rest1 into one block, which serves it in place.
  void* p = a.allocate(8 * KiB, s0);
  EXPECT_EQ(p, t.z);
  EXPECT_EQ(a.stats().num_device_allocs, 1u);
  EXPECT_EQ(states_of_segment(a, 0),
            (std::vector<std::string>{"active_allocated", "inactive", "active_allocated"}));
  EXPECT_EQ(a.snapshot()["segments"][0]["blocks"][1]["size"].get<std::size_t>(), MiB);
  expect_valid(a);
  a.deallocate(p);
  a.deallocate(t.rest2);
  a.empty_cache();  // consolidates the rest: the segment is whole again and goes back
  EXPECT_EQ(a.stats().reserved_bytes.all().current, 0);
  EXPECT_EQ(a.stats().num_device_frees, 1u);
  expect_valid(a);
}

TEST_F(caching_allocator_fast_bin_test, the_limit_sends_further_frees_down_the_merging_path) {
  caching_allocator a(dev, fast_bins(1));
  tiled t = fill_segment(a, s0);
  a.deallocate(t.z);  // deferred
  a.deallocate(t.x);  // the bins are full: free at once (its neighbour z is not merged with)
  expect_valid(a);
  // With room for both, x (freed last) would come back first; here the fast bin has only z.
  void* p = a.allocate(4 * KiB, s0);
  EXPECT_EQ(p, t.z);
  a.deallocate(p);
  expect_valid(a);
  for (void* r : {t.rest1, t.rest2}) a.deallocate(r);
  a.empty_cache();
  EXPECT_EQ(a.stats().reserved_bytes.all().current, 0);
}

TEST_F(caching_allocator_fast_bin_test, a_limit_of_zero_coalesces_eagerly) {
  caching_allocator a(dev, fast_bins(0));
  tiled t = fill_segment(a, s0);
  a.deallocate(t.z);
  a.deallocate(t.x);
  EXPECT_EQ(states_of_segment(a, 0),
            (std::vector<std::string>{"inactive", "active_allocated", "active_allocated"}));
  void* p = a.allocate(4 * KiB, s0);
  EXPECT_EQ(p, t.z);  // carved from the merged 8 KiB block
  for (void* r : {p, t.rest1, t.rest2}) a.deallocate(r);
  expect_valid(a);
}

TEST_F(caching_allocator_fast_bin_test, a_fast_bin_block_is_never_handed_to_another_stream) {
  caching_allocator a(dev, {});
  stream_t s1 = dev.create_stream(stream_priority::normal);
  tiled t = fill_segment(a, s0);
  a.deallocate(t.x);
  void* p = a.allocate(4 * KiB, s1);  // the exact size s0's fast bin holds
  EXPECT_NE(p, t.x);
  EXPECT_EQ(a.stats().segment.all().current, 2);
  expect_valid(a);
  void* q = a.allocate(4 * KiB, s0);
  EXPECT_EQ(q, t.x);
  for (void* r : {p, q, t.z, t.rest1, t.rest2}) a.deallocate(r);
  expect_valid(a);
  a.empty_cache();
  EXPECT_EQ(a.stats().reserved_bytes.all().current, 0);
  dev.destroy_stream(s1);
}

TEST_F(caching_allocator_fast_bin_test, empty_cache_after_fast_bin_frees_returns_every_segment) {
  caching_allocator a(dev, {});
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<std::size_t> size(1, MiB);
  std::vector<void*> live;
  for (int i = 0; i < 500; ++i) live.push_back(a.allocate(size(rng), s0));
  const auto segments = a.stats().segment.all().current;
  EXPECT_GT(segments, 10);
  std::shuffle(live.begin(), live.end(), rng);
  for (void* p : live) a.deallocate(p);
  auto st = a.stats();
  EXPECT_EQ(st.allocation.all().current, 0);
  EXPECT_EQ(st.active_bytes.all().current, 0);
  EXPECT_EQ(st.requested_bytes.all().current, 0);
  EXPECT_EQ(st.inactive_split_bytes.all().current, st.reserved_bytes.all().current);
  EXPECT_GT(st.inactive_split.all().current, segments);  // pieces wait unmerged
  expect_valid(a);
  a.empty_cache();
  st = a.stats();
  EXPECT_EQ(st.reserved_bytes.all().current, 0);
  EXPECT_EQ(st.inactive_split.all().current, 0);
  EXPECT_EQ(st.num_device_frees, static_cast<std::uint64_t>(segments));
  EXPECT_EQ(a.snapshot()["segments"].size(), 0u);
  expect_valid(a);
}

TEST_F(caching_allocator_fast_bin_test, the_oom_ladder_consolidates_before_releasing) {
  // Room for two small segments only. Once their blocks wait in the fast bins, a large request
  // fits only if the ladder merges them, sees the segments wholly free and releases them.
  caching_allocator_options o;
  o.device_limit = 4 * MiB;
  caching_allocator a(dev, o);
  std::vector<void*> live;
  for (int i = 0; i < 8; ++i) live.push_back(a.allocate(512 * KiB, s0));
  EXPECT_EQ(a.stats().segment.all().current, 2);
  for (void* p : live) a.deallocate(p);
  void* big = a.allocate(3 * MiB, s0);
  EXPECT_NE(big, nullptr);
  EXPECT_EQ(a.stats().num_device_frees, 2u);
  expect_valid(a);
  a.deallocate(big);
  a.empty_cache();
  EXPECT_EQ(a.stats().reserved_bytes.all().current, 0);
}

TEST_F(caching_allocator_fast_bin_test, steady_state_replay_neither_splits_nor_merges) {
  // A training loop's shape: the same sizes every iteration. After the first, every request
  // is a fast-bin hit and every free a push: the blocks stay as the first iteration cut them
  // (eager coalescing would merge each segment back whole after every iteration).
  caching_allocator a(dev, {});
  std::mt19937_64 rng(11);
  std::uniform_int_distribution<std::size_t> size(1, MiB);
  std::vector<std::size_t> sizes(300);
  for (std::size_t& s : sizes) s = size(rng);
  std::vector<void*> first;
  for (std::size_t s : sizes) first.push_back(a.allocate(s, s0));
  auto block_count = [&a] {
    std::size_t n = 0;
    const nlohmann::json snap = a.snapshot();
    for (const auto& seg : snap["segments"]) n += seg["blocks"].size();
    return n;
  };
  const std::size_t blocks = block_count();
  const auto segments = a.stats().segment.all().current;
  EXPECT_GT(blocks, static_cast<std::size_t>(segments));
  for (auto it = first.rbegin(); it != first.rend(); ++it) a.deallocate(*it);
  for (int iteration = 0; iteration < 3; ++iteration) {
    EXPECT_EQ(block_count(), blocks);
    std::vector<void*> live;
    for (std::size_t s : sizes) live.push_back(a.allocate(s, s0));
    EXPECT_EQ(block_count(), blocks);
    std::shuffle(live.begin(), live.end(), rng);
    for (void* p : live) a.deallocate(p);
    expect_valid(a);
  }
  EXPECT_EQ(a.stats().segment.all().current, segments);
  a.empty_cache();
  EXPECT_EQ(a.stats().reserved_bytes.all().current, 0);
}

}  // namespace
}  // namespace gpuswap
