// pinned_host_pool under load and under faults.
//
// Stress: several threads allocate staging buffers, stage data through the device and back with
// real copies on sim_device, and hand buffers back while those copies are in flight. Every byte
// is checked: a buffer handed to two owners, or reused before its copy's event, corrupts a
// pattern. Op counts scale with GPUSWAP_STRESS_SCALE (default 1.0; CI lowers it for sanitizers).
//
// Faults: a reference workload is run once per possible failure point of the device calls the
// pool makes (pinned allocation, event record); each run either succeeds with correct data or
// throws out_of_memory, and the accounting is exact afterwards.
#include "allocator/pinned_host_pool.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/errors.hpp"
#include "device/sim_device.hpp"

namespace gpuswap {
namespace {

constexpr std::size_t kib = std::size_t{1} << 10;
constexpr std::size_t mib = std::size_t{1} << 20;

double stress_scale() {
  const char* text = std::getenv("GPUSWAP_STRESS_SCALE");
  if (text == nullptr || *text == '\0') return 1.0;
  char* end = nullptr;
  const double v = std::strtod(text, &end);
  return (end != text && v > 0) ? v : 1.0;
}

// Fills the first `bytes` (a multiple of 4) with a word unique to `tag`.
void fill(void* p, std::size_t bytes, std::uint32_t tag) {
  auto* w = static_cast<std::uint32_t*>(p);
  std::fill(w, w + bytes / 4, tag);
}

// Number of words in the first `bytes` that differ from `tag`.
std::size_t mismatches(const void* p, std::size_t bytes, std::uint32_t tag) {
  const auto* w = static_cast<const std::uint32_t*>(p);
  return static_cast<std::size_t>(std::count_if(w, w + bytes / 4, [tag](std::uint32_t x) {
    return x != tag;
  }));
}

sim_options stress_sim() {
  sim_options o;
  o.backing = sim_backing::real;
  o.device_capacity = 128 * mib;
  o.host_capacity = 512 * mib;
  return o;
}

// Sizes a swap engine stages: small, page-sized, odd, and above the 2 MiB threshold.
const std::vector<std::size_t>& stress_sizes() {
  static const std::vector<std::size_t> sizes = {256,        4 * kib,  12 * kib, 64 * kib,
                                                 300 * kib,  mib,      mib + 4 * kib,
                                                 2 * mib + 4 * kib};
  return sizes;
}
constexpr std::size_t max_stress_bytes = 2 * mib + 4 * kib;

struct stress_config {
  int threads = 4;
  int ops_per_thread = 300;
  bool shared_stream = false;  // every thread stages on one copy stream (like the swap engine)
  std::size_t host_limit = 0;
};

struct stress_outcome {
  std::atomic<std::uint64_t> corrupt{0};
  std::atomic<std::uint64_t> checks{0};
  std::atomic<std::uint64_t> oom_retries{0};
  std::atomic<std::uint64_t> unexpected{0};
};

// One op: stage a tagged buffer A to the device (H2D) and back into buffer B (D2H) on `stream`,
// hand A back at once (its H2D may not have read it yet); B is either checked at the next
// synchronisation point, or handed back unchecked while its D2H may still write it. A reused
// too early shows up as a wrong tag in a checked B (someone's bytes reached the device too late
// or too early), a B written late as a wrong tag in the next owner's staging.
void stress_thread(sim_device& dev, pinned_host_pool& pool, const stress_config& cfg, int index,
                   stream_t stream, stress_outcome& out) {
  std::mt19937 rng(static_cast<std::uint32_t>(1234 + index));
  void* dbuf = dev.allocate_device(max_stress_bytes);
  if (dbuf == nullptr) {
    ++out.unexpected;
    return;
  }
  auto allocate = [&](std::size_t bytes) -> void* {
    for (int attempt = 0; attempt < 1000; ++attempt) {
      try {
        return pool.allocate(bytes);
      } catch (const out_of_memory&) {
        // Only possible with a limit, when other threads hold the room at this instant.
        ++out.oom_retries;
        std::this_thread::yield();
      }
    }
    ++out.unexpected;
    return nullptr;
  };
  struct to_check {
    void* ptr;
    std::size_t bytes;
    std::uint32_t tag;
  };
  std::vector<to_check> pending_checks;
  auto check_all = [&] {
    dev.synchronize_stream(stream);
    for (const to_check& c : pending_checks) {
      out.corrupt += mismatches(c.ptr, c.bytes, c.tag) != 0;
      ++out.checks;
      pool.deallocate(c.ptr);
    }
    pending_checks.clear();
  };
  const auto& sizes = stress_sizes();
  for (int op = 0; op < cfg.ops_per_thread; ++op) {
    const std::size_t bytes = sizes[rng() % sizes.size()];
    const std::uint32_t tag = (static_cast<std::uint32_t>(index) << 24) |
                              static_cast<std::uint32_t>(op + 1);
    void* a = allocate(bytes);
    if (a == nullptr) break;
    fill(a, bytes, tag);
    out.corrupt += mismatches(a, bytes, tag) != 0;  // nobody else writes a buffer we own
    if (rng() % 4 == 0) {
      kernel_cost cost;
      cost.fixed_ns = 5e4;
      // Compute that really takes a while, so the copies behind it really run late and a
      // buffer reused too early is really written or read by the old owner's copy.
      dev.launch(stream, cost,
                 [] { std::this_thread::sleep_for(std::chrono::microseconds(300)); }, {});
    }
    dev.copy_async(dbuf, a, bytes, copy_kind::host_to_device, stream);
    pool.record_stream(a, stream);
    void* b = allocate(bytes);
    if (b == nullptr) {
      pool.deallocate(a);
      break;
    }
    fill(b, bytes, ~tag);
    dev.copy_async(b, dbuf, bytes, copy_kind::device_to_host, stream);
    pool.record_stream(b, stream);
    pool.deallocate(a);  // its H2D is in flight
    if (rng() % 2 == 0) {
      pending_checks.push_back({b, bytes, tag});
    } else {
      pool.deallocate(b);  // its D2H is in flight
    }
    if (pending_checks.size() >= 3) check_all();
  }
  check_all();
  dev.synchronize_stream(stream);
  dev.free_device(dbuf);
}

void run_stress(const stress_config& cfg) {
  sim_device dev(stress_sim());
  pinned_host_pool_options o;
  o.host_limit = cfg.host_limit;
  pinned_host_pool pool(dev, o);
  std::vector<stream_t> streams;
  for (int t = 0; t < cfg.threads; ++t) {
    if (t == 0 || !cfg.shared_stream) streams.push_back(dev.create_stream(stream_priority::normal));
  }
  stress_outcome out;
  std::vector<std::thread> threads;
  for (int t = 0; t < cfg.threads; ++t) {
    const stream_t s = cfg.shared_stream ? streams[0] : streams[static_cast<std::size_t>(t)];
    threads.emplace_back(
        [&dev, &pool, &cfg, &out, t, s] { stress_thread(dev, pool, cfg, t, s, out); });
  }
  for (std::thread& t : threads) t.join();
  dev.synchronize();

  EXPECT_EQ(out.unexpected.load(), 0U);
  EXPECT_EQ(out.corrupt.load(), 0U) << "of " << out.checks.load() << " checks";
  EXPECT_GT(out.checks.load(), 0U);
  EXPECT_TRUE(pool.is_valid());
  const pinned_pool_stats s = pool.stats();
  EXPECT_EQ(s.allocations.current, 0);
  EXPECT_EQ(s.allocated_bytes.current, 0);
  EXPECT_EQ(s.requested_bytes.current, 0);
  EXPECT_EQ(static_cast<std::size_t>(s.reserved_bytes.current), dev.counters().pinned_used);
  EXPECT_EQ(s.num_unknown_pointers, 0U);
  EXPECT_GT(s.num_reuses, 0U);
  if (cfg.host_limit != 0) {
    EXPECT_LE(s.reserved_bytes.peak, static_cast<std::int64_t>(cfg.host_limit));
  }
  pool.empty_cache();
  EXPECT_EQ(pool.stats().reserved_bytes.current, 0);
  EXPECT_EQ(dev.counters().pinned_used, 0U);
  std::printf("[ stress ] %d threads x %d ops: %llu checks, %llu pinned allocs, %llu reuses, "
              "%llu event syncs, %llu pinned frees, peak reserved %lld MiB, %llu oom retries\n",
              cfg.threads, cfg.ops_per_thread, static_cast<unsigned long long>(out.checks.load()),
              static_cast<unsigned long long>(s.num_pinned_allocs),
              static_cast<unsigned long long>(s.num_reuses),
              static_cast<unsigned long long>(s.num_event_syncs),
              static_cast<unsigned long long>(s.num_pinned_frees),
              static_cast<long long>(s.reserved_bytes.peak >> 20),
              static_cast<unsigned long long>(out.oom_retries.load()));
  for (stream_t st : streams) dev.destroy_stream(st);
}

int scaled(int ops) { return std::max(10, static_cast<int>(ops * stress_scale())); }

TEST(PinnedHostPoolStressTest, ThreadsWithOwnStreams) {
  stress_config cfg;
  cfg.ops_per_thread = scaled(300);
  run_stress(cfg);
}

TEST(PinnedHostPoolStressTest, ThreadsSharingOneCopyStream) {
  stress_config cfg;
  cfg.shared_stream = true;
  cfg.ops_per_thread = scaled(300);
  run_stress(cfg);
}

TEST(PinnedHostPoolStressTest, ThreadsUnderATightHostLimit) {
  stress_config cfg;
  cfg.ops_per_thread = scaled(200);
  // A thread holds at most 4 buffers at once (A, B and two awaiting checks) of at most 4 MiB:
  // exactly what the limit allows, so the pool must free and wait for pending buffers (the
  // ladder) all the time, with threads racing for the room.
  cfg.host_limit = static_cast<std::size_t>(cfg.threads) * 4 * 4 * mib;
  run_stress(cfg);
}

// --- fault injection -------------------------------------------------------------------------

// The reference workload: three steps of staging a fixed set of sizes through the device and
// back, under a limit that forces the ladder to wait for pending buffers. Returns the number of
// corrupt buffers; throws what the pool throws, after giving back every buffer it holds.
std::size_t reference_workload(sim_device& dev, pinned_host_pool& pool, stream_t stream,
                               void* dbuf) {
  const std::vector<std::size_t> sizes = {4 * kib, 64 * kib, mib, 3 * mib};
  std::vector<void*> live;
  std::size_t corrupt = 0;
  try {
    for (std::uint32_t step = 0; step < 3; ++step) {
      struct staged {
        void* b;
        std::size_t bytes;
        std::uint32_t tag;
      };
      std::vector<staged> out;
      for (std::size_t i = 0; i < sizes.size(); ++i) {
        const std::uint32_t tag = 0x5000u + step * 16 + static_cast<std::uint32_t>(i);
        void* a = pool.allocate(sizes[i]);
        live.push_back(a);
        fill(a, sizes[i], tag);
        dev.copy_async(dbuf, a, sizes[i], copy_kind::host_to_device, stream);
        pool.record_stream(a, stream);
        void* b = pool.allocate(sizes[i]);
        live.push_back(b);
        fill(b, sizes[i], ~tag);
        dev.copy_async(b, dbuf, sizes[i], copy_kind::device_to_host, stream);
        pool.record_stream(b, stream);
        live.erase(std::find(live.begin(), live.end(), a));
        pool.deallocate(a);
        out.push_back({b, sizes[i], tag});
      }
      dev.synchronize_stream(stream);
      for (const staged& s : out) {
        corrupt += mismatches(s.b, s.bytes, s.tag) != 0;
        live.erase(std::find(live.begin(), live.end(), s.b));
        pool.deallocate(s.b);
      }
    }
  } catch (...) {
    for (void* p : live) pool.deallocate(p);
    throw;
  }
  return corrupt;
}

struct fault_run {
  bool threw_oom = false;
  std::size_t corrupt = 0;
  std::uint64_t pinned_alloc_calls = 0;
  std::uint64_t event_record_calls = 0;
  std::uint64_t fence_failures = 0;
};

// One run on a fresh device and pool, with `inject` applied before the workload; checks the
// accounting afterwards and that the pool serves again once faults are cleared.
fault_run run_with_fault(const std::function<void(sim_device&)>& inject) {
  sim_options so = stress_sim();
  so.host_capacity = 64 * mib;
  sim_device dev(so);
  pinned_host_pool_options o;
  o.host_limit = 10 * mib;  // below one step's 2 x (4K + 64K + 1M + 4M): the ladder must wait
  fault_run r;
  {
    pinned_host_pool pool(dev, o);
    const stream_t stream = dev.create_stream(stream_priority::normal);
    void* dbuf = dev.allocate_device(4 * mib);
    inject(dev);
    try {
      r.corrupt = reference_workload(dev, pool, stream, dbuf);
    } catch (const out_of_memory& e) {
      r.threw_oom = true;
      EXPECT_NE(std::string(e.what()).find("out of pinned host memory"), std::string::npos);
    }
    dev.synchronize();
    r.pinned_alloc_calls = dev.calls(sim_call::pinned_alloc);
    r.event_record_calls = dev.calls(sim_call::event_record);

    EXPECT_TRUE(pool.is_valid());
    const pinned_pool_stats s = pool.stats();
    EXPECT_EQ(s.allocations.current, 0);
    EXPECT_EQ(s.allocated_bytes.current, 0);
    EXPECT_EQ(s.requested_bytes.current, 0);
    EXPECT_EQ(static_cast<std::size_t>(s.reserved_bytes.current), dev.counters().pinned_used);
    EXPECT_EQ(static_cast<std::uint64_t>(s.pinned_buffers.current),
              s.num_pinned_allocs - s.num_pinned_frees);
    EXPECT_EQ(dev.calls(sim_call::pinned_alloc), s.num_pinned_allocs + s.num_pinned_alloc_failures);
    EXPECT_LE(s.reserved_bytes.peak, static_cast<std::int64_t>(o.host_limit));
    EXPECT_EQ(s.num_ooms, r.threw_oom ? 1U : 0U);
    r.fence_failures = s.num_fence_failures;

    dev.clear_faults();
    void* p = nullptr;
    EXPECT_NO_THROW(p = pool.allocate(3 * mib));
    EXPECT_NE(p, nullptr);
    pool.deallocate(p);
    dev.free_device(dbuf);
    dev.destroy_stream(stream);
  }
  EXPECT_EQ(dev.counters().pinned_used, 0U);
  return r;
}

TEST(PinnedHostPoolFaultTest, EveryPinnedAllocationFailureSucceedsOrThrowsOutOfMemory) {
  const fault_run clean = run_with_fault([](sim_device&) {});
  ASSERT_FALSE(clean.threw_oom);
  ASSERT_EQ(clean.corrupt, 0U);
  ASSERT_GT(clean.pinned_alloc_calls, 0U);
  int ooms = 0;
  for (std::uint64_t n = 1; n <= clean.pinned_alloc_calls + 1; ++n) {
    SCOPED_TRACE("pinned_alloc fails at call " + std::to_string(n));
    const fault_run r =
        run_with_fault([n](sim_device& d) { d.fail_nth(sim_call::pinned_alloc, n); });
    EXPECT_EQ(r.corrupt, 0U);
    ooms += r.threw_oom;
  }
  // The first pinning has nothing cached to fall back on: it must be reported, not hidden.
  EXPECT_GE(ooms, 1);
  // And a failure with something cached to free is absorbed by the ladder.
  EXPECT_LT(ooms, static_cast<int>(clean.pinned_alloc_calls));
}

TEST(PinnedHostPoolFaultTest, AlwaysFailingPinnedAllocationThrowsOutOfMemory) {
  const fault_run r =
      run_with_fault([](sim_device& d) { d.fail_always(sim_call::pinned_alloc); });
  EXPECT_TRUE(r.threw_oom);
}

TEST(PinnedHostPoolFaultTest, EveryEventRecordFailureStillSucceedsWithCorrectData) {
  const fault_run clean = run_with_fault([](sim_device&) {});
  ASSERT_GT(clean.event_record_calls, 0U);
  for (std::uint64_t n = 1; n <= clean.event_record_calls + 1; ++n) {
    SCOPED_TRACE("event_record fails at call " + std::to_string(n));
    const fault_run r =
        run_with_fault([n](sim_device& d) { d.fail_nth(sim_call::event_record, n); });
    EXPECT_FALSE(r.threw_oom);
    EXPECT_EQ(r.corrupt, 0U);
    EXPECT_EQ(r.fence_failures, n <= clean.event_record_calls ? 1U : 0U);
  }
  const fault_run always =
      run_with_fault([](sim_device& d) { d.fail_always(sim_call::event_record); });
  EXPECT_FALSE(always.threw_oom);
  EXPECT_EQ(always.corrupt, 0U);
  EXPECT_EQ(always.fence_failures, clean.event_record_calls);
}

}  // namespace
}  // namespace gpuswap
