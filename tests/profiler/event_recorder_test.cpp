#include "profiler/event_recorder.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

namespace gpuswap {
namespace {

trace_event numbered(double time_ns, std::uint64_t buffer, double value) {
  trace_event e = trace_event::marker(event_kind::alloc, time_ns, trace_track::host, buffer);
  e.value = value;
  return e;
}

TEST(EventRecorder, DisabledRecordsNothing) {
  event_recorder recorder;
  EXPECT_FALSE(recorder.enabled());
  recorder.record(numbered(1, 1, 0));
  EXPECT_TRUE(recorder.collect().empty());
  EXPECT_EQ(recorder.dropped(), 0u);
  EXPECT_EQ(recorder.ring_count(), 0u);  // a disabled record does not even register a ring

  recorder.enable(true);
  EXPECT_TRUE(recorder.enabled());
  recorder.record(numbered(2, 1, 0));
  recorder.enable(false);
  recorder.record(numbered(3, 1, 0));
  const auto events = recorder.collect();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].time_ns, 2);
}

TEST(EventRecorder, CollectSortsByTimeKeepingRecordOrderForTies) {
  event_recorder recorder;
  recorder.enable(true);
  recorder.record(numbered(30, 1, 0));
  recorder.record(numbered(10, 1, 1));
  recorder.record(numbered(20, 1, 2));
  recorder.record(numbered(10, 1, 3));
  recorder.record(numbered(10, 1, 4));
  const auto events = recorder.collect();
  ASSERT_EQ(events.size(), 5u);
  EXPECT_EQ(events[0].value, 1);
  EXPECT_EQ(events[1].value, 3);
  EXPECT_EQ(events[2].value, 4);
  EXPECT_EQ(events[3].value, 2);
  EXPECT_EQ(events[4].value, 0);
  EXPECT_TRUE(recorder.collect().empty()) << "collect takes the events out";
}

TEST(EventRecorder, BlockEventsComeOutAsAllocAndFreeMarkers) {
  event_recorder recorder;
  recorder.record_block(event_kind::alloc, 5, 0x1000, 512, 7);  // disabled: nothing
  recorder.enable(true);
  recorder.record_block(event_kind::alloc, 10, 0x7f12'3456'7800, 1536, 3);
  recorder.record_block(event_kind::free, 20, 0x7f12'3456'7800, 1536, 3);
  // Values the compact record cannot hold take the full ring, unchanged.
  recorder.record_block(event_kind::alloc, 30, 0x3001, 100, 3);                      // unaligned
  recorder.record_block(event_kind::alloc, 40, 0x4000, std::uint64_t{1} << 60, 3);   // huge
  recorder.record_block(event_kind::alloc, 50, std::uintptr_t{1} << 50, 512, 3);     // high
  recorder.record_block(event_kind::free, 60, 0x5000, (std::uint64_t{1} << 32) - 512, 3);
  const auto events = recorder.collect();
  ASSERT_EQ(events.size(), 6u);
  EXPECT_EQ(events[0].kind, event_kind::alloc);
  EXPECT_EQ(events[0].time_ns, 10);
  EXPECT_EQ(events[0].buffer, 0x7f12'3456'7800u);
  EXPECT_EQ(events[0].bytes, 1536u);
  EXPECT_EQ(events[0].stream, 3u);
  EXPECT_EQ(events[0].track, trace_track::host);
  EXPECT_EQ(events[0].layer, -1);
  EXPECT_EQ(events[1].kind, event_kind::free);
  EXPECT_EQ(events[1].buffer, 0x7f12'3456'7800u);
  EXPECT_EQ(events[1].stream, 3u);
  EXPECT_EQ(events[2].buffer, 0x3001u);
  EXPECT_EQ(events[2].bytes, 100u);
  EXPECT_EQ(events[3].bytes, std::uint64_t{1} << 60);
  EXPECT_EQ(events[4].buffer, std::uintptr_t{1} << 50);
  EXPECT_EQ(events[5].kind, event_kind::free);
  EXPECT_EQ(events[5].bytes, (std::uint64_t{1} << 32) - 512);
  for (const trace_event& e : events) EXPECT_EQ(e.stream, 3u) << e.time_ns;
}

// A producer that holds events back (the caching allocator's pipelined frees) records them in a
// collect hook: collect() and clear() run the hooks before they read the rings, so what a hook
// records comes out of that very collect (or is cleared with the rest), and record_block_enabled
// records an event decided while the recorder was on even after it was switched off.
TEST(EventRecorder, CollectHooksRecordWhatTheyHeldBackBeforeTheRingsAreRead) {
  event_recorder recorder;
  recorder.enable(true);
  int held = 0;
  const std::uint64_t id = recorder.add_collect_hook([&] {
    for (; held > 0; --held) recorder.record_block_enabled(event_kind::free, 7, 0x1000, 512, 1);
  });
  held = 2;
  recorder.enable(false);
  auto events = recorder.collect();
  EXPECT_EQ(events.size(), 2u);
  EXPECT_EQ(held, 0);
  held = 1;
  recorder.clear();
  EXPECT_EQ(held, 0);
  EXPECT_EQ(recorder.collect().size(), 0u) << "a hook's records before clear() were cleared";
  recorder.remove_collect_hook(id);
  held = 1;
  EXPECT_EQ(recorder.collect().size(), 0u);
  EXPECT_EQ(held, 1) << "a removed hook was called";
}

// The stream is written only when it changes; every record must still come out with its own,
// also when the change was read by an earlier collect.
TEST(EventRecorder, BlockEventsKeepTheirStreamAcrossChangesAndCollects) {
  event_recorder recorder;
  recorder.enable(true);
  const std::uintptr_t streams[] = {0, 0, 9, 9, 0, 0xffff'ffff'ffff'fff1, 9};
  std::vector<std::uintptr_t> got;
  double t = 0;
  for (std::uintptr_t s : streams) {
    recorder.record_block(event_kind::alloc, ++t, 0x10000, 512, s);
    recorder.record_block(event_kind::free, ++t, 0x10000, 512, s);
    for (const trace_event& e : recorder.collect()) got.push_back(e.stream);
  }
  std::vector<std::uintptr_t> expected;
  for (std::uintptr_t s : streams) expected.insert(expected.end(), {s, s});
  EXPECT_EQ(got, expected);
}

// A stream change that was dropped (ring full) must not let later records through with the
// old stream.
TEST(EventRecorder, ADroppedStreamChangeIsWrittenAgainBeforeTheNextRecord) {
  event_recorder recorder(4);
  recorder.enable(true);
  for (int i = 0; i < 4; ++i) recorder.record_block(event_kind::alloc, i, 0x1000, 512, 0);
  recorder.record_block(event_kind::alloc, 10, 0x2000, 512, 5);  // ring full: both dropped
  EXPECT_EQ(recorder.dropped(), 1u);
  EXPECT_EQ(recorder.collect().size(), 4u);
  recorder.record_block(event_kind::free, 11, 0x2000, 512, 5);
  const auto events = recorder.collect();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].stream, 5u);
}

// Block events and full events share a modelled time on the simulator; each thread's events
// must still come out in the order it recorded them, across both rings and across collects.
TEST(EventRecorder, BlockEventsKeepTheirPlaceAmongOtherEventsAtEqualTimes) {
  event_recorder recorder;
  recorder.enable(true);
  std::vector<std::uint64_t> expected;
  std::vector<std::uint64_t> got;
  std::uint64_t n = 0;
  for (int round = 0; round < 3; ++round) {
    // A pattern with runs of each kind: 2 full, 3 block, 1 full, 1 block, 4 full, 2 block.
    for (int run : {2, -3, 1, -1, 4, -2}) {
      for (int i = 0; i < (run > 0 ? run : -run); ++i) {
        if (run > 0) {
          recorder.record(numbered(7, n, 0));
        } else {
          recorder.record_block(event_kind::free, 7, n * 512, 512, 0);
        }
        expected.push_back(n++);
      }
    }
    for (const trace_event& e : recorder.collect()) {
      got.push_back(e.kind == event_kind::free ? e.buffer / 512 : e.buffer);
    }
  }
  EXPECT_EQ(got, expected);
}

TEST(EventRecorder, FullBlockRingDropsAndCounts) {
  event_recorder recorder(4);
  recorder.enable(true);
  for (int i = 0; i < 6; ++i) recorder.record_block(event_kind::alloc, i, 512, 512, 0);
  recorder.record(numbered(9, 1, 0));  // the other ring still has room
  EXPECT_EQ(recorder.dropped(), 2u);
  EXPECT_EQ(recorder.collect().size(), 5u);
}

TEST(EventRecorder, CapacityIsRoundedUpToAPowerOfTwo) {
  EXPECT_EQ(event_recorder(5).ring_capacity(), 8u);
  EXPECT_EQ(event_recorder(8).ring_capacity(), 8u);
  EXPECT_EQ(event_recorder(0).ring_capacity(), 2u);
}

TEST(EventRecorder, FullRingDropsNewEventsAndCountsThem) {
  event_recorder recorder(8);
  recorder.enable(true);
  for (int i = 0; i < 20; ++i) recorder.record(numbered(i, 1, i));
  EXPECT_EQ(recorder.dropped(), 12u);
  auto events = recorder.collect();
  ASSERT_EQ(events.size(), 8u);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(events[static_cast<std::size_t>(i)].value, i);

  // Draining frees the slots: the writer can go on.
  for (int i = 0; i < 3; ++i) recorder.record(numbered(100 + i, 1, i));
  EXPECT_EQ(recorder.collect().size(), 3u);
  EXPECT_EQ(recorder.dropped(), 12u) << "the count lasts until clear()";

  recorder.record(numbered(200, 1, 0));
  recorder.clear();
  EXPECT_EQ(recorder.dropped(), 0u);
  EXPECT_TRUE(recorder.collect().empty());
}

TEST(EventRecorder, EventsOfThreadsThatExitedAreCollected) {
  event_recorder recorder;
  recorder.enable(true);
  std::thread writer([&] {
    for (int i = 0; i < 100; ++i) recorder.record(numbered(i, 7, i));
  });
  writer.join();
  EXPECT_EQ(recorder.ring_count(), 1u);
  const auto events = recorder.collect();
  ASSERT_EQ(events.size(), 100u);
  for (const auto& e : events) EXPECT_EQ(e.buffer, 7u);
  EXPECT_EQ(recorder.ring_count(), 0u) << "an exited thread's drained ring is retired";
}

TEST(EventRecorder, DropsOfExitedThreadsStayCounted) {
  event_recorder recorder(4);
  recorder.enable(true);
  std::thread writer([&] {
    for (int i = 0; i < 10; ++i) recorder.record(numbered(i, 7, i));
  });
  writer.join();
  EXPECT_EQ(recorder.collect().size(), 4u);
  EXPECT_EQ(recorder.ring_count(), 0u);
  EXPECT_EQ(recorder.dropped(), 6u);
}

TEST(EventRecorder, InstancesAreIndependent) {
  event_recorder a;
  event_recorder b;
  a.enable(true);
  b.enable(true);
  a.record(numbered(1, 1, 0));
  b.record(numbered(2, 2, 0));
  a.record(numbered(3, 1, 0));
  const auto from_a = a.collect();
  const auto from_b = b.collect();
  ASSERT_EQ(from_a.size(), 2u);
  ASSERT_EQ(from_b.size(), 1u);
  EXPECT_EQ(from_b[0].buffer, 2u);
}

TEST(EventRecorder, ANewRecorderNeverWritesIntoADestroyedOnesRing) {
  // The thread-local cache is keyed by a per-instance id, not the address, which a new
  // recorder may well reuse.
  for (int round = 0; round < 3; ++round) {
    auto recorder = std::make_unique<event_recorder>();
    recorder->enable(true);
    recorder->record(numbered(round, static_cast<std::uint64_t>(round), 0));
    const auto events = recorder->collect();
    ASSERT_EQ(events.size(), 1u);
    EXPECT_EQ(events[0].buffer, static_cast<std::uint64_t>(round));
  }
}

TEST(EventRecorder, ARecorderMayBeDestroyedBeforeAThreadThatWroteToIt) {
  std::atomic<bool> recorded{false};
  std::atomic<bool> finish{false};
  std::thread writer;
  {
    event_recorder recorder;
    recorder.enable(true);
    writer = std::thread([&] {
      recorder.record(numbered(1, 1, 0));
      recorded.store(true);
      while (!finish.load()) std::this_thread::yield();
      // Exiting now marks this thread's rings; the recorder's is gone (ASan checks the rest).
    });
    while (!recorded.load()) std::this_thread::yield();
  }
  finish.store(true);
  writer.join();
  event_recorder next;
  next.enable(true);
  next.record(numbered(2, 2, 0));
  EXPECT_EQ(next.collect().size(), 1u);
}

TEST(EventRecorder, GlobalRecorderIsOneInstanceAndStartsDisabled) {
  EXPECT_EQ(&global_recorder(), &global_recorder());
  EXPECT_FALSE(global_recorder().enabled());
}

// Several writers record while one thread keeps collecting. Every event comes out exactly once
// or is counted as dropped, and each writer's events come out in the order it recorded them.
void run_concurrent(std::size_t capacity, int writers, int per_writer, bool expect_no_drops) {
  event_recorder recorder(capacity);
  recorder.enable(true);
  std::atomic<int> running{writers};
  std::vector<trace_event> collected;
  std::thread collector([&] {
    while (running.load(std::memory_order_acquire) > 0) {
      auto batch = recorder.collect();
      collected.insert(collected.end(), batch.begin(), batch.end());
    }
  });
  std::vector<std::thread> threads;
  for (int w = 0; w < writers; ++w) {
    threads.emplace_back([&, w] {
      for (int i = 0; i < per_writer; ++i) {
        // time = sequence number: within a collect() the stable sort keeps each writer's order.
        // Every third event goes through the compact ring: the merge must keep order too.
        if (i % 3 == 1) {
          recorder.record_block(event_kind::alloc, i, static_cast<std::uint64_t>(w) * 512,
                                static_cast<std::uint64_t>(i) * 512, 0);
        } else {
          recorder.record(numbered(i, static_cast<std::uint64_t>(w), i));
        }
      }
      running.fetch_sub(1, std::memory_order_release);
    });
  }
  for (auto& t : threads) t.join();
  collector.join();
  auto rest = recorder.collect();
  collected.insert(collected.end(), rest.begin(), rest.end());

  const auto total = static_cast<std::uint64_t>(writers) * static_cast<std::uint64_t>(per_writer);
  EXPECT_EQ(collected.size() + recorder.dropped(), total);
  if (expect_no_drops) {
    EXPECT_EQ(recorder.dropped(), 0u);
  }
  std::vector<double> last(static_cast<std::size_t>(writers), -1);
  for (const auto& e : collected) {
    // A block event carries its writer times 512 in buffer and its sequence number times 512
    // in bytes; a full one its writer in buffer and its sequence number in value.
    const bool block = e.kind == event_kind::alloc && e.value == 0 && e.bytes != 0;
    const std::uint64_t writer = block ? e.buffer / 512 : e.buffer;
    ASSERT_LT(writer, static_cast<std::uint64_t>(writers));
    double& previous = last[writer];
    const double seq = block ? static_cast<double>(e.bytes / 512) : e.value;
    ASSERT_GT(seq, previous) << "writer " << e.buffer << " reordered or duplicated";
    ASSERT_EQ(e.time_ns, seq) << "a torn slot";
    previous = seq;
  }
  EXPECT_EQ(recorder.ring_count(), 0u);
}

TEST(EventRecorder, ConcurrentWritersWithACollectorLoseNothingWhenRingsAreLargeEnough) {
  run_concurrent(std::size_t{1} << 15, 4, 20000, true);
}

TEST(EventRecorder, ConcurrentWritersWithSmallRingsCountEveryDrop) {
  run_concurrent(64, 4, 20000, false);
}

}  // namespace
}  // namespace gpuswap
