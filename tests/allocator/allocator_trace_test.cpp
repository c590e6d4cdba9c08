// What caching_allocator reports to the event recorder (Note [Profiling hooks] in
// caching_allocator.cpp): alloc and free with address, bytes and stream; segment map and release
// with a device_memory counter sample; OOM with a counter; nothing while the recorder is off or
// when the hooks are compiled away with trace_hooks = false.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "allocator/caching_allocator.hpp"
#include "core/errors.hpp"
#include "device/sim_device.hpp"
#include "profiler/event_recorder.hpp"

namespace gpuswap {
namespace {

constexpr std::size_t mib = std::size_t{1} << 20;

sim_options small_device() {
  sim_options o;
  o.device_capacity = 64 * mib;
  o.host_capacity = 16 * mib;
  return o;
}

std::vector<trace_event> of_kind(const std::vector<trace_event>& events, event_kind k) {
  std::vector<trace_event> out;
  for (const trace_event& e : events) {
    if (e.kind == k) out.push_back(e);
  }
  return out;
}

TEST(allocator_trace, alloc_free_and_segments_carry_address_bytes_stream_and_counters) {
  sim_device dev(small_device());
  event_recorder rec;
  rec.enable(true);
  caching_allocator_options opts;
  opts.recorder = &rec;
  caching_allocator alloc(dev, opts);
  const stream_t s = dev.create_stream(stream_priority::normal);

  void* p = alloc.allocate(1000, s);
  alloc.deallocate(p);
  alloc.empty_cache();
  const std::vector<trace_event> events = rec.collect();

  const auto maps = of_kind(events, event_kind::segment_map);
  ASSERT_EQ(maps.size(), 1u);
  EXPECT_EQ(maps[0].bytes, caching_allocator::small_buffer);
  const std::uint64_t base = maps[0].buffer;
  EXPECT_EQ(base, reinterpret_cast<std::uintptr_t>(p));  // the first block starts the segment

  const auto allocs = of_kind(events, event_kind::alloc);
  ASSERT_EQ(allocs.size(), 1u);
  EXPECT_EQ(allocs[0].buffer, reinterpret_cast<std::uintptr_t>(p));
  EXPECT_EQ(allocs[0].bytes, 1024u);  // the block: the request rounded to 512 bytes
  EXPECT_EQ(allocs[0].stream, static_cast<std::uintptr_t>(s));
  EXPECT_EQ(allocs[0].track, trace_track::host);

  const auto frees = of_kind(events, event_kind::free);
  ASSERT_EQ(frees.size(), 1u);
  EXPECT_EQ(frees[0].buffer, allocs[0].buffer);
  EXPECT_EQ(frees[0].bytes, allocs[0].bytes);
  EXPECT_EQ(frees[0].stream, allocs[0].stream);

  const auto releases = of_kind(events, event_kind::segment_release);
  ASSERT_EQ(releases.size(), 1u);
  EXPECT_EQ(releases[0].buffer, base);
  EXPECT_EQ(releases[0].bytes, caching_allocator::small_buffer);

  // One counter per change of reserved memory: 2 MiB reserved after the map, 0 after release.
  const auto counters = of_kind(events, event_kind::counter);
  ASSERT_EQ(counters.size(), 2u);
  EXPECT_EQ(counters[0].detail, event_detail::device_memory);
  EXPECT_EQ(counters[0].value2, static_cast<double>(caching_allocator::small_buffer));
  EXPECT_EQ(counters[1].value, 0.0);
  EXPECT_EQ(counters[1].value2, 0.0);
  EXPECT_EQ(rec.dropped(), 0u);
}

TEST(allocator_trace, events_are_in_call_order_on_the_device_clock) {
  sim_device dev(small_device());
  event_recorder rec;
  rec.enable(true);
  caching_allocator_options opts;
  opts.recorder = &rec;
  caching_allocator alloc(dev, opts);
  const stream_t s = dev.default_stream();
  void* a = alloc.allocate(4096, s);
  dev.advance_host_ns(1000);
  void* b = alloc.allocate(4096, s);
  dev.advance_host_ns(1000);
  alloc.deallocate(a);
  alloc.deallocate(b);
  const auto events = rec.collect();
  const auto allocs = of_kind(events, event_kind::alloc);
  const auto frees = of_kind(events, event_kind::free);
  ASSERT_EQ(allocs.size(), 2u);
  ASSERT_EQ(frees.size(), 2u);
  EXPECT_LT(allocs[0].time_ns, allocs[1].time_ns);
  EXPECT_LT(allocs[1].time_ns, frees[0].time_ns);
  EXPECT_EQ(frees[0].buffer, reinterpret_cast<std::uintptr_t>(a));
}

TEST(allocator_trace, oom_is_recorded_with_a_counter_sample) {
  sim_device dev(small_device());
  event_recorder rec;
  rec.enable(true);
  caching_allocator_options opts;
  opts.recorder = &rec;
  opts.device_limit = 4 * mib;
  caching_allocator alloc(dev, opts);
  const stream_t s = dev.default_stream();
  void* p = alloc.allocate(3 * mib, s);
  EXPECT_THROW(alloc.allocate(3 * mib, s), out_of_memory);
  const auto events = rec.collect();
  const auto ooms = of_kind(events, event_kind::oom);
  ASSERT_EQ(ooms.size(), 1u);
  EXPECT_EQ(ooms[0].bytes, 3 * mib);
  const auto counters = of_kind(events, event_kind::counter);
  ASSERT_FALSE(counters.empty());
  const trace_event& last = counters.back();
  EXPECT_EQ(last.time_ns, ooms[0].time_ns);
  EXPECT_EQ(last.value, static_cast<double>(alloc.stats().allocated_bytes.all().current));
  EXPECT_EQ(last.value2, static_cast<double>(alloc.stats().reserved_bytes.all().current));
  alloc.deallocate(p);
}

TEST(allocator_trace, nothing_is_recorded_while_the_recorder_is_off) {
  sim_device dev(small_device());
  event_recorder rec;  // disabled
  caching_allocator_options opts;
  opts.recorder = &rec;
  caching_allocator alloc(dev, opts);
  alloc.deallocate(alloc.allocate(1000, dev.default_stream()));
  alloc.empty_cache();
  rec.enable(true);
  EXPECT_TRUE(rec.collect().empty());
  EXPECT_EQ(rec.ring_count(), 0u) << "a disabled recorder must not even register a ring";
}

TEST(allocator_trace, trace_hooks_false_records_nothing_even_when_enabled) {
  sim_device dev(small_device());
  event_recorder rec;
  rec.enable(true);
  caching_allocator_options opts;
  opts.recorder = &rec;
  opts.trace_hooks = false;
  caching_allocator alloc(dev, opts);
  alloc.deallocate(alloc.allocate(1000, dev.default_stream()));
  alloc.empty_cache();
  EXPECT_TRUE(rec.collect().empty());
}

TEST(allocator_trace, reports_to_the_global_recorder_by_default) {
  sim_device dev(small_device());
  caching_allocator alloc(dev, caching_allocator_options{});
  event_recorder& global = global_recorder();
  global.clear();
  global.enable(true);
  void* p = alloc.allocate(1000, dev.default_stream());
  alloc.deallocate(p);
  global.enable(false);
  const auto events = global.collect();
  global.clear();
  const auto allocs = of_kind(events, event_kind::alloc);
  ASSERT_EQ(allocs.size(), 1u);
  EXPECT_EQ(allocs[0].buffer, reinterpret_cast<std::uintptr_t>(p));
  EXPECT_EQ(of_kind(events, event_kind::free).size(), 1u);
}

}  // namespace
}  // namespace gpuswap
