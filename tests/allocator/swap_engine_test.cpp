// swap_engine on the simulated device: round trips keep every byte, eviction order, failure
// paths that must lose nothing, and stall accounting.
#include "allocator/swap_engine.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <memory>
#include <vector>

#include "core/errors.hpp"
#include "device/sim_device.hpp"

namespace gpuswap {
namespace {

constexpr std::size_t mib = std::size_t{1} << 20;

struct rig {
  explicit rig(std::size_t budget = 0, sim_options o = defaults())
      : dev(o),
        alloc(dev, caching_allocator_options{budget, SIZE_MAX}),
        pool(dev, pinned_host_pool_options{}),
        engine(dev, alloc, pool) {
    compute = dev.create_stream(stream_priority::normal);
  }
  static sim_options defaults() {
    sim_options o;
    o.device_capacity = 256 * mib;
    o.host_capacity = 512 * mib;
    return o;
  }
  // Writes a pattern derived from `seed` with a kernel on the compute stream.
  void fill(buffer_id id, unsigned seed) {
    auto* p = static_cast<unsigned char*>(engine.acquire(id, compute));
    const std::size_t n = engine.size(id);
    touched_buffer t{p, n};
    dev.launch(compute, kernel_cost{0, static_cast<double>(n), 0},
               [p, n, seed] {
                 for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<unsigned char>(i * 31 + seed);
               },
               {&t, 1});
    engine.release(id, compute);
  }
  // Reads the buffer back through a kernel and counts the bytes that differ from the pattern.
  std::size_t mismatches(buffer_id id, unsigned seed) {
    auto* p = static_cast<unsigned char*>(engine.acquire(id, compute));
    const std::size_t n = engine.size(id);
    auto bad = std::make_shared<std::size_t>(0);
    touched_buffer t{p, n};
    dev.launch(compute, kernel_cost{0, static_cast<double>(n), 0},
               [p, n, seed, bad] {
                 for (std::size_t i = 0; i < n; ++i) {
                   if (p[i] != static_cast<unsigned char>(i * 31 + seed)) ++*bad;
                 }
               },
               {&t, 1});
    engine.release(id, compute);
    dev.synchronize_stream(compute);
    return *bad;
  }

  sim_device dev;
  caching_allocator alloc;
  pinned_host_pool pool;
  swap_engine engine;
  stream_t compute{};
};

TEST(swap_engine, names_its_copy_streams_for_profilers) {
  rig r;
  EXPECT_EQ(r.dev.stream_name(r.engine.d2h_stream()), "gpuswap swap-out (D2H)");
  EXPECT_EQ(r.dev.stream_name(r.engine.h2d_stream()), "gpuswap swap-in (H2D)");
}

TEST(swap_engine, round_trip_keeps_every_byte_and_frees_the_device_block) {
  rig r;
  const buffer_id id = r.engine.create(8 * mib, r.compute, 3);
  r.fill(id, 7);
  const auto allocated_before = r.alloc.stats().allocated_bytes.all().current;
  ASSERT_TRUE(r.engine.swap_out(id, r.compute));
  EXPECT_EQ(r.alloc.stats().allocated_bytes.all().current, allocated_before - static_cast<std::int64_t>(8 * mib));
  r.engine.synchronize();
  EXPECT_EQ(r.engine.state(id), buffer_state::host);
  EXPECT_EQ(r.engine.stats().bytes_on_host, 8 * mib);
  // Scribble over whatever device memory the buffer had.
  void* other = r.alloc.allocate(8 * mib, r.compute);
  std::memset(other, 0xEE, 8 * mib);
  r.alloc.deallocate(other);
  ASSERT_TRUE(r.engine.prefetch(id));
  EXPECT_EQ(r.mismatches(id, 7), 0u);
  r.engine.synchronize();
  EXPECT_EQ(r.engine.state(id), buffer_state::device);
  const swap_stats s = r.engine.stats();
  EXPECT_EQ(s.swaps_out, 1u);
  EXPECT_EQ(s.swaps_in, 1u);
  EXPECT_EQ(s.bytes_out, 8 * mib);
  EXPECT_EQ(s.bytes_in, 8 * mib);
  EXPECT_EQ(s.prefetches, 1u);
  EXPECT_EQ(s.bytes_on_host, 0u);
  EXPECT_EQ(s.bytes_in_flight, 0u);
  EXPECT_GT(s.copy_out_ns, 0.0);
  r.engine.destroy(id);
  EXPECT_EQ(r.engine.stats().live_buffers, 0u);
}

TEST(swap_engine, acquire_of_a_swapped_out_buffer_fetches_on_demand_and_counts_a_stall) {
  rig r;
  const buffer_id id = r.engine.create(16 * mib, r.compute);
  r.fill(id, 1);
  ASSERT_TRUE(r.engine.swap_out(id, r.compute));
  r.dev.synchronize();
  EXPECT_EQ(r.mismatches(id, 1), 0u);
  r.engine.synchronize();
  const swap_stats s = r.engine.stats();
  EXPECT_EQ(s.demand_fetches, 1u);
  EXPECT_EQ(s.stalls, 1u);
  // The consumer waited at least for the whole 16 MiB copy at the default 12 GB/s.
  EXPECT_GE(s.stall_ns, static_cast<double>(16 * mib) * 1e9 / 12e9);
  r.engine.destroy(id);
}

// Note [Waiting for swap-outs in order]: a buffer created while the budget is held by blocks
// whose swap-outs are still copying waits for the oldest copy only, not for every copy in
// flight (the allocator's ladder would wait for the last one), and evicts nothing.
TEST(swap_engine, create_waits_for_the_oldest_swap_out_only) {
  rig r(40 * mib);  // three 12 MiB segments and 4 MiB of headroom
  const buffer_id a = r.engine.create(12 * mib, r.compute);
  const buffer_id b = r.engine.create(12 * mib, r.compute);
  const buffer_id c = r.engine.create(12 * mib, r.compute);
  ASSERT_TRUE(r.engine.swap_out(a, r.compute));
  ASSERT_TRUE(r.engine.swap_out(b, r.compute));  // its D2H queues behind a's
  const buffer_id d = r.engine.create(12 * mib, r.compute);  // fits in a's block once a's copy ends
  r.engine.poll();
  EXPECT_EQ(r.engine.state(a), buffer_state::host);
  EXPECT_EQ(r.engine.state(b), buffer_state::swapping_out);  // not waited for
  EXPECT_EQ(r.engine.state(c), buffer_state::device);
  EXPECT_EQ(r.engine.state(d), buffer_state::device);
  EXPECT_EQ(r.engine.stats().evictions, 0u);
  EXPECT_LE(static_cast<std::size_t>(r.alloc.stats().reserved_bytes.all().peak), 40 * mib);
  r.engine.synchronize();
  EXPECT_EQ(r.engine.state(b), buffer_state::host);
}

TEST(swap_engine, prefetch_far_enough_ahead_hides_the_copy) {
  rig r;
  const buffer_id id = r.engine.create(4 * mib, r.compute);
  r.fill(id, 2);
  ASSERT_TRUE(r.engine.swap_out(id, r.compute));
  r.dev.synchronize();
  ASSERT_TRUE(r.engine.prefetch(id));
  // 10 ms of compute before the use: the 4 MiB copy (~0.36 ms) arrives long before.
  r.dev.launch(r.compute, kernel_cost{0, 0, 10e6}, nullptr, {});
  EXPECT_EQ(r.mismatches(id, 2), 0u);
  r.engine.synchronize();
  EXPECT_EQ(r.engine.stats().stalls, 0u);
  r.engine.destroy(id);
}

TEST(swap_engine, allocation_under_pressure_evicts_the_least_recently_used) {
  // A 48 MiB budget holds two 20 MiB buffers, not three.
  rig r(48 * mib);
  const buffer_id a = r.engine.create(20 * mib, r.compute);
  r.fill(a, 10);
  const buffer_id b = r.engine.create(20 * mib, r.compute);
  r.fill(b, 11);
  r.mismatches(a, 10);  // a is now more recently used than b
  const buffer_id c = r.engine.create(20 * mib, r.compute);
  r.fill(c, 12);
  EXPECT_NE(r.engine.state(b), buffer_state::device) << "b was least recently used";
  EXPECT_EQ(r.engine.state(a), buffer_state::device);
  EXPECT_EQ(r.engine.stats().evictions, 1u);
  EXPECT_LE(r.alloc.stats().reserved_bytes.all().peak, static_cast<std::int64_t>(48 * mib));
  // Everything comes back intact, evicting in turn.
  EXPECT_EQ(r.mismatches(b, 11), 0u);
  EXPECT_EQ(r.mismatches(c, 12), 0u);
  EXPECT_EQ(r.mismatches(a, 10), 0u);
  EXPECT_LE(r.alloc.stats().reserved_bytes.all().peak, static_cast<std::int64_t>(48 * mib));
  for (buffer_id id : {a, b, c}) r.engine.destroy(id);
}

struct fixed_advisor : eviction_advisor {
  std::map<buffer_id, std::uint64_t> next;
  std::uint64_t next_use(buffer_id id) const override {
    auto it = next.find(id);
    return it == next.end() ? UINT64_MAX : it->second;
  }
};

TEST(swap_engine, with_a_schedule_the_buffer_needed_furthest_ahead_is_evicted) {
  rig r(48 * mib);
  fixed_advisor advisor;
  r.engine.set_advisor(&advisor);
  const buffer_id a = r.engine.create(20 * mib, r.compute);
  r.fill(a, 1);
  const buffer_id b = r.engine.create(20 * mib, r.compute);
  r.fill(b, 2);
  advisor.next[a] = 100;  // needed much later than b, although a is the least recently used
  advisor.next[b] = 5;
  const buffer_id c = r.engine.create(20 * mib, r.compute);
  EXPECT_NE(r.engine.state(a), buffer_state::device);
  EXPECT_EQ(r.engine.state(b), buffer_state::device);
  r.engine.set_advisor(nullptr);
  EXPECT_EQ(r.mismatches(a, 1), 0u);
  for (buffer_id id : {a, b, c}) r.engine.destroy(id);
}

TEST(swap_engine, an_acquired_buffer_is_never_evicted_and_out_of_memory_names_the_figures) {
  rig r(48 * mib);
  const buffer_id a = r.engine.create(20 * mib, r.compute);
  const buffer_id b = r.engine.create(20 * mib, r.compute);
  r.engine.acquire(a, r.compute);
  r.engine.acquire(b, r.compute);
  EXPECT_THROW(r.engine.create(20 * mib, r.compute), out_of_memory);
  EXPECT_EQ(r.engine.state(a), buffer_state::device);
  EXPECT_EQ(r.engine.state(b), buffer_state::device);
  r.engine.release(a, r.compute);
  r.engine.release(b, r.compute);
  const buffer_id c = r.engine.create(20 * mib, r.compute);
  for (buffer_id id : {a, b, c}) r.engine.destroy(id);
}

// --- no byte is ever lost ----------------------------------------------------------------------

TEST(swap_engine, failed_pinned_allocation_keeps_the_buffer_on_the_device) {
  rig r;
  const buffer_id id = r.engine.create(4 * mib, r.compute);
  r.fill(id, 5);
  r.dev.fail_always(sim_call::pinned_alloc);
  EXPECT_FALSE(r.engine.swap_out(id, r.compute));
  EXPECT_EQ(r.engine.state(id), buffer_state::device);
  EXPECT_EQ(r.engine.stats().failed_swap_outs, 1u);
  r.dev.clear_faults();
  EXPECT_EQ(r.mismatches(id, 5), 0u);
  r.engine.destroy(id);
}

TEST(swap_engine, failed_copy_out_keeps_the_buffer_on_the_device) {
  rig r;
  const buffer_id id = r.engine.create(4 * mib, r.compute);
  r.fill(id, 6);
  r.dev.fail_nth(sim_call::copy, 1);
  EXPECT_FALSE(r.engine.swap_out(id, r.compute));
  EXPECT_EQ(r.engine.state(id), buffer_state::device);
  EXPECT_EQ(r.mismatches(id, 6), 0u);
  EXPECT_TRUE(r.engine.swap_out(id, r.compute)) << "the next attempt works";
  EXPECT_EQ(r.mismatches(id, 6), 0u);
  r.engine.destroy(id);
}

TEST(swap_engine, failed_copy_in_keeps_the_buffer_on_the_host_and_reports) {
  rig r;
  const buffer_id id = r.engine.create(4 * mib, r.compute);
  r.fill(id, 8);
  ASSERT_TRUE(r.engine.swap_out(id, r.compute));
  r.engine.synchronize();
  r.dev.fail_nth(sim_call::copy, 1);
  EXPECT_THROW(r.engine.acquire(id, r.compute), device_error);
  EXPECT_EQ(r.engine.state(id), buffer_state::host);
  EXPECT_EQ(r.engine.stats().failed_swap_ins, 1u);
  EXPECT_EQ(r.mismatches(id, 8), 0u) << "the host copy survived and comes back";
  r.engine.destroy(id);
}

TEST(swap_engine, every_fault_point_of_a_round_trip_loses_nothing) {
  // For every call kind the round trip makes, fail its n-th call for each n until a run
  // passes with no fault hit: each run ends with the pattern intact or a reported error
  // after which the data is still recoverable.
  for (sim_call kind : {sim_call::device_alloc, sim_call::pinned_alloc, sim_call::copy,
                        sim_call::event_record, sim_call::event_wait}) {
    for (std::uint64_t n = 1; n < 40; ++n) {
      SCOPED_TRACE(testing::Message() << to_string(kind) << " #" << n);
      rig r;
      const buffer_id id = r.engine.create(2 * mib, r.compute);
      r.fill(id, 9);
      r.dev.synchronize();
      const std::uint64_t calls_before = r.dev.calls(kind);
      r.dev.fail_nth(kind, n);
      try {
        r.engine.swap_out(id, r.compute);
        r.dev.synchronize();
        r.engine.prefetch(id);
        r.engine.acquire(id, r.compute);
        r.engine.release(id, r.compute);
      } catch (const device_error&) {
      } catch (const out_of_memory&) {
      }
      const bool hit = r.dev.calls(kind) - calls_before >= n;
      r.dev.clear_faults();
      r.dev.synchronize();
      r.engine.poll();
      EXPECT_EQ(r.mismatches(id, 9), 0u);
      r.engine.destroy(id);
      if (!hit) break;
    }
  }
}

// Note [Guarding a block brought in]: once the consumer has waited for a buffer's H2D, its block
// is free for the home stream as soon as it is destroyed, whatever the H2D stream has queued
// since (recording the H2D stream kept it pending behind the later prefetches).
TEST(swap_engine, a_consumed_swap_in_frees_its_block_without_waiting_for_later_copies) {
  rig r(20 * mib);  // one 20 MiB segment: a and b, and 4 MiB that fits neither
  const buffer_id a = r.engine.create(8 * mib, r.compute);
  r.fill(a, 1);
  const buffer_id b = r.engine.create(8 * mib, r.compute);
  r.fill(b, 2);
  ASSERT_TRUE(r.engine.swap_out(a, r.compute));
  ASSERT_TRUE(r.engine.swap_out(b, r.compute));
  r.engine.synchronize();
  ASSERT_TRUE(r.engine.prefetch(a));
  void* block = r.engine.acquire(a, r.compute);  // the compute stream waits for a's H2D
  r.engine.release(a, r.compute);
  // A long copy queued on the H2D stream after a's, as the lookahead keeps it busy.
  r.dev.launch(r.engine.h2d_stream(), kernel_cost{0, 0, 50e6}, nullptr, {});
  ASSERT_TRUE(r.engine.prefetch(b));
  r.engine.destroy(a);
  void* again = r.alloc.try_allocate(8 * mib, r.compute);
  EXPECT_EQ(again, block) << "a's block waited for the H2D stream's later work";
  r.alloc.deallocate(again);
  EXPECT_EQ(r.mismatches(b, 2), 0u);
  r.engine.destroy(b);
}

// The other half of the rule: a buffer destroyed before anyone waited for its H2D keeps its
// block until the copy has ended.
TEST(swap_engine, an_unconsumed_swap_in_keeps_its_block_until_the_copy_ends) {
  rig r(20 * mib);
  const buffer_id a = r.engine.create(8 * mib, r.compute);
  r.fill(a, 1);
  const buffer_id b = r.engine.create(8 * mib, r.compute);
  r.fill(b, 2);
  ASSERT_TRUE(r.engine.swap_out(a, r.compute));
  r.engine.synchronize();
  r.dev.launch(r.engine.h2d_stream(), kernel_cost{0, 0, 50e6}, nullptr, {});
  ASSERT_TRUE(r.engine.prefetch(a));  // its H2D waits behind the long copy
  r.engine.destroy(a);
  EXPECT_EQ(r.alloc.try_allocate(8 * mib, r.compute), nullptr)
      << "the block was handed out while its H2D may still write it";
  r.engine.synchronize();
  r.dev.synchronize();
  void* later = r.alloc.try_allocate(8 * mib, r.compute);
  EXPECT_NE(later, nullptr);
  r.alloc.deallocate(later);
  r.engine.destroy(b);
}

// Note [Prefetch in order of need]: a prefetch that would leave too little room for a buffer
// needed before it and still on the host waits, so that the demand fetch of the sooner one does
// not evict it; where both fit, it goes ahead.
TEST(swap_engine, a_prefetch_leaves_room_for_a_buffer_needed_sooner) {
  for (const bool room_for_both : {false, true}) {
    SCOPED_TRACE(room_for_both ? "room for both" : "room for one");
    rig r(room_for_both ? 52 * mib : 40 * mib);
    fixed_advisor advisor;
    r.engine.set_advisor(&advisor);
    const buffer_id sooner = r.engine.create(12 * mib, r.compute);
    r.fill(sooner, 1);
    const buffer_id later = r.engine.create(12 * mib, r.compute);
    r.fill(later, 2);
    advisor.next[sooner] = 5;
    advisor.next[later] = 6;
    ASSERT_TRUE(r.engine.swap_out(sooner, r.compute));
    ASSERT_TRUE(r.engine.swap_out(later, r.compute));
    r.engine.synchronize();
    const buffer_id resident = r.engine.create(20 * mib, r.compute);
    advisor.next[resident] = 1;
    // 40 MiB: 20 MiB free, room for one of the 12 MiB buffers, not both; 52 MiB: 32 MiB free.
    EXPECT_EQ(r.engine.prefetch(later), room_for_both);
    EXPECT_EQ(r.engine.state(later), room_for_both ? buffer_state::swapping_in : buffer_state::host);
    EXPECT_EQ(r.mismatches(sooner, 1), 0u);  // fetched on demand
    EXPECT_EQ(r.engine.stats().evictions, 0u) << "the demand fetch evicted the prefetch";
    r.engine.destroy(sooner);  // its last use
    EXPECT_EQ(r.mismatches(later, 2), 0u);
    r.engine.set_advisor(nullptr);
    for (buffer_id id : {resident, later}) r.engine.destroy(id);
  }
}

// Without an advisor the engine does not know which buffer is needed first: it prefetches
// whatever fits.
TEST(swap_engine, without_an_advisor_a_prefetch_takes_what_fits) {
  rig r(40 * mib);  // as in the test above, without room for both
  const buffer_id sooner = r.engine.create(12 * mib, r.compute);
  const buffer_id later = r.engine.create(12 * mib, r.compute);
  ASSERT_TRUE(r.engine.swap_out(sooner, r.compute));
  ASSERT_TRUE(r.engine.swap_out(later, r.compute));
  r.engine.synchronize();
  const buffer_id resident = r.engine.create(20 * mib, r.compute);
  EXPECT_TRUE(r.engine.prefetch(later));
  for (buffer_id id : {resident, sooner, later}) r.engine.destroy(id);
}

}  // namespace
}  // namespace gpuswap
