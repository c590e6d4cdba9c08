#include "allocator/swap_engine.hpp"

#include <algorithm>

#include "core/errors.hpp"
#include "core/logging.hpp"
#include "profiler/device_timeline.hpp"
#include "profiler/event_recorder.hpp"
#include "profiler/nvtx_ranges.hpp"

namespace gpuswap {

// Note [Swap ordering]
// Every cross-stream hazard of a swap has one event that guards it:
//   1. D2H reads what the producer wrote: swap_out records an event on the producer stream and
//      the D2H stream waits for it (and for the buffer's own H2D, if it is still arriving).
//   2. The device block is not reused while the D2H reads it: swap_out calls
//      caching_allocator::record_stream(block, D2H) before deallocate, so the allocator keeps the
//      block until the D2H's work is done (tests: swap_engine_ordering_test, "reuse").
//   3. The H2D reads complete host bytes: bring_in makes the H2D stream wait for the D2H's done
//      event when the swap-out is still in flight.
//   4. The pinned buffer is not reused while a copy touches it: pinned_host_pool::record_stream
//      for the D2H and the H2D before it is given back.
//   5. The consumer reads complete device bytes: acquire makes the consumer stream wait for the
//      H2D's done event (tests: swap_engine_ordering_test, "prefetch").
//   6. Later users of the block: release records the consumer stream on the block, and a
//      block brought in is not reused under its own H2D: a stream that waited for the H2D is
//      recorded on it, or the H2D stream itself (Note [Guarding a block brought in]).
//
// Note [Locking]
// mutex_ is never held while calling caching_allocator::allocate: a short allocator calls
// reclaim(), which takes mutex_. Creating a buffer and bringing one in therefore drop the lock
// around allocate and re-find the buffer afterwards (it may have been destroyed meanwhile; a
// buffer being brought in is in state swapping_in, which nothing else moves). The allocator
// never calls the engine while holding its own lock, so calling deallocate / record_stream with
// mutex_ held is safe, as is calling the pinned pool, which calls nobody. The one blocking call
// under mutex_ is the recovery from a failed event record after a copy was enqueued
// (synchronize_stream): a device that fails there is already in trouble, and waiting is the only
// way to know the copy finished.

// Note [Guarding a block brought in]
// The H2D writes a block allocated on the home stream, so until some stream the allocator
// orders the block's reuse after has waited for that copy, the block must not be reused when
// freed. Recording the H2D stream on the block does that, but the allocator's event is taken
// at the free, on the H2D stream as it is then: behind every prefetch issued since, which is
// the lookahead's whole queue. So a block freed in backward stayed pending until the copies
// of tensors needed several steps later had ended: ResNet-50 at batch 256 under half its peak
// (Titan X) found 4.7 GiB of such blocks pending and no room for an 822 MB prefetch at
// backward step 312, which became a 137 ms demand stall at step 316 and delayed every swap-in
// behind it. The copy needs no such guard once it is known to be done (poll) or once a stream
// the free is ordered by has waited for its event: acquire's consumer, which is the home
// stream (whose own reuse is in order) or is recorded at release. Only a buffer destroyed
// before either happens records the H2D stream, at its free, as before.
//
// Note [NVTX in the engine]
// The engine has no threads: copies are enqueued, and stalls measured, on the threads that call
// it. So its NVTX ranges wrap the enqueueing (swap_out, swap_in on demand, prefetch), on the
// caller's row next to the caller's own ranges, each with the byte count, buffer id and layer;
// an eviction is a mark after its swap_out range, and a stall a mark emitted when poll
// finds that a consumer waited longer than the threshold (the wait itself is on the device, on
// no host thread's row). The copies themselves appear on the copy streams' rows of Nsight's CUDA
// trace; the engine names those two streams (device::name_stream: NVTX's name for a CUDA
// stream), and Nsight Systems can project NVTX ranges that enclose CUDA calls onto the GPU
// rows where that work ran, which puts the swap ranges on the copy streams' rows too. A
// library should not rename its host's threads, so the engine names a calling thread's row
// only when swap_engine_options::nvtx_thread_name asks it to, once per thread.

namespace {

double to_ns(double ms) { return ms * 1e6; }

}  // namespace

std::string_view to_string(buffer_state s) noexcept {
  switch (s) {
    case buffer_state::device: return "device";
    case buffer_state::swapping_out: return "swapping_out";
    case buffer_state::host: return "host";
    case buffer_state::swapping_in: return "swapping_in";
  }
  return "?";
}

swap_engine::swap_engine(device& dev, caching_allocator& alloc, pinned_host_pool& host_pool,
                         swap_engine_options options, device_timeline* timeline)
    : dev_(dev), alloc_(alloc), host_pool_(host_pool), opts_(options), timeline_(timeline) {
  d2h_ = dev_.create_stream(stream_priority::high);
  h2d_ = dev_.create_stream(stream_priority::high);
  // Note [NVTX in the engine]: the rows the copies run on, by name in Nsight Systems.
  dev_.name_stream(d2h_, "gpuswap swap-out (D2H)");
  dev_.name_stream(h2d_, "gpuswap swap-in (H2D)");
  alloc_.add_reclaimer(this);
}

swap_engine::~swap_engine() {
  alloc_.remove_reclaimer(this);
  try {
    synchronize();
  } catch (const std::exception& e) {
    log().error("swap_engine: waiting for copies at shutdown failed: {}", e.what());
  }
  std::vector<buffer_id> ids;
  {
    std::lock_guard lock(mutex_);
    for (const auto& [id, b] : buffers_) ids.push_back(id);
  }
  for (buffer_id id : ids) destroy(id);
  std::lock_guard lock(mutex_);
  for (event_t e : all_events_) dev_.destroy_event(e);
  dev_.destroy_stream(d2h_);
  dev_.destroy_stream(h2d_);
}

swap_engine::buffer& swap_engine::get_locked(buffer_id id, const char* what) {
  auto it = buffers_.find(id);
  if (it == buffers_.end()) {
    throw_error(fmt::format("swap_engine::{}: no buffer {}", what, id));
  }
  return it->second;
}

event_t swap_engine::take_event_locked() {
  if (!spare_events_.empty()) {
    event_t e = spare_events_.back();
    spare_events_.pop_back();
    return e;
  }
  all_events_.reserve(all_events_.size() + 1);
  spare_events_.reserve(all_events_.size() + 1);
  event_t e = dev_.create_event();
  all_events_.push_back(e);
  return e;
}

void swap_engine::give_event_locked(event_t e) noexcept {
  spare_events_.push_back(e);  // capacity reserved in take_event_locked
}

// Note [Waiting for swap-outs in order]
// A swap-out gives its device block back when its D2H ends (Note [Swap ordering] 2), so under
// a budget the memory a new buffer needs is often in blocks whose copies are still running.
// The allocator's own answer (Note [OOM ladder]) is to wait for every pending free, i.e. for
// the last swap-out enqueued, and before that to release its unused segments behind a
// device-wide synchronize, which also waits for every copy: in a forward pass that offloads
// faster than the D2H engine drains, that is hundreds of milliseconds of compute standing
// still (ResNet-50 at batch 256 on a Titan X under half its peak: 662 ms of host wait at one
// allocation, 414 ms of it idle compute). The D2H engine completes swap-outs in the order they
// were issued, so the engine waits for them one at a time, oldest first, and retries what the
// cache and the budget can serve (try_allocate) after each; only when none is left in flight
// does the allocator's ladder (and eviction) run. That is also what the planner's model
// assumes (Note [The iteration model]).
void* swap_engine::allocate_after_swap_outs(std::size_t bytes, stream_t stream) {
  for (;;) {
    if (void* p = alloc_.try_allocate(bytes, stream)) return p;
    event_t oldest{};
    bool any = false;
    {
      std::lock_guard lock(mutex_);
      poll_locked();
      std::uint64_t best = UINT64_MAX;
      for (const pending_copy& c : copies_) {
        if (c.out && c.seq < best) {
          best = c.seq;
          oldest = c.done;
          any = true;
        }
      }
    }
    if (!any) break;
    // The event stays ours while its copy is pending (only poll_locked gives it back); if it
    // was given back and recorded again meanwhile, this waits longer, never too little.
    dev_.synchronize_event(oldest);
    poll();
  }
  return alloc_.allocate(bytes, stream);  // may call reclaim()
}

buffer_id swap_engine::create(std::size_t bytes, stream_t stream, int layer) {
  void* ptr = allocate_after_swap_outs(bytes, stream);  // without mutex_: may call reclaim()
  std::lock_guard lock(mutex_);
  const buffer_id id = next_id_++;
  buffer& b = buffers_[id];
  b.bytes = bytes;
  b.layer = layer;
  b.dev = ptr;
  b.block_stream = stream;
  b.last_stream = stream;
  b.last_use = ++tick_;
  ++stats_.live_buffers;
  return id;
}

void swap_engine::destroy(buffer_id id) noexcept {
  std::lock_guard lock(mutex_);
  auto it = buffers_.find(id);
  if (it == buffers_.end()) return;
  buffer& b = it->second;
  // Streams that used the block were recorded at release, and the H2D stream guards it while
  // nothing else waited for the copy that brought it in, so the allocator holds it until they
  // are done (Note [Swap ordering] 6, Note [Guarding a block brought in]).
  if (b.dev != nullptr) {
    if (b.h2d_guard) alloc_.record_stream(b.dev, h2d_);
    alloc_.deallocate(b.dev);
  }
  if (b.host != nullptr) {
    host_pool_.deallocate(b.host);
    if (b.state == buffer_state::host || b.state == buffer_state::swapping_out) {
      stats_.bytes_on_host -= b.bytes;
    }
  }
  buffers_.erase(it);
  --stats_.live_buffers;
  // Copies still in flight keep their events in copies_ and resolve without the buffer.
}

void* swap_engine::acquire(buffer_id id, stream_t consumer) {
  std::unique_lock lock(mutex_);
  poll_locked();
  {
    buffer& b = get_locked(id, "acquire");
    if (b.state == buffer_state::host || b.state == buffer_state::swapping_out) {
      bring_in(lock, id, /*demand=*/true);
    }
  }
  buffer& b = get_locked(id, "acquire");
  b.last_use = ++tick_;
  ++b.pins;
  if (b.has_arrived_event && !opts_.unsafe_testing.skip_consumer_wait) {
    // Note [Swap ordering] 5, timed: the consumer's wait is what the events around it measure.
    event_t before = take_event_locked();
    event_t after = take_event_locked();
    try {
      dev_.record_event(before, consumer);
      dev_.wait_event(consumer, b.arrived);
      dev_.record_event(after, consumer);
    } catch (...) {
      // Without the timing events the wait itself must still happen.
      give_event_locked(before);
      give_event_locked(after);
      --b.pins;
      dev_.wait_event(consumer, b.arrived);
      ++b.pins;
      b.h2d_guard = false;
      b.last_stream = consumer;
      return b.dev;
    }
    stalls_.push_back(pending_stall{id, b.layer, b.bytes, consumer, before, after});
    b.h2d_guard = false;  // the consumer waited: Note [Guarding a block brought in]
  }
  b.last_stream = consumer;
  return b.dev;
}

void swap_engine::release(buffer_id id, stream_t consumer) {
  std::lock_guard lock(mutex_);
  buffer& b = get_locked(id, "release");
  if (b.pins > 0) --b.pins;
  if (b.dev != nullptr && consumer != b.block_stream) alloc_.record_stream(b.dev, consumer);
  b.last_stream = consumer;
}

bool swap_engine::swap_out(buffer_id id, stream_t producer) {
  std::lock_guard lock(mutex_);
  poll_locked();
  buffer& b = get_locked(id, "swap_out");
  return swap_out_locked(id, b, producer, /*eviction=*/false);
}

void swap_engine::nvtx_name_caller() const noexcept {
  // Note [NVTX in the engine]. Per thread, not per engine: one name per row is all Nsight keeps.
  thread_local bool named = false;
  if (named || opts_.nvtx_thread_name.empty() || !nvtx_enabled()) return;
  nvtx_name_thread(opts_.nvtx_thread_name.c_str());
  named = true;
}

bool swap_engine::swap_out_locked(buffer_id id, buffer& b, stream_t producer, bool eviction) {
  if ((b.state != buffer_state::device && b.state != buffer_state::swapping_in) || b.dev == nullptr ||
      b.pins > 0) {
    return false;
  }
  nvtx_name_caller();
  const nvtx_range range(nvtx_category::swap_out, b.bytes, id, b.layer);
  void* host = nullptr;
  try {
    host = host_pool_.allocate(b.bytes);
  } catch (const std::exception& e) {
    ++stats_.failed_swap_outs;
    log().warn("swap_out of buffer {} ({} bytes) kept it on the device: {}", id, b.bytes, e.what());
    return false;
  }
  event_t start{}, done{};
  bool copy_enqueued = false;
  try {
    event_t ready = take_event_locked();
    try {
      dev_.record_event(ready, producer);
      dev_.wait_event(d2h_, ready);  // Note [Swap ordering] 1
    } catch (...) {
      give_event_locked(ready);
      throw;
    }
    give_event_locked(ready);  // the wait captured it
    if (b.has_arrived_event) dev_.wait_event(d2h_, b.arrived);
    start = take_event_locked();
    done = take_event_locked();
    dev_.record_event(start, d2h_);
    dev_.copy_async(host, b.dev, b.bytes, copy_kind::device_to_host, d2h_);
    copy_enqueued = true;
    dev_.record_event(done, d2h_);
  } catch (const std::exception& e) {
    if (start != event_t{}) give_event_locked(start);
    if (done != event_t{}) give_event_locked(done);
    if (copy_enqueued) {
      // The copy runs but we cannot tell when it ends: wait for it, then keep the device copy.
      try {
        dev_.synchronize_stream(d2h_);
      } catch (...) {
      }
    }
    host_pool_.deallocate(host);  // no copy into it is pending any more
    ++stats_.failed_swap_outs;
    log().warn("swap_out of buffer {} ({} bytes) kept it on the device: {}", id, b.bytes, e.what());
    return false;
  }
  host_pool_.record_stream(host, d2h_);  // Note [Swap ordering] 4
  if (!opts_.unsafe_testing.skip_copy_guard_on_free) alloc_.record_stream(b.dev, d2h_);  // 2
  alloc_.deallocate(b.dev);
  b.dev = nullptr;
  b.h2d_guard = false;  // the D2H waited for the H2D, and guards the block (2)
  b.host = host;
  b.state = buffer_state::swapping_out;
  b.departed = done;
  b.has_departed_event = true;
  b.has_arrived_event = false;
  copies_.push_back(pending_copy{id, true, false, b.bytes, b.layer, start, done, ++copy_seq_});
  ++stats_.swaps_out;
  stats_.bytes_out += b.bytes;
  stats_.bytes_in_flight += b.bytes;
  stats_.bytes_on_host += b.bytes;
  if (eviction) ++stats_.evictions;
  return true;
}

bool swap_engine::prefetch(buffer_id id) {
  std::unique_lock lock(mutex_);
  poll_locked();
  buffer& b = get_locked(id, "prefetch");
  if (b.state != buffer_state::host && b.state != buffer_state::swapping_out) return false;
  if (crowds_sooner_needs_locked(id)) return false;  // Note [Prefetch in order of need]
  try {
    bring_in(lock, id, /*demand=*/false);
  } catch (const out_of_memory&) {
    return false;  // stays on the host; acquire fetches it on demand
  }
  auto it = buffers_.find(id);
  return it != buffers_.end() && it->second.state == buffer_state::swapping_in;
}

// Note [Prefetch in order of need]
// The prefetcher issues swap-ins in order of need, but what it issued can still be off the
// device: a prefetch that found no room stays on the host, and an eviction sends a buffer back.
// Those are fetched on demand when their step comes, before the later buffer is needed; a
// prefetch of the later one that takes the room they need makes that demand fetch evict it
// (Belady: it is needed furthest), and the next step repeats the pattern. GPT-7B under a
// quarter of its peak (Titan X) did that on every backward step once freed blocks stopped
// waiting for the H2D queue (Note [Guarding a block brought in]): 90 evictions, 189 swaps
// instead of 99, 1.54x instead of 1.28x. So a prefetch waits (stays on the host) while the
// buffers the advisor says are needed sooner and are off the device would not fit beside it
// in what the budget leaves free; where they fit, the prefetch goes ahead as before (refusing
// it outright turns later prefetches into demand fetches: `all` on vgg16, Titan X at half its
// peak, 1.05x -> 1.16x). Without an advisor the engine does not know the order and prefetches
// whatever fits.
bool swap_engine::crowds_sooner_needs_locked(buffer_id id) const {
  if (advisor_ == nullptr) return false;
  const std::uint64_t mine = advisor_->next_use(id);
  std::size_t sooner = 0;
  for (const auto& [other, b] : buffers_) {
    if (other == id || (b.state != buffer_state::host && b.state != buffer_state::swapping_out)) continue;
    if (advisor_->next_use(other) < mine) sooner += b.bytes;
  }
  if (sooner == 0) return false;
  const auto allocated = static_cast<std::size_t>(alloc_.stats().allocated_bytes.all().current);
  const std::size_t budget = alloc_.budget();
  const std::size_t free = budget > allocated ? budget - allocated : 0;
  return buffers_.at(id).bytes + sooner > free;
}

void swap_engine::bring_in(std::unique_lock<std::mutex>& lock, buffer_id id, bool demand) {
  buffer_state previous{};
  std::size_t bytes = 0;
  int layer = -1;
  {
    buffer& b = get_locked(id, "bring_in");
    previous = b.state;
    bytes = b.bytes;
    layer = b.layer;
    b.state = buffer_state::swapping_in;  // not evictable, not brought in twice
  }
  // Note [NVTX in the engine]: spans the allocation too, so the evictions it forces nest in it.
  nvtx_name_caller();
  const nvtx_range range(demand ? nvtx_category::swap_in : nvtx_category::prefetch, bytes, id,
                         layer);
  auto revert = [&](bool failed) {
    auto it = buffers_.find(id);
    if (it != buffers_.end()) {
      it->second.state = it->second.has_departed_event ? buffer_state::swapping_out : buffer_state::host;
    }
    if (failed) ++stats_.failed_swap_ins;
  };
  (void)previous;

  // Note [Home stream]: the block comes from the pool of the buffer's home stream (where it was
  // created and is consumed), not the H2D stream's, so that a budget is not split into one pool
  // per stream. The H2D stream then waits for the home stream's work so far, which is what
  // makes reuse of a home-stream block safe there.
  stream_t home{};
  {
    buffer& b = get_locked(id, "bring_in");
    home = b.block_stream;
  }
  // Note [Prefetch never evicts]: a prefetch brings back a buffer needed later than what the
  // device holds now (else it would have been needed first), so it takes only memory that is
  // free; a demand fetch is needed now and may evict (through reclaim()), once the swap-outs
  // in flight have ended (Note [Waiting for swap-outs in order]).
  void* dev_ptr = nullptr;
  lock.unlock();
  try {
    dev_ptr = demand ? allocate_after_swap_outs(bytes, home) : alloc_.try_allocate(bytes, home);
  } catch (...) {
    lock.lock();
    revert(demand);
    throw;
  }
  lock.lock();
  if (dev_ptr == nullptr) {  // a prefetch that does not fit: stays on the host for now
    revert(false);
    return;
  }
  auto it = buffers_.find(id);
  if (it == buffers_.end()) {  // destroyed while we allocated
    alloc_.deallocate(dev_ptr);
    return;
  }
  buffer& b = it->second;
  event_t start{}, done{};
  bool copy_enqueued = false;
  try {
    event_t ready = take_event_locked();
    try {
      dev_.record_event(ready, home);
      if (!opts_.unsafe_testing.skip_home_stream_wait) dev_.wait_event(h2d_, ready);  // Note [Home stream]
    } catch (...) {
      give_event_locked(ready);
      throw;
    }
    give_event_locked(ready);
    if (b.has_departed_event) dev_.wait_event(h2d_, b.departed);  // Note [Swap ordering] 3
    start = take_event_locked();
    done = take_event_locked();
    dev_.record_event(start, h2d_);
    dev_.copy_async(dev_ptr, b.host, bytes, copy_kind::host_to_device, h2d_);
    copy_enqueued = true;
    dev_.record_event(done, h2d_);
  } catch (const std::exception& e) {
    if (start != event_t{}) give_event_locked(start);
    if (done != event_t{}) give_event_locked(done);
    if (copy_enqueued) {
      try {
        dev_.synchronize_stream(h2d_);
      } catch (...) {
      }
    }
    alloc_.deallocate(dev_ptr);  // nothing pending reads or writes it any more
    revert(true);
    log().warn("swap_in of buffer {} ({} bytes) left it on the host: {}", id, bytes, e.what());
    throw;
  }
  host_pool_.record_stream(b.host, h2d_);  // Note [Swap ordering] 4
  host_pool_.deallocate(b.host);
  b.h2d_guard = true;  // Note [Guarding a block brought in]
  b.host = nullptr;
  b.dev = dev_ptr;
  b.state = buffer_state::swapping_in;
  b.arrived = done;
  b.has_arrived_event = true;
  b.has_departed_event = false;
  copies_.push_back(pending_copy{id, false, demand, bytes, b.layer, start, done, ++copy_seq_});
  ++stats_.swaps_in;
  stats_.bytes_in += bytes;
  stats_.bytes_in_flight += bytes;
  stats_.bytes_on_host -= bytes;
  if (demand) {
    ++stats_.demand_fetches;
  } else {
    ++stats_.prefetches;
  }
}

std::size_t swap_engine::reclaim(std::size_t bytes, stream_t) {
  std::lock_guard lock(mutex_);
  poll_locked();
  struct candidate {
    buffer_id id;
    std::uint64_t key;  // larger: evict first
  };
  std::vector<candidate> candidates;
  for (const auto& [id, b] : buffers_) {
    // A buffer still arriving is evictable too: its D2H waits for the H2D (Note [Swap
    // ordering] 1), and a prefetch issued too early must not hold the budget hostage.
    // (b.dev is null while a bring_in is still allocating its block: not yet evictable.)
    if ((b.state != buffer_state::device && b.state != buffer_state::swapping_in) || b.dev == nullptr ||
        b.pins > 0) {
      continue;
    }
    // Note [Eviction order]: furthest next use first when the schedule is known (Belady's
    // rule), least recently used otherwise.
    const std::uint64_t key = advisor_ != nullptr ? advisor_->next_use(id) : UINT64_MAX - b.last_use;
    candidates.push_back({id, key});
  }
  std::sort(candidates.begin(), candidates.end(), [](const candidate& a, const candidate& b) {
    return a.key != b.key ? a.key > b.key : a.id < b.id;
  });
  std::size_t freed = 0;
  auto& rec = global_recorder();
  for (const candidate& c : candidates) {
    if (freed >= bytes) break;
    buffer& b = buffers_.at(c.id);
    const std::size_t n = b.bytes;
    const int layer = b.layer;
    if (swap_out_locked(c.id, b, b.last_stream, /*eviction=*/true)) {
      freed += n;
      nvtx_mark(nvtx_category::evict, n, c.id, layer);
      rec.record(trace_event::marker(event_kind::evict, dev_.host_time_ns(), trace_track::host, c.id, n,
                                     layer, advisor_ != nullptr ? event_detail::belady : event_detail::lru));
    }
  }
  return freed;
}

void swap_engine::poll() {
  std::lock_guard lock(mutex_);
  poll_locked();
}

void swap_engine::poll_locked() {
  auto& rec = global_recorder();
  for (std::size_t i = 0; i < copies_.size();) {
    pending_copy& c = copies_[i];
    if (!dev_.query_event(c.done)) {
      ++i;
      continue;
    }
    const double ns = to_ns(dev_.elapsed_ms(c.start, c.done));
    if (c.out) {
      stats_.copy_out_ns += ns;
    } else {
      stats_.copy_in_ns += ns;
    }
    if (timeline_ != nullptr && rec.enabled()) {
      const double t0 = timeline_->time_ns(c.start);
      const double t1 = timeline_->time_ns(c.done);
      const auto stream = static_cast<std::uintptr_t>(c.out ? d2h_ : h2d_);
      const event_detail why = c.out ? event_detail::none
                                     : (c.demand ? event_detail::demand : event_detail::prefetch);
      rec.record(trace_event::swap(c.out ? event_kind::swap_out_begin : event_kind::swap_in_begin, t0,
                                   c.id, c.bytes, c.layer, stream, why));
      rec.record(trace_event::swap(c.out ? event_kind::swap_out_end : event_kind::swap_in_end, t1, c.id,
                                   c.bytes, c.layer, stream, why));
    }
    auto it = buffers_.find(c.id);
    if (it != buffers_.end()) {
      buffer& b = it->second;
      if (c.out && b.has_departed_event && b.departed == c.done) {
        b.has_departed_event = false;
        if (b.state == buffer_state::swapping_out) b.state = buffer_state::host;
      } else if (!c.out && b.has_arrived_event && b.arrived == c.done) {
        b.has_arrived_event = false;
        b.h2d_guard = false;  // the copy is done
        if (b.state == buffer_state::swapping_in) b.state = buffer_state::device;
      }
    }
    stats_.bytes_in_flight -= c.bytes;
    give_event_locked(c.start);
    give_event_locked(c.done);
    c = copies_.back();
    copies_.pop_back();
  }
  for (std::size_t i = 0; i < stalls_.size();) {
    pending_stall& s = stalls_[i];
    if (!dev_.query_event(s.after)) {
      ++i;
      continue;
    }
    const double wait = to_ns(dev_.elapsed_ms(s.before, s.after));
    if (wait > opts_.stall_threshold_ns) {
      ++stats_.stalls;
      stats_.stall_ns += wait;
      nvtx_mark(nvtx_category::stall, s.bytes, s.id, s.layer);
      if (timeline_ != nullptr && rec.enabled()) {
        rec.record(trace_event::stall_for(timeline_->time_ns(s.before), wait, s.id, s.layer,
                                          static_cast<std::uintptr_t>(s.consumer)));
      }
    }
    give_event_locked(s.before);
    give_event_locked(s.after);
    s = stalls_.back();
    stalls_.pop_back();
  }
}

void swap_engine::synchronize() {
  std::vector<event_t> waits;
  {
    std::lock_guard lock(mutex_);
    for (const pending_copy& c : copies_) waits.push_back(c.done);
    for (const pending_stall& s : stalls_) waits.push_back(s.after);
  }
  // Events stay ours while they are pending (only poll_locked gives them back), so waiting on
  // them without the lock is safe.
  for (event_t e : waits) dev_.synchronize_event(e);
  std::lock_guard lock(mutex_);
  poll_locked();
}

buffer_state swap_engine::state(buffer_id id) const {
  std::lock_guard lock(mutex_);
  auto it = buffers_.find(id);
  if (it == buffers_.end()) throw_error(fmt::format("swap_engine::state: no buffer {}", id));
  return it->second.state;
}

std::size_t swap_engine::size(buffer_id id) const {
  std::lock_guard lock(mutex_);
  auto it = buffers_.find(id);
  return it == buffers_.end() ? 0 : it->second.bytes;
}

void swap_engine::set_advisor(eviction_advisor* advisor) {
  std::lock_guard lock(mutex_);
  advisor_ = advisor;
}

swap_stats swap_engine::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

external_memory_report swap_engine::memory_report() const {
  external_memory_report r;
  {
    std::lock_guard lock(mutex_);
    r.swapped_out = stats_.bytes_on_host;
  }
  const auto pool = host_pool_.stats();
  r.pinned_used = static_cast<std::size_t>(pool.reserved_bytes.current);
  r.pinned_limit = host_pool_.limit();
  return r;
}

}  // namespace gpuswap
