// Stream-ordered reuse, proven with data: each test lets a block be written by two streams in the
// order a wrong allocator would produce, and checks the bytes. A "gate" holds a slow kernel
// back in real time until the test opens it, so a block handed out too early is overwritten
// after the new owner's write, deterministically: remove the event wait in deallocate (or let
// free_block_locked merge a pending neighbour) and these tests fail on the bytes.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "allocator/caching_allocator.hpp"
#include "device/sim_device.hpp"
#include "support/gate.hpp"

namespace gpuswap {
namespace {

using testing_support::gate;

constexpr std::size_t KiB = std::size_t{1} << 10;
constexpr std::size_t MiB = std::size_t{1} << 20;
constexpr double slow_kernel_ns = 1e9;  // modelled: far beyond anything the host waits for

std::size_t count_not(const void* p, std::size_t n, unsigned char value) {
  const auto* bytes = static_cast<const unsigned char*>(p);
  std::size_t bad = 0;
  for (std::size_t i = 0; i < n; ++i) bad += bytes[i] != value ? 1 : 0;
  return bad;
}

class caching_allocator_ordering_test : public ::testing::Test {
 public:
  caching_allocator_ordering_test() {
    sim_options o;
    o.backing = sim_backing::real;
    o.device_capacity = std::size_t{256} << 20;
    dev = std::make_unique<sim_device>(o);
    a = dev->default_stream();
    b = dev->create_stream(stream_priority::normal);
    c = dev->create_stream(stream_priority::normal);
    alloc = std::make_unique<caching_allocator>(*dev, caching_allocator_options{});
  }
  ~caching_allocator_ordering_test() override {
    dev->synchronize();
    alloc.reset();
    for (void* h : pinned) dev->free_pinned(h);
  }

  // A kernel on `s` that fills [p, p+n) with `value`, after `g` opens (if given).
  void fill_kernel(stream_t s, void* p, std::size_t n, unsigned char value, const gate* g,
                   double cost_ns) {
    const touched_buffer touched[] = {{p, n}};
    dev->launch(
        s, kernel_cost{0, 0, cost_ns},
        [p, n, value, g] {
          if (g != nullptr) g->wait();
          std::memset(p, value, n);
        },
        touched);
  }

  // Three blocks of n bytes from A, each used on B (record_stream) by a 1 ms kernel writing
  // '0', '1', '2' and freed; then the host clock passes the second kernel's end, not the third's.
  void free_three_used_on_b(void* (&x)[3], std::size_t n) {
    for (auto& p : x) p = alloc->allocate(n, a);
    for (int i = 0; i < 3; ++i) {
      alloc->record_stream(x[i], b);
      fill_kernel(b, x[i], n, static_cast<unsigned char>('0' + i), nullptr, 1e6);
      alloc->deallocate(x[i]);
    }
    const double second_end = dev->stream_tail_ns(b) - 1e6;
    dev->advance_host_ns(second_end - dev->now_ns() + 1);
  }

  // Stream `s` writes `value` into [p, p+n): an H2D copy from pinned memory, then the host waits
  // for `s` only.
  void write_on(stream_t s, void* p, std::size_t n, unsigned char value) {
    void* host = dev->allocate_pinned(n);
    ASSERT_NE(host, nullptr);
    pinned.push_back(host);
    std::memset(host, value, n);
    dev->copy_async(p, host, n, copy_kind::host_to_device, s);
    dev->synchronize_stream(s);
  }

  std::unique_ptr<sim_device> dev;
  stream_t a{}, b{}, c{};
  std::unique_ptr<caching_allocator> alloc;
  std::vector<void*> pinned;
};

TEST_F(caching_allocator_ordering_test, record_stream_block_waits_for_the_other_stream) {
  const std::size_t n = 64 * KiB;
  void* x = alloc->allocate(n, a);
  alloc->record_stream(x, b);
  gate g;
  fill_kernel(b, x, n, 'B', &g, slow_kernel_ns);  // B still writes x, later in real time
  alloc->deallocate(x);

  void* y = alloc->allocate(n, a);
  write_on(a, y, n, 'A');  // A's data has landed in y
  g.open();
  dev->synchronize();  // B's kernel has run
  EXPECT_EQ(count_not(y, n, 'A'), 0u)
      << "stream B's kernel overwrote the block handed to stream A: reused before B finished";
  EXPECT_NE(y, x);
  EXPECT_EQ(alloc->validate(), "");

  // Now that B is done the block is free again: the next allocation polls its event.
  void* z = alloc->allocate(n, a);
  EXPECT_EQ(alloc->stats().active.all().current, 2);
  const auto snap = alloc->snapshot();
  for (const auto& seg : snap["segments"]) {
    for (const auto& blk : seg["blocks"]) EXPECT_NE(blk["state"], "active_pending_free");
  }
  alloc->deallocate(y);
  alloc->deallocate(z);
  EXPECT_EQ(alloc->validate(), "");
}

TEST_F(caching_allocator_ordering_test, completion_is_polled_by_the_modelled_clock) {
  const std::size_t n = 4 * KiB;
  void* x = alloc->allocate(n, a);
  alloc->record_stream(x, b);
  fill_kernel(b, x, n, 'B', nullptr, 1e6);  // 1 ms of modelled work on B
  alloc->deallocate(x);
  void* y = alloc->allocate(n, a);
  EXPECT_NE(y, x);            // B's event lies in the modelled future
  dev->advance_host_ns(2e6);  // modelled host work past B's kernel: no synchronize call
  void* z = alloc->allocate(n, a);
  EXPECT_EQ(z, x);                      // query_event now answers complete and the block is reused
  EXPECT_EQ(count_not(z, n, 'B'), 0u);  // and B's write really happened before
  alloc->deallocate(y);
  alloc->deallocate(z);
  EXPECT_EQ(alloc->validate(), "");
}

// Two neighbours of one segment, each used by another stream, both freed; one stream finishes.
// The finished neighbour must not merge with the pending one (RMM #2489 kept only one event).
void merged_neighbours_keep_both_events(caching_allocator_ordering_test& t, bool first_done,
                                        bool free_first_first) {
  caching_allocator& alloc = *t.alloc;
  sim_device& dev = *t.dev;
  const std::size_t half = 6 * MiB;
  alloc.empty_cache();
  const auto allocs = alloc.stats().num_device_allocs;
  void* whole = alloc.allocate(2 * half, t.a);  // one exactly-sized 12 MiB segment
  alloc.deallocate(whole);
  void* x1 = alloc.allocate(half, t.a);
  void* x2 = alloc.allocate(half, t.a);
  ASSERT_EQ(x1, whole);
  ASSERT_EQ(static_cast<char*>(x2), static_cast<char*>(x1) + half);
  ASSERT_EQ(alloc.stats().segment.all().current, 1);
  alloc.record_stream(x1, t.b);
  alloc.record_stream(x2, t.c);

  // The stream that finishes first gets a short kernel enqueued first; the other a slow gated one
  // (the compute engine serves kernels in enqueue order, so the slow one ends later).
  stream_t fast = first_done ? t.b : t.c;
  stream_t slow = first_done ? t.c : t.b;
  void* fast_block = first_done ? x1 : x2;
  void* slow_block = first_done ? x2 : x1;
  gate g;
  t.fill_kernel(fast, fast_block, half, 'F', nullptr, 1000);
  t.fill_kernel(slow, slow_block, half, 'S', &g, slow_kernel_ns);
  alloc.deallocate(free_first_first ? x1 : x2);
  alloc.deallocate(free_first_first ? x2 : x1);
  dev.synchronize_stream(fast);  // one side's event completes
  EXPECT_EQ(alloc.validate(), "");

  void* y = alloc.allocate(2 * half, t.a);  // would fit only in the merged pair
  t.write_on(t.a, y, 2 * half, 'A');
  g.open();
  dev.synchronize();
  EXPECT_EQ(count_not(y, 2 * half, 'A'), 0u)
      << "the merged block was reused while the slow stream still wrote its half";
  EXPECT_NE(y, x1);
  EXPECT_EQ(alloc.stats().num_device_allocs, allocs + 2);

  // Both streams done: the halves merge back and the whole segment is reused.
  void* z = alloc.allocate(2 * half, t.a);
  EXPECT_EQ(z, x1);
  EXPECT_EQ(alloc.allocated_size(z), 2 * half);
  EXPECT_EQ(alloc.stats().num_device_allocs, allocs + 2);
  alloc.deallocate(y);
  alloc.deallocate(z);
  EXPECT_EQ(alloc.validate(), "");
}

TEST_F(caching_allocator_ordering_test, merged_neighbours_keep_both_events_lower_done_first) {
  merged_neighbours_keep_both_events(*this, /*first_done=*/true, /*free_first_first=*/true);
}

TEST_F(caching_allocator_ordering_test, merged_neighbours_keep_both_events_upper_done_first) {
  merged_neighbours_keep_both_events(*this, /*first_done=*/false, /*free_first_first=*/true);
}

TEST_F(caching_allocator_ordering_test, merged_neighbours_keep_both_events_freed_in_reverse) {
  merged_neighbours_keep_both_events(*this, /*first_done=*/true, /*free_first_first=*/false);
  merged_neighbours_keep_both_events(*this, /*first_done=*/false, /*free_first_first=*/false);
}

TEST_F(caching_allocator_ordering_test, same_stream_reuse_is_immediate_and_stream_ordered) {
  const std::size_t n = 64 * KiB;
  void* x = alloc->allocate(n, a);
  alloc->record_stream(x, a);  // its own stream: nothing to wait for
  gate g;
  fill_kernel(a, x, n, 'K', &g, slow_kernel_ns);  // A's kernel still to run
  const auto records = dev->calls(sim_call::event_record);
  const double host_before = dev->now_ns();
  alloc->deallocate(x);
  void* y = alloc->allocate(n, a);
  EXPECT_EQ(y, x);  // at once: no event, no wait
  EXPECT_EQ(dev->calls(sim_call::event_record), records);
  EXPECT_EQ(dev->now_ns(), host_before);
  // The new owner's write is queued behind the old owner's kernel on the same stream.
  void* host = dev->allocate_pinned(n);
  pinned.push_back(host);
  std::memset(host, 'A', n);
  dev->copy_async(y, host, n, copy_kind::host_to_device, a);
  g.open();
  dev->synchronize_stream(a);
  EXPECT_EQ(count_not(y, n, 'A'), 0u);
  alloc->deallocate(y);
  EXPECT_EQ(alloc->validate(), "");
}

TEST_F(caching_allocator_ordering_test, pending_events_complete_in_order_per_stream) {
  // Three blocks used on B by kernels of growing modelled end; the host clock passes the first
  // two only: exactly those two are reused. Frees merge at once here (the fast-bin variant
  // follows).
  caching_allocator_options eager;
  eager.fast_bin_limit = 0;
  alloc = std::make_unique<caching_allocator>(*dev, eager);
  const std::size_t n = 4 * KiB;
  void* x[3];
  free_three_used_on_b(x, n);
  alloc->allocate(0, a);                  // a no-op: nothing polled
  void* big = alloc->allocate(3 * n, a);  // polls: x[0] and x[1] merge back, x[2] still pending
  EXPECT_NE(big, x[0]);
  void* r = alloc->allocate(2 * n, a);
  EXPECT_EQ(r, x[0]);
  const auto st = alloc->stats();
  EXPECT_EQ(st.active.all().current, 3);  // big, r, and pending x[2]
  EXPECT_EQ(st.allocation.all().current, 2);
  dev->synchronize();
  alloc->deallocate(big);
  alloc->deallocate(r);
  alloc->empty_cache();
  EXPECT_EQ(alloc->stats().reserved_bytes.all().current, 0);
  EXPECT_EQ(alloc->validate(), "");
}

TEST_F(caching_allocator_ordering_test, pending_blocks_enter_the_fast_bin_only_after_their_events) {
  // As above with the fast bins on: a block freed after record_stream reaches its stream's fast
  // bin (Note [Deferred coalescing]) only when its event completed, so the exact-size requests
  // get x[1] and x[0] back, most recent first, and never x[2] while B may still write it.
  const std::size_t n = 4 * KiB;
  void* x[3];
  free_three_used_on_b(x, n);
  void* r1 = alloc->allocate(n, a);  // polls: x[0] and x[1] reach the fast bin
  void* r0 = alloc->allocate(n, a);
  void* r2 = alloc->allocate(n, a);
  EXPECT_EQ(r1, x[1]);
  EXPECT_EQ(r0, x[0]);
  EXPECT_NE(r2, x[2]);
  EXPECT_EQ(alloc->validate(), "");
  dev->synchronize();
  EXPECT_EQ(count_not(x[2], n, '2'), 0u);  // B's last write landed on memory nobody else got
  for (void* p : {r0, r1, r2}) alloc->deallocate(p);
  alloc->empty_cache();
  EXPECT_EQ(alloc->stats().reserved_bytes.all().current, 0);
  EXPECT_EQ(alloc->validate(), "");
}

}  // namespace
}  // namespace gpuswap
