#pragma once
// swap_engine: virtual buffers whose bytes live on the device, on the host, or in flight between
// them, moved on the engine's own copy streams so that the copies overlap compute.
//
// Life of a buffer (Note [Swap ordering] in swap_engine.cpp says which event guards each step):
//
//   create ──► device ──swap_out──► swapping_out ──(D2H done)──► host
//                 ▲                                                │
//                 └──(H2D done)── swapping_in ◄──prefetch/acquire──┘
//
//   - swap_out(id, producer): the D2H stream waits for the producer stream's work, copies the
//     bytes into pinned host memory, and the device block goes back to the allocator guarded by
//     the copy's event: it is reused by nobody until the copy has read it.
//   - prefetch(id): allocates a device block and copies back on the H2D stream (after the D2H,
//     if that is still running).
//   - acquire(id, consumer): the consumer stream waits for the bytes (the H2D's event); if the
//     buffer is still on the host, it is fetched on demand first. How long the consumer waits is
//     a stall, measured with events on the consumer stream, counted and traced.
//   - release(id, consumer): the consumer's work is enqueued; the block is not reused or copied
//     out from under it (record_stream).
//   - Under memory pressure the allocator asks reclaim(): idle buffers are swapped out, the one
//     needed furthest in the future first when an eviction_advisor knows the schedule (Belady),
//     least recently used otherwise.
//
// No byte is ever lost: a swap-out that fails (no pinned memory, a failed copy) leaves the
// buffer on the device; a swap-in that fails leaves it on the host and reports the error.
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "allocator/caching_allocator.hpp"
#include "allocator/pinned_host_pool.hpp"
#include "allocator/reclaimer.hpp"
#include "device/device.hpp"
#include "profiler/nvtx_ranges.hpp"

namespace gpuswap {

class device_timeline;

using buffer_id = std::uint64_t;

enum class buffer_state : std::uint8_t { device, swapping_out, host, swapping_in };
std::string_view to_string(buffer_state s) noexcept;

// Implemented by the prefetcher layer, which knows the schedule.
class eviction_advisor {
 public:
  virtual ~eviction_advisor() = default;
  // A number that grows with how far in the future the buffer is next needed; UINT64_MAX when
  // never again or unknown. Called with the engine's lock held: must not call the engine.
  virtual std::uint64_t next_use(buffer_id id) const = 0;
};

struct swap_stats {
  std::uint64_t swaps_out = 0;
  std::uint64_t swaps_in = 0;
  std::uint64_t bytes_out = 0;
  std::uint64_t bytes_in = 0;
  std::uint64_t prefetches = 0;        // swap-ins issued ahead of use
  std::uint64_t demand_fetches = 0;    // swap-ins issued by acquire because nothing prefetched
  std::uint64_t evictions = 0;         // swap-outs asked for by the allocator under pressure
  std::uint64_t stalls = 0;            // acquires whose consumer had to wait for the copy
  double stall_ns = 0;
  double copy_out_ns = 0;              // D2H copy time, summed
  double copy_in_ns = 0;
  std::uint64_t failed_swap_outs = 0;  // data stayed on the device
  std::uint64_t failed_swap_ins = 0;   // data stayed on the host
  std::size_t bytes_on_host = 0;       // now: buffers whose only copy is on the host
  std::size_t bytes_in_flight = 0;     // now: copies enqueued and not yet known complete
  std::size_t live_buffers = 0;
};

struct swap_engine_options {
  // A consumer wait shorter than this is not counted as a stall (event timing noise on a GPU).
  double stall_threshold_ns = 1'000;
  // Names the Nsight row (nvtx_name_thread) of each thread that swaps through the engine, once
  // per thread; empty (the default) leaves the host program's thread names alone. Note [NVTX in
  // the engine] in swap_engine.cpp.
  std::string nvtx_thread_name;

  // Test hooks that remove one ordering guarantee each, so that tests can show their checks
  // catch the corruption that follows. Never set outside tests.
  struct unsafe_testing_hooks {
    bool skip_consumer_wait = false;        // acquire does not wait for the H2D
    bool skip_copy_guard_on_free = false;   // swap_out frees the device block unguarded
    bool skip_home_stream_wait = false;     // a swap-in writes its block without waiting
                                            // for the home stream's earlier users
  } unsafe_testing;
};

class swap_engine final : public reclaimer {
 public:
  // Registers itself as a reclaimer of `alloc` (and unregisters in the destructor). `timeline`
  // is optional: with it, copies and stalls are timed and traced on the host clock.
  swap_engine(device& dev, caching_allocator& alloc, pinned_host_pool& host_pool,
              swap_engine_options options = {}, device_timeline* timeline = nullptr);
  ~swap_engine() override;
  swap_engine(const swap_engine&) = delete;
  swap_engine& operator=(const swap_engine&) = delete;

  // A buffer of `bytes` on the device, allocated for use on `stream`. `layer` labels traces.
  // Throws out_of_memory (after evicting what it can) when it cannot be served.
  buffer_id create(std::size_t bytes, stream_t stream, int layer = -1);
  // Frees the buffer wherever it lives, guarded by the streams that used it. Unknown ids are
  // ignored.
  void destroy(buffer_id id) noexcept;

  // The device pointer, valid for work enqueued on `consumer` until release(). The consumer
  // stream is ordered after the bytes' arrival. Throws out_of_memory if a demand fetch cannot
  // get device memory (the data stays on the host), device_error if its copy fails.
  void* acquire(buffer_id id, stream_t consumer);
  void release(buffer_id id, stream_t consumer);

  // Starts moving the buffer to the host once `producer`'s work enqueued so far is done.
  // Returns false (the data stays on the device, and the reason is logged and counted) when it
  // cannot: buffer acquired, not on the device, no pinned memory, or a failed device call.
  bool swap_out(buffer_id id, stream_t producer);
  // Starts bringing the buffer back. Returns false when it is not on the host (nothing to do),
  // when device memory cannot be had without eviction beyond the budget, or when the buffers
  // the advisor says are needed sooner and are off the device would no longer fit beside it
  // (it stays on the host; acquire will fetch it on demand).
  bool prefetch(buffer_id id);

  buffer_state state(buffer_id id) const;
  std::size_t size(buffer_id id) const;
  void set_advisor(eviction_advisor* advisor);

  // reclaimer: evicts idle buffers until `bytes` are freed or none is left.
  std::size_t reclaim(std::size_t bytes, stream_t stream) override;

  // Resolves completed copies and stalls (updates states, statistics and the trace). Cheap;
  // called by the other methods too.
  void poll();
  // Waits for every copy in flight, then polls.
  void synchronize();
  swap_stats stats() const;
  external_memory_report memory_report() const;

  stream_t d2h_stream() const noexcept { return d2h_; }
  stream_t h2d_stream() const noexcept { return h2d_; }

 private:
  struct buffer {
    std::size_t bytes = 0;
    int layer = -1;
    buffer_state state = buffer_state::device;
    void* dev = nullptr;
    void* host = nullptr;
    stream_t block_stream{};     // home: the stream its device blocks are allocated on
    stream_t last_stream{};      // the last stream that wrote or used it (orders a swap-out)
    event_t arrived{};           // recorded after the H2D; valid while has_arrived_event
    bool has_arrived_event = false;
    event_t departed{};          // recorded after the D2H; valid while has_departed_event
    bool has_departed_event = false;
    // The H2D that brought the block in is not known done and no stream recorded on the block
    // has waited for it: freeing it must record the H2D stream (Note [Guarding a block
    // brought in] in swap_engine.cpp).
    bool h2d_guard = false;
    int pins = 0;                // acquires not yet released
    std::uint64_t last_use = 0;  // engine tick of the last acquire (LRU)
  };
  struct pending_copy {
    buffer_id id;
    bool out;  // D2H
    bool demand;
    std::size_t bytes;
    int layer;
    event_t start, done;
    std::uint64_t seq;  // issue order (copy_seq_)
  };
  struct pending_stall {
    buffer_id id;
    int layer;
    std::size_t bytes;
    stream_t consumer;
    event_t before, after;
  };

  // All *_locked: mutex_ held. Note [Locking] in the .cpp.
  buffer& get_locked(buffer_id id, const char* what);
  event_t take_event_locked();
  void give_event_locked(event_t e) noexcept;
  bool swap_out_locked(buffer_id id, buffer& b, stream_t producer, bool eviction);
  void poll_locked();
  void bring_in(std::unique_lock<std::mutex>& lock, buffer_id id, bool demand);
  // Whether bringing `id` in would leave too little of the budget for the buffers the advisor
  // says are needed before it and are off the device (Note [Prefetch in order of need]).
  bool crowds_sooner_needs_locked(buffer_id id) const;
  // A device block for a new or demanded buffer: what the cache and budget serve now, else
  // after the swap-outs in flight end, oldest first, else through the allocator's ladder
  // (Note [Waiting for swap-outs in order]). Call without mutex_.
  void* allocate_after_swap_outs(std::size_t bytes, stream_t stream);
  void nvtx_name_caller() const noexcept;

  device& dev_;
  caching_allocator& alloc_;
  pinned_host_pool& host_pool_;
  const swap_engine_options opts_;
  device_timeline* timeline_;
  stream_t d2h_{};
  stream_t h2d_{};

  // Note [Locking]: guards everything below. Never held while calling caching_allocator::
  // allocate (which may call reclaim(), which takes it) nor across a blocking device call;
  // held across enqueueing calls (copy_async, record/wait_event, query_event) and across
  // pinned_host_pool and caching_allocator::deallocate / record_stream, which never call back.
  mutable std::mutex mutex_;
  std::unordered_map<buffer_id, buffer> buffers_;
  buffer_id next_id_ = 1;
  std::uint64_t tick_ = 0;
  std::vector<event_t> spare_events_;
  std::vector<event_t> all_events_;
  std::vector<pending_copy> copies_;
  std::uint64_t copy_seq_ = 0;
  std::vector<pending_stall> stalls_;
  eviction_advisor* advisor_ = nullptr;
  swap_stats stats_;
};

}  // namespace gpuswap
