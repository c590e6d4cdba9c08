// What the simulated device promises beyond the Device contract: the modelled clock, copy
// engines, real cross-stream ordering, phantom backing, managed faults and fault injection.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "core/errors.hpp"
#include "device/sim_device.hpp"

#include "support/sanitizers.hpp"

namespace gpuswap {
namespace {

constexpr std::size_t mib = std::size_t{1} << 20;

sim_options small_real() {
  sim_options o;
  o.device_capacity = 64 * mib;
  o.host_capacity = 64 * mib;
  o.h2d_bandwidth = 10e9;
  o.d2h_bandwidth = 10e9;
  o.h2d_latency_ns = 5'000;
  o.d2h_latency_ns = 5'000;
  return o;
}

TEST(sim_device_streams, name_stream_labels_a_stream_and_ignores_unknown_ones) {
  sim_device d(small_real());
  const stream_t s = d.create_stream(stream_priority::high);
  EXPECT_EQ(d.stream_name(s), "");
  d.name_stream(s, "gpuswap D2H copies");
  EXPECT_EQ(d.stream_name(s), "gpuswap D2H copies");
  d.name_stream(s, nullptr);  // ignored
  EXPECT_EQ(d.stream_name(s), "gpuswap D2H copies");
  d.name_stream(stream_t{12345}, "nobody");  // not a stream of this device: ignored
  EXPECT_EQ(d.stream_name(stream_t{12345}), "");
  d.destroy_stream(s);
  EXPECT_EQ(d.stream_name(s), "");
}

TEST(sim_device_clock, copy_on_idle_engine_takes_latency_plus_bytes_over_bandwidth) {
  sim_device d(small_real());
  void* dev = d.allocate_device(8 * mib);
  void* host = d.allocate_pinned(8 * mib);
  stream_t s = d.create_stream(stream_priority::normal);
  d.copy_async(dev, host, 8 * mib, copy_kind::host_to_device, s);
  const double expected = 5'000 + static_cast<double>(8 * mib) * 1e9 / 10e9;
  EXPECT_DOUBLE_EQ(d.stream_tail_ns(s), expected);
  d.synchronize_stream(s);
  EXPECT_DOUBLE_EQ(d.now_ns(), expected);
}

TEST(sim_device_clock, opposite_directions_overlap_and_same_direction_serialises) {
  sim_device d(small_real());
  void* dev_a = d.allocate_device(4 * mib);
  void* dev_b = d.allocate_device(4 * mib);
  void* host_a = d.allocate_pinned(4 * mib);
  void* host_b = d.allocate_pinned(4 * mib);
  stream_t s1 = d.create_stream(stream_priority::normal);
  stream_t s2 = d.create_stream(stream_priority::normal);
  const double one = 5'000 + static_cast<double>(4 * mib) * 1e9 / 10e9;

  d.copy_async(dev_a, host_a, 4 * mib, copy_kind::host_to_device, s1);
  d.copy_async(host_b, dev_b, 4 * mib, copy_kind::device_to_host, s2);
  EXPECT_DOUBLE_EQ(d.stream_tail_ns(s1), one);
  EXPECT_DOUBLE_EQ(d.stream_tail_ns(s2), one) << "H2D and D2H use separate engines";
  d.synchronize();

  const double t0 = d.now_ns();
  d.copy_async(dev_a, host_a, 4 * mib, copy_kind::host_to_device, s1);
  d.copy_async(dev_b, host_b, 4 * mib, copy_kind::host_to_device, s2);
  EXPECT_DOUBLE_EQ(d.stream_tail_ns(s1), t0 + one);
  EXPECT_DOUBLE_EQ(d.stream_tail_ns(s2), t0 + 2 * one) << "one H2D engine: copies queue";
}

TEST(sim_device_clock, both_directions_at_once_slow_the_later_copy) {
  sim_options o = small_real();
  o.h2d_factor_when_both = 0.5;
  o.h2d_latency_ns = 0;
  o.d2h_latency_ns = 0;
  sim_device d(o);
  void* dev = d.allocate_device(8 * mib);
  void* host = d.allocate_pinned(8 * mib);
  stream_t s1 = d.create_stream(stream_priority::normal);
  stream_t s2 = d.create_stream(stream_priority::normal);
  const double full = static_cast<double>(4 * mib) * 1e9 / 10e9;
  // Disjoint halves: the two copies run at once on the simulator's stream threads, and on
  // shared bytes they would race (as they would on a GPU).
  char* const dev_bytes = static_cast<char*>(dev);
  char* const host_bytes = static_cast<char*>(host);
  d.copy_async(host_bytes, dev_bytes, 4 * mib, copy_kind::device_to_host, s1);  // busy [0, full]
  // Half speed while the D2H runs.
  d.copy_async(dev_bytes + 4 * mib, host_bytes + 4 * mib, 4 * mib, copy_kind::host_to_device, s2);
  // During [0, full] the H2D moves half its bytes; the other half at full speed afterwards.
  EXPECT_DOUBLE_EQ(d.stream_tail_ns(s2), full + full / 2);
}

// Note [Published host clock]: the inline read must be the clock host_time_ns() reads, the
// modelled one and, once switched, the wall clock.
TEST(sim_device_clock, fast_host_time_reads_the_same_clock_as_host_time) {
  sim_device d(small_real());
  d.advance_host_ns(1e12);  // 1,000 modelled seconds: far from any wall time since construction
  EXPECT_EQ(d.host_time_ns_fast(), d.now_ns());
  EXPECT_EQ(d.host_time_ns_fast(), d.host_time_ns());
  d.set_wall_clock_timestamps(true);
  const double before = d.host_time_ns();
  const double fast = d.host_time_ns_fast();
  const double after = d.host_time_ns();
  EXPECT_LE(before, fast);
  EXPECT_LE(fast, after);
  EXPECT_LT(fast, 1e12);
  d.set_wall_clock_timestamps(false);
  EXPECT_EQ(d.host_time_ns_fast(), d.now_ns());
}

TEST(sim_device_clock, kernel_cost_uses_throughput_and_efficiency) {
  sim_options o = small_real();
  o.compute_flops = 1e12;
  o.compute_efficiency = 0.5;
  sim_device d(o);
  stream_t s = d.create_stream(stream_priority::normal);
  d.launch(s, kernel_cost{1e9, 0, 100}, nullptr, {});
  EXPECT_DOUBLE_EQ(d.stream_tail_ns(s), 2e6 + 100);  // 1 GFLOP at 0.5 TFLOP/s = 2 ms
}

TEST(sim_device_clock, event_wait_moves_the_waiting_stream_to_the_event_time) {
  sim_device d(small_real());
  stream_t a = d.create_stream(stream_priority::normal);
  stream_t b = d.create_stream(stream_priority::normal);
  event_t e = d.create_event();
  d.launch(a, kernel_cost{0, 0, 1'000'000}, nullptr, {});
  d.record_event(e, a);
  EXPECT_DOUBLE_EQ(d.event_time_ns(e), 1'000'000);
  d.wait_event(b, e);
  d.launch(b, kernel_cost{0, 0, 10}, nullptr, {});
  EXPECT_DOUBLE_EQ(d.stream_tail_ns(b), 1'000'010);
}

TEST(sim_device_clock, query_answers_by_the_modelled_clock) {
  sim_device d(small_real());
  stream_t s = d.create_stream(stream_priority::normal);
  event_t e = d.create_event();
  d.launch(s, kernel_cost{0, 0, 1e6}, nullptr, {});
  d.record_event(e, s);
  EXPECT_FALSE(d.query_event(e)) << "the host's clock is still at 0";
  d.advance_host_ns(999'999);
  EXPECT_FALSE(d.query_event(e));
  d.advance_host_ns(1);
  EXPECT_TRUE(d.query_event(e));
}

// When query says complete by the modelled clock, the bytes are there in fact, even if the
// worker thread is slow (here: a kernel that really sleeps before the copy behind it).
TEST(sim_device_clock, query_never_shows_an_unfinished_copy) {
  sim_device d(small_real());
  const std::size_t n = 4 * mib;
  auto* host = static_cast<unsigned char*>(d.allocate_pinned(n));
  auto* back = static_cast<unsigned char*>(d.allocate_pinned(n));
  void* dev = d.allocate_device(n);
  std::memset(host, 0x5A, n);
  std::memset(back, 0, n);
  stream_t s = d.create_stream(stream_priority::normal);
  event_t e = d.create_event();
  d.launch(s, kernel_cost{}, [] { std::this_thread::sleep_for(std::chrono::milliseconds(50)); }, {});
  d.copy_async(dev, host, n, copy_kind::host_to_device, s);
  d.copy_async(back, dev, n, copy_kind::device_to_host, s);
  d.record_event(e, s);
  d.advance_host_ns(1e12);
  ASSERT_TRUE(d.query_event(e));
  EXPECT_EQ(back[0], 0x5A);
  EXPECT_EQ(back[n - 1], 0x5A);
}

// --- ordering: each scenario runs with and without its event wait; without it the bytes are
// wrong, which shows that the assertion with the wait tests the wait (not luck). The runs
// without the wait are real races, so they are left out under ThreadSanitizer.

struct ordering_result {
  unsigned char first;
  unsigned char last;
};

// A slow kernel on the compute stream produces a buffer; the copy stream copies it to the host.
ordering_result copy_after_kernel(bool with_wait) {
  sim_device d(small_real());
  const std::size_t n = mib;
  auto* dev = static_cast<unsigned char*>(d.allocate_device(n));
  auto* host = static_cast<unsigned char*>(d.allocate_pinned(n));
  std::memset(dev, 0, n);
  std::memset(host, 0, n);
  stream_t compute = d.create_stream(stream_priority::normal);
  stream_t copy = d.create_stream(stream_priority::high);
  event_t produced = d.create_event();
  touched_buffer t{dev, n};
  d.launch(compute, kernel_cost{0, 0, 1e6},
           [dev, n] {
             std::this_thread::sleep_for(std::chrono::milliseconds(40));
             std::memset(dev, 0xC3, n);
           },
           {&t, 1});
  d.record_event(produced, compute);
  if (with_wait) d.wait_event(copy, produced);
  d.copy_async(host, dev, n, copy_kind::device_to_host, copy);
  d.synchronize_stream(copy);
  ordering_result r{host[0], host[n - 1]};
  d.synchronize();
  return r;
}

TEST(sim_device_ordering, copy_after_kernel_on_another_stream_via_event) {
  const ordering_result r = copy_after_kernel(true);
  EXPECT_EQ(r.first, 0xC3);
  EXPECT_EQ(r.last, 0xC3);
#ifndef GPUSWAP_TSAN
  const ordering_result race = copy_after_kernel(false);
  EXPECT_NE(race.first, 0xC3) << "without the wait the copy should have read stale bytes";
#endif
}

// A buffer being copied out must not be overwritten until its copy's event: the compute stream
// waits for the D2H before the kernel that reuses the source buffer.
ordering_result reuse_source_after_copy(bool with_wait) {
  sim_device d(small_real());
  const std::size_t n = mib;
  auto* src = static_cast<unsigned char*>(d.allocate_device(n));
  auto* host = static_cast<unsigned char*>(d.allocate_pinned(n));
  std::memset(src, 0x11, n);
  std::memset(host, 0, n);
  stream_t compute = d.create_stream(stream_priority::normal);
  stream_t copy = d.create_stream(stream_priority::high);
  event_t copied = d.create_event();
  // The copy stream is busy first, so its D2H really runs late.
  d.launch(copy, kernel_cost{}, [] { std::this_thread::sleep_for(std::chrono::milliseconds(40)); }, {});
  d.copy_async(host, src, n, copy_kind::device_to_host, copy);
  d.record_event(copied, copy);
  if (with_wait) d.wait_event(compute, copied);
  touched_buffer t{src, n};
  d.launch(compute, kernel_cost{}, [src, n] { std::memset(src, 0x22, n); }, {&t, 1});
  d.synchronize();
  return {host[0], host[n - 1]};
}

TEST(sim_device_ordering, source_reused_only_after_its_copy_event) {
  const ordering_result r = reuse_source_after_copy(true);
  EXPECT_EQ(r.first, 0x11);
  EXPECT_EQ(r.last, 0x11);
#ifndef GPUSWAP_TSAN
  const ordering_result race = reuse_source_after_copy(false);
  EXPECT_EQ(race.first, 0x22) << "without the wait the kernel should have overwritten the source";
#endif
}

// The host reads a D2H result only after synchronising on the copy's event.
unsigned char host_reads_after_wait(bool with_wait) {
  sim_device d(small_real());
  const std::size_t n = mib;
  auto* dev = static_cast<unsigned char*>(d.allocate_device(n));
  auto* host = static_cast<unsigned char*>(d.allocate_pinned(n));
  std::memset(dev, 0x77, n);
  std::memset(host, 0, n);
  stream_t copy = d.create_stream(stream_priority::high);
  event_t done = d.create_event();
  d.launch(copy, kernel_cost{}, [] { std::this_thread::sleep_for(std::chrono::milliseconds(40)); }, {});
  d.copy_async(host, dev, n, copy_kind::device_to_host, copy);
  d.record_event(done, copy);
  if (with_wait) d.synchronize_event(done);
  const unsigned char seen = __atomic_load_n(&host[n / 2], __ATOMIC_RELAXED);
  d.synchronize();
  return seen;
}

TEST(sim_device_ordering, host_waits_for_copy_event_before_reading) {
  EXPECT_EQ(host_reads_after_wait(true), 0x77);
#ifndef GPUSWAP_TSAN
  EXPECT_EQ(host_reads_after_wait(false), 0x00) << "without the wait the host reads too early";
#endif
}

// --- determinism -------------------------------------------------------------------------------

std::vector<sim_op> fixed_program(unsigned jitter_us, std::uint64_t seed) {
  sim_options o = small_real();
  o.h2d_factor_when_both = 0.7;
  o.d2h_factor_when_both = 0.8;
  o.worker_jitter_us = jitter_us;
  o.jitter_seed = seed;
  sim_device d(o);
  d.set_timeline_recording(true);
  stream_t compute = d.create_stream(stream_priority::normal);
  stream_t d2h = d.create_stream(stream_priority::high);
  stream_t h2d = d.create_stream(stream_priority::high);
  std::vector<void*> dev, host;
  for (int i = 0; i < 6; ++i) {
    dev.push_back(d.allocate_device(2 * mib));
    host.push_back(d.allocate_pinned(2 * mib));
  }
  std::vector<event_t> events;
  std::vector<event_t> offloaded;
  for (int i = 0; i < 6; ++i) {
    events.push_back(d.create_event());
    offloaded.push_back(d.create_event());
  }
  // forward: compute layer i, then offload its output while layer i+1 runs
  for (int i = 0; i < 6; ++i) {
    touched_buffer t{dev[i], 2 * mib};
    d.launch(compute, kernel_cost{2e8 * (i + 1), 0, 0}, [] {}, {&t, 1});
    d.record_event(events[i], compute);
    d.wait_event(d2h, events[i]);
    d.copy_async(host[i], dev[i], 2 * mib, copy_kind::device_to_host, d2h);
    d.record_event(offloaded[i], d2h);
  }
  // backward: bring them back in reverse (each after its own D2H), each consumed by a kernel
  // after its copy
  for (int i = 5; i >= 0; --i) {
    d.wait_event(h2d, offloaded[i]);
    d.copy_async(dev[i], host[i], 2 * mib, copy_kind::host_to_device, h2d);
    d.record_event(events[i], h2d);
    d.wait_event(compute, events[i]);
    touched_buffer t{dev[i], 2 * mib};
    d.launch(compute, kernel_cost{4e8 * (i + 1), 0, 0}, [] {}, {&t, 1});
    if (i % 2 == 0) d.synchronize_event(events[i]);
  }
  d.synchronize();
  return d.timeline();
}

TEST(sim_device_determinism, modelled_times_identical_over_twenty_perturbed_runs) {
  const std::vector<sim_op> reference = fixed_program(0, 1);
  ASSERT_GT(reference.size(), 30u);
  for (std::uint64_t run = 0; run < 20; ++run) {
    const std::vector<sim_op> t = fixed_program(300, run + 11);
    ASSERT_EQ(t.size(), reference.size());
    for (std::size_t i = 0; i < t.size(); ++i) {
      EXPECT_EQ(t[i].start_ns, reference[i].start_ns) << "run " << run << " op " << i;
      EXPECT_EQ(t[i].end_ns, reference[i].end_ns) << "run " << run << " op " << i;
    }
  }
}

// --- memory ------------------------------------------------------------------------------------

TEST(sim_device_memory, capacity_is_enforced_and_recovers_after_free) {
  sim_device d(small_real());
  std::vector<void*> blocks;
  for (;;) {
    void* p = d.allocate_device(8 * mib);
    if (p == nullptr) break;
    blocks.push_back(p);
  }
  EXPECT_EQ(blocks.size(), 8u);  // 64 MiB of 8 MiB blocks
  EXPECT_EQ(d.memory().free_bytes, 0u);
  d.free_device(blocks.back());
  blocks.pop_back();
  void* again = d.allocate_device(8 * mib);
  EXPECT_NE(again, nullptr);
  d.free_device(again);
  for (void* p : blocks) d.free_device(p);
  EXPECT_EQ(d.memory().free_bytes, 64 * mib);
}

TEST(sim_device_memory, phantom_backing_models_an_80_gib_gpu_without_its_bytes) {
  sim_options o = sim_preset("h100-pcie5");
  o.backing = sim_backing::phantom;
  sim_device d(o);
  EXPECT_EQ(d.memory().total_bytes, std::size_t{80} << 30);
  void* big = d.allocate_device(std::size_t{60} << 30);
  void* host = d.allocate_pinned(std::size_t{60} << 30);
  ASSERT_NE(big, nullptr);
  ASSERT_NE(host, nullptr);
  stream_t s = d.create_stream(stream_priority::normal);
  d.copy_async(host, big, std::size_t{60} << 30, copy_kind::device_to_host, s);
  d.synchronize_stream(s);
  // 60 GiB at 55 GB/s is over a second of modelled time, and no real time at all.
  EXPECT_GT(d.now_ns(), 1e9);
  EXPECT_EQ(d.counters().bytes_d2h, std::size_t{60} << 30);
  d.free_device(big);
  d.free_pinned(host);
}

TEST(sim_device_memory, copies_outside_live_allocations_are_rejected) {
  sim_device d(small_real());
  void* dev = d.allocate_device(mib);
  void* host = d.allocate_pinned(mib);
  stream_t s = d.create_stream(stream_priority::normal);
  EXPECT_THROW(d.copy_async(dev, host, 2 * mib, copy_kind::host_to_device, s), device_error);
  d.free_device(dev);
  EXPECT_THROW(d.copy_async(dev, host, mib, copy_kind::host_to_device, s), device_error);
  EXPECT_THROW(d.copy_async(host, host, mib, copy_kind::host_to_device, s), device_error);
  d.free_pinned(host);
}

TEST(sim_device_memory, kernel_touching_freed_memory_is_reported) {
  sim_device d(small_real());
  void* dev = d.allocate_device(mib);
  d.free_device(dev);
  stream_t s = d.create_stream(stream_priority::normal);
  touched_buffer t{dev, mib};
  EXPECT_THROW(d.launch(s, kernel_cost{}, [] {}, {&t, 1}), device_error);
}

TEST(sim_device_memory, managed_pages_fault_in_once_and_prefetch_avoids_faults) {
  sim_options o = small_real();
  o.managed_page_bytes = 2 * mib;
  sim_device d(o);
  stream_t s = d.create_stream(stream_priority::normal);
  void* m = d.allocate_managed(8 * mib);
  touched_buffer t{m, 8 * mib};
  d.launch(s, kernel_cost{}, [] {}, {&t, 1});
  EXPECT_EQ(d.counters().managed_faults, 4u);
  const double first = d.stream_tail_ns(s);
  EXPECT_GT(first, 0.0) << "faulting 8 MiB costs modelled time";
  d.launch(s, kernel_cost{}, [] {}, {&t, 1});
  EXPECT_EQ(d.counters().managed_faults, 4u) << "resident pages do not fault again";
  d.prefetch_managed(m, 8 * mib, false, s);
  d.prefetch_managed(m, 8 * mib, true, s);
  d.launch(s, kernel_cost{}, [] {}, {&t, 1});
  EXPECT_EQ(d.counters().managed_faults, 4u) << "prefetched pages do not fault";
  d.synchronize();
  d.free_managed(m);
}

// --- fault injection ---------------------------------------------------------------------------

TEST(sim_device_faults, nth_allocation_fails_with_null) {
  sim_device d(small_real());
  d.fail_nth(sim_call::device_alloc, 2);
  void* a = d.allocate_device(mib);
  void* b = d.allocate_device(mib);
  void* c = d.allocate_device(mib);
  EXPECT_NE(a, nullptr);
  EXPECT_EQ(b, nullptr);
  EXPECT_NE(c, nullptr);
  EXPECT_EQ(d.calls(sim_call::device_alloc), 3u);
  d.free_device(a);
  d.free_device(c);
}

TEST(sim_device_faults, failed_copy_throws_and_enqueues_nothing) {
  sim_device d(small_real());
  void* dev = d.allocate_device(mib);
  auto* host = static_cast<unsigned char*>(d.allocate_pinned(mib));
  std::memset(host, 0x3C, mib);
  stream_t s = d.create_stream(stream_priority::normal);
  d.fail_nth(sim_call::copy, 1);
  try {
    d.copy_async(host, dev, mib, copy_kind::device_to_host, s);
    ADD_FAILURE() << "the copy should have failed";
  } catch (const device_error& e) {
    EXPECT_EQ(e.error_name(), "sim_fault_injected");
    EXPECT_EQ(e.call(), "copy_async");
  }
  EXPECT_EQ(d.stream_tail_ns(s), 0.0);
  d.synchronize();
  EXPECT_EQ(host[0], 0x3C) << "a failed copy leaves the destination untouched";
  d.fail_always(sim_call::event_record);
  event_t e = d.create_event();
  EXPECT_THROW(d.record_event(e, s), device_error);
  EXPECT_THROW(d.record_event(e, s), device_error);
  d.clear_faults();
  EXPECT_NO_THROW(d.record_event(e, s));
  d.free_device(dev);
  d.free_pinned(host);
}

TEST(sim_device_faults, a_throwing_kernel_is_reported_at_the_next_synchronisation) {
  sim_device d(small_real());
  stream_t s = d.create_stream(stream_priority::normal);
  d.launch(s, kernel_cost{}, [] { throw std::runtime_error("bad kernel"); }, {});
  EXPECT_THROW(d.synchronize_stream(s), device_error);
  EXPECT_NO_THROW(d.synchronize_stream(s)) << "reported once";
}

TEST(sim_device_options, presets_and_validation) {
  for (const std::string& name : sim_preset_names()) {
    sim_options o = sim_preset(name);
    EXPECT_EQ(o.preset, name);
    EXPECT_NO_THROW(o.validate());
  }
  EXPECT_EQ(sim_preset("h100-pcie5").h2d_bandwidth, 55e9);
  try {
    sim_preset("h100");
    ADD_FAILURE();
  } catch (const config_error& e) {
    EXPECT_NE(std::string(e.what()).find("h100-pcie5"), std::string::npos) << e.what();
  }
  sim_options bad;
  bad.compute_efficiency = 1.5;
  EXPECT_THROW(sim_device{bad}, config_error);
}

}  // namespace
}  // namespace gpuswap
