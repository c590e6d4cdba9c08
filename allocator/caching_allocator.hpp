#pragma once
// caching_allocator: gpuswap's device allocator. Segments come from device::allocate_device, are
// split into blocks and cached on free, the way PyTorch's CUDA caching allocator does it, so
// that the steady state of a training loop never calls the device.
//
// What a caller can rely on (details in the Notes of caching_allocator.cpp):
//   - Requests are rounded up to 512 bytes; blocks are 512-byte aligned within their segment.
//     Requests <= 1 MiB come from 2 MiB segments (small pool); larger ones from 20 MiB segments
//     when below 10 MiB, else from a segment of their size rounded up to 2 MiB (large pool).
//   - Stream-ordered reuse: a block belongs to the stream it was allocated on. Freed, it is
//     reusable on that stream at once; if record_stream named other streams, only after the
//     work they had enqueued when it was freed is complete.
//   - The bytes of segments held (reserved) never exceed budget(): device_limit, or the
//     device's physical capacity when device_limit is 0.
//   - Before failing, allocate frees unused cached segments, waits for pending frees, and asks
//     the registered reclaimers (the swap engine) to evict; then it throws out_of_memory with
//     a message that says where the memory is.
//   - A freed small block waits, unmerged, for a request of its exact size on its stream (a
//     "fast bin"); it is merged with its free neighbours when a request misses, and before
//     segments are released. It is free memory in every figure.
//   - A free is applied (its block returned to the cache, its bytes taken out of the figures)
//     within the next 16 frees or at the next call that looks at the cache, whichever comes
//     first: stats, snapshot and every other method see every free made before them, and an
//     allocation that the fast bins cannot serve sees them too (Note [Pipelined frees]).
//   - With expandable_segments, large requests come from address space reserved per stream,
//     with device pages mapped where a block needs them and unmapped from free blocks when the
//     budget is short, so that free memory scattered between live blocks can serve one large
//     request (Note [Expandable segments], caching_allocator_expandable.cpp).
//   - Every method is thread-safe. deallocate is noexcept.
#include <array>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "allocator/allocator_stats.hpp"
#include "allocator/block_pool.hpp"
#include "allocator/reclaimer.hpp"
#include "device/device.hpp"
#include "profiler/nvtx_memory_pool.hpp"
#include "profiler/trace_event.hpp"

namespace gpuswap {

class event_recorder;

struct caching_allocator_options {
  // Budget in bytes below the physical capacity; 0 = the physical capacity. When set it must be
  // at least 2 MiB (one small segment) and at most the device's physical capacity.
  std::size_t device_limit = 0;
  // Blocks larger than this are never split, and requests below it never take them (PyTorch's
  // max_split_size_mb). SIZE_MAX (the default) disables the rule; otherwise it must be more
  // than 20 MiB, the large segment size. Ignored by the large pool with expandable segments,
  // where splitting strands nothing.
  std::size_t max_split_size = SIZE_MAX;
  // Where trace events go (alloc, free, segment map/release, OOM, device counters); nullptr:
  // global_recorder(). Nothing is recorded while that recorder is disabled.
  event_recorder* recorder = nullptr;
  // false removes the profiling hooks (trace events and NVTX memory annotations) entirely, not
  // just their output: the baseline `gpuswap bench alloc` measures their cost against. Leave
  // it on everywhere else. See Note [Profiling hooks].
  bool trace_hooks = true;
  // At most this many freed small-pool blocks wait unmerged in the fast bins for a request of
  // their exact size (Note [Deferred coalescing]); beyond it a free merges at once. 0 turns
  // the fast bins off. It bounds how long one consolidation can take and how many pieces
  // the free memory may be in; the memory itself is never lost (a miss consolidates first).
  std::size_t fast_bin_limit = std::size_t{1} << 17;
  // Frees go through a short pipeline that overlaps each one's cache misses with the next
  // ones' (Note [Pipelined frees]); false applies each free inside its own call.
  bool pipelined_frees = true;
  // Large-pool requests are served from expandable segments (Note [Expandable segments]):
  // fragmentation of the large pool no longer strands memory, at the cost of mapping and
  // unmapping device pages when the budget is short. Needs a device with virtual memory
  // management (device::vm_page_size() != 0); on one without, a warning and the plain
  // segments. PyTorch's expandable_segments:True.
  bool expandable_segments = false;

  // Throws config_error naming the field.
  void validate() const;
};

class caching_allocator {
 public:
  static constexpr std::size_t min_block_size = 512;                 // rounding unit and alignment
  static constexpr std::size_t small_size = std::size_t{1} << 20;    // largest small-pool request
  static constexpr std::size_t small_buffer = std::size_t{2} << 20;  // small-pool segment
  static constexpr std::size_t min_large_alloc = std::size_t{10} << 20;
  static constexpr std::size_t large_buffer = std::size_t{20} << 20;  // segment below 10 MiB
  static constexpr std::size_t round_large = std::size_t{2} << 20;    // larger segments' unit

  // The block size a request of `bytes` gets; 0 when rounding would overflow.
  static std::size_t round_size(std::size_t bytes) noexcept;
  // The preferred segment size for a rounded request.
  static std::size_t segment_size(std::size_t rounded) noexcept;

  // Throws config_error for invalid options or a device_limit above the physical capacity.
  caching_allocator(device& dev, caching_allocator_options opts);
  caching_allocator(const caching_allocator&) = delete;
  caching_allocator& operator=(const caching_allocator&) = delete;
  // Waits for pending frees and returns every segment to the device (live blocks included:
  // they are leaked by their owners and counted in a warning).
  ~caching_allocator();

  // A block of at least `bytes` usable on `stream`. bytes == 0 returns nullptr. Throws
  // out_of_memory when neither the cache, the budget, nor the reclaimers can serve it, and
  // device_error when a device call fails for another reason.
  void* allocate(std::size_t bytes, stream_t stream);
  // What the cache and the budget can serve now, without waiting for pending frees, releasing
  // cached segments or asking the reclaimers; nullptr (not out_of_memory) when that is not
  // enough. For work that may simply be done later, like a prefetch: it must not push out
  // what is needed sooner.
  void* try_allocate(std::size_t bytes, stream_t stream);
  // nullptr is a no-op; a pointer this allocator did not hand out is ignored and counted
  // (stats().num_invalid_frees).
  void deallocate(void* ptr) noexcept;
  // The block is also used on `stream`: when freed it is not reused before the work enqueued
  // on `stream` up to the free is complete. Unknown pointers are ignored (as in PyTorch).
  void record_stream(void* ptr, stream_t stream);
  // Waits for pending frees, then returns every unused segment to the device.
  void empty_cache();

  allocator_stats stats() const;
  void reset_peak_stats();
  // {"device", "budget", "stats", "segments": [{"address", "size", "pool", "stream",
  //  "blocks": [{"address", "size", "requested", "state", "stream"}]}]}; states use PyTorch's
  // names: "active_allocated", "active_pending_free", "inactive". Two "inactive" blocks can be
  // neighbours while one of them waits in a fast bin (Note [Deferred coalescing]).
  nlohmann::json snapshot() const;

  // Reclaimers are asked, in registration order, when the cache cannot serve a request.
  // remove_reclaimer waits until no call to it is in flight; it must not be called from inside
  // reclaim().
  void add_reclaimer(reclaimer* r);
  void remove_reclaimer(reclaimer* r);
  // Figures for the OOM message from the swap engine and pinned host pool.
  void set_external_memory_reporter(std::function<external_memory_report()> reporter);

  // Adds or removes the profiling hooks (caching_allocator_options::trace_hooks) at run time.
  // For `gpuswap bench alloc`, which times hooks off, on and absent on one allocator so that no
  // difference in memory layout between two instances hides in a 1% figure. Preconditions: no
  // other thread uses the allocator meanwhile, no block is allocated and no NVTX tool tracks
  // its pool; throws gpuswap::error otherwise.
  void set_trace_hooks(bool on);

  std::size_t budget() const noexcept { return budget_; }
  // Whether large requests are served from expandable segments (the option, on a device that
  // can map pages).
  bool expandable_segments() const noexcept { return page_size_ != 0; }
  device& dev() noexcept { return dev_; }
  // The size of the block at `ptr` if it is allocated here (its rounded size), else 0.
  std::size_t allocated_size(const void* ptr) const;

  // Debug invariant checker: blocks tile their segments, the free index matches block states,
  // no two free neighbours are left unmerged, pending bookkeeping adds up, and every stat
  // equals the sum recomputed from the blocks. Returns "" when all hold, else one line per
  // broken invariant. O(blocks); for tests.
  std::string validate() const;

 private:
  struct request {
    std::size_t bytes;
    std::size_t size;  // rounded
    pool_kind pool;
    stream_t stream;
  };
  // A stream's pending events, in record order (so completion order): an intrusive FIFO
  // through block::stream_uses entries.
  struct stream_queue {
    stream_t stream{};
    block::stream_use* head = nullptr;
    block::stream_use* tail = nullptr;
  };
  // Allocated blocks by address: open addressing with linear probing and backward-shift
  // deletion in one flat array, so that a lookup is one cache line where a node-based map costs
  // three dependent loads (see Note [Hot path]). Addresses are never 0, which marks a free slot.
  class block_index {
   public:
    block_index();
    // Precondition: no entry for `address`. May throw bad_alloc when it grows; then unchanged.
    void insert(std::uintptr_t address, block* b);
    block* find(std::uintptr_t address) const noexcept;
    // Starts loading the line where `address` would be found (Note [Pipelined frees]).
    void prefetch(std::uintptr_t address) const noexcept;
    // Removes and returns the entry, or nullptr if there is none.
    block* erase(std::uintptr_t address) noexcept;
    std::size_t size() const noexcept { return size_; }
    bool empty() const noexcept { return size_ == 0; }

   private:
    struct slot {
      std::uintptr_t address = 0;
      block* value = nullptr;
    };
    std::size_t home(std::uintptr_t address) const noexcept;
    void grow();
    std::vector<slot> slots_;
    std::size_t size_ = 0;
    unsigned shift_ = 0;  // 64 - log2(slots_.size())
  };

  block_pool& pool_of(pool_kind kind) noexcept {
    return kind == pool_kind::small ? small_pool_ : large_pool_;
  }
  const block_pool& pool_of(pool_kind kind) const noexcept {
    return kind == pool_kind::small ? small_pool_ : large_pool_;
  }
  request make_request(std::size_t bytes, stream_t stream) const noexcept;
  bool should_split(const block& b, std::size_t size) const noexcept;

  // All *_locked functions require mutex_ held. Those taking the unique_lock may drop it
  // around a blocking device call and hold it again on return (unless they throw).
  block* search_locked(const request& req);
  block* search_or_new_segment(std::unique_lock<std::mutex>& lock, const request& req);
  block* new_segment(std::unique_lock<std::mutex>& lock, const request& req);
  block* allocate_slow(std::unique_lock<std::mutex>& lock, const request& req);
  block* take_block_locked(block& b, const request& req, bool in_pool);
  // A block popped from req's fast bin (exactly req.size bytes).
  block* take_deferred_locked(const size_class_bins::popped_block& d, const request& req);
  void free_block_locked(block* b) noexcept;
  // Note [Pipelined frees]. The first takes a free out of the allocated index (stage 2), the
  // second applies the oldest (stage 3), the third applies every free in the pipeline; the
  // fourth is the third for the const readers (the books are brought up to date, nothing that
  // a caller can tell apart changes).
  void look_up_free_locked() noexcept;
  void apply_oldest_free_locked() noexcept;
  void apply_frees_locked() noexcept;
  void apply_frees_locked() const noexcept;
  // A free applied at once, without the pipeline; `b` is out of the index.
  void release_allocated_locked(block* b) noexcept;
  // Merges a block whose state was just set to free with its free neighbours, and puts the
  // result in its pool.
  void merge_and_insert_locked(block* b) noexcept;
  // Note [Deferred coalescing]: merges the fast bins' blocks of one stream, or of all.
  void consolidate_locked(stream_t stream) noexcept;
  // The books of a block of `size` bytes leaving a fast bin (popped or consolidated); the
  // caller sets its state.
  void left_fast_bin_locked(std::size_t size) noexcept;
  void consolidate_all_locked() noexcept;
  void start_pending_locked(block* b) noexcept;
  void process_events_locked();
  void clear_unsynced_locked(std::uint64_t epoch);
  // Returns unused segments (one whole free block) to the device: all of them, or with
  // `wanted` just enough to cover that many bytes (Note [Releasing just enough]). Returns the
  // bytes released.
  std::size_t release_unused_segments(std::unique_lock<std::mutex>& lock,
                                      std::size_t wanted = SIZE_MAX);
  // The segments from allocate_device among those (expandable ones unmap pages instead).
  std::size_t release_whole_segments(std::unique_lock<std::mutex>& lock, std::size_t wanted);
  std::vector<segment*> pick_unused_segments_locked(std::size_t wanted);
  static std::size_t minimal_segment_size(const request& req) noexcept;
  void synchronize_pending(std::unique_lock<std::mutex>& lock);
  std::size_t call_reclaimers(std::unique_lock<std::mutex>& lock, const request& req);
  [[noreturn]] void throw_oom(std::unique_lock<std::mutex>& lock, std::size_t bytes,
                              std::size_t rounded);

  // Note [Profiling hooks]. The *_traced functions run only when the recorder is enabled (or,
  // for NVTX, a tool tracks this pool); they are out of line so the hot path stays small.
  double trace_time_ns() const noexcept;
  void trace_alloc(void* ptr, std::size_t size, stream_t stream) noexcept;
  // A marker and, unless `allocated` < 0, a device_memory counter sample.
  void trace_segment(event_kind kind, std::uintptr_t base, std::size_t size,
                     std::int64_t allocated, std::int64_t reserved) noexcept;

  // Note [Expandable segments] (caching_allocator_expandable.cpp).
  // Maps pages for a large request in its stream's expandable segments (reserving one when
  // none has room) and takes the block; nullptr when the budget's headroom is too small or
  // the device is out of memory. May drop the lock to reserve address space.
  block* grow_expandable(std::unique_lock<std::mutex>& lock, const request& req);
  // Where a request would go in its stream's expandable segments: a run of free and unmapped
  // blocks, the place in it needing the fewest bytes mapped; seg == nullptr when no run is
  // long enough.
  struct placement {
    segment* seg = nullptr;
    block* first = nullptr;  // the run's first block
    std::uintptr_t begin = 0;
    std::size_t size = 0;         // the request's
    std::size_t cost = SIZE_MAX;  // bytes to map
  };
  placement find_placement_locked(const request& req);
  // The OOM ladder's first rung for a large request with expandable segments: unmaps free
  // pages outside the request's placement until the budget can map the rest of it. Returns
  // the bytes unmapped.
  std::size_t make_room_expandable(std::unique_lock<std::mutex>& lock, const request& req);
  // Unmaps the whole pages inside free large blocks: the largest first until `wanted` bytes,
  // or all; none of the blocks that `keep` would use. Waits (lock dropped) for the work
  // enqueued on their streams first. Returns the bytes unmapped.
  std::size_t unmap_free_pages(std::unique_lock<std::mutex>& lock, std::size_t wanted,
                               const placement* keep = nullptr);
  // Gives back the reservations of expandable segments with nothing mapped.
  void release_empty_reservations(std::unique_lock<std::mutex>& lock);
  // Splits b at `offset` (0 < offset < b.size): `tail` (a spare block object) becomes
  // [b.address + offset, end) with b's state, stream and segment. Pool membership and stats
  // are the caller's.
  static void split_block(block& b, std::size_t offset, block& tail) noexcept;
  // Unmaps every mapped page of an expandable segment (for the destructor).
  static void unmap_all_pages(device& dev, const segment& seg) noexcept;
  // Merges an unmapped block with its unmapped neighbours.
  void merge_unmapped_locked(block* b) noexcept;
  // Waits, with the lock dropped, for the work enqueued so far on `streams` (Note [Work in
  // flight on released segments]); holds the lock again on return. Returns what the wait threw,
  // or nullptr.
  std::exception_ptr wait_for_streams(std::unique_lock<std::mutex>& lock,
                                      const std::vector<stream_t>& streams);
  // The streams of `streams`, each with an event recorded now, into `waits`; false when that
  // failed (then only a device-wide synchronize proves their work done).
  bool record_stream_waits_locked(const std::vector<stream_t>& streams,
                                  std::vector<event_t>& waits) noexcept;

  block* new_block_object();
  void recycle_block_object(block* b) noexcept;
  stream_queue* queue_of(stream_t stream) noexcept;
  void pool_insert_locked(block& b) noexcept;
  void pool_erase_locked(block& b) noexcept;

  device& dev_;
  const caching_allocator_options opts_;
  std::size_t budget_ = 0;
  // The device's page size when expandable segments are on, else 0.
  std::size_t page_size_ = 0;
  event_recorder& recorder_;
  // opts_.trace_hooks, kept next to recorder_ for the hot path; changed only by
  // set_trace_hooks, whose preconditions exclude concurrent readers.
  bool hooks_;
  // Segments and blocks as NVTX heaps and regions; its own lock, never taken with mutex_ held.
  nvtx_memory_pool nvtx_pool_;

  // Note [Locking] (caching_allocator.cpp). mutex_ guards everything below down to stats_.
  // It is never held across allocate_device, free_device, synchronize_event or synchronize;
  // it is held across create_event, record_event and query_event, which enqueue or poll and
  // never wait for the device. Never held together with reclaim_mutex_.
  mutable std::mutex mutex_;
  // Block objects live here for the allocator's lifetime and are recycled through
  // spare_blocks_ (whose capacity always covers every block, so recycling cannot throw).
  // Declared before the pools so that the pools unlink their blocks first on destruction.
  std::deque<block> block_storage_;
  std::vector<block*> spare_blocks_;
  block_pool small_pool_{pool_kind::small};
  block_pool large_pool_{pool_kind::large};
  std::map<std::uintptr_t, segment> segments_;
  block_index allocated_;
  // Note [Pipelined frees]: frees [frees_applied_, frees_made_) are in the pipeline, those
  // before frees_looked_up_ already out of the index. Slot: the free's number % depth.
  struct pipelined_free {
    std::uintptr_t address = 0;
    block* b = nullptr;      // set by the look-up; nullptr there means an invalid free
    double trace_ns = -1;    // the call's trace timestamp, or < 0 when it was not traced
  };
  static constexpr std::size_t free_pipeline_depth = 16;
  std::array<pipelined_free, free_pipeline_depth> free_pipeline_{};
  std::uint64_t frees_made_ = 0;
  std::uint64_t frees_looked_up_ = 0;
  std::uint64_t frees_applied_ = 0;
  // Allocated blocks with record_stream uses: while there are any, frees bypass the pipeline,
  // so that each one's events are recorded in its own call (Note [Pipelined frees]).
  std::size_t stream_use_blocks_ = 0;
  // Our hook in recorder_ (Note [Pipelined frees]): applies the pipeline before a collect.
  std::uint64_t collect_hook_id_ = 0;
  std::size_t deferred_blocks_ = 0;  // in the small pool's fast bins, all streams
  // Streams named by record_stream get a queue there, before any free needs one.
  std::vector<stream_queue> queues_;
  std::size_t pending_events_total_ = 0;
  // Blocks whose event record failed: they wait for a device-wide synchronize (Note
  // [Failed event records]). A block's needs_sync_epoch is the epoch current when it was
  // flagged; a synchronize that began in epoch E clears flags <= E.
  std::size_t unsynced_blocks_ = 0;
  std::uint64_t sync_epoch_ = 1;
  // Recorded-and-completed events for reuse; capacity covers every event created.
  std::vector<event_t> spare_events_;
  std::size_t events_created_ = 0;
  // Bytes counted against the budget that are not in reserved_bytes: segments being obtained
  // from allocate_device, and segments on their way back through free_device.
  std::size_t in_flight_bytes_ = 0;
  // Notified (all) whenever in_flight_bytes_ goes down; waited on, with mutex_, by the OOM
  // ladder (Note [Bytes in flight]).
  std::condition_variable in_flight_settled_;
  void settle_in_flight_locked(std::size_t bytes) noexcept {
    in_flight_bytes_ -= bytes;
    in_flight_settled_.notify_all();
  }
  allocator_stats stats_;

  // reclaim_mutex_ guards reclaimers_, reclaim_calls_in_flight_ and reporter_; it is never
  // held across a reclaim() or reporter call, nor together with mutex_.
  mutable std::mutex reclaim_mutex_;
  std::condition_variable reclaim_done_;
  std::vector<reclaimer*> reclaimers_;
  std::size_t reclaim_calls_in_flight_ = 0;
  std::function<external_memory_report()> reporter_;
};

}  // namespace gpuswap
