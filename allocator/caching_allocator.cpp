#include "allocator/caching_allocator.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <exception>
#include <limits>
#include <utility>

#include "allocator/caching_allocator_stats_math.hpp"
#include "allocator/oom_report.hpp"
#include "core/errors.hpp"
#include "core/logging.hpp"
#include "profiler/event_recorder.hpp"
#include "profiler/nvtx_ranges.hpp"

namespace gpuswap {

static_assert(size_class_bins::granularity == caching_allocator::min_block_size &&
                  size_class_bins::max_size == caching_allocator::small_buffer,
              "the small pool's size classes must cover exactly its block sizes");

// Note [Locking]
// One std::mutex (mutex_) guards the pools, the blocks, the segment map, the pending queues
// and the statistics. The hot path (a cache hit, a free without record_stream) takes it once
// and does a hash-map operation and one or two free-index operations under it.
// It is never held across a call that may wait for the device: allocate_device, free_device
// (cudaFree synchronises), synchronize_event and synchronize. Those paths count the bytes
// involved in in_flight_bytes_ so that the budget holds while the lock is dropped, drop the
// lock, make the call, and take the lock again; whatever they decide afterwards is decided
// again from the state they find. create_event, record_event, query_event, map_pages and
// unmap_pages are called under the lock: by the device contract they enqueue, poll or change
// mappings and never wait for device work (Note [Expandable segments]; the
// simulator's query_event may wait for a worker to finish an operation whose modelled time has
// passed, which is bounded by that one operation).
// Reclaimers and the external reporter are called with no lock held, because they call back
// into deallocate and into their own locks; reclaim_mutex_ guards only their registration.
// No lock is recursive and no two of the allocator's are held together. One outside lock comes
// before mutex_: the recorder's collect hook (Note [Pipelined frees]) takes mutex_ while the
// recorder holds its hooks mutex, and the allocator adds and removes that hook only in its
// constructor and destructor, without mutex_, so the two are always taken in that order.

// Note [Stream-ordered reuse]
// A block belongs to the stream it was allocated on, and all blocks of a segment share the
// segment's stream, because a free block is only ever handed to a request on its own stream.
// Work on one stream runs in order, so a block freed on its stream can be reused on it at once:
// the next user's work is queued behind the last user's. When record_stream named other
// streams, deallocate records an event on each of them and the block stays "pending" (active,
// not allocated, not in any pool) until every one has completed. Completion is polled with
// query_event at the start of allocations (and waited for on the OOM ladder and in
// empty_cache), in record order per stream, stopping at a stream's first incomplete event:
// events of one stream complete in the order they were recorded. This is the reuse-before-the-
// other-stream-finished bug of PyTorch #23729, guarded.

// Note [Pending blocks never merge]
// Coalescing two free neighbours must not lose either side's pending state: RMM #2489 merged
// free lists and kept only one stream's event, letting a block be reused while the donor
// stream still wrote to it. Here a pending block is not free: its state is `pending`, it is not
// in any pool, and free_block_locked only merges neighbours whose state is `free`. A pending
// block merges with its free neighbours when its own last event completes, so a merged block
// is always one with nothing outstanding. (caching_allocator_ordering_test checks both orders.)

// Note [Deferred coalescing]
// A freed small-pool block with nothing outstanding (no record_stream, or its events done)
// does not merge with its neighbours at once: it goes, state `deferred`, onto its stream's
// fast bin for its exact size (a LIFO, size_class_bins), and an allocation of exactly that
// size on that stream pops it. This is glibc's fastbins/tcache idea, and it fits a training
// loop, which asks for the same sizes every iteration: in the steady state an allocation is a
// pop and an index insert, a free an index erase and a push, with no split, no merge, no
// bitmap update and one cache line of the block touched (Note [Block layout], block.hpp).
// A deferred block is free memory in every figure (inactive; in inactive_split, since a
// small-pool block never fills its segment; "inactive" in the snapshot), not in any pool's
// best-fit index, and never merged with: merges only take neighbours whose state is `free`.
// Its memory is never lost to a request that needs it merged: when a small request's
// best-fit search misses, its stream's fast bins are consolidated (each block merged as a free
// would, Note [Pending blocks never merge]) and the search is retried before any new segment;
// releasing segments (empty_cache, the OOM ladder) and the OOM report consolidate all of them
// first. Each deferred block is consolidated at most once, so the total merge work is what
// eager coalescing does, only later and often never. fast_bin_limit bounds the blocks waiting
// (a full set of fast bins sends a free down the merging path), so that a consolidation's
// pause and the pieces free memory is in stay bounded. The fast bins are per stream, like the
// pools, so a block of stream A is never handed to stream B. The large pool keeps eager
// merging: its requests are rarer and its blocks are split to varying sizes.

// Note [Bytes in flight]
// While one thread releases segments or unmaps pages, their bytes are out of reserved_bytes
// but still counted against the budget (in_flight_bytes_), and its lock is dropped while it
// waits for the streams that used them. Another thread whose request fits nowhere then finds
// the budget full and nothing left to release: without a wait it would throw out_of_memory for
// memory that is a moment from being free. So the last rung of the OOM ladder, when the
// reclaimers freed nothing and bytes are in flight, waits until none are and climbs again
// (bounded by max_reclaim_rounds like the reclaimers' rounds). A segment another thread is
// obtaining counts the same: once it lands, the figures the OOM report gives are settled.
// caching_allocator_concurrent_release_test holds a release on a gated stream and checks that
// an allocation beside it waits and succeeds.

// Note [Fast bins as arrays]
// A fast bin is an array of (block, address) pairs per size class, not a list linked through
// the blocks. With the links in the blocks, a pop read the next link from the popped block, a
// line that the other size classes' traffic has long evicted at 100,000 live blocks: 97% of
// search_locked's samples (`perf record`, `gpuswap bench alloc`) stood on that load, and the
// rest of the allocation waited for it. From the array a pop knows the block and its address
// without touching the block, and take_deferred_locked only writes to it (its size is the
// request's), so the index insert's miss and the block's line are fetched together and no load
// waits on the block. The arrays' top entries, one line per size class in use, stay in cache.
// The price: a push may need memory, on the free path, which must not fail; a push that cannot
// grow its array returns false and the block is freed the ordinary way (merged). empty_cache
// gives the arrays' memory back. fast_bin_limit bounds what they hold (16 bytes a block).
// Measured side by side (`gpuswap bench alloc`, alternating binaries on a noisy hour of this
// VM): at 100,000 live blocks 10 of 13 pairs faster, median 287 -> 129 ns a pair; at 1,000 and
// 10,000, where everything is in cache, about 6 ns slower in the quiet pairs (64 -> 70 ns): a
// pop reads the array's header and its top entry, two lines where the list read one and the
// block. Kept for the flatter curve: the cost no longer grows with the blocks a bin's link
// must be fetched from.

// Note [Pipelined frees]
// With 100,000 live blocks the index and the block objects (23 MB) no longer fit in the core's
// L2, and a free in random order misses twice, one miss after the other: on the index slot
// that says which block the pointer is, then on that block. The mutex's atomics keep one
// call's misses from overlapping the next call's, so each free paid both latencies in full
// (Note [Hot path]). So a free is applied in three stages, each in a later call than the one
// before, with a prefetch at each stage for the next:
//   1. deallocate(ptr) queues the pointer and prefetches its index slot;
//   2. 8 frees later its entry is erased from the index (the slot is in cache now) and the
//      block's first line is prefetched;
//   3. 16 frees later the block is freed as before (Note [Deferred coalescing]).
// Each call does stage 1 for its pointer, 2 for the one 8 before and 3 for the one 16 before,
// so the misses of 16 frees are in flight together. The same for allocations served by a fast
// bin: popping a block prefetches the next block of that bin and its index slot, which the next
// request of that size will touch.
// What the pipeline must not change is what a caller can observe. So:
//   - Every method other than deallocate and a fast-bin hit applies the whole pipeline first,
//     in order: stats, snapshot and validate count every free made before them; a request the
//     fast bins cannot serve, empty_cache, the OOM ladder and the reclaimers see every free
//     block. Frees are applied in call order, so merges and the pools end up exactly as with
//     eager frees (a fast-bin hit may hand out another block of the same size).
//   - Frees of blocks used on other streams (record_stream) must record their events in their
//     own call: events recorded later would also wait for work enqueued after the free. While
//     any allocated block has such uses, frees bypass the pipeline (after draining it).
//   - A free's trace event keeps the time of its call and is recorded when it is applied, with
//     its block's size and stream; collect() and clear() of the allocator's recorder apply the
//     pipeline first (event_recorder::add_collect_hook), so a trace never misses a free made
//     before it was collected.
//   - An invalid free (foreign pointer, double free) is found at stage 2, counted and logged
//     then; a double free whose first free is still queued is caught the same way.
// Measured with `gpuswap bench alloc --repetitions 36` (thread CPU ns per alloc+free pair,
// medians; the binary before this change run right after on the same quiet machine): 1,000
// live blocks 70 -> 69, 10,000 69 -> 66, 100,000 238 -> 108.

// Note [Failed event records]
// deallocate is noexcept, but creating or recording an event can fail. A block whose event
// could not be recorded cannot be proven idle by polling, so it is flagged with the current
// sync epoch and stays pending until a device-wide synchronize begun after the flag completes
// (the OOM ladder and empty_cache run one when any block is flagged). Nothing is lost, and no
// block is reused early.

// Note [Budget and segment sizes]
// Reserved bytes plus in_flight_bytes_ never exceed the budget, checked before every
// allocate_device. Segment sizes follow PyTorch (2 MiB for the small pool; 20 MiB for large
// requests below 10 MiB; else the request rounded up to 2 MiB), except when the preferred size
// does not fit the budget's headroom, or the device refuses it: then the smallest segment that
// holds the request is tried, so that a budget a few MiB above the live data still serves
// requests that a 20 MiB segment would not fit.

// Note [Profiling hooks]
// The allocator reports what it does to the event recorder (alloc, free, segment map and
// release, OOM, and a device_memory counter sample whenever reserved memory changes) and, with
// NVTX compiled in, describes its segments and blocks to an attached tool (nvtx_memory_pool).
// Both must cost nothing measurable when nobody listens, since every allocation passes here:
//   - recorder: one relaxed load of the enabled flag per alloc and per free; the event is built
//     (and the clock read) only when it is set, in the out-of-line trace_* functions.
//   - NVTX: register_block / unregister_block are an inline test of the pool's tracking flag,
//     which is set only once a tool accepted a heap, and are empty when NVTX is compiled out.
// Events are recorded after mutex_ is released, except for the rare segment maps and the frees
// the pipeline applies (Note [Pipelined frees]); a record is a lock-free push, and the
// recorder's own mutex (a thread's first record) is never held while it calls out. NVTX calls
// are never made with mutex_ held (the pool has its own lock; Note [Locking] holds no two
// together) and are ordered so that the tool never sees a block registered twice or
// unregistered after its reuse: a block is registered after allocate handed it out (nobody
// else may free it yet) and unregistered before deallocate makes it reusable; a segment is
// registered before it enters segments_ and unregistered after it left, before free_device.
// `gpuswap bench alloc` measures the hooks against an allocator made with trace_hooks = false,
// which skips them entirely.

// Note [OOM ladder]
// A request the cache cannot serve climbs, each rung followed by a retry (search, then a new
// segment): (1) release every cached segment that is wholly free; (2) if blocks are pending,
// wait for their events (and for a device-wide synchronize if a record failed) and release
// again; (3) ask the reclaimers, without any lock, to evict at least the rounded request, and
// if they freed anything start over (at most max_reclaim_rounds times); (4) if they freed
// nothing but another thread has bytes in flight, wait for them to land and start over (Note
// [Bytes in flight]). Then out_of_memory.
// A request larger than the whole budget skips the ladder: no release or eviction can serve it,
// and evicting everything for nothing would be the worst answer.

using namespace caching_detail;

namespace {

constexpr int max_reclaim_rounds = 64;

// The stats that taking a block for a request changes, and those that freeing it does.
void count_take(allocator_stats& s, pool_kind kind, std::int64_t size,
                std::int64_t requested) noexcept {
  add(s.allocation, kind, 1);
  add(s.allocated_bytes, kind, size);
  add(s.active, kind, 1);
  add(s.active_bytes, kind, size);
  add(s.requested_bytes, kind, requested);
}

void count_release(allocator_stats& s, pool_kind kind, std::int64_t size,
                   std::int64_t requested) noexcept {
  sub(s.active, kind, 1);
  sub(s.active_bytes, kind, size);
  sub(s.requested_bytes, kind, requested);
}

const char* state_name(block_state state) noexcept {
  switch (state) {
    case block_state::allocated:
      return "active_allocated";
    case block_state::pending:
      return "active_pending_free";
    case block_state::free:
    case block_state::deferred:  // free memory awaiting coalescing: Note [Deferred coalescing]
      return "inactive";
    case block_state::unmapped:
    case block_state::unmapping:  // Note [Expandable segments]: no memory (soon) behind it
      return "unmapped";
  }
  return "unknown";
}

}  // namespace

void caching_allocator_options::validate() const {
  if (device_limit != 0 && device_limit < caching_allocator::small_buffer) {
    throw_config_error("device_limit", std::to_string(device_limit),
                       "0 (the physical capacity) or at least 2 MiB (2097152 bytes)",
                       "a budget below one 2 MiB segment cannot hold any allocation");
  }
  if (max_split_size != SIZE_MAX && max_split_size <= caching_allocator::large_buffer) {
    throw_config_error("max_split_size", std::to_string(max_split_size),
                       "more than 20 MiB (20971520 bytes), or unset",
                       "blocks at most one large segment in size are always splittable");
  }
}

std::size_t caching_allocator::round_size(std::size_t bytes) noexcept {
  if (bytes > std::numeric_limits<std::size_t>::max() - min_block_size) return 0;
  if (bytes < min_block_size) return min_block_size;
  return round_up(bytes, min_block_size);
}

std::size_t caching_allocator::segment_size(std::size_t rounded) noexcept {
  if (rounded <= small_size) return small_buffer;
  if (rounded < min_large_alloc) return large_buffer;
  return round_up(rounded, round_large);
}

caching_allocator::caching_allocator(device& dev, caching_allocator_options opts)
    : dev_(dev),
      opts_(opts),
      recorder_(opts.recorder != nullptr ? *opts.recorder : global_recorder()),
      hooks_(opts.trace_hooks),
      nvtx_pool_(fmt::format("gpuswap {}", dev.name())) {
  opts_.validate();
  const memory_info info = dev_.memory();
  if (opts_.device_limit > info.total_bytes) {
    throw_config_error("device_limit", std::to_string(opts_.device_limit),
                       fmt::format("0 or at most the physical capacity of {} ({} bytes)",
                                   dev_.name(), info.total_bytes),
                       "above the device's physical capacity");
  }
  budget_ = opts_.device_limit != 0 ? opts_.device_limit : info.total_bytes;
  if (opts_.expandable_segments) {
    page_size_ = dev_.vm_page_size();
    if (page_size_ == 0) {
      log().warn(
          "caching_allocator: expandable_segments needs virtual memory management, which {} "
          "does not have; large requests use plain segments",
          dev_.name());
    }
  }
  // Note [Pipelined frees]: a trace collected between two calls sees every free made before.
  collect_hook_id_ = recorder_.add_collect_hook([this] {
    std::lock_guard lock(mutex_);
    apply_frees_locked();
  });
}

caching_allocator::~caching_allocator() {
  recorder_.remove_collect_hook(collect_hook_id_);  // before mutex_, which the hook takes
  std::unique_lock lock(mutex_);
  apply_frees_locked();
  if (!allocated_.empty()) {
    log().warn(
        "caching_allocator: destroyed with {} live blocks ({} bytes); their "
        "memory is returned to the device",
        allocated_.size(), stats_.allocated_bytes.all().current);
  }
  try {
    if (pending_events_total_ > 0 || unsynced_blocks_ > 0) synchronize_pending(lock);
  } catch (const std::exception& e) {
    log().warn("caching_allocator: waiting for pending frees at destruction failed: {}", e.what());
  }
  if (!lock.owns_lock()) lock.lock();
  std::vector<void*> bases;
  std::vector<const segment*> reservations;  // Note [Expandable segments]
  bases.reserve(segments_.size());
  for (const auto& [base, seg] : segments_) {
    if (seg.expandable) {
      reservations.push_back(&seg);
    } else {
      bases.push_back(reinterpret_cast<void*>(base));
    }
  }
  std::vector<event_t> events = std::move(spare_events_);
  for (const stream_queue& q : queues_) {
    for (const block::stream_use* u = q.head; u != nullptr; u = u->next) events.push_back(u->event);
  }
  queues_.clear();
  lock.unlock();
  if (hooks_) {
    for (void* base : bases) nvtx_pool_.unregister_segment(base);
    for (const segment* seg : reservations) nvtx_pool_.unregister_segment(reinterpret_cast<void*>(seg->base));
  }
  try {
    dev_.synchronize();  // Note [Work in flight on released segments]
  } catch (const std::exception& e) {
    log().warn("caching_allocator: waiting for the device at destruction failed: {}", e.what());
  }
  for (void* base : bases) dev_.free_device(base);
  // No other thread may use the allocator now, so its segments can be read without the lock.
  for (const segment* seg : reservations) {
    unmap_all_pages(dev_, *seg);
    dev_.release_address_range(reinterpret_cast<void*>(seg->base), seg->size);
  }
  for (event_t e : events) dev_.destroy_event(e);
}

caching_allocator::request caching_allocator::make_request(std::size_t bytes,
                                                           stream_t stream) const noexcept {
  const std::size_t size = round_size(bytes);
  return request{bytes, size, size <= small_size ? pool_kind::small : pool_kind::large, stream};
}

bool caching_allocator::should_split(const block& b, std::size_t size) const noexcept {
  const std::size_t remaining = b.size - size;
  if (b.pool == pool_kind::small) return remaining >= min_block_size;
  // Note [Expandable segments]: a split strands nothing there, since free pages are unmapped.
  if (page_size_ != 0) return remaining > small_size;
  return size < opts_.max_split_size && b.size <= opts_.max_split_size && remaining > small_size;
}

// --- allocate --------------------------------------------------------------------------------

void* caching_allocator::try_allocate(std::size_t bytes, stream_t stream) {
  if (bytes == 0) return nullptr;
  const request req = make_request(bytes, stream);
  void* ptr = nullptr;
  std::size_t size = 0;
  {
    std::unique_lock lock(mutex_);
    if (req.size == 0 || req.size > budget_) return nullptr;
    process_events_locked();
    block* b = search_locked(req);
    if (b == nullptr) b = search_or_new_segment(lock, req);
    if (b == nullptr) return nullptr;
    ptr = b->ptr();
    size = b->size;
  }
  if (hooks_) {
    if (recorder_.enabled()) trace_alloc(ptr, size, stream);
    nvtx_pool_.register_block(ptr, size);
  }
  return ptr;
}

void* caching_allocator::allocate(std::size_t bytes, stream_t stream) {
  if (bytes == 0) return nullptr;
  const request req = make_request(bytes, stream);
  void* ptr = nullptr;
  std::size_t size = 0;
  {
    std::unique_lock lock(mutex_);
    if (req.size == 0 || req.size > budget_) throw_oom(lock, bytes, req.size);
    block* b = search_locked(req);
    if (b == nullptr) b = allocate_slow(lock, req);
    ptr = b->ptr();
    size = b->size;
  }
  // Note [Profiling hooks].
  if (hooks_) {
    if (recorder_.enabled()) trace_alloc(ptr, size, stream);
    nvtx_pool_.register_block(ptr, size);
  }
  return ptr;
}

block* caching_allocator::search_locked(const request& req) {
  if (pending_events_total_ != 0) process_events_locked();
  block_pool& pool = pool_of(req.pool);
  // Note [Deferred coalescing]: a fast bin of exactly this size.
  auto pop_fast_bin = [&]() -> block* {
    if (req.pool != pool_kind::small || deferred_blocks_ == 0) return nullptr;
    const size_class_bins::popped_block d = small_pool_.pop_deferred(req.stream, req.size);
    return d.b != nullptr ? take_deferred_locked(d, req) : nullptr;
  };
  if (block* b = pop_fast_bin()) return b;
  if (frees_applied_ != frees_made_) {
    // Note [Pipelined frees]: past the fast bins, the search sees every free made so far.
    apply_frees_locked();
    if (block* b = pop_fast_bin()) return b;
  }
  // max_split_size keeps large blocks whole so that they are not stranded in pieces; with
  // expandable segments nothing is (Note [Expandable segments]).
  const std::size_t max_split =
      page_size_ != 0 && req.pool == pool_kind::large ? SIZE_MAX : opts_.max_split_size;
  block* b = pool.best_fit(req.stream, req.size, max_split, large_buffer);
  if (b == nullptr && req.pool == pool_kind::small && deferred_blocks_ != 0 &&
      small_pool_.deferred_size(req.stream) != 0) {
    consolidate_locked(req.stream);
    b = pool.best_fit(req.stream, req.size, max_split, large_buffer);
  }
  return b != nullptr ? take_block_locked(*b, req, /*in_pool=*/true) : nullptr;
}

block* caching_allocator::search_or_new_segment(std::unique_lock<std::mutex>& lock,
                                                const request& req) {
  if (block* b = search_locked(req)) return b;
  if (page_size_ != 0 && req.pool == pool_kind::large) return grow_expandable(lock, req);
  return new_segment(lock, req);
}

block* caching_allocator::allocate_slow(std::unique_lock<std::mutex>& lock, const request& req) {
  // Note [OOM ladder].
  for (int round = 0;; ++round) {
    if (block* b = search_or_new_segment(lock, req)) return b;
    ++stats_.num_alloc_retries;
    // Note [Releasing just enough]: first what one new segment for this request needs (with
    // expandable segments, the pages it needs mapped, from outside where it will go), then
    // everything unused.
    const std::size_t released = page_size_ != 0 && req.pool == pool_kind::large
                                     ? make_room_expandable(lock, req)
                                     : release_unused_segments(lock, minimal_segment_size(req));
    if (released != 0) {
      if (block* b = search_or_new_segment(lock, req)) return b;
    }
    release_unused_segments(lock);
    if (block* b = search_or_new_segment(lock, req)) return b;
    if (pending_events_total_ != 0 || unsynced_blocks_ != 0) {
      synchronize_pending(lock);
      release_unused_segments(lock);
      if (block* b = search_or_new_segment(lock, req)) return b;
    }
    if (round == max_reclaim_rounds) break;
    if (call_reclaimers(lock, req) != 0) continue;
    // Note [Bytes in flight]
    if (in_flight_bytes_ == 0) break;
    in_flight_settled_.wait(lock, [this] { return in_flight_bytes_ == 0; });
  }
  throw_oom(lock, req.bytes, req.size);
}

std::size_t caching_allocator::minimal_segment_size(const request& req) noexcept {
  return req.pool == pool_kind::small ? small_buffer : round_up(req.size, round_large);
}

block* caching_allocator::new_segment(std::unique_lock<std::mutex>& lock, const request& req) {
  // Note [Budget and segment sizes].
  const std::size_t preferred = segment_size(req.size);
  const std::size_t minimal = minimal_segment_size(req);
  const std::size_t candidates[2] = {preferred, minimal};
  const std::size_t candidate_count = preferred == minimal ? 1 : 2;
  for (std::size_t i = 0; i < candidate_count; ++i) {
    const std::size_t seg_size = candidates[i];
    const auto reserved = static_cast<std::size_t>(stats_.reserved_bytes.all().current);
    const std::size_t used = reserved + in_flight_bytes_;
    if (used > budget_ || seg_size > budget_ - used) continue;
    in_flight_bytes_ += seg_size;
    lock.unlock();
    void* ptr = nullptr;
    try {
      ptr = dev_.allocate_device(seg_size);
    } catch (...) {
      lock.lock();
      settle_in_flight_locked(seg_size);
      throw;
    }
    if (ptr != nullptr && hooks_) nvtx_pool_.register_segment(ptr, seg_size);
    lock.lock();
    settle_in_flight_locked(seg_size);
    if (ptr == nullptr) continue;
    block* b = nullptr;
    segment* seg = nullptr;
    const auto base = reinterpret_cast<std::uintptr_t>(ptr);
    try {
      pool_of(req.pool).add_stream(req.stream);
      b = new_block_object();
      auto [it, inserted] = segments_.try_emplace(base);
      seg = &it->second;
    } catch (...) {
      if (b != nullptr) recycle_block_object(b);
      lock.unlock();
      if (hooks_) nvtx_pool_.unregister_segment(ptr);
      dev_.free_device(ptr);
      lock.lock();
      throw;
    }
    ++stats_.num_device_allocs;
    seg->base = base;
    seg->size = seg_size;
    seg->pool = req.pool;
    seg->stream = req.stream;
    seg->first = b;
    b->address = base;
    b->size = seg_size;
    b->stream = req.stream;
    b->seg = seg;
    b->pool = req.pool;
    b->state = block_state::free;
    add(stats_.segment, req.pool, 1);
    add(stats_.reserved_bytes, req.pool, signed_size(seg_size));
    if (hooks_ && recorder_.enabled()) {
      trace_segment(event_kind::segment_map, base, seg_size, stats_.allocated_bytes.all().current,
                    stats_.reserved_bytes.all().current);
    }
    try {
      return take_block_locked(*b, req, /*in_pool=*/false);
    } catch (...) {
      // The segment stays cached as one free block; accounting is already consistent.
      pool_insert_locked(*b);
      throw;
    }
  }
  return nullptr;
}

block* caching_allocator::take_block_locked(block& b, const request& req, bool in_pool) {
  // Everything that may throw comes first, so that a failure leaves the state untouched.
  block* remainder = should_split(b, req.size) ? new_block_object() : nullptr;
  try {
    allocated_.insert(b.address, &b);
  } catch (...) {
    if (remainder != nullptr) recycle_block_object(remainder);
    throw;
  }

  if (in_pool) pool_erase_locked(b);
  if (remainder != nullptr) {
    remainder->address = b.address + req.size;
    remainder->size = b.size - req.size;
    remainder->stream = b.stream;
    remainder->seg = b.seg;
    remainder->pool = b.pool;
    remainder->state = block_state::free;
    remainder->prev = &b;
    remainder->next = b.next;
    if (b.next != nullptr) b.next->prev = remainder;
    b.next = remainder;
    b.size = req.size;
    pool_insert_locked(*remainder);
  }
  b.state = block_state::allocated;
  b.requested = req.bytes;
  count_take(stats_, b.pool, signed_size(b.size), signed_size(req.bytes));
  return &b;
}

block* caching_allocator::take_deferred_locked(const size_class_bins::popped_block& d,
                                               const request& req) {
  // Note [Fast bins as arrays]: nothing here loads from the block, whose line is likely cold;
  // its address and size come from the bin, and its fields are only written.
  block& b = *d.b;
  try {
    allocated_.insert(d.address, &b);
  } catch (...) {
    // Back where it was: the bin has room for it, having just given it up.
    (void)small_pool_.push_deferred(b);
    throw;
  }
  if (d.next.b != nullptr) {
    // Note [Pipelined frees]: the next request of this size will touch these two lines.
    __builtin_prefetch(d.next.b, 1);
    allocated_.prefetch(d.next.address);
  }
  left_fast_bin_locked(req.size);
  b.state = block_state::allocated;
  b.requested = req.bytes;
  count_take(stats_, pool_kind::small, signed_size(req.size), signed_size(req.bytes));
  return &b;
}

// --- free ------------------------------------------------------------------------------------

namespace {

void log_invalid_free(const void* ptr) noexcept {
  log().error(
      "caching_allocator: deallocate of {} which it did not allocate "
      "(double free or foreign pointer); ignored",
      ptr);
}

}  // namespace

void caching_allocator::deallocate(void* ptr) noexcept {
  if (ptr == nullptr) return;
  // Note [Profiling hooks]: before the block can be handed to another thread.
  if (hooks_) nvtx_pool_.unregister_block(ptr);
  const auto address = reinterpret_cast<std::uintptr_t>(ptr);
  const bool traced = hooks_ && recorder_.enabled();
  const double trace_ns = traced ? trace_time_ns() : -1;
  bool invalid = false;
  std::size_t size = 0;
  stream_t stream{};
  {
    std::lock_guard lock(mutex_);
    if (opts_.pipelined_frees && stream_use_blocks_ == 0) [[likely]] {
      // Note [Pipelined frees]: stage 3 for the oldest, 2 for the middle one, 1 for this one.
      if (frees_made_ - frees_applied_ == free_pipeline_depth) apply_oldest_free_locked();
      if (frees_made_ - frees_looked_up_ == free_pipeline_depth / 2) look_up_free_locked();
      free_pipeline_[frees_made_ % free_pipeline_depth] =
          pipelined_free{address, nullptr, trace_ns};
      ++frees_made_;
      allocated_.prefetch(address);
      return;
    }
    apply_frees_locked();
    block* b = allocated_.erase(address);
    if (b == nullptr) {
      ++stats_.num_invalid_frees;
      invalid = true;
    } else {
      size = b->size;
      stream = b->stream;
      release_allocated_locked(b);
    }
  }
  if (invalid) {
    log_invalid_free(ptr);
  } else if (traced) {
    recorder_.record_block_enabled(event_kind::free, trace_ns, address, size,
                                   static_cast<std::uintptr_t>(stream));
  }
}

void caching_allocator::release_allocated_locked(block* b) noexcept {
  const pool_kind kind = b->pool;
  sub(stats_.allocation, kind, 1);
  sub(stats_.allocated_bytes, kind, signed_size(b->size));
  if (!b->has_stream_uses) {
    free_block_locked(b);
  } else {
    --stream_use_blocks_;
    start_pending_locked(b);
  }
}

void caching_allocator::look_up_free_locked() noexcept {
  pipelined_free& f = free_pipeline_[frees_looked_up_ % free_pipeline_depth];
  ++frees_looked_up_;
  f.b = allocated_.erase(f.address);
  if (f.b != nullptr) {
    __builtin_prefetch(f.b, 1);
    return;
  }
  ++stats_.num_invalid_frees;
  // Rare, and the call that made it has returned: logged here, under the lock.
  log_invalid_free(reinterpret_cast<void*>(f.address));
}

void caching_allocator::apply_oldest_free_locked() noexcept {
  if (frees_looked_up_ == frees_applied_) look_up_free_locked();
  const pipelined_free f = free_pipeline_[frees_applied_ % free_pipeline_depth];
  ++frees_applied_;
  if (f.b == nullptr) return;  // invalid: counted by the look-up
  if (f.trace_ns >= 0) {
    // Traced when it was made: recorded even if the recorder was disabled since.
    recorder_.record_block_enabled(event_kind::free, f.trace_ns, f.address, f.b->size,
                                   static_cast<std::uintptr_t>(f.b->stream));
  }
  release_allocated_locked(f.b);
}

void caching_allocator::apply_frees_locked() noexcept {
  while (frees_applied_ != frees_made_) apply_oldest_free_locked();
}

void caching_allocator::apply_frees_locked() const noexcept {
  // Note [Pipelined frees]: bringing the books up to date changes nothing a caller can tell
  // apart, and a caching_allocator is never itself a const object.
  const_cast<caching_allocator*>(this)->apply_frees_locked();
}

void caching_allocator::start_pending_locked(block* b) noexcept {
  // Note [Stream-ordered reuse]; Note [Failed event records].
  b->state = block_state::pending;
  for (block::stream_use& use : b->stream_uses) {
    event_t event{};
    bool have_event = false;
    try {
      if (!spare_events_.empty()) {
        event = spare_events_.back();
        spare_events_.pop_back();
        have_event = true;
      } else {
        spare_events_.reserve(events_created_ + 1);
        event = dev_.create_event();
        ++events_created_;
        have_event = true;
      }
      dev_.record_event(event, use.stream);
    } catch (...) {
      if (have_event) spare_events_.push_back(event);  // capacity covers every event
      if (b->needs_sync_epoch == 0) {
        b->needs_sync_epoch = sync_epoch_;
        ++unsynced_blocks_;
      }
      continue;
    }
    stream_queue* q = queue_of(use.stream);  // created by record_stream
    use.event = event;
    use.recorded = true;
    use.owner = b;
    use.next = nullptr;
    if (q->tail != nullptr) {
      q->tail->next = &use;
    } else {
      q->head = &use;
    }
    q->tail = &use;
    ++b->pending_events;
    ++pending_events_total_;
  }
  if (b->pending_events == 0 && b->needs_sync_epoch == 0) free_block_locked(b);
}

void caching_allocator::free_block_locked(block* b) noexcept {
  const pool_kind kind = b->pool;
  const std::int64_t size = signed_size(b->size);
  count_release(stats_, kind, size, signed_size(b->requested));
  b->requested = 0;
  if (b->has_stream_uses) {
    b->stream_uses.clear();
    b->has_stream_uses = false;
  }
  if (kind == pool_kind::small && deferred_blocks_ < opts_.fast_bin_limit &&
      small_pool_.push_deferred(*b)) {
    // Note [Deferred coalescing]: a small-pool block is always split.
    b->state = block_state::deferred;
    ++deferred_blocks_;
    add(stats_.inactive_split, kind, 1);
    add(stats_.inactive_split_bytes, kind, size);
    return;
  }
  b->state = block_state::free;
  merge_and_insert_locked(b);
}

void caching_allocator::left_fast_bin_locked(std::size_t size) noexcept {
  // A deferred block is inactive split memory (small-pool blocks are always split): Note
  // [Deferred coalescing].
  --deferred_blocks_;
  sub(stats_.inactive_split, pool_kind::small, 1);
  sub(stats_.inactive_split_bytes, pool_kind::small, signed_size(size));
}

void caching_allocator::consolidate_locked(stream_t stream) noexcept {
  small_pool_.drain_deferred(stream, [this](block& b) {
    left_fast_bin_locked(b.size);
    b.state = block_state::free;
    merge_and_insert_locked(&b);
  });
}

void caching_allocator::consolidate_all_locked() noexcept {
  if (deferred_blocks_ == 0) return;
  small_pool_.drain_all_deferred([this](block& b) {
    left_fast_bin_locked(b.size);
    b.state = block_state::free;
    merge_and_insert_locked(&b);
  });
}

void caching_allocator::merge_and_insert_locked(block* b) noexcept {
  // Note [Pending blocks never merge]; deferred ones neither (Note [Deferred coalescing]).
  if (block* prev = b->prev; prev != nullptr && prev->is_free()) {
    pool_erase_locked(*prev);
    prev->size += b->size;
    prev->next = b->next;
    if (b->next != nullptr) b->next->prev = prev;
    recycle_block_object(b);
    b = prev;
  }
  if (block* next = b->next; next != nullptr && next->is_free()) {
    pool_erase_locked(*next);
    b->size += next->size;
    b->next = next->next;
    if (next->next != nullptr) next->next->prev = b;
    recycle_block_object(next);
  }
  pool_insert_locked(*b);
}

void caching_allocator::process_events_locked() {
  for (stream_queue& q : queues_) {
    while (q.head != nullptr) {
      block::stream_use* use = q.head;
      if (!dev_.query_event(use->event)) break;
      q.head = use->next;
      if (q.head == nullptr) q.tail = nullptr;
      spare_events_.push_back(use->event);  // capacity covers every event
      use->recorded = false;
      use->next = nullptr;
      --pending_events_total_;
      block* b = use->owner;
      if (--b->pending_events == 0 && b->needs_sync_epoch == 0) free_block_locked(b);
    }
  }
}

void caching_allocator::clear_unsynced_locked(std::uint64_t epoch) {
  // Collected first: freeing one block merges it with free neighbours, and flagged blocks are
  // pending, never free, so no collected block is merged away by another's release.
  std::vector<block*> ready;
  for (auto& [base, seg] : segments_) {
    for (block* b = seg.first; b != nullptr; b = b->next) {
      if (b->needs_sync_epoch != 0 && b->needs_sync_epoch <= epoch) ready.push_back(b);
    }
  }
  for (block* b : ready) {
    b->needs_sync_epoch = 0;
    --unsynced_blocks_;
    if (b->pending_events == 0) free_block_locked(b);
  }
}

void caching_allocator::synchronize_pending(std::unique_lock<std::mutex>& lock) {
  std::vector<event_t> tails;
  tails.reserve(queues_.size());
  for (const stream_queue& q : queues_) {
    if (q.tail != nullptr) tails.push_back(q.tail->event);
  }
  const std::uint64_t epoch = unsynced_blocks_ != 0 ? sync_epoch_++ : 0;
  lock.unlock();
  // Waiting for a stream's last pending event covers the earlier ones on that stream. If the
  // event was recycled and recorded again meanwhile, this waits longer, never too little.
  for (event_t e : tails) dev_.synchronize_event(e);
  if (epoch != 0) dev_.synchronize();
  lock.lock();
  if (epoch != 0) clear_unsynced_locked(epoch);
  process_events_locked();
}

// Note [Work in flight on released segments]
// A block freed on its own stream is free at once, while kernels enqueued on that stream before
// the free may still be using it. cudaFree waits for the device; the Device contract does not
// promise that (the simulator does not wait), so the allocator waits itself before giving the
// memory back. Only the segments' own streams need waiting for: a free block's last users are
// on its segment's stream (uses on other streams were recorded with record_stream, and such a
// block only became free once their events completed). So an event is recorded on each
// victim's stream and waited for; a device-wide synchronize would also wait for the swap
// engine's whole D2H queue, which is how a forward pass under a budget used to stall for
// hundreds of milliseconds behind swap-outs it did not need. If no event can be had, the
// device-wide synchronize is the fallback. A failed wait puts the segments back as they were.
//
// Note [Releasing just enough]
// The OOM ladder first releases what one new segment for the request needs (the smallest
// unused segment at least that big, else the largest ones until they add up), like PyTorch's
// release_available_cached_blocks, and only then everything unused: a cache cut for backward's
// sizes keeps most of its segments for the next backward, and each segment released is a
// cudaFree now and a cudaMalloc later.

std::vector<segment*> caching_allocator::pick_unused_segments_locked(std::size_t wanted) {
  std::vector<segment*> unused;
  for (auto& [base, seg] : segments_) {
    const block* b = seg.first;
    if (!seg.releasing && !seg.expandable && b->next == nullptr &&
        b->state == block_state::free) {
      unused.push_back(&seg);
    }
  }
  if (wanted == SIZE_MAX) return unused;
  // Note [Releasing just enough]: the smallest segment that covers `wanted` alone, else the
  // largest ones until they do (or all of them, if even that is not enough).
  std::sort(unused.begin(), unused.end(),
            [](const segment* a, const segment* b) { return a->size < b->size; });
  auto one = std::find_if(unused.begin(), unused.end(),
                          [&](const segment* seg) { return seg->size >= wanted; });
  if (one != unused.end()) return {*one};
  std::vector<segment*> picked;
  std::size_t total = 0;
  for (auto it = unused.rbegin(); it != unused.rend() && total < wanted; ++it) {
    picked.push_back(*it);
    total += (*it)->size;
  }
  return picked;
}

std::size_t caching_allocator::release_unused_segments(std::unique_lock<std::mutex>& lock,
                                                       std::size_t wanted) {
  ++stats_.num_cache_flushes;
  consolidate_all_locked();  // Note [Deferred coalescing]
  if (wanted == SIZE_MAX) small_pool_.shrink_deferred();  // Note [Fast bins as arrays]
  std::size_t total = release_whole_segments(lock, wanted);
  if (page_size_ != 0) {
    // Note [Expandable segments]: their free pages are given back the same way.
    if (total < wanted) total += unmap_free_pages(lock, wanted == SIZE_MAX ? SIZE_MAX : wanted - total);
    if (wanted == SIZE_MAX) release_empty_reservations(lock);
  }
  return total;
}

std::size_t caching_allocator::release_whole_segments(std::unique_lock<std::mutex>& lock,
                                                      std::size_t wanted) {
  const std::vector<segment*> victims = pick_unused_segments_locked(wanted);
  if (victims.empty()) return 0;
  std::vector<std::pair<std::uintptr_t, std::size_t>> released;
  released.reserve(victims.size());  // before anything changes, as it may throw
  std::vector<stream_t> streams;
  for (const segment* seg : victims) {
    if (std::find(streams.begin(), streams.end(), seg->stream) == streams.end()) {
      streams.push_back(seg->stream);
    }
  }
  // Out of the pools and the figures now, so that nobody allocates from them while the lock is
  // dropped; still in segments_ (marked releasing) until the device has them back, so that a
  // failed wait can put them back untouched.
  std::size_t total = 0;
  for (segment* seg : victims) {
    seg->releasing = true;
    pool_erase_locked(*seg->first);
    sub(stats_.segment, seg->pool, 1);
    sub(stats_.reserved_bytes, seg->pool, signed_size(seg->size));
    total += seg->size;
  }
  in_flight_bytes_ += total;  // still counted against the budget until the device has them
  const std::int64_t allocated_now = stats_.allocated_bytes.all().current;
  const std::int64_t reserved_now = stats_.reserved_bytes.all().current;
  if (std::exception_ptr failure = wait_for_streams(lock, streams)) {
    for (segment* seg : victims) {
      seg->releasing = false;
      add(stats_.segment, seg->pool, 1);
      add(stats_.reserved_bytes, seg->pool, signed_size(seg->size));
      pool_insert_locked(*seg->first);
    }
    settle_in_flight_locked(total);
    std::rethrow_exception(failure);
  }
  // Forgotten before the device has them back: once free_device returns, another thread's
  // allocate_device may hand out the same address, and its segment must not meet this one.
  for (segment* seg : victims) {
    released.emplace_back(seg->base, seg->size);
    recycle_block_object(seg->first);
    segments_.erase(seg->base);
  }
  lock.unlock();
  for (const auto& [base, size] : released) {
    void* ptr = reinterpret_cast<void*>(base);
    if (hooks_) nvtx_pool_.unregister_segment(ptr);
    dev_.free_device(ptr);
  }
  if (hooks_ && recorder_.enabled()) {
    for (std::size_t i = 0; i < released.size(); ++i) {
      // One counter sample for the whole release, on its last marker.
      const bool last = i + 1 == released.size();
      trace_segment(event_kind::segment_release, released[i].first, released[i].second,
                    last ? allocated_now : -1, last ? reserved_now : -1);
    }
  }
  lock.lock();
  settle_in_flight_locked(total);
  stats_.num_device_frees += released.size();
  return total;
}

std::exception_ptr caching_allocator::wait_for_streams(std::unique_lock<std::mutex>& lock,
                                                      const std::vector<stream_t>& streams) {
  // Note [Work in flight on released segments].
  std::vector<event_t> waits;
  const bool whole_device = !record_stream_waits_locked(streams, waits);
  lock.unlock();
  std::exception_ptr failure;
  try {
    if (whole_device) {
      dev_.synchronize();
    } else {
      for (event_t e : waits) dev_.synchronize_event(e);
    }
  } catch (...) {
    failure = std::current_exception();
  }
  lock.lock();
  spare_events_.insert(spare_events_.end(), waits.begin(), waits.end());  // capacity covers them
  return failure;
}

bool caching_allocator::record_stream_waits_locked(const std::vector<stream_t>& streams,
                                                   std::vector<event_t>& waits) noexcept {
  try {
    waits.reserve(streams.size());
    for (stream_t stream : streams) {
      event_t e{};
      if (!spare_events_.empty()) {
        e = spare_events_.back();
        spare_events_.pop_back();
      } else {
        spare_events_.reserve(events_created_ + 1);
        e = dev_.create_event();
        ++events_created_;
      }
      waits.push_back(e);  // reserved: cannot throw
      dev_.record_event(e, stream);
    }
    return true;
  } catch (...) {
    // No event to wait on (creating or recording one failed): wait for the whole device.
    return false;
  }
}

std::size_t caching_allocator::call_reclaimers(std::unique_lock<std::mutex>& lock,
                                               const request& req) {
  std::vector<reclaimer*> list;
  {
    std::lock_guard reclaim_lock(reclaim_mutex_);
    if (reclaimers_.empty()) return 0;
    list = reclaimers_;
    ++reclaim_calls_in_flight_;
  }
  lock.unlock();
  std::size_t freed = 0;
  std::exception_ptr failure;
  try {
    for (reclaimer* r : list) {
      freed += r->reclaim(req.size - std::min(freed, req.size), req.stream);
      if (freed >= req.size) break;
    }
  } catch (...) {
    failure = std::current_exception();
  }
  {
    std::lock_guard reclaim_lock(reclaim_mutex_);
    --reclaim_calls_in_flight_;
  }
  reclaim_done_.notify_all();
  if (failure) std::rethrow_exception(failure);
  lock.lock();
  return freed;
}

void caching_allocator::throw_oom(std::unique_lock<std::mutex>& lock, std::size_t bytes,
                                  std::size_t rounded) {
  ++stats_.num_ooms;
  consolidate_all_locked();  // the largest free block, as merged: Note [Deferred coalescing]
  oom_report report;
  report.requested = bytes;
  report.rounded = rounded;
  report.budget = budget_;
  report.budget_is_device_limit = opts_.device_limit != 0;
  report.allocated = static_cast<std::size_t>(stats_.allocated_bytes.all().current);
  report.reserved = static_cast<std::size_t>(stats_.reserved_bytes.all().current);
  report.max_split_size = opts_.max_split_size;
  for (const block_pool* pool : {&small_pool_, &large_pool_}) {
    pool->for_each([&](const block& b) {
      report.largest_free_block = std::max(report.largest_free_block, b.size);
    });
  }
  lock.unlock();
  report.device_name = dev_.name();
  report.device_ordinal = dev_.ordinal();
  try {
    report.physical = dev_.memory();
  } catch (...) {
    report.physical = {};  // the message is about memory; a failing query only blanks a line
  }
  if (hooks_ && recorder_.enabled()) {
    const double t = trace_time_ns();
    recorder_.record(trace_event::marker(event_kind::oom, t, trace_track::host, 0, bytes));
    recorder_.record(trace_event::device_counter(t, static_cast<double>(report.allocated),
                                                 static_cast<double>(report.reserved)));
  }
  if (hooks_ && nvtx_enabled()) {
    const std::string note = fmt::format("gpuswap out of memory: {} bytes requested", bytes);
    nvtx_mark_message(nvtx_category::alloc, note.c_str(), bytes);
  }
  std::function<external_memory_report()> reporter;
  {
    std::lock_guard reclaim_lock(reclaim_mutex_);
    reporter = reporter_;
  }
  if (reporter) {
    try {
      report.external = reporter();
    } catch (...) {
      report.external.reset();
    }
  }
  throw_out_of_memory(format_oom_message(report));
}

// --- record_stream, empty_cache --------------------------------------------------------------

void caching_allocator::record_stream(void* ptr, stream_t stream) {
  std::lock_guard lock(mutex_);
  apply_frees_locked();
  block* b = allocated_.find(reinterpret_cast<std::uintptr_t>(ptr));
  if (b == nullptr || stream == b->stream) return;
  for (const block::stream_use& use : b->stream_uses) {
    if (use.stream == stream) return;
  }
  if (queue_of(stream) == nullptr) queues_.push_back(stream_queue{stream, nullptr, nullptr});
  block::stream_use use;
  use.stream = stream;
  b->stream_uses.push_back(use);
  if (!b->has_stream_uses) ++stream_use_blocks_;
  b->has_stream_uses = true;
}

void caching_allocator::empty_cache() {
  std::unique_lock lock(mutex_);
  apply_frees_locked();
  if (pending_events_total_ != 0 || unsynced_blocks_ != 0) synchronize_pending(lock);
  const std::size_t released = release_unused_segments(lock);
  lock.unlock();
  if (hooks_) nvtx_mark(nvtx_category::alloc, nvtx_name::empty_cache, released);
}

// --- profiling hooks (Note [Profiling hooks]) ------------------------------------------------

void caching_allocator::set_trace_hooks(bool on) {
  const std::size_t tracked = nvtx_pool_.segment_count();  // its own lock, before mutex_
  std::lock_guard lock(mutex_);
  apply_frees_locked();
  if (!allocated_.empty() || tracked != 0) {
    throw_error(fmt::format(
        "caching_allocator::set_trace_hooks: needs no allocated block ({} are) and no NVTX "
        "tool tracking the pool ({} segments registered)",
        allocated_.size(), tracked));
  }
  hooks_ = on;
}

double caching_allocator::trace_time_ns() const noexcept {
  try {
    return dev_.host_time_ns_fast();
  } catch (...) {
    return 0;  // a clock that fails (a lock error) costs the event its time, not the process
  }
}

void caching_allocator::trace_alloc(void* ptr, std::size_t size, stream_t stream) noexcept {
  recorder_.record_block(event_kind::alloc, trace_time_ns(), reinterpret_cast<std::uintptr_t>(ptr),
                         size, static_cast<std::uintptr_t>(stream));
}

void caching_allocator::trace_segment(event_kind kind, std::uintptr_t base, std::size_t size,
                                      std::int64_t allocated, std::int64_t reserved) noexcept {
  const double t = trace_time_ns();
  recorder_.record(trace_event::marker(kind, t, trace_track::host, base, size));
  if (allocated >= 0) {
    recorder_.record(trace_event::device_counter(t, static_cast<double>(allocated),
                                                 static_cast<double>(reserved)));
  }
}

// --- bookkeeping helpers ---------------------------------------------------------------------

// Note [Hot path]
// In the steady state of a loop that repeats its sizes, a small request is: lock, pop its
// stream's fast bin for its exact size (Note [Deferred coalescing]), one block_index insert,
// stat updates; a free without record_stream is: lock, one block_index erase, one push, stat
// updates. Otherwise a cache hit is: best_fit (constant time in the small pool, Note
// [Segregated fit]; one lower_bound in the large pool's tree), maybe a split (a spare block
// object and one insert), the index insert; and a free merges with free neighbours and does one
// insert. Nothing allocates in the steady state (block objects, index slots and events are
// recycled), nothing logs, no std::function is built, and the rare features (record_stream's
// events, the profiling hooks) cost a predictable branch each. So the work per call does not
// grow with the number of blocks; what does grow is its memory cost: with 100,000 live blocks
// the block objects (~19 MB) and the index (4 MB) no longer fit in the core's L2, and a call
// in random order misses on the index slot and on the block. The mutex's atomic operations
// order memory, so consecutive calls' misses do not overlap; within a call, a fast-bin
// allocation overlaps its two (the bin carries the block's address, Note [Block layout]) while
// a free cannot (the block is found through its slot). Hence a flat index (one probe, usually
// one cache line), the fast path confined to the block's first cache line, no neighbour
// touched on the fast path at all, and the pipeline of Note [Pipelined frees], which spreads a
// free over three calls and prefetches ahead of each. Measured with `gpuswap bench alloc`
// (thread CPU ns per alloc+free pair, every request a cache hit, medians on a shared 2-core VM),
// eager coalescing then fast bins: 1,000 live 106-116 -> 57-60; 10,000 145-151 -> 64-67;
// 100,000 403-428 -> 261-271, where the misses were most of what was left (pipelined frees:
// 238 -> 108).

caching_allocator::block_index::block_index() {
  slots_.resize(1024);
  shift_ = 64 - 10;
}

std::size_t caching_allocator::block_index::home(std::uintptr_t address) const noexcept {
  // Addresses are multiples of 512; Fibonacci hashing spreads the remaining bits.
  return static_cast<std::size_t>(((address >> 9) * 0x9E3779B97F4A7C15ull) >> shift_);
}

void caching_allocator::block_index::grow() {
  std::vector<slot> old(slots_.size() * 2);
  old.swap(slots_);
  --shift_;
  const std::size_t mask = slots_.size() - 1;
  for (const slot& s : old) {
    if (s.address == 0) continue;
    std::size_t i = home(s.address);
    while (slots_[i].address != 0) i = (i + 1) & mask;
    slots_[i] = s;
  }
}

void caching_allocator::block_index::insert(std::uintptr_t address, block* b) {
  if ((size_ + 1) * 2 > slots_.size()) grow();  // load factor <= 1/2: short probe runs
  const std::size_t mask = slots_.size() - 1;
  std::size_t i = home(address);
  while (slots_[i].address != 0) i = (i + 1) & mask;
  slots_[i] = slot{address, b};
  ++size_;
}

void caching_allocator::block_index::prefetch(std::uintptr_t address) const noexcept {
  __builtin_prefetch(&slots_[home(address)], 1);
}

block* caching_allocator::block_index::find(std::uintptr_t address) const noexcept {
  if (address == 0) return nullptr;
  const std::size_t mask = slots_.size() - 1;
  for (std::size_t i = home(address);; i = (i + 1) & mask) {
    if (slots_[i].address == address) return slots_[i].value;
    if (slots_[i].address == 0) return nullptr;
  }
}

block* caching_allocator::block_index::erase(std::uintptr_t address) noexcept {
  if (address == 0) return nullptr;
  const std::size_t mask = slots_.size() - 1;
  std::size_t i = home(address);
  while (slots_[i].address != address) {
    if (slots_[i].address == 0) return nullptr;
    i = (i + 1) & mask;
  }
  block* found = slots_[i].value;
  // Backward-shift deletion: pull later entries of the run into the hole when their home
  // position allows, so that no tombstones accumulate.
  for (std::size_t j = (i + 1) & mask; slots_[j].address != 0; j = (j + 1) & mask) {
    const std::size_t h = home(slots_[j].address);
    // Move j into the hole at i unless its home lies cyclically in (i, j].
    const bool stays = i <= j ? (i < h && h <= j) : (i < h || h <= j);
    if (!stays) {
      slots_[i] = slots_[j];
      i = j;
    }
  }
  slots_[i] = slot{};
  --size_;
  return found;
}

block* caching_allocator::new_block_object() {
  if (!spare_blocks_.empty()) {
    block* b = spare_blocks_.back();
    spare_blocks_.pop_back();
    return b;
  }
  spare_blocks_.reserve(block_storage_.size() + 1);  // so that recycling never allocates
  return &block_storage_.emplace_back();
}

void caching_allocator::recycle_block_object(block* b) noexcept {
  b->address = 0;
  b->size = 0;
  b->requested = 0;
  b->stream = stream_t{};
  b->state = block_state::free;
  b->pending_events = 0;
  b->needs_sync_epoch = 0;
  b->seg = nullptr;
  b->pool = pool_kind::small;
  b->prev = nullptr;
  b->next = nullptr;
  b->stream_uses.clear();
  b->has_stream_uses = false;
  spare_blocks_.push_back(b);
}

caching_allocator::stream_queue* caching_allocator::queue_of(stream_t stream) noexcept {
  for (stream_queue& q : queues_) {
    if (q.stream == stream) return &q;
  }
  return nullptr;
}

void caching_allocator::pool_insert_locked(block& b) noexcept {
  pool_of(b.pool).insert(b);
  if (b.is_split()) {
    add(stats_.inactive_split, b.pool, 1);
    add(stats_.inactive_split_bytes, b.pool, signed_size(b.size));
  }
}

void caching_allocator::pool_erase_locked(block& b) noexcept {
  pool_of(b.pool).erase(b);
  if (b.is_split()) {
    sub(stats_.inactive_split, b.pool, 1);
    sub(stats_.inactive_split_bytes, b.pool, signed_size(b.size));
  }
}

// --- observers -------------------------------------------------------------------------------

allocator_stats caching_allocator::stats() const {
  std::lock_guard lock(mutex_);
  apply_frees_locked();
  return stats_;
}

void caching_allocator::reset_peak_stats() {
  std::lock_guard lock(mutex_);
  apply_frees_locked();
  stats_.reset_peak();
}

std::size_t caching_allocator::allocated_size(const void* ptr) const {
  std::lock_guard lock(mutex_);
  apply_frees_locked();
  const block* b = allocated_.find(reinterpret_cast<std::uintptr_t>(ptr));
  return b != nullptr ? b->size : 0;
}

void caching_allocator::add_reclaimer(reclaimer* r) {
  if (r == nullptr) return;
  std::lock_guard lock(reclaim_mutex_);
  if (std::find(reclaimers_.begin(), reclaimers_.end(), r) == reclaimers_.end()) {
    reclaimers_.push_back(r);
  }
}

void caching_allocator::remove_reclaimer(reclaimer* r) {
  std::unique_lock lock(reclaim_mutex_);
  reclaimers_.erase(std::remove(reclaimers_.begin(), reclaimers_.end(), r), reclaimers_.end());
  // A call that copied the list before the removal may still be using r.
  reclaim_done_.wait(lock, [this] { return reclaim_calls_in_flight_ == 0; });
}

void caching_allocator::set_external_memory_reporter(
    std::function<external_memory_report()> reporter) {
  std::lock_guard lock(reclaim_mutex_);
  reporter_ = std::move(reporter);
}

nlohmann::json caching_allocator::snapshot() const {
  nlohmann::json out;
  out["device"] = dev_.name();
  out["budget"] = budget_;
  nlohmann::json segments = nlohmann::json::array();
  allocator_stats copy;
  {
    std::lock_guard lock(mutex_);
    apply_frees_locked();
    copy = stats_;
    for (const auto& [base, seg] : segments_) {
      if (seg.releasing) continue;  // no longer counted: on its way back to the device
      nlohmann::json blocks = nlohmann::json::array();
      for (const block* b = seg.first; b != nullptr; b = b->next) {
        blocks.push_back({{"address", b->address},
                          {"size", b->size},
                          {"requested", b->requested},
                          {"state", state_name(b->state)},
                          {"stream", static_cast<std::uintptr_t>(b->stream)}});
      }
      segments.push_back({{"address", seg.base},
                          {"size", seg.size},
                          {"pool", seg.pool == pool_kind::small ? "small" : "large"},
                          {"stream", static_cast<std::uintptr_t>(seg.stream)},
                          {"expandable", seg.expandable},
                          {"mapped", seg.expandable ? seg.mapped : seg.size},
                          {"blocks", std::move(blocks)}});
    }
  }
  out["stats"] = copy.to_json();
  out["segments"] = std::move(segments);
  return out;
}

std::string caching_allocator::validate() const {
  std::lock_guard lock(mutex_);
  apply_frees_locked();
  std::string problems;
  auto fail = [&problems](std::string line) {
    problems += line;
    problems += '\n';
  };

  allocator_stats expect;  // recomputed current values
  const auto count = [](stat_array& a, pool_kind kind, std::int64_t n) { add(a, kind, n); };
  std::size_t free_blocks[2] = {0, 0};
  std::size_t allocated_blocks = 0;
  std::size_t stream_use_blocks = 0;
  std::size_t deferred_blocks = 0;
  std::size_t pending_events = 0;
  std::size_t unsynced = 0;

  for (const auto& [base, seg] : segments_) {
    if (seg.releasing) continue;  // out of the pools and figures until release ends
    if (seg.base != base) fail(fmt::format("segment {:#x}: keyed as {:#x}", seg.base, base));
    count(expect.segment, seg.pool, 1);
    count(expect.reserved_bytes, seg.pool, signed_size(seg.expandable ? seg.mapped : seg.size));
    std::size_t unmapped_bytes = 0;  // Note [Expandable segments]
    std::uintptr_t expected_address = seg.base;
    const block* prev = nullptr;
    for (const block* b = seg.first; b != nullptr; prev = b, b = b->next) {
      auto bad = [&](bool broken, const char* what) {
        if (broken)
          fail(fmt::format("block {:#x} of segment {:#x}: {}", b->address, seg.base, what));
      };
      bad(b->address != expected_address, "does not start where its prev ends");
      bad(b->prev != prev, "prev link broken");
      bad(b->seg != &seg || b->pool != seg.pool, "points at another segment");
      bad(b->in_pool() != (b->state == block_state::free), "pool link disagrees with state");
      bad(b->stream != seg.stream, "stream differs from its segment's");
      bad(b->size == 0 || b->size % min_block_size != 0, "bad size");
      bad(b->has_stream_uses == b->stream_uses.empty(), "has_stream_uses is stale");
      expected_address = b->address + b->size;
      const bool linked = b->in_pool();
      switch (b->state) {
        case block_state::free:
          ++free_blocks[seg.pool == pool_kind::small ? 0 : 1];
          bad(!linked || !pool_of(seg.pool).contains(*b), "free but not in its pool");
          bad(b->requested != 0 || !b->stream_uses.empty(), "free with leftovers");
          bad(b->pending_events != 0 || b->needs_sync_epoch != 0, "free but pending");
          bad(prev != nullptr && prev->state == block_state::free,
              "free next to a free block (not merged)");
          if (b->is_split()) {
            count(expect.inactive_split, seg.pool, 1);
            count(expect.inactive_split_bytes, seg.pool, signed_size(b->size));
          }
          break;
        case block_state::deferred:
          ++deferred_blocks;
          bad(linked, "deferred but in a pool");
          bad(seg.pool != pool_kind::small, "deferred outside the small pool");
          bad(b->requested != 0 || !b->stream_uses.empty() || b->has_stream_uses,
              "deferred with leftovers");
          bad(b->pending_events != 0 || b->needs_sync_epoch != 0, "deferred but pending");
          bad(!b->is_split(), "deferred but not split");
          count(expect.inactive_split, seg.pool, 1);
          count(expect.inactive_split_bytes, seg.pool, signed_size(b->size));
          break;
        case block_state::allocated: {
          ++allocated_blocks;
          if (b->has_stream_uses) ++stream_use_blocks;
          bad(linked, "allocated but in a pool");
          bad(allocated_.find(b->address) != b, "allocated but not in the map");
          bad(b->pending_events != 0 || b->needs_sync_epoch != 0, "allocated but pending");
          count(expect.allocation, seg.pool, 1);
          count(expect.allocated_bytes, seg.pool, signed_size(b->size));
          count(expect.active, seg.pool, 1);
          count(expect.active_bytes, seg.pool, signed_size(b->size));
          count(expect.requested_bytes, seg.pool, signed_size(b->requested));
          break;
        }
        case block_state::unmapped:
        case block_state::unmapping:
          unmapped_bytes += b->size;
          bad(!seg.expandable, "unmapped in a segment that is not expandable");
          bad(linked, "unmapped but in a pool");
          bad(page_size_ == 0 || b->address % page_size_ != 0 || b->size % page_size_ != 0,
              "unmapped but not whole pages");
          bad(b->requested != 0 || b->has_stream_uses || b->pending_events != 0 ||
                  b->needs_sync_epoch != 0,
              "unmapped with leftovers");
          bad(b->state == block_state::unmapped && prev != nullptr &&
                  prev->state == block_state::unmapped,
              "unmapped next to an unmapped block (not merged)");
          break;
        case block_state::pending: {
          bad(linked, "pending but in a pool");
          bad(allocated_.find(b->address) != nullptr, "pending but in the map");
          bad(b->pending_events == 0 && b->needs_sync_epoch == 0, "pending on nothing");
          std::size_t recorded = 0;
          for (const block::stream_use& use : b->stream_uses) recorded += use.recorded ? 1 : 0;
          bad(recorded != b->pending_events, "pending_events does not match its uses");
          pending_events += b->pending_events;
          unsynced += b->needs_sync_epoch != 0 ? 1 : 0;
          count(expect.active, seg.pool, 1);
          count(expect.active_bytes, seg.pool, signed_size(b->size));
          count(expect.requested_bytes, seg.pool, signed_size(b->requested));
          break;
        }
      }
    }
    if (expected_address != seg.base + seg.size) {
      fail(fmt::format("segment {:#x}: blocks do not tile it", seg.base));
    }
    if (seg.expandable && seg.mapped + unmapped_bytes != seg.size) {
      fail(fmt::format("expandable segment {:#x}: {} bytes mapped and {} unmapped, size {}",
                       seg.base, seg.mapped, unmapped_bytes, seg.size));
    }
  }
  if (small_pool_.size() != free_blocks[0]) fail("small pool holds blocks that are not free");
  if (large_pool_.size() != free_blocks[1]) fail("large pool holds blocks that are not free");
  if (allocated_.size() != allocated_blocks) fail("allocated map holds blocks not allocated");
  if (stream_use_blocks_ != stream_use_blocks) {
    fail(fmt::format("{} allocated blocks have record_stream uses, counted {}", stream_use_blocks,
                     stream_use_blocks_));
  }
  std::size_t in_fast_bins = 0;
  small_pool_.for_each_deferred([&](stream_t stream, const block& b) {
    ++in_fast_bins;
    if (b.state != block_state::deferred || b.stream != stream || b.pool != pool_kind::small) {
      fail(fmt::format("fast bin of stream {:#x} holds block {:#x}, which is not a deferred "
                       "block of that stream",
                       static_cast<std::uintptr_t>(stream), b.address));
    }
  });
  if (!small_pool_.deferred_links_consistent()) {
    fail("a fast-bin link carries another block's address, or a block is in another size's bin");
  }
  if (in_fast_bins != deferred_blocks || deferred_blocks != deferred_blocks_) {
    fail(fmt::format("deferred blocks: {} in fast bins, {} in segments, {} counted", in_fast_bins,
                     deferred_blocks, deferred_blocks_));
  }
  std::size_t queued = 0;
  for (const stream_queue& q : queues_) {
    const block::stream_use* last = nullptr;
    for (const block::stream_use* u = q.head; u != nullptr; last = u, u = u->next) {
      ++queued;
      if (u->stream != q.stream || !u->recorded) fail("pending queue holds a foreign entry");
    }
    if (last != q.tail) fail("pending queue tail is stale");
  }
  if (queued != pending_events || pending_events != pending_events_total_) {
    fail(fmt::format("pending events: {} queued, {} on blocks, {} counted", queued, pending_events,
                     pending_events_total_));
  }
  if (unsynced != unsynced_blocks_) fail("unsynced block count is off");

  auto check = [&](const char* name, const stat_array& have, const stat_array& want) {
    for (std::size_t i = 0; i < stat_pool_count; ++i) {
      const stat& h = have.by_pool[i];
      if (h.current != want.by_pool[i].current) {
        fail(fmt::format("stat {}[{}]: current {} but the blocks say {}", name, i, h.current,
                         want.by_pool[i].current));
      }
      if (h.allocated - h.freed != h.current || h.peak < h.current || h.current < 0) {
        fail(
            fmt::format("stat {}[{}]: inconsistent {{current {}, peak {}, allocated {}, freed {}}}",
                        name, i, h.current, h.peak, h.allocated, h.freed));
      }
    }
  };
  check("allocation", stats_.allocation, expect.allocation);
  check("segment", stats_.segment, expect.segment);
  check("active", stats_.active, expect.active);
  check("inactive_split", stats_.inactive_split, expect.inactive_split);
  check("allocated_bytes", stats_.allocated_bytes, expect.allocated_bytes);
  check("reserved_bytes", stats_.reserved_bytes, expect.reserved_bytes);
  check("active_bytes", stats_.active_bytes, expect.active_bytes);
  check("inactive_split_bytes", stats_.inactive_split_bytes, expect.inactive_split_bytes);
  check("requested_bytes", stats_.requested_bytes, expect.requested_bytes);
  const auto reserved = static_cast<std::size_t>(stats_.reserved_bytes.all().current);
  if (reserved + in_flight_bytes_ > budget_) {
    fail(fmt::format("reserved {} + in flight {} exceed the budget {}", reserved, in_flight_bytes_,
                     budget_));
  }
  return problems;
}

}  // namespace gpuswap
