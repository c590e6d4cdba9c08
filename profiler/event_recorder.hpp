#pragma once
// event_recorder: where every layer above reports what it did (swaps, stalls, layer phases,
// memory counters), cheaply enough to leave the calls in release builds.
//
//   - Off: record() is one relaxed atomic load and a branch, inline.
//   - On: record() copies the event into a ring buffer owned by the calling thread (single
//     producer, lock-free, no allocation). A thread's first record() into a recorder registers
//     its ring (allocates and takes the registry lock once per thread).
//   - record_block() is the allocator's hot path (alloc and free): inline, a 16-byte record in
//     a second ring of the same thread, expanded into a trace_event by collect() in the order
//     the thread recorded it relative to its other events (Note [Compact block events]).
//   - Full ring: the event is dropped and counted; the writer never waits for the reader.
//   - collect() drains every ring, including those of threads that have exited since, and
//     returns the events sorted by time_ns (stable: equal times keep each thread's record
//     order). Events recorded while collect() runs land in this call or the next one.
//
// See Note [Recorder memory ordering] in event_recorder.cpp.
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "profiler/spsc_ring.hpp"
#include "profiler/trace_event.hpp"

namespace gpuswap {

class event_recorder;

namespace recorder_detail {

// One record_block() event, or a change of the stream the next ones are on (Note [Compact
// block events], event_recorder.cpp). word: bits 0-1 the tag, 2-40 address / 512, 41-63
// bytes / 512. For a stream change, `time_ns` holds the stream's bits instead of a time.
struct alignas(16) block_record {
  double time_ns = 0;
  std::uint64_t word = 0;
};
enum block_tag : std::uint64_t { tag_alloc = 0, tag_free = 1, tag_stream = 2 };
inline constexpr unsigned address_bits = 39;
inline constexpr unsigned bytes_bits = 23;
inline constexpr std::uint64_t record_unit = 512;

// The record's word for an alloc or free of `bytes` at `address`, or false when it does not fit
// (another kind; address or size not a multiple of 512; address >= 256 TiB; size >= 4 GiB).
inline bool pack_block_word(event_kind kind, std::uintptr_t address, std::uint64_t bytes,
                            std::uint64_t& word) noexcept {
  const std::uint64_t a = address / record_unit;
  const std::uint64_t n = bytes / record_unit;
  if ((kind != event_kind::alloc && kind != event_kind::free) ||
      (address | bytes) % record_unit != 0 || a >> address_bits != 0 || n >> bytes_bits != 0) {
    return false;
  }
  word = (kind == event_kind::alloc ? tag_alloc : tag_free) | a << 2 | n << (2 + address_bits);
  return true;
}

// A thread's block ring for one recorder, with the producer's stream state.
struct block_ring {
  explicit block_ring(std::size_t capacity) : records(capacity) {}
  spsc_ring<block_record> records;
  std::uintptr_t stream = 0;  // producer: the stream of the last record pushed
  // consumer: the same, as read so far. On a line of its own: the producer reads `stream` on
  // every record, and a drain that wrote beside it would cost that read a miss.
  alignas(64) std::uintptr_t consumer_stream = 0;
};

struct thread_cache {
  std::uint64_t recorder_id = 0;  // 0: none cached
  void* ring = nullptr;           // event_recorder::ring*
  block_ring* blocks = nullptr;
};
// Constant-initialized and trivially destructible: the fast path needs no guard and works
// (by taking the slow path) during thread exit.
inline thread_local thread_cache tls_cache;

}  // namespace recorder_detail

class event_recorder {
 public:
  // Events each thread can buffer between two collect() calls, in each of its two rings (64
  // bytes an event from record(), 16 from record_block()).
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

  // An allocation (kind alloc) or free (kind free) of `bytes` at `address` on `stream`, for the
  // allocator's hot path. collect() returns it as
  //   trace_event::marker(kind, time_ns, trace_track::host, address, bytes) with .stream set.
  // Inline and 16 bytes when the address and size are multiples of 512 below 256 TiB and
  // 4 GiB and the stream is the thread's last one; a full event otherwise.
  void record_block(event_kind kind, double time_ns, std::uintptr_t address,
                    std::uint64_t bytes, std::uintptr_t stream) noexcept {
    if (!enabled_.load(std::memory_order_relaxed)) return;
    record_block_enabled(kind, time_ns, address, bytes, stream);
  }
  // The same whatever enabled() says now: for an event of a call made while the recorder was
  // enabled and recorded later (the caching allocator's pipelined frees).
  void record_block_enabled(event_kind kind, double time_ns, std::uintptr_t address,
                            std::uint64_t bytes, std::uintptr_t stream) noexcept {
    using namespace recorder_detail;
    const thread_cache& cache = tls_cache;
    std::uint64_t word = 0;
    if (cache.recorder_id == id_ && cache.blocks->stream == stream &&
        pack_block_word(kind, address, bytes, word)) [[likely]] {
      cache.blocks->records.push(block_record{time_ns, word});
      return;
    }
    record_block_slow(kind, time_ns, address, bytes, stream);
  }

  // For a producer that holds events back (the caching allocator's pipelined frees, whose
  // events are recorded when the free is applied): collect() and clear() call every hook
  // first, on their own thread, with no lock of the recorder's held, so that what the
  // producer holds back is recorded before the rings are read. Returns an id for
  // remove_collect_hook, which waits until no call to that hook is in flight; neither may be
  // called from inside a hook, nor by a thread holding a lock that the hook takes.
  std::uint64_t add_collect_hook(std::function<void()> hook);
  void remove_collect_hook(std::uint64_t id);

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
  void record_block_slow(event_kind kind, double time_ns, std::uintptr_t address,
                         std::uint64_t bytes, std::uintptr_t stream) noexcept;
  ring* this_thread_ring() noexcept;
  ring* find_or_register_ring() noexcept;
  // Requires mutex_.
  std::uint64_t total_dropped_locked() const noexcept;
  void run_collect_hooks();

  std::atomic<bool> enabled_{false};
  const std::uint64_t id_;  // unique per instance, so thread-local caches never alias
  const std::size_t capacity_;
  // Drops by threads that could not get a ring (allocation failed, or recording while the
  // thread was being torn down).
  std::atomic<std::uint64_t> unregistered_dropped_{0};

  // guards rings_, retired_dropped_ and dropped_baseline_. Taken by collect/clear/dropped and by
  // a thread's first record(); never by the record() fast path; never held across a device call.
  // Not on the line of enabled_ and id_, which every record() reads: a drain taking the lock
  // would cost each recording thread a miss.
  alignas(64) mutable std::mutex mutex_;
  std::vector<std::shared_ptr<ring>> rings_;
  std::uint64_t retired_dropped_ = 0;   // drops counted by rings retired after their thread exited
  std::uint64_t dropped_baseline_ = 0;  // total drops at the last clear()

  // guards collect_hooks_ and next_hook_id_; held while the hooks run (so that removing one
  // waits for its call), and never together with mutex_.
  std::mutex hooks_mutex_;
  std::vector<std::pair<std::uint64_t, std::function<void()>>> collect_hooks_;
  std::uint64_t next_hook_id_ = 1;
};

// The process-wide recorder every layer reports to. Disabled until someone enables it (the
// trace:FILE config key). Never destroyed, so threads may record during process exit.
event_recorder& global_recorder() noexcept;

}  // namespace gpuswap
