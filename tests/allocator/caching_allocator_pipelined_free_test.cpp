// caching_allocator's pipelined frees (Note [Pipelined frees], caching_allocator.cpp): a free
// is applied up to 16 frees after its call, and nothing a caller can observe may show it.
// Each test observes one thing the pipeline could get wrong: figures read between calls, a
// block asked for again, an invalid free, the events of a block used on another stream, the
// trace, and the cache's layout against eager frees.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <atomic>
#include <random>
#include <thread>
#include <vector>

#include "allocator/caching_allocator.hpp"
#include "device/sim_device.hpp"
#include "profiler/event_recorder.hpp"
#include "support/small_sim.hpp"

namespace gpuswap {
namespace {

constexpr std::size_t KiB = std::size_t{1} << 10;
constexpr std::size_t MiB = std::size_t{1} << 20;

using testing_support::sim_with_capacity;

caching_allocator_options pipelined(bool on) {
  caching_allocator_options o;
  o.pipelined_frees = on;
  return o;
}

TEST(pipelined_frees, figures_read_after_a_free_count_it) {
  sim_device dev(sim_with_capacity());
  caching_allocator alloc(dev, pipelined(true));
  std::vector<void*> live;
  for (int i = 0; i < 5; ++i) live.push_back(alloc.allocate(100 * KiB, dev.default_stream()));
  alloc.deallocate(live[1]);
  alloc.deallocate(live[3]);
  // Two frees, far fewer than the pipeline holds: only the figures' reader can apply them.
  const allocator_stats st = alloc.stats();
  EXPECT_EQ(st.allocation.all().current, 3);
  EXPECT_EQ(st.allocated_bytes.all().current, static_cast<std::int64_t>(3 * 100 * KiB));
  EXPECT_EQ(alloc.allocated_size(live[1]), 0u);
  EXPECT_EQ(alloc.allocated_size(live[0]), 100 * KiB);
  int inactive = 0;
  const nlohmann::json snap = alloc.snapshot();  // kept: the loop must not outlive it
  for (const auto& blk : snap["segments"][0]["blocks"]) {
    inactive += blk["state"] == "inactive" ? 1 : 0;
  }
  EXPECT_GE(inactive, 2);
  EXPECT_EQ(alloc.validate(), "");
  for (void* p : {live[0], live[2], live[4]}) alloc.deallocate(p);
}

TEST(pipelined_frees, a_block_freed_and_asked_for_again_is_reused) {
  sim_device dev(sim_with_capacity());
  caching_allocator alloc(dev, pipelined(true));
  const stream_t s = dev.default_stream();
  for (const std::size_t n : {std::size_t{1000}, 3 * MiB, 30 * MiB}) {
    void* p = alloc.allocate(n, s);
    const auto segments = alloc.stats().num_device_allocs;
    alloc.deallocate(p);
    void* q = alloc.allocate(n, s);  // the fast bin misses or the pool is searched: applied
    EXPECT_EQ(q, p) << n;
    EXPECT_EQ(alloc.stats().num_device_allocs, segments) << n;
    alloc.deallocate(q);
  }
  EXPECT_EQ(alloc.validate(), "");
}

TEST(pipelined_frees, a_double_free_is_caught_while_the_first_is_still_queued) {
  sim_device dev(sim_with_capacity());
  caching_allocator alloc(dev, pipelined(true));
  void* p = alloc.allocate(4 * KiB, dev.default_stream());
  void* q = alloc.allocate(4 * KiB, dev.default_stream());
  alloc.deallocate(p);
  alloc.deallocate(p);  // both in the pipeline: the second finds p already out of the index
  int foreign = 0;
  alloc.deallocate(&foreign);
  EXPECT_EQ(alloc.stats().num_invalid_frees, 2u);
  EXPECT_EQ(alloc.stats().allocation.all().current, 1);
  EXPECT_EQ(alloc.validate(), "");
  alloc.deallocate(q);
  EXPECT_EQ(alloc.stats().allocation.all().current, 0);
}

// A block used on stream B is freed; B then gets more work. The block may be reused once
// the work B had when it was freed is done, not only after the later work too: so its event
// must be recorded in the free's own call, which the pipeline would postpone.
TEST(pipelined_frees, a_block_used_on_another_stream_records_its_event_at_its_free) {
  sim_device dev(sim_with_capacity());
  caching_allocator alloc(dev, pipelined(true));
  const stream_t a = dev.default_stream();
  const stream_t b = dev.create_stream(stream_priority::normal);
  const std::size_t n = 64 * KiB;
  void* x = alloc.allocate(n, a);
  alloc.record_stream(x, b);
  dev.launch(b, kernel_cost{0, 0, 1e6}, [] {}, {});  // 1 ms: B's work at the free
  alloc.deallocate(x);
  dev.launch(b, kernel_cost{0, 0, 1e9}, [] {}, {});  // 1 s: enqueued after the free
  dev.advance_host_ns(2e6);                           // the first kernel has ended
  void* y = alloc.allocate(n, a);
  EXPECT_EQ(y, x) << "the free's event waited for work enqueued after the free";
  alloc.deallocate(y);
  dev.synchronize();
  EXPECT_EQ(alloc.validate(), "");
}

// A trace collected between two calls holds every free made before it, each with its call's
// time, its block's size and its stream, though none was applied when collect() began.
TEST(pipelined_frees, a_trace_holds_every_free_with_the_time_of_its_call) {
  sim_device dev(sim_with_capacity());
  event_recorder rec;
  caching_allocator_options opts = pipelined(true);
  opts.recorder = &rec;
  caching_allocator alloc(dev, opts);
  const stream_t s = dev.create_stream(stream_priority::normal);
  std::vector<void*> live;
  for (int i = 0; i < 4; ++i) live.push_back(alloc.allocate((i + 1) * 10 * KiB, s));
  rec.enable(true);
  std::vector<double> call_ns;
  for (void* p : live) {
    dev.advance_host_ns(1000);
    call_ns.push_back(dev.host_time_ns());
    alloc.deallocate(p);
  }
  dev.advance_host_ns(1e6);  // a later apply would carry a later time
  const std::vector<trace_event> events = rec.collect();
  std::vector<trace_event> frees;
  for (const trace_event& e : events) {
    if (e.kind == event_kind::free) frees.push_back(e);
  }
  ASSERT_EQ(frees.size(), live.size());
  for (std::size_t i = 0; i < frees.size(); ++i) {
    EXPECT_EQ(frees[i].buffer, reinterpret_cast<std::uintptr_t>(live[i]));
    EXPECT_EQ(frees[i].bytes, (i + 1) * 10 * KiB);
    EXPECT_EQ(frees[i].stream, static_cast<std::uintptr_t>(s));
    EXPECT_DOUBLE_EQ(frees[i].time_ns, call_ns[i]);
  }
  EXPECT_EQ(alloc.stats().allocation.all().current, 0);
}

// The same random sequence of large-pool allocations and frees (no fast bins: every request
// searches the pool, so the layouts must match exactly), with the pipeline on and off: the
// snapshots agree at every checkpoint, between which up to 16 frees wait in the pipeline.
TEST(pipelined_frees, the_cache_ends_up_as_with_eager_frees) {
  sim_options so = sim_with_capacity(std::size_t{4} << 30);
  so.backing = sim_backing::phantom;
  sim_device dev_on(so);
  sim_device dev_off(so);
  caching_allocator on(dev_on, pipelined(true));
  caching_allocator off(dev_off, pipelined(false));
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<std::size_t> size(MiB + 1, 24 * MiB);
  std::vector<std::pair<void*, void*>> live;
  auto same = [&](int op) {
    nlohmann::json a = on.snapshot();
    nlohmann::json b = off.snapshot();
    // The two devices hand out different addresses; compare every segment's layout relative
    // to its base, and the figures.
    ASSERT_EQ(a["segments"].size(), b["segments"].size()) << op;
    for (std::size_t i = 0; i < a["segments"].size(); ++i) {
      const auto& sa = a["segments"][i];
      const auto& sb = b["segments"][i];
      ASSERT_EQ(sa["blocks"].size(), sb["blocks"].size()) << op;
      for (std::size_t j = 0; j < sa["blocks"].size(); ++j) {
        EXPECT_EQ(sa["blocks"][j]["size"], sb["blocks"][j]["size"]) << op;
        EXPECT_EQ(sa["blocks"][j]["state"], sb["blocks"][j]["state"]) << op;
      }
    }
    EXPECT_EQ(a["stats"], b["stats"]) << op;
  };
  for (int op = 0; op < 3000; ++op) {
    const bool grow = live.empty() || rng() % 100 < 52;
    if (grow) {
      const std::size_t n = size(rng);
      live.emplace_back(on.allocate(n, dev_on.default_stream()),
                        off.allocate(n, dev_off.default_stream()));
    } else {
      const std::size_t i = rng() % live.size();
      on.deallocate(live[i].first);
      off.deallocate(live[i].second);
      live[i] = live.back();
      live.pop_back();
    }
    if (op % 250 == 249) same(op);
  }
  for (const auto& [p, q] : live) {
    on.deallocate(p);
    off.deallocate(q);
  }
  same(-1);
  EXPECT_EQ(on.validate(), "");
}

// Threads allocating and freeing, with cross-thread frees, while another thread collects the
// trace: the collect hook takes the allocator's lock from the collecting thread and records the
// frees it applies there (Note [Pipelined frees]). Every alloc and every free comes out exactly
// once, and the books balance. Under TSan in CI (the suite's name).
TEST(pipelined_frees_concurrency, threads_free_while_a_trace_is_collected) {
  sim_options so = sim_with_capacity(std::size_t{2} << 30);
  so.backing = sim_backing::phantom;
  sim_device dev(so);
  event_recorder rec(std::size_t{1} << 16);
  rec.enable(true);
  caching_allocator_options opts = pipelined(true);
  opts.recorder = &rec;
  caching_allocator alloc(dev, opts);
  constexpr int threads = 4;
  constexpr int per_thread = 3000;
  std::vector<std::vector<void*>> handed(threads);  // thread t frees what t-1 allocated
  std::atomic<int> allocating{threads};
  std::atomic<bool> done{false};
  std::size_t allocs = 0, frees = 0;
  std::thread collector([&] {
    while (!done.load()) {
      for (const trace_event& e : rec.collect()) {
        allocs += e.kind == event_kind::alloc ? 1 : 0;
        frees += e.kind == event_kind::free ? 1 : 0;
      }
    }
  });
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      std::mt19937_64 rng(static_cast<std::uint64_t>(t));
      std::vector<void*> mine;
      for (int i = 0; i < per_thread; ++i) {
        mine.push_back(alloc.allocate(512 + rng() % (64 * KiB), dev.default_stream()));
        if (rng() % 3 == 0) {
          alloc.deallocate(mine.back());
          mine.pop_back();
        }
      }
      handed[static_cast<std::size_t>(t)] = std::move(mine);
      allocating.fetch_sub(1);
      while (allocating.load() != 0) std::this_thread::yield();
      for (void* p : handed[static_cast<std::size_t>((t + threads - 1) % threads)]) {
        alloc.deallocate(p);
      }
    });
  }
  for (std::thread& w : workers) w.join();
  done.store(true);
  collector.join();
  for (const trace_event& e : rec.collect()) {
    allocs += e.kind == event_kind::alloc ? 1 : 0;
    frees += e.kind == event_kind::free ? 1 : 0;
  }
  EXPECT_EQ(rec.dropped(), 0u);
  EXPECT_EQ(allocs, static_cast<std::size_t>(threads * per_thread));
  EXPECT_EQ(frees, allocs);
  EXPECT_EQ(alloc.stats().allocation.all().current, 0);
  EXPECT_EQ(alloc.validate(), "");
}

}  // namespace
}  // namespace gpuswap
