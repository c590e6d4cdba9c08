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
        recorder.record(numbered(i, static_cast<std::uint64_t>(w), i));
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
    ASSERT_LT(e.buffer, static_cast<std::uint64_t>(writers));
    double& previous = last[e.buffer];
    ASSERT_GT(e.value, previous) << "writer " << e.buffer << " reordered or duplicated";
    ASSERT_EQ(e.time_ns, e.value) << "a torn slot";
    previous = e.value;
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
