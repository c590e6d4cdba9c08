#pragma once
// event_recorder: where every layer above reports what it did (swaps, stalls, layer phases,
// memory counters), cheaply enough to leave the calls in release builds.
//
//   - Off: record() is one relaxed atomic load and a branch, inline.
//   - On: record() copies the event into a ring buffer owned by the calling thread (single
//     producer, lock-free, no allocation). A thread's first record() into a recorder registers
//     its ring (allocates and takes the registry lock once per thread).
//   - Full ring: the event is dropped and counted; the writer never waits for the reader.
//   - collect() drains every ring, including those of threads that have exited since, and
//     returns the events sorted by time_ns (stable: equal times keep each thread's record
//     order). Events recorded while collect() runs land in this call or the next one.
//
// See Note [Recorder memory ordering] in event_recorder.cpp.
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "profiler/trace_event.hpp"

namespace gpuswap {

class event_recorder {
 public:
  // Events each thread can buffer between two collect() calls (56 bytes each).
  static constexpr std::size_t default_ring_capacity = std::size_t{1} << 14;

  // ring_capacity is rounded up to a power of two (at least 2).
  explicit event_recorder(std::size_t ring_capacity = default_ring_capacity);
  ~event_recorder();
  event_recorder(const event_recorder&) = delete;
  event_recorder& operator=(const event_recorder&) = delete;

  void enable(bool on) noexcept { enabled_.store(on, std::memory_order_relaxed); }
  bool enabled() const noexcept { return enabled_.load(std::memory_order_relaxed); }

  // Never blocks, never throws, never allocates after the calling thread's first record.
  void record(const trace_event& event) noexcept {
    if (!enabled_.load(std::memory_order_relaxed)) return;
    record_enabled(event);
  }

  // Takes every buffered event out of the recorder, sorted by time_ns (stable).
  std::vector<trace_event> collect();
  // Discards every buffered event and resets dropped() to zero.
  void clear();
  // Events lost since construction or the last clear(): ring full, or no ring could be made.
  std::uint64_t dropped() const;

  std::size_t ring_capacity() const noexcept { return capacity_; }
  // Rings currently registered (threads that recorded and whose ring was not yet retired).
  std::size_t ring_count() const;

  struct ring;  // defined in the .cpp

 private:
  void record_enabled(const trace_event& event) noexcept;
  ring* find_or_register_ring() noexcept;
  // Requires mutex_.
  std::uint64_t total_dropped_locked() const noexcept;

  std::atomic<bool> enabled_{false};
  const std::uint64_t id_;  // unique per instance, so thread-local caches never alias
  const std::size_t capacity_;
  // Drops by threads that could not get a ring (allocation failed, or recording while the
  // thread was being torn down).
  std::atomic<std::uint64_t> unregistered_dropped_{0};

  // guards rings_, retired_dropped_ and dropped_baseline_. Taken by collect/clear/dropped and by
  // a thread's first record(); never by the record() fast path; never held across a device call.
  mutable std::mutex mutex_;
  std::vector<std::shared_ptr<ring>> rings_;
  std::uint64_t retired_dropped_ = 0;   // drops counted by rings retired after their thread exited
  std::uint64_t dropped_baseline_ = 0;  // total drops at the last clear()
};

// The process-wide recorder every layer reports to. Disabled until someone enables it (the
// trace:FILE config key). Never destroyed, so threads may record during process exit.
event_recorder& global_recorder() noexcept;

}  // namespace gpuswap
