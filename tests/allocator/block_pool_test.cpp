// block_pool and size_class_bins: best fit by exact size in the small pool (Note [Segregated
// fit]) agrees with an ordered reference, keeps streams apart, and the large pool's tree keeps
// PyTorch's max_split_size rule. Also set_trace_hooks' preconditions.
#include "allocator/block_pool.hpp"

#include <gtest/gtest.h>

#include <deque>
#include <map>
#include <random>
#include <vector>

#include "allocator/caching_allocator.hpp"
#include "allocator/size_class_bins.hpp"
#include "core/errors.hpp"
#include "device/sim_device.hpp"

namespace gpuswap {
namespace {

constexpr std::size_t KiB = std::size_t{1} << 10;
constexpr std::size_t MiB = std::size_t{1} << 20;
constexpr stream_t stream_a{1};
constexpr stream_t stream_b{2};

block& make_block(std::deque<block>& storage, std::size_t size, stream_t stream,
                  pool_kind kind = pool_kind::small) {
  block& b = storage.emplace_back();
  b.size = size;
  b.stream = stream;
  b.pool = kind;
  b.address = 0x10000 + storage.size() * 4 * MiB;
  return b;
}

TEST(SizeClassBins, FindsTheSmallestSizeAtLeastTheRequestAcrossWordBoundaries) {
  std::deque<block> storage;
  size_class_bins bins(stream_a);
  // Classes 62, 63 | 64 (one bitmap word ends at class 63) and the very last class.
  block& c62 = make_block(storage, 63 * 512, stream_a);
  block& c64 = make_block(storage, 65 * 512, stream_a);
  block& last = make_block(storage, size_class_bins::max_size, stream_a);
  bins.insert(c62);
  bins.insert(c64);
  bins.insert(last);
  EXPECT_EQ(bins.size(), 3u);
  EXPECT_EQ(bins.smallest_at_least(1), &c62);
  EXPECT_EQ(bins.smallest_at_least(63 * 512), &c62);
  EXPECT_EQ(bins.smallest_at_least(63 * 512 + 1), &c64);  // class 63 empty: next word
  EXPECT_EQ(bins.smallest_at_least(65 * 512 + 1), &last);
  EXPECT_EQ(bins.smallest_at_least(size_class_bins::max_size), &last);
  EXPECT_EQ(bins.smallest_at_least(size_class_bins::max_size + 1), nullptr);

  bins.erase(c64);  // its word and its summary bit must clear
  EXPECT_EQ(bins.smallest_at_least(63 * 512 + 1), &last);
  bins.erase(last);
  EXPECT_EQ(bins.smallest_at_least(63 * 512 + 1), nullptr);
  EXPECT_TRUE(bins.contains(c62));
  EXPECT_FALSE(bins.contains(last));
  bins.erase(c62);
  EXPECT_EQ(bins.size(), 0u);
  EXPECT_EQ(bins.smallest_at_least(1), nullptr);
}

TEST(SizeClassBins, AgreesWithAnOrderedReferenceUnderRandomInsertsAndErases) {
  std::mt19937_64 rng(7);
  std::deque<block> storage;
  size_class_bins bins(stream_a);
  std::multimap<std::size_t, block*> reference;  // size -> free block
  std::uniform_int_distribution<std::size_t> classes(1, size_class_bins::class_count);
  for (int step = 0; step < 20'000; ++step) {
    const bool grow = reference.empty() || rng() % 3 != 0;
    if (grow) {
      block& b = make_block(storage, classes(rng) * 512, stream_a);
      bins.insert(b);
      reference.emplace(b.size, &b);
    } else {
      auto it = reference.begin();
      std::advance(it, static_cast<long>(rng() % reference.size()));
      bins.erase(*it->second);
      reference.erase(it);
    }
    const std::size_t want = std::uniform_int_distribution<std::size_t>(
        1, size_class_bins::max_size)(rng);
    const block* got = bins.smallest_at_least(want);
    auto expect = reference.lower_bound(want);
    if (expect == reference.end()) {
      ASSERT_EQ(got, nullptr) << "step " << step << " want " << want;
    } else {
      ASSERT_NE(got, nullptr) << "step " << step << " want " << want;
      ASSERT_EQ(got->size, expect->first) << "step " << step << " want " << want;
    }
    ASSERT_EQ(bins.size(), reference.size());
  }
  for (auto& [size, b] : reference) bins.erase(*b);
}

TEST(BlockPool, SmallPoolKeepsStreamsApart) {
  std::deque<block> storage;
  block_pool pool(pool_kind::small);
  pool.add_stream(stream_a);
  pool.add_stream(stream_b);
  pool.add_stream(stream_a);  // idempotent
  block& a = make_block(storage, 4 * KiB, stream_a);
  block& b = make_block(storage, 8 * KiB, stream_b);
  pool.insert(a);
  pool.insert(b);
  EXPECT_EQ(pool.size(), 2u);
  EXPECT_EQ(pool.best_fit(stream_a, 512, SIZE_MAX, 0), &a);
  EXPECT_EQ(pool.best_fit(stream_b, 512, SIZE_MAX, 0), &b);
  EXPECT_EQ(pool.best_fit(stream_a, 5 * KiB, SIZE_MAX, 0), nullptr);  // b is another stream's
  EXPECT_EQ(pool.best_fit(stream_t{3}, 512, SIZE_MAX, 0), nullptr);  // never added
  EXPECT_TRUE(pool.contains(a));
  pool.erase(a);
  EXPECT_FALSE(pool.contains(a));
  std::size_t seen = 0;
  pool.for_each([&](const block& x) {
    EXPECT_EQ(&x, &b);
    ++seen;
  });
  EXPECT_EQ(seen, 1u);
  pool.erase(b);
  EXPECT_TRUE(pool.empty());
}

TEST(SizeClassBins, FastBinsAreExactSizeLifosThatCarryTheAddresses) {
  std::deque<block> storage;
  size_class_bins bins(stream_a);
  block& x = make_block(storage, 4 * KiB, stream_a);
  block& y = make_block(storage, 4 * KiB, stream_a);
  block& z = make_block(storage, 8 * KiB, stream_a);
  for (block* b : {&x, &y, &z}) {
    b->state = block_state::deferred;
    EXPECT_TRUE(bins.push_deferred(*b));
  }
  EXPECT_EQ(bins.deferred_size(), 3u);
  EXPECT_EQ(bins.size(), 0u);  // not in the best-fit lists
  EXPECT_TRUE(bins.deferred_links_consistent());
  EXPECT_EQ(bins.smallest_at_least(512), nullptr);
  EXPECT_EQ(bins.pop_deferred(2 * KiB).b, nullptr);  // exact sizes only, never a larger one
  EXPECT_EQ(bins.pop_deferred(size_class_bins::max_size + 512).b, nullptr);
  const std::uintptr_t x_address = x.address;
  x.address = 0;  // a pop must not read the block: the bin carries its address
  const auto first = bins.pop_deferred(4 * KiB);
  EXPECT_EQ(first.b, &y);  // the last pushed
  EXPECT_EQ(first.address, y.address);
  EXPECT_EQ(first.next.b, &x);  // what the next pop of this size returns, for a prefetch
  EXPECT_EQ(first.next.address, x_address);
  const auto second = bins.pop_deferred(4 * KiB);
  EXPECT_EQ(second.b, &x);
  EXPECT_EQ(second.address, x_address);
  EXPECT_EQ(second.next.b, nullptr);
  x.address = x_address;
  EXPECT_EQ(bins.pop_deferred(4 * KiB).b, nullptr);
  EXPECT_TRUE(bins.push_deferred(x));
  std::vector<block*> drained;
  bins.drain_deferred([&](block& b) {
    EXPECT_EQ(bins.deferred_links_consistent(), true);  // the count already left with b
    drained.push_back(&b);
  });
  EXPECT_EQ(drained, (std::vector<block*>{&x, &z}));  // by size class
  EXPECT_EQ(bins.deferred_size(), 0u);
  EXPECT_EQ(bins.pop_deferred(8 * KiB).b, nullptr);
  bins.shrink_deferred();
  EXPECT_TRUE(bins.push_deferred(z));  // usable again after giving its memory back
  EXPECT_EQ(bins.pop_deferred(8 * KiB).b, &z);
}

TEST(SizeClassBins, ALinkThatDisagreesWithItsBlockIsCaught) {
  std::deque<block> storage;
  size_class_bins bins(stream_a);
  block& x = make_block(storage, 4 * KiB, stream_a);
  x.state = block_state::deferred;
  ASSERT_TRUE(bins.push_deferred(x));
  EXPECT_TRUE(bins.deferred_links_consistent());
  x.address += 512;  // the block moved under its bin entry
  EXPECT_FALSE(bins.deferred_links_consistent());
  x.address -= 512;
  x.size = 8 * KiB;  // or changed size: it sits in another size's bin
  EXPECT_FALSE(bins.deferred_links_consistent());
  x.size = 4 * KiB;
  EXPECT_EQ(bins.pop_deferred(4 * KiB).b, &x);
}

TEST(BlockPool, FastBinsKeepStreamsApart) {
  std::deque<block> storage;
  block_pool pool(pool_kind::small);
  pool.add_stream(stream_a);
  pool.add_stream(stream_b);
  block& a = make_block(storage, 4 * KiB, stream_a);
  a.state = block_state::deferred;
  pool.push_deferred(a);
  EXPECT_EQ(pool.pop_deferred(stream_b, 4 * KiB).b, nullptr);
  EXPECT_EQ(pool.pop_deferred(stream_t{3}, 4 * KiB).b, nullptr);  // never added
  EXPECT_EQ(pool.deferred_size(stream_a), 1u);
  EXPECT_EQ(pool.deferred_size(stream_b), 0u);
  std::size_t seen = 0;
  pool.for_each_deferred([&](stream_t s, const block& b) {
    EXPECT_EQ(s, stream_a);
    EXPECT_EQ(&b, &a);
    ++seen;
  });
  EXPECT_EQ(seen, 1u);
  EXPECT_EQ(pool.pop_deferred(stream_a, 4 * KiB).b, &a);
  EXPECT_EQ(pool.deferred_size(stream_a), 0u);
}

TEST(BlockPool, LargePoolIsBestFitWithTheMaxSplitSizeRule) {
  std::deque<block> storage;
  block_pool pool(pool_kind::large);
  block& mid = make_block(storage, 30 * MiB, stream_a, pool_kind::large);
  block& big = make_block(storage, 80 * MiB, stream_a, pool_kind::large);
  block& other = make_block(storage, 22 * MiB, stream_b, pool_kind::large);
  pool.insert(mid);
  pool.insert(big);
  pool.insert(other);
  EXPECT_EQ(pool.best_fit(stream_a, 21 * MiB, SIZE_MAX, 20 * MiB), &mid);
  EXPECT_EQ(pool.best_fit(stream_a, 31 * MiB, SIZE_MAX, 20 * MiB), &big);
  // max_split_size 64 MiB: a 40 MiB request (below it) never takes the 80 MiB block...
  EXPECT_EQ(pool.best_fit(stream_a, 40 * MiB, 64 * MiB, 20 * MiB), nullptr);
  // ...and a 70 MiB request takes 80 MiB only while the waste stays under the slack.
  EXPECT_EQ(pool.best_fit(stream_a, 70 * MiB, 64 * MiB, 20 * MiB), &big);
  EXPECT_EQ(pool.best_fit(stream_a, 70 * MiB, 64 * MiB, 5 * MiB), nullptr);
  EXPECT_EQ(pool.best_fit(stream_b, 21 * MiB, SIZE_MAX, 20 * MiB), &other);
  pool.erase(mid);
  pool.erase(big);
  pool.erase(other);
  EXPECT_TRUE(pool.empty());
}

TEST(CachingAllocatorTraceHooks, SwitchOnlyWhileNothingIsAllocated) {
  sim_device dev(sim_options{});
  caching_allocator alloc(dev, {});
  const stream_t s = dev.default_stream();
  void* p = alloc.allocate(4 * KiB, s);
  EXPECT_THROW(alloc.set_trace_hooks(false), error);
  alloc.deallocate(p);
  EXPECT_NO_THROW(alloc.set_trace_hooks(false));
  void* q = alloc.allocate(4 * KiB, s);
  alloc.deallocate(q);
  EXPECT_NO_THROW(alloc.set_trace_hooks(true));
  EXPECT_EQ(alloc.validate(), "");
}

}  // namespace
}  // namespace gpuswap
