// Fault injection: a reference workload runs once clean to count the device calls of a kind,
// then once per call with exactly that call failing. Every run either completes or throws the
// defined error (out_of_memory, or device_error "sim_fault_injected" from the workload's own
// device calls); in every case the allocator's accounting stays exact (validate()), and after
// clear_faults() the next allocation succeeds and empty_cache returns every byte.
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "allocator/caching_allocator.hpp"
#include "core/errors.hpp"
#include "device/sim_device.hpp"

namespace gpuswap {
namespace {

constexpr std::size_t KiB = std::size_t{1} << 10;
constexpr std::size_t MiB = std::size_t{1} << 20;

struct rig {
  rig() {
    sim_options o;
    o.backing = sim_backing::real;
    o.device_capacity = std::size_t{256} << 20;
    dev = std::make_unique<sim_device>(o);
    s0 = dev->default_stream();
    s1 = dev->create_stream(stream_priority::normal);
    s2 = dev->create_stream(stream_priority::normal);
    caching_allocator_options opts;
    opts.device_limit = 96 * MiB;  // tight enough that the OOM ladder runs
    alloc = std::make_unique<caching_allocator>(*dev, opts);
    event = dev->create_event();
  }
  ~rig() {
    dev->synchronize();
    alloc.reset();
    dev->destroy_event(event);
  }
  std::unique_ptr<sim_device> dev;
  std::unique_ptr<caching_allocator> alloc;
  stream_t s0{}, s1{}, s2{};
  event_t event{};
};

// Frees whatever the workload still holds, however it ends.
struct live_set {
  caching_allocator& alloc;
  std::vector<void*> blocks;
  ~live_set() {
    for (void* p : blocks) alloc.deallocate(p);
  }
};

// Small and large blocks on two streams, some also used on a third (record_stream plus a kernel
// there, with cross-stream event waits), frees in between, a cache flush, and enough volume
// under a 96 MiB budget that segments are released and obtained again.
void workload(rig& r) {
  static constexpr std::size_t sizes[] = {700,       64 * KiB, 3 * MiB, 200,
                                          900 * KiB, 12 * MiB, 5 * MiB, 4 * KiB};
  live_set live{*r.alloc, {}};
  for (int i = 0; i < 48; ++i) {
    const std::size_t n = sizes[static_cast<std::size_t>(i) % std::size(sizes)];
    const stream_t s = i % 2 == 0 ? r.s0 : r.s1;
    void* p = r.alloc->allocate(n, s);
    live.blocks.push_back(p);
    if (i % 3 == 0) {
      // s2 uses the block after s's work so far: an event wait, then a kernel touching it.
      r.dev->record_event(r.event, s);
      r.dev->wait_event(r.s2, r.event);
      r.alloc->record_stream(p, r.s2);
      const touched_buffer touched[] = {{p, n}};
      r.dev->launch(r.s2, kernel_cost{0, 0, 5000}, nullptr, touched);
    }
    if (i % 4 == 3) {  // free the three oldest
      for (int k = 0; k < 3 && !live.blocks.empty(); ++k) {
        r.alloc->deallocate(live.blocks.front());
        live.blocks.erase(live.blocks.begin());
      }
    }
    if (i % 16 == 15) r.alloc->empty_cache();
    if (i % 5 == 0) r.dev->advance_host_ns(3000);
  }
}

enum class outcome { completed, out_of_memory, device_error };

outcome run_once(rig& r) {
  try {
    workload(r);
    return outcome::completed;
  } catch (const out_of_memory&) {
    return outcome::out_of_memory;
  } catch (const device_error& e) {
    EXPECT_EQ(e.error_name(), "sim_fault_injected") << e.what();
    return outcome::device_error;
  }
}

// After any run: exact accounting, nothing live, and a working allocator once faults clear.
void check_recovers(rig& r, const std::string& label) {
  EXPECT_EQ(r.alloc->validate(), "") << label;
  EXPECT_EQ(r.alloc->stats().allocation.all().current, 0) << label;
  r.dev->clear_faults();
  void* p = nullptr;
  EXPECT_NO_THROW(p = r.alloc->allocate(MiB, r.s0)) << label;
  EXPECT_NE(p, nullptr) << label;
  r.alloc->deallocate(p);
  r.dev->synchronize();
  r.alloc->empty_cache();
  const auto st = r.alloc->stats();
  EXPECT_EQ(st.reserved_bytes.all().current, 0) << label;
  EXPECT_EQ(st.active.all().current, 0) << label;
  EXPECT_EQ(r.alloc->validate(), "") << label;
  EXPECT_EQ(r.dev->counters().device_used, 0u) << label;
}

std::uint64_t clean_calls(sim_call kind) {
  rig r;
  const std::uint64_t before = r.dev->calls(kind);
  EXPECT_EQ(run_once(r), outcome::completed);
  check_recovers(r, "clean run");
  return r.dev->calls(kind) - before;
}

// Runs the workload once per call of `kind` that a clean run makes, with exactly that call
// failing; `expect(outcome, label)` judges each run, then the allocator must recover.
template <typename Expect>
void for_each_failing_call(sim_call kind, Expect&& expect) {
  const std::uint64_t total = clean_calls(kind);
  ASSERT_GT(total, 5u) << to_string(kind);
  for (std::uint64_t n = 1; n <= total; ++n) {
    rig r;
    r.dev->fail_nth(kind, n);
    const std::string label = std::string(to_string(kind)) + " #" + std::to_string(n);
    expect(run_once(r), label);
    check_recovers(r, label);
  }
}

TEST(caching_allocator_fault_test, every_failing_device_allocation_is_retried) {
  // A refused segment is retried (a smaller segment, then the OOM ladder: release the cache and
  // ask again), so the workload completes.
  for_each_failing_call(sim_call::device_alloc, [](outcome o, const std::string& label) {
    EXPECT_EQ(o, outcome::completed) << label;
  });
}

TEST(caching_allocator_fault_test, a_device_that_refuses_everything_gives_out_of_memory) {
  rig r;
  void* kept = r.alloc->allocate(4 * KiB, r.s0);
  r.dev->fail_always(sim_call::device_alloc);
  EXPECT_EQ(run_once(r), outcome::out_of_memory);
  EXPECT_GE(r.alloc->stats().num_ooms, 1u);
  EXPECT_EQ(r.alloc->validate(), "");
  r.alloc->deallocate(kept);
  check_recovers(r, "fail_always(device_alloc)");
}

TEST(caching_allocator_fault_test, every_failing_event_record) {
  // The workload's own record_event throws; the allocator's (in deallocate) is absorbed and the
  // block waits for a device-wide synchronize instead.
  int completed = 0, failed = 0;
  for_each_failing_call(sim_call::event_record, [&](outcome o, const std::string& label) {
    EXPECT_NE(o, outcome::out_of_memory) << label;
    (o == outcome::completed ? completed : failed) += 1;
  });
  EXPECT_GT(completed, 0);  // some faults hit the allocator's records
  EXPECT_GT(failed, 0);     // and some the workload's
}

TEST(caching_allocator_fault_test, every_failing_event_wait) {
  // Only the workload waits on events (the allocator polls and synchronizes instead).
  for_each_failing_call(sim_call::event_wait, [](outcome o, const std::string& label) {
    EXPECT_EQ(o, outcome::device_error) << label;
  });
}

TEST(caching_allocator_fault_test, every_event_record_failing_at_once) {
  rig r;
  void* p = r.alloc->allocate(8 * KiB, r.s0);
  r.alloc->record_stream(p, r.s1);
  r.alloc->record_stream(p, r.s2);
  r.dev->fail_always(sim_call::event_record);
  r.alloc->deallocate(p);
  EXPECT_EQ(r.alloc->validate(), "");
  EXPECT_EQ(r.alloc->stats().active.all().current, 1);  // held until a device synchronize
  check_recovers(r, "fail_always(event_record)");
}

}  // namespace
}  // namespace gpuswap
