// pinned_host_pool: size classes, reuse, the limit and its ladder, statistics, empty_cache and
// the steady state of a training loop (no new pinned allocation after the first step). All on
// sim_device with real backing.
#include "allocator/pinned_host_pool.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/errors.hpp"
#include "device/sim_device.hpp"

namespace gpuswap {
namespace {

constexpr std::size_t kib = std::size_t{1} << 10;
constexpr std::size_t mib = std::size_t{1} << 20;

sim_options small_sim(std::size_t host_capacity = 256 * mib) {
  sim_options o;
  o.backing = sim_backing::real;
  o.device_capacity = 64 * mib;
  o.host_capacity = host_capacity;
  return o;
}

// A kernel that occupies `stream` for `ns` of modelled time (and no real time).
void busy(sim_device& dev, stream_t stream, double ns) {
  kernel_cost cost;
  cost.fixed_ns = ns;
  dev.launch(stream, cost, nullptr, {});
}

TEST(PinnedHostPoolTest, RoundSizeUsesPageThenPowerOfTwoThen2MiBSteps) {
  using p = pinned_host_pool;
  EXPECT_EQ(p::round_size(1), 4 * kib);
  EXPECT_EQ(p::round_size(4 * kib), 4 * kib);
  EXPECT_EQ(p::round_size(4 * kib + 1), 8 * kib);
  EXPECT_EQ(p::round_size(100 * kib), 128 * kib);
  EXPECT_EQ(p::round_size(mib + 1), 2 * mib);
  EXPECT_EQ(p::round_size(2 * mib), 2 * mib);
  EXPECT_EQ(p::round_size(2 * mib + 1), 4 * mib);
  EXPECT_EQ(p::round_size(5 * mib), 6 * mib);
  EXPECT_EQ(p::round_size(64 * mib + 1), 66 * mib);
  // Bounded waste: above 2 MiB never more than 2 MiB, below it less than half.
  for (std::size_t b : {4 * kib + 1, 300 * kib, mib + 7, 3 * mib, 97 * mib + 5}) {
    const std::size_t r = p::round_size(b);
    EXPECT_GE(r, b);
    EXPECT_LT(r - b, std::max(b, 2 * mib));
  }
}

TEST(PinnedHostPoolTest, OptionsValidateNamesTheKey) {
  EXPECT_NO_THROW(pinned_host_pool_options{}.validate());
  pinned_host_pool_options o;
  o.host_limit = 100;
  try {
    o.validate();
    FAIL() << "host_limit 100 accepted";
  } catch (const config_error& e) {
    EXPECT_EQ(e.key(), "host_limit");
    EXPECT_EQ(e.value(), "100");
  }
  sim_device dev(small_sim());
  EXPECT_THROW(pinned_host_pool(dev, o), config_error);
}

TEST(PinnedHostPoolTest, AllocatesPinnedMemoryOfTheSizeClass) {
  sim_device dev(small_sim());
  pinned_host_pool pool(dev, {});
  void* p = pool.allocate(5000);
  ASSERT_NE(p, nullptr);
  EXPECT_TRUE(dev.owns(p));
  EXPECT_EQ(dev.counters().pinned_used, 8 * kib);
  std::memset(p, 0x5a, 8 * kib);  // the whole class is usable
  const pinned_pool_stats s = pool.stats();
  EXPECT_EQ(s.allocated_bytes.current, 8 * 1024);
  EXPECT_EQ(s.requested_bytes.current, 5000);
  EXPECT_EQ(s.reserved_bytes.current, 8 * 1024);
  EXPECT_EQ(s.allocations.current, 1);
  EXPECT_EQ(s.pinned_buffers.current, 1);
  EXPECT_EQ(s.num_pinned_allocs, 1U);
  EXPECT_EQ(s.num_reuses, 0U);
  pool.deallocate(p);
  EXPECT_TRUE(pool.is_valid());
}

TEST(PinnedHostPoolTest, ZeroBytesAndNullAreNoOps) {
  sim_device dev(small_sim());
  pinned_host_pool pool(dev, {});
  EXPECT_EQ(pool.allocate(0), nullptr);
  pool.deallocate(nullptr);
  pool.record_stream(nullptr, dev.default_stream());
  const pinned_pool_stats s = pool.stats();
  EXPECT_EQ(s.allocations.allocated, 0);
  EXPECT_EQ(s.num_pinned_allocs, 0U);
  EXPECT_EQ(s.num_unknown_pointers, 0U);
  EXPECT_EQ(dev.calls(sim_call::pinned_alloc), 0U);
}

TEST(PinnedHostPoolTest, BufferWithoutRecordedStreamIsReusedAtOnceWithinItsClass) {
  sim_device dev(small_sim());
  pinned_host_pool pool(dev, {});
  void* p = pool.allocate(1000);
  pool.deallocate(p);
  void* q = pool.allocate(3000);  // same 4 KiB class
  EXPECT_EQ(q, p);
  void* r = pool.allocate(5000);  // 8 KiB class: not served by the 4 KiB buffer
  EXPECT_NE(r, p);
  const pinned_pool_stats s = pool.stats();
  EXPECT_EQ(s.num_reuses, 1U);
  EXPECT_EQ(s.num_pinned_allocs, 2U);
  EXPECT_EQ(s.requested_bytes.current, 3000 + 5000);
  pool.deallocate(q);
  pool.deallocate(r);
  EXPECT_TRUE(pool.is_valid());
}

TEST(PinnedHostPoolTest, PendingBufferWaitsForEveryRecordedStream) {
  sim_device dev(small_sim());
  pinned_host_pool pool(dev, {});
  const stream_t s1 = dev.create_stream(stream_priority::normal);
  const stream_t s2 = dev.create_stream(stream_priority::normal);
  busy(dev, s1, 1e6);
  busy(dev, s2, 5e6);
  void* p = pool.allocate(64 * kib);
  pool.record_stream(p, s1);
  pool.record_stream(p, s2);
  pool.record_stream(p, s2);  // recorded twice: one event
  pool.deallocate(p);
  EXPECT_EQ(pool.stats().pending_bytes, 64 * kib);

  void* q = pool.allocate(64 * kib);
  EXPECT_NE(q, p);  // both streams still busy
  pool.deallocate(q);
  dev.synchronize_stream(s1);
  void* r = pool.allocate(64 * kib);
  EXPECT_EQ(r, q);  // q had no stream; p still waits for s2
  dev.synchronize_stream(s2);
  void* t = pool.allocate(64 * kib);
  EXPECT_EQ(t, p);
  EXPECT_EQ(pool.stats().pending_bytes, 0U);
  pool.deallocate(r);
  pool.deallocate(t);
  EXPECT_TRUE(pool.is_valid());
  dev.destroy_stream(s1);
  dev.destroy_stream(s2);
}

TEST(PinnedHostPoolTest, StatsCountCurrentPeakAllocatedFreedAndResetPeak) {
  sim_device dev(small_sim());
  pinned_host_pool pool(dev, {});
  void* a = pool.allocate(4 * kib);
  void* b = pool.allocate(mib);
  pool.deallocate(a);
  void* c = pool.allocate(100);  // reuses a
  pinned_pool_stats s = pool.stats();
  EXPECT_EQ(s.allocated_bytes.current, static_cast<std::int64_t>(4 * kib + mib));
  EXPECT_EQ(s.allocated_bytes.peak, static_cast<std::int64_t>(4 * kib + mib));
  EXPECT_EQ(s.allocated_bytes.allocated, static_cast<std::int64_t>(8 * kib + mib));
  EXPECT_EQ(s.allocated_bytes.freed, static_cast<std::int64_t>(4 * kib));
  EXPECT_EQ(s.requested_bytes.current, static_cast<std::int64_t>(100 + mib));
  EXPECT_EQ(s.allocations.allocated, 3);
  EXPECT_EQ(s.allocations.freed, 1);
  EXPECT_EQ(s.reserved_bytes.current, static_cast<std::int64_t>(4 * kib + mib));
  EXPECT_EQ(s.cached_bytes, 0U);
  EXPECT_EQ(s.num_pinned_allocs, 2U);
  EXPECT_EQ(s.num_reuses, 1U);

  pool.deallocate(b);
  s = pool.stats();
  EXPECT_EQ(s.allocated_bytes.current, static_cast<std::int64_t>(4 * kib));
  EXPECT_EQ(s.allocated_bytes.peak, static_cast<std::int64_t>(4 * kib + mib));
  EXPECT_EQ(s.cached_bytes, mib);
  pool.reset_peak_stats();
  s = pool.stats();
  EXPECT_EQ(s.allocated_bytes.peak, static_cast<std::int64_t>(4 * kib));
  EXPECT_EQ(s.reserved_bytes.peak, static_cast<std::int64_t>(4 * kib + mib));  // still held

  const nlohmann::json j = s.to_json();
  EXPECT_EQ(j.at("allocated_bytes").at("current").get<std::int64_t>(), 4 * 1024);
  EXPECT_EQ(j.at("allocated_bytes").at("freed").get<std::int64_t>(),
            static_cast<std::int64_t>(4 * kib + mib));
  EXPECT_EQ(j.at("reserved_bytes").at("peak").get<std::int64_t>(),
            static_cast<std::int64_t>(4 * kib + mib));
  EXPECT_EQ(j.at("num_pinned_allocs").get<std::uint64_t>(), 2U);
  EXPECT_EQ(j.at("num_reuses").get<std::uint64_t>(), 1U);
  EXPECT_EQ(j.at("cached_bytes").get<std::size_t>(), mib);
  for (const char* key : {"requested_bytes", "allocations", "pinned_buffers", "pending_bytes",
                          "host_limit", "num_pinned_frees", "num_pinned_alloc_failures",
                          "num_event_syncs", "num_fence_failures", "num_ooms",
                          "num_unknown_pointers"}) {
    EXPECT_TRUE(j.contains(key)) << key;
  }
  pool.deallocate(c);
  EXPECT_TRUE(pool.is_valid());
}

TEST(PinnedHostPoolTest, LimitIsEnforcedWithAMessageNamingEveryFigure) {
  sim_device dev(small_sim());
  pinned_host_pool_options o;
  o.host_limit = 8 * mib;
  pinned_host_pool pool(dev, o);
  EXPECT_EQ(pool.limit(), 8 * mib);
  void* a = pool.allocate(3 * mib);  // 4 MiB class
  void* b = pool.allocate(4 * mib);
  try {
    (void)pool.allocate(3 * mib);
    FAIL() << "allocation over host_limit succeeded";
  } catch (const out_of_memory& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("out of pinned host memory: tried to allocate 3.00 MiB"), std::string::npos)
        << m;
    EXPECT_NE(m.find("requested: 3.00 MiB (3145728 bytes), rounded to 4194304 bytes"),
              std::string::npos)
        << m;
    EXPECT_NE(m.find("host_limit: 8.00 MiB (8388608 bytes)"), std::string::npos) << m;
    EXPECT_NE(m.find("in use: 8.00 MiB (8388608 bytes) in 2 buffers"), std::string::npos) << m;
    EXPECT_NE(m.find("cached: 0 B (0 bytes), of which 0 B (0 bytes) awaiting events"),
              std::string::npos)
        << m;
    EXPECT_NE(m.find("raise host_limit"), std::string::npos) << m;
  }
  // out_of_memory is a std::bad_alloc, and the failure changed nothing.
  EXPECT_THROW((void)pool.allocate(1), std::bad_alloc);
  const pinned_pool_stats s = pool.stats();
  EXPECT_EQ(s.num_ooms, 2U);
  EXPECT_EQ(s.allocated_bytes.current, static_cast<std::int64_t>(8 * mib));
  EXPECT_EQ(s.reserved_bytes.current, static_cast<std::int64_t>(8 * mib));
  EXPECT_LE(s.reserved_bytes.peak, static_cast<std::int64_t>(8 * mib));
  EXPECT_EQ(dev.counters().pinned_used, 8 * mib);
  EXPECT_TRUE(pool.is_valid());
  pool.deallocate(a);
  void* c = pool.allocate(4 * mib);  // now fits (reuse)
  EXPECT_EQ(c, a);
  pool.deallocate(b);
  pool.deallocate(c);
}

TEST(PinnedHostPoolTest, RequestAboveTheLimitFailsAtOnceWithoutWaiting) {
  sim_device dev(small_sim());
  pinned_host_pool_options o;
  o.host_limit = 4 * mib;
  pinned_host_pool pool(dev, o);
  const stream_t s = dev.create_stream(stream_priority::normal);
  busy(dev, s, 1e9);
  void* a = pool.allocate(mib);
  pool.record_stream(a, s);
  pool.deallocate(a);
  try {
    (void)pool.allocate(5 * mib);
    FAIL() << "a request above host_limit succeeded";
  } catch (const out_of_memory& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("rounded to 6291456 bytes"), std::string::npos) << m;
    EXPECT_NE(m.find("cached: 1.00 MiB (1048576 bytes), of which 1.00 MiB (1048576 bytes) "
                     "awaiting events"),
              std::string::npos)
        << m;
    EXPECT_NE(m.find("the request alone exceeds host_limit"), std::string::npos) << m;
  }
  EXPECT_EQ(dev.now_ns(), 0.0);  // nothing was waited for
  EXPECT_EQ(pool.stats().num_event_syncs, 0U);
  EXPECT_EQ(pool.stats().num_pinned_frees, 0U);
  dev.synchronize();
  dev.destroy_stream(s);
}

TEST(PinnedHostPoolTest, RecordedStreamDestroyedBeforeDeallocateFallsBackToDeviceSync) {
  sim_device dev(small_sim());
  pinned_host_pool pool(dev, {});
  const stream_t s = dev.create_stream(stream_priority::normal);
  void* p = pool.allocate(kib);
  pool.record_stream(p, s);
  dev.destroy_stream(s);
  pool.deallocate(p);  // the event cannot be recorded on a stream that is gone
  pinned_pool_stats st = pool.stats();
  EXPECT_EQ(st.num_fence_failures, 1U);
  EXPECT_EQ(st.pending_bytes, 0U);
  EXPECT_EQ(pool.allocate(kib), p);
  pool.deallocate(p);
  EXPECT_TRUE(pool.is_valid());
}

TEST(PinnedHostPoolTest, LimitFreesTheSmallestSufficientCachedBuffer) {
  sim_device dev(small_sim());
  pinned_host_pool_options o;
  o.host_limit = 12 * mib;
  pinned_host_pool pool(dev, o);
  void* x = pool.allocate(4 * mib);
  void* a = pool.allocate(2 * mib);
  void* b = pool.allocate(6 * mib);
  pool.deallocate(a);
  pool.deallocate(b);
  void* c = pool.allocate(mib);  // needs 1 MiB of room: the 2 MiB buffer goes, the 6 MiB stays
  pinned_pool_stats s = pool.stats();
  EXPECT_EQ(s.num_pinned_frees, 1U);
  EXPECT_EQ(s.cached_bytes, 6 * mib);
  EXPECT_EQ(s.reserved_bytes.current, static_cast<std::int64_t>(11 * mib));
  void* d = pool.allocate(6 * mib);
  EXPECT_EQ(d, b);
  for (void* p : {x, c, d}) pool.deallocate(p);
  EXPECT_TRUE(pool.is_valid());
}

TEST(PinnedHostPoolTest, LimitFreesLargestCachedBuffersFirstWhenNoneSufficesAlone) {
  sim_device dev(small_sim());
  pinned_host_pool_options o;
  o.host_limit = 12 * mib;
  pinned_host_pool pool(dev, o);
  void* x = pool.allocate(2 * mib);
  void* a = pool.allocate(2 * mib);
  void* b = pool.allocate(4 * mib);
  void* c = pool.allocate(4 * mib);
  for (void* p : {a, b, c}) pool.deallocate(p);
  void* d = pool.allocate(6 * mib);  // needs 6 MiB: both 4 MiB buffers go
  pinned_pool_stats s = pool.stats();
  EXPECT_EQ(s.num_pinned_frees, 2U);
  EXPECT_EQ(s.reserved_bytes.current, static_cast<std::int64_t>(10 * mib));
  void* e = pool.allocate(2 * mib);  // the cached 2 MiB buffer survived
  EXPECT_EQ(e, a);
  for (void* p : {x, d, e}) pool.deallocate(p);
  EXPECT_TRUE(pool.is_valid());
  EXPECT_EQ(static_cast<std::size_t>(pool.stats().reserved_bytes.current),
            dev.counters().pinned_used);
}

TEST(PinnedHostPoolTest, LimitWaitsForPendingBuffersBeforeGivingUp) {
  sim_device dev(small_sim());
  pinned_host_pool_options o;
  o.host_limit = 4 * mib;
  pinned_host_pool pool(dev, o);
  const stream_t s = dev.create_stream(stream_priority::normal);
  busy(dev, s, 1e9);
  void* a = pool.allocate(2 * mib);
  pool.record_stream(a, s);
  pool.deallocate(a);
  void* b = pool.allocate(2 * mib);  // room for a second one: pinned, not waited for
  EXPECT_NE(b, a);
  pool.record_stream(b, s);
  pool.deallocate(b);
  void* c = pool.allocate(4 * mib);  // wait for both, free both, pin 4 MiB
  pinned_pool_stats st = pool.stats();
  EXPECT_EQ(st.num_event_syncs, 2U);
  EXPECT_EQ(st.num_pinned_frees, 2U);
  EXPECT_EQ(st.reserved_bytes.current, static_cast<std::int64_t>(4 * mib));
  EXPECT_GE(dev.now_ns(), 1e9);  // the host really waited for the stream
  pool.deallocate(c);
  EXPECT_TRUE(pool.is_valid());
  dev.destroy_stream(s);
}

TEST(PinnedHostPoolTest, DeviceRefusalFreesTheCacheAndRetriesThenReports) {
  sim_device dev(small_sim(8 * mib));  // the device itself has 8 MiB of pinned memory
  pinned_host_pool pool(dev, {});
  void* a = pool.allocate(4 * mib);
  void* b = pool.allocate(4 * mib);
  pool.deallocate(a);
  void* c = pool.allocate(2 * mib);  // device full: the cached 4 MiB goes, then it fits
  ASSERT_NE(c, nullptr);
  pinned_pool_stats s = pool.stats();
  EXPECT_EQ(s.num_pinned_alloc_failures, 1U);
  EXPECT_EQ(s.num_pinned_frees, 1U);
  EXPECT_EQ(s.reserved_bytes.current, static_cast<std::int64_t>(6 * mib));
  try {
    (void)pool.allocate(4 * mib);
    FAIL() << "the device had no room";
  } catch (const out_of_memory& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("host_limit: none"), std::string::npos) << m;
    EXPECT_NE(m.find("in use: 6.00 MiB (6291456 bytes) in 2 buffers"), std::string::npos) << m;
    EXPECT_NE(m.find("the device has no more pinned host memory"), std::string::npos) << m;
  }
  s = pool.stats();
  EXPECT_EQ(s.num_ooms, 1U);
  EXPECT_EQ(dev.calls(sim_call::pinned_alloc), s.num_pinned_allocs + s.num_pinned_alloc_failures);
  pool.deallocate(b);
  pool.deallocate(c);
  EXPECT_TRUE(pool.is_valid());
}

TEST(PinnedHostPoolTest, HugeRequestIsOutOfMemoryNotOverflow) {
  sim_device dev(small_sim());
  pinned_host_pool pool(dev, {});
  EXPECT_THROW((void)pool.allocate(SIZE_MAX), out_of_memory);
  EXPECT_THROW((void)pool.allocate(SIZE_MAX - mib), out_of_memory);
  EXPECT_THROW((void)pool.allocate(512 * mib), out_of_memory);  // more than the device has
  EXPECT_EQ(pool.stats().num_ooms, 3U);
  EXPECT_TRUE(pool.is_valid());
}

TEST(PinnedHostPoolTest, UnknownPointersAndDoubleFreesChangeNothing) {
  sim_device dev(small_sim());
  pinned_host_pool pool(dev, {});
  int local = 0;
  void* p = pool.allocate(kib);
  pool.record_stream(&local, dev.default_stream());
  pool.deallocate(&local);
  pool.deallocate(p);
  pool.deallocate(p);
  pool.record_stream(p, dev.default_stream());  // no longer in use
  const pinned_pool_stats s = pool.stats();
  EXPECT_EQ(s.num_unknown_pointers, 4U);
  EXPECT_EQ(s.allocations.current, 0);
  EXPECT_EQ(s.allocations.freed, 1);
  EXPECT_TRUE(pool.is_valid());
}

TEST(PinnedHostPoolTest, EmptyCacheFreesReadyAndWaitsForPendingButKeepsInUse) {
  sim_device dev(small_sim());
  pinned_host_pool pool(dev, {});
  const stream_t s = dev.create_stream(stream_priority::normal);
  void* keep = pool.allocate(mib);
  void* ready = pool.allocate(64 * kib);
  void* pending = pool.allocate(2 * mib);
  pool.deallocate(ready);
  busy(dev, s, 1e8);
  pool.record_stream(pending, s);
  pool.deallocate(pending);
  EXPECT_EQ(pool.stats().cached_bytes, 64 * kib + 2 * mib);
  pool.empty_cache();
  const pinned_pool_stats st = pool.stats();
  EXPECT_EQ(st.cached_bytes, 0U);
  EXPECT_EQ(st.pending_bytes, 0U);
  EXPECT_EQ(st.reserved_bytes.current, static_cast<std::int64_t>(mib));
  EXPECT_EQ(st.num_pinned_frees, 2U);
  EXPECT_EQ(st.num_event_syncs, 1U);
  EXPECT_EQ(dev.counters().pinned_used, mib);
  EXPECT_GE(dev.now_ns(), 1e8);
  std::memset(keep, 1, mib);  // untouched by empty_cache
  pool.deallocate(keep);
  EXPECT_TRUE(pool.is_valid());
  dev.destroy_stream(s);
}

TEST(PinnedHostPoolTest, DestructorWaitsForPendingCopiesAndFreesEverything) {
  sim_device dev(small_sim());
  const stream_t s = dev.create_stream(stream_priority::normal);
  void* src = dev.allocate_device(mib);
  {
    pinned_host_pool pool(dev, {});
    void* p = pool.allocate(mib);
    busy(dev, s, 1e8);
    dev.copy_async(p, src, mib, copy_kind::device_to_host, s);
    pool.record_stream(p, s);
    pool.deallocate(p);
    (void)pool.allocate(kib);  // still in use at destruction: freed too
  }
  EXPECT_EQ(dev.counters().pinned_used, 0U);
  EXPECT_GE(dev.now_ns(), 1e8);  // the pending copy was waited for before its buffer was freed
  dev.free_device(src);
  dev.destroy_stream(s);
}

// The training-loop property of issue 3: after the first step, no step pins anything new.
struct loop_result {
  std::uint64_t pinned_allocs_after_first = 0;
  std::uint64_t pinned_allocs_at_end = 0;
  pinned_pool_stats stats;
};

loop_result run_training_loop(sim_device& dev, pinned_host_pool& pool, bool sync_each_step,
                              int steps) {
  // A step's activations, offloaded: repeated sizes, small and large.
  const std::vector<std::size_t> sizes = {3 * kib, 100 * kib, 100 * kib, mib,
                                          3 * mib, 3 * mib,   5 * mib + 123};
  const stream_t compute = dev.create_stream(stream_priority::normal);
  const stream_t d2h = dev.create_stream(stream_priority::high);
  const event_t produced = dev.create_event();
  void* src = dev.allocate_device(6 * mib);
  loop_result r;
  for (int step = 0; step < steps; ++step) {
    for (std::size_t bytes : sizes) {
      busy(dev, compute, 2e5);  // the layer that produces the activation
      dev.record_event(produced, compute);
      dev.wait_event(d2h, produced);
      void* host = pool.allocate(bytes);
      dev.copy_async(host, src, bytes, copy_kind::device_to_host, d2h);
      pool.record_stream(host, d2h);
      pool.deallocate(host);  // handed back while the copy is in flight
    }
    if (sync_each_step) dev.synchronize();  // e.g. reading the loss
    if (step == 0) r.pinned_allocs_after_first = pool.stats().num_pinned_allocs;
  }
  dev.synchronize();
  r.stats = pool.stats();
  r.pinned_allocs_at_end = r.stats.num_pinned_allocs;
  dev.free_device(src);
  dev.destroy_event(produced);
  dev.destroy_stream(compute);
  dev.destroy_stream(d2h);
  return r;
}

TEST(PinnedHostPoolTest, SteadyStateTrainingLoopPinsNothingAfterTheFirstStep) {
  sim_device dev(small_sim());
  pinned_host_pool pool(dev, {});
  const loop_result r = run_training_loop(dev, pool, /*sync_each_step=*/true, 10);
  EXPECT_GT(r.pinned_allocs_after_first, 0U);
  EXPECT_EQ(r.pinned_allocs_at_end, r.pinned_allocs_after_first);
  EXPECT_GE(r.stats.num_reuses, 9U * 7U);
  EXPECT_EQ(r.stats.num_pinned_frees, 0U);
  EXPECT_TRUE(pool.is_valid());
}

TEST(PinnedHostPoolTest, SteadyStateHoldsUnderALimitOfOneStepWithoutHostSync) {
  // One step's worth of size classes: 4K + 2x128K + 1M + 2x4M + 6M.
  const std::size_t one_step = 4 * kib + 2 * 128 * kib + mib + 2 * 4 * mib + 6 * mib;
  sim_device dev(small_sim());
  pinned_host_pool_options o;
  o.host_limit = one_step;
  pinned_host_pool pool(dev, o);
  const loop_result r = run_training_loop(dev, pool, /*sync_each_step=*/false, 10);
  EXPECT_EQ(r.pinned_allocs_at_end, r.pinned_allocs_after_first);
  EXPECT_LE(r.stats.reserved_bytes.peak, static_cast<std::int64_t>(one_step));
  EXPECT_GT(r.stats.num_event_syncs, 0U);  // the limit made it wait instead of pinning
  EXPECT_EQ(r.stats.num_ooms, 0U);
  EXPECT_TRUE(pool.is_valid());
}

}  // namespace
}  // namespace gpuswap
