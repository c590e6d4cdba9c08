#pragma once
// pinned_host_pool: a cache of page-locked host buffers, the staging memory of every swap.
//
// Pinned memory is slow to obtain (0.24-0.35 s per GiB, REFERENCE.md) and allocating it per
// tensor made offload overhead 49.6% instead of 22% in a Llama3-8B run, so buffers are kept and
// handed out again. A buffer handed back may still be read or written by a copy in flight, so it
// becomes reusable only after an event recorded on every stream the caller named with
// record_stream has completed (Note [Event-guarded reuse] in the .cpp). The pool holds at most
// `host_limit` bytes, in use and cached together; past it, it frees and waits before it reports
// out_of_memory (Note [The allocation ladder]).
//
// Glossary
//   size class  the rounded size a request is served with (round_size; Note [Size classes]).
//   ready       a cached buffer whose events completed: reusable now.
//   pending     a cached buffer whose events have not completed yet.
//   fence       the events recorded on deallocate, one per recorded stream.
//
// Thread safety: every method may be called from any thread. A given pointer is owned by one
// caller between allocate and deallocate; record_stream and deallocate of the same pointer must
// not race each other (as with any allocator). The destructor must not race anything.
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "allocator/pinned_pool_stats.hpp"
#include "device/device.hpp"

namespace gpuswap {

struct pinned_host_pool_options {
  std::size_t host_limit = 0;  // most pinned bytes the pool may hold (cached + in use); 0 = none
  // Throws config_error naming the key when a value is out of range.
  void validate() const;
};

class pinned_host_pool {
 public:
  // Every buffer is a multiple of the smallest class: one host page.
  static constexpr std::size_t min_block_bytes = std::size_t{4} << 10;
  // Requests above this are rounded to a multiple of it rather than to a power of two.
  static constexpr std::size_t large_granularity = std::size_t{2} << 20;
  // Requests above this are refused (out_of_memory) before rounding could overflow.
  static constexpr std::size_t max_request_bytes = std::size_t{1} << 62;

  // The size class a request of `bytes` (0 < bytes <= max_request_bytes) is served with.
  static std::size_t round_size(std::size_t bytes) noexcept;

  // Throws config_error if `opts` is invalid. `dev` must outlive the pool.
  pinned_host_pool(device& dev, pinned_host_pool_options opts);
  // Waits for the events of pending buffers (and the recorded streams of buffers still in use),
  // then frees every buffer and event. Never throws.
  ~pinned_host_pool();
  pinned_host_pool(const pinned_host_pool&) = delete;
  pinned_host_pool& operator=(const pinned_host_pool&) = delete;

  // A pinned buffer of at least `bytes` bytes (round_size(bytes) usable). bytes == 0 returns
  // nullptr. Throws out_of_memory (naming requested, in use, cached and limit) when neither the
  // cache nor the device can serve it within host_limit; device_error if a device call fails.
  void* allocate(std::size_t bytes);
  // Work on `stream` uses the buffer (e.g. the D2H copy into it): deallocate will not let it be
  // reused before that work, enqueued up to the deallocate call, completes. Pointers the pool
  // did not hand out are ignored (counted in num_unknown_pointers), like PyTorch's host allocator.
  void record_stream(void* ptr, stream_t stream);
  // Gives the buffer back. It is reusable at once if no stream was recorded, otherwise once the
  // events recorded now on the recorded streams complete. nullptr is a no-op.
  void deallocate(void* ptr) noexcept;
  // Waits for pending buffers, then frees every cached buffer. Buffers in use are untouched.
  void empty_cache();

  pinned_pool_stats stats() const;
  // Sets every peak to its current value.
  void reset_peak_stats();
  std::size_t limit() const noexcept { return options_.host_limit; }

  // Checks the internal invariants (block states vs. lists vs. statistics). For tests and debug
  // builds; takes the lock.
  bool is_valid() const;

 private:
  enum class block_state : std::uint8_t { in_use, fencing, pending, ready };

  // One event recorded on one stream; `recorded` false means the record failed and the device
  // must be synchronised instead (Note [When an event cannot be recorded]).
  struct fence {
    stream_t stream{};
    event_t event{};
    bool recorded = false;
  };

  struct block {
    std::size_t size = 0;       // size class: the bytes pinned
    std::size_t requested = 0;  // while in use: the bytes asked for
    block_state state = block_state::in_use;
    std::uint64_t fence_id = 0;     // while pending: key in pending_, unique per deallocate
    std::vector<stream_t> streams;  // while in use: recorded streams, no duplicates
    std::vector<fence> fences;      // while pending
  };

  // A copy of a pending block's fences, taken under the lock and waited on without it.
  struct fence_snapshot {
    void* ptr = nullptr;
    std::uint64_t fence_id = 0;
    std::vector<fence> fences;
  };

  void* take_ready_locked(std::size_t size, std::size_t bytes);
  bool fits_locked(std::size_t size) const noexcept;
  void* pin(std::size_t size, std::size_t bytes);
  void* free_cached_and_pin(std::size_t size, std::size_t bytes, bool& device_refused);
  void pop_ready_locked(std::map<std::size_t, std::vector<void*>>::iterator it,
                        std::vector<std::pair<void*, std::size_t>>& victims);
  void release_detached_locked(const std::vector<std::pair<void*, std::size_t>>& victims) noexcept;
  std::vector<fence_snapshot> snapshot_pending_locked(bool queryable_only) const;
  void collect_completed();
  void synchronize_pending();
  void make_ready_locked(void* ptr, block& b);
  bool complete_fence_locked(void* ptr, std::uint64_t fence_id);
  enum class oom_cause : std::uint8_t { too_large, over_limit, limit, device };
  [[noreturn]] void throw_out_of_memory_locked(std::size_t bytes, std::size_t size,
                                               oom_cause cause);

  device& device_;
  const pinned_host_pool_options options_;
  const std::string device_name_;  // for messages, read once: no device call under the lock

  // Guards everything below. Never held across a device call (allocate_pinned, free_pinned,
  // event create/record/query/synchronize, stream synchronize): those are slow, may block on
  // device work, and a simulated kernel may itself call into the pool. State that a device call
  // in progress is about to change is marked (block_state::fencing, room_held_,
  // detached_bytes_) so that other threads never act on it twice.
  mutable std::mutex mutex_;
  std::unordered_map<void*, block> blocks_;             // every buffer held, any state
  std::map<std::size_t, std::vector<void*>> ready_;     // size class -> ready buffers (LIFO)
  std::map<std::uint64_t, void*> pending_;              // fence_id -> buffer, deallocate order
  std::vector<event_t> free_events_;                    // the event pool: not in any fence
  std::uint64_t next_fence_id_ = 1;
  std::size_t ready_bytes_ = 0;
  std::size_t pending_bytes_ = 0;  // pending and fencing buffers
  std::size_t room_held_ = 0;       // bytes promised to allocate_pinned calls in flight
  std::size_t detached_bytes_ = 0;  // being freed by free_pinned; still in reserved_bytes
  pinned_pool_stats stats_;
};

}  // namespace gpuswap
