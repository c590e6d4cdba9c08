#include "allocator/pinned_host_pool.hpp"

#include <algorithm>
#include <bit>
#include <iterator>
#include <string>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/human_bytes.hpp"
#include "core/errors.hpp"

namespace gpuswap {

// Note [Size classes]
// A training loop asks for the same multiset of sizes every step, so what matters is that equal
// requests land in the same class (reuse across steps) and that the rounding waste is bounded:
//   - up to 4 KiB: one class of 4 KiB (a host page; pinning is page-granular anyway);
//   - up to 2 MiB: the next power of two, so the number of small classes stays ~10 and a waste
//     of < 50% is < 1 MiB in absolute terms;
//   - above 2 MiB: the next multiple of 2 MiB, so the waste is < 2 MiB, i.e. < 3% from 64 MiB
//     on, where the bytes are. 2 MiB is also the huge-page size, which pinned allocations of
//     that granularity can be backed by.
// A request is served only from its own class, never from a larger cached buffer: borrowing a
// larger buffer would leave the next request of that larger class to pin a new one, and in a
// loop that repeats its sizes exact classes reach a steady state with no pinning at all.

// Note [Event-guarded reuse]
// A staging buffer is typically deallocated right after the async copy into or out of it was
// enqueued, while the copy may not have run yet (REFERENCE.md: "reusing its pinned buffer before
// the copy's event"). deallocate therefore records an event on every stream named by
// record_stream and parks the buffer as pending; a later allocate queries the pending fences, in
// deallocation order, and only buffers whose events all completed become ready. Events come from
// a small pool (free_events_) and go back to it when their fence completes, so the steady state
// creates no events either. A buffer nobody recorded a stream for is ready at once: the pool has
// no way to know about work it was not told of, exactly like PyTorch's record_stream contract.
// Queries on one stream complete in order, so once one event of a stream answers "not yet", the
// later fences on that stream are not queried again in that pass.
//
// Pending fences are snapshotted under the lock and queried or waited on without it. A fence may
// complete and its events be reused by another thread meanwhile; each pending period has a unique
// fence_id, and an answer is applied only if the buffer is still pending under the same id, so a
// stale answer can never release a buffer.

// Note [The allocation ladder]
// allocate(bytes), size = round_size(bytes):
//   0. size above host_limit: out_of_memory at once (no amount of freeing or waiting helps);
//   1. a ready buffer of the class: reuse it;
//   2. room under host_limit: pin a new buffer. A cached buffer of the class that is still
//      pending is not waited for: pinning costs far less than stalling the caller behind a copy
//      of unknown length, and without a limit the host is the limit;
//   3. no room (or the device refused): free ready buffers of other classes, the smallest one
//      that makes room or else largest first (all of them when the device refused), then pin;
//   4. wait for every pending buffer (synchronize_event), reuse one of the class if any;
//   5. free ready buffers again as in 3, then pin;
//   6. throw out_of_memory with the figures.
// Room is claimed under the lock before the device call (room_held_), and buffers being freed
// stay counted until free_pinned returned (detached_bytes_), so concurrent allocations can never
// push the pool over its limit, and the thread that freed the room is the one that gets it.

// Note [When an event cannot be recorded]
// deallocate is noexcept but its event create/record may fail. The buffer may then still be in
// use by the stream, so it is not made ready: the pool synchronises the stream instead (a
// blocking call on a failure path only, lock not held), and if that fails too (the stream may
// have been destroyed) the whole device. If even that fails the buffer stays pending with an
// unrecorded fence, which only the waiting steps (4, empty_cache, destructor) resolve, by
// synchronising the device; a device that cannot synchronise reports device_error from there.
// Either way no byte is reused early.

namespace {

nlohmann::json stat_json(const stat& s) {
  return {{"current", s.current}, {"peak", s.peak}, {"allocated", s.allocated}, {"freed", s.freed}};
}

}  // namespace

nlohmann::json pinned_pool_stats::to_json() const {
  return {
      {"allocated_bytes", stat_json(allocated_bytes)},
      {"requested_bytes", stat_json(requested_bytes)},
      {"reserved_bytes", stat_json(reserved_bytes)},
      {"allocations", stat_json(allocations)},
      {"pinned_buffers", stat_json(pinned_buffers)},
      {"cached_bytes", cached_bytes},
      {"pending_bytes", pending_bytes},
      {"host_limit", host_limit},
      {"num_pinned_allocs", num_pinned_allocs},
      {"num_pinned_alloc_failures", num_pinned_alloc_failures},
      {"num_pinned_frees", num_pinned_frees},
      {"num_reuses", num_reuses},
      {"num_event_syncs", num_event_syncs},
      {"num_fence_failures", num_fence_failures},
      {"num_ooms", num_ooms},
      {"num_unknown_pointers", num_unknown_pointers},
  };
}

void pinned_host_pool_options::validate() const {
  if (host_limit != 0 && host_limit < pinned_host_pool::min_block_bytes) {
    throw_config_error("host_limit", std::to_string(host_limit),
                       "0 (no limit) or a size of at least 4 KiB",
                       "smaller than the smallest pinned buffer");
  }
}

std::size_t pinned_host_pool::round_size(std::size_t bytes) noexcept {
  if (bytes <= min_block_bytes) return min_block_bytes;
  if (bytes <= large_granularity) return std::bit_ceil(bytes);
  return (bytes + large_granularity - 1) / large_granularity * large_granularity;
}

pinned_host_pool::pinned_host_pool(device& dev, pinned_host_pool_options opts)
    : device_(dev), options_(opts), device_name_(dev.name()) {
  options_.validate();
  stats_.host_limit = options_.host_limit;
}

pinned_host_pool::~pinned_host_pool() {
  // Nothing else may use the pool now, so the lock is not needed; device calls are wrapped
  // because a destructor must not throw, and a failed wait falls back to a device-wide one.
  auto wait = [this](auto&& call) {
    try {
      call();
    } catch (...) {
      try {
        device_.synchronize();
      } catch (...) {  // nothing more can be done: free anyway
      }
    }
  };
  for (auto& [ptr, b] : blocks_) {
    for (const fence& f : b.fences) {
      wait([&] {
        if (f.recorded) {
          device_.synchronize_event(f.event);
        } else {
          device_.synchronize();
        }
      });
    }
    // Still in use: the caller's bug, but its recorded copies must not outlive the bytes.
    for (stream_t s : b.streams) wait([&] { device_.synchronize_stream(s); });
  }
  for (auto& [ptr, b] : blocks_) {
    device_.free_pinned(ptr);
    for (const fence& f : b.fences) {
      if (f.recorded) device_.destroy_event(f.event);
    }
  }
  for (event_t e : free_events_) device_.destroy_event(e);
}

void* pinned_host_pool::allocate(std::size_t bytes) {
  if (bytes == 0) return nullptr;
  if (bytes > max_request_bytes) {
    std::lock_guard lock(mutex_);
    throw_out_of_memory_locked(bytes, 0, oom_cause::too_large);
  }
  const std::size_t size = round_size(bytes);
  if (options_.host_limit != 0 && size > options_.host_limit) {
    std::lock_guard lock(mutex_);  // no amount of freeing or waiting helps
    throw_out_of_memory_locked(bytes, size, oom_cause::over_limit);
  }
  collect_completed();

  // Note [The allocation ladder], steps 1 and 2.
  bool device_refused = false;
  {
    std::unique_lock lock(mutex_);
    if (void* p = take_ready_locked(size, bytes)) return p;
    if (fits_locked(size)) {
      room_held_ += size;
      lock.unlock();
      if (void* p = pin(size, bytes)) return p;
      device_refused = true;
    }
  }
  // Step 3.
  if (void* p = free_cached_and_pin(size, bytes, device_refused)) return p;
  // Step 4.
  synchronize_pending();
  {
    std::lock_guard lock(mutex_);
    if (void* p = take_ready_locked(size, bytes)) return p;
  }
  // Step 5.
  if (void* p = free_cached_and_pin(size, bytes, device_refused)) return p;
  std::lock_guard lock(mutex_);
  throw_out_of_memory_locked(bytes, size, device_refused ? oom_cause::device : oom_cause::limit);
}

void pinned_host_pool::record_stream(void* ptr, stream_t stream) {
  if (ptr == nullptr) return;
  std::lock_guard lock(mutex_);
  auto it = blocks_.find(ptr);
  if (it == blocks_.end() || it->second.state != block_state::in_use) {
    ++stats_.num_unknown_pointers;
    return;
  }
  std::vector<stream_t>& streams = it->second.streams;
  if (std::find(streams.begin(), streams.end(), stream) == streams.end()) {
    streams.push_back(stream);
  }
}

void pinned_host_pool::deallocate(void* ptr) noexcept {
  if (ptr == nullptr) return;
  std::vector<stream_t> streams;
  std::vector<event_t> events;
  {
    std::lock_guard lock(mutex_);
    auto it = blocks_.find(ptr);
    if (it == blocks_.end() || it->second.state != block_state::in_use) {
      ++stats_.num_unknown_pointers;  // a double free or a foreign pointer: change nothing
      return;
    }
    block& b = it->second;
    stats_.allocated_bytes.decrease(static_cast<std::int64_t>(b.size));
    stats_.requested_bytes.decrease(static_cast<std::int64_t>(b.requested));
    stats_.allocations.decrease(1);
    b.requested = 0;
    if (b.streams.empty()) {
      make_ready_locked(ptr, b);
      return;
    }
    streams.swap(b.streams);
    b.state = block_state::fencing;
    pending_bytes_ += b.size;
    while (events.size() < streams.size() && !free_events_.empty()) {
      events.push_back(free_events_.back());
      free_events_.pop_back();
    }
  }

  // Note [Event-guarded reuse]; failures: Note [When an event cannot be recorded].
  std::vector<fence> fences;
  fences.reserve(streams.size());
  std::vector<event_t> spare;
  std::uint64_t failures = 0;
  for (std::size_t i = 0; i < streams.size(); ++i) {
    bool have_event = i < events.size();
    event_t event = have_event ? events[i] : event_t{};
    try {
      if (!have_event) {
        event = device_.create_event();
        have_event = true;
      }
      device_.record_event(event, streams[i]);
      fences.push_back({streams[i], event, true});
      continue;
    } catch (...) {
      ++failures;
    }
    if (have_event) spare.push_back(event);
    try {
      device_.synchronize_stream(streams[i]);
      continue;
    } catch (...) {
    }
    try {
      device_.synchronize();  // the stream itself may be gone: wait for everything
    } catch (...) {
      fences.push_back({streams[i], event_t{}, false});
    }
  }

  std::lock_guard lock(mutex_);
  free_events_.insert(free_events_.end(), spare.begin(), spare.end());
  stats_.num_fence_failures += failures;
  block& b = blocks_.find(ptr)->second;  // a fencing block is touched by this thread only
  if (fences.empty()) {
    pending_bytes_ -= b.size;
    make_ready_locked(ptr, b);
    return;
  }
  b.fences = std::move(fences);
  b.fence_id = next_fence_id_++;
  b.state = block_state::pending;
  pending_.emplace(b.fence_id, ptr);
}

void pinned_host_pool::empty_cache() {
  synchronize_pending();
  std::vector<std::pair<void*, std::size_t>> victims;
  {
    std::lock_guard lock(mutex_);
    while (!ready_.empty()) pop_ready_locked(ready_.begin(), victims);
  }
  for (const auto& v : victims) device_.free_pinned(v.first);
  std::lock_guard lock(mutex_);
  release_detached_locked(victims);
}

pinned_pool_stats pinned_host_pool::stats() const {
  std::lock_guard lock(mutex_);
  pinned_pool_stats s = stats_;
  s.cached_bytes = ready_bytes_ + pending_bytes_;
  s.pending_bytes = pending_bytes_;
  return s;
}

void pinned_host_pool::reset_peak_stats() {
  std::lock_guard lock(mutex_);
  for (stat* s : {&stats_.allocated_bytes, &stats_.requested_bytes, &stats_.reserved_bytes,
                  &stats_.allocations, &stats_.pinned_buffers}) {
    s->reset_peak();
  }
}

bool pinned_host_pool::is_valid() const {
  std::lock_guard lock(mutex_);
  std::size_t total = 0, in_use = 0, requested = 0, ready = 0, pending = 0;
  std::size_t in_use_count = 0, ready_count = 0, pending_count = 0;
  for (const auto& [ptr, b] : blocks_) {
    if (b.size < min_block_bytes || b.size % min_block_bytes != 0) return false;
    total += b.size;
    switch (b.state) {
      case block_state::in_use:
        if (!b.fences.empty()) return false;
        in_use += b.size;
        requested += b.requested;
        ++in_use_count;
        break;
      case block_state::fencing:
        pending += b.size;
        break;
      case block_state::pending: {
        auto it = pending_.find(b.fence_id);
        if (it == pending_.end() || it->second != ptr || b.fences.empty()) return false;
        pending += b.size;
        ++pending_count;
        break;
      }
      case block_state::ready: {
        auto it = ready_.find(b.size);
        if (it == ready_.end() || std::find(it->second.begin(), it->second.end(), ptr) ==
                                      it->second.end()) {
          return false;
        }
        ready += b.size;
        ++ready_count;
        break;
      }
    }
  }
  std::size_t listed_ready = 0;
  for (const auto& [size, ptrs] : ready_) {
    if (ptrs.empty()) return false;
    listed_ready += ptrs.size();
  }
  const auto& s = stats_;
  const auto reserved = static_cast<std::size_t>(s.reserved_bytes.current);
  return listed_ready == ready_count && pending_.size() == pending_count &&
         ready == ready_bytes_ && pending == pending_bytes_ &&
         static_cast<std::size_t>(s.allocated_bytes.current) == in_use &&
         static_cast<std::size_t>(s.requested_bytes.current) == requested &&
         static_cast<std::size_t>(s.allocations.current) == in_use_count &&
         total + detached_bytes_ == reserved &&
         (detached_bytes_ != 0 ||
          static_cast<std::size_t>(s.pinned_buffers.current) == blocks_.size()) &&
         (options_.host_limit == 0 || reserved + room_held_ <= options_.host_limit);
}

// --- private ---------------------------------------------------------------------------------

void* pinned_host_pool::take_ready_locked(std::size_t size, std::size_t bytes) {
  auto it = ready_.find(size);
  if (it == ready_.end()) return nullptr;
  void* p = it->second.back();
  it->second.pop_back();
  if (it->second.empty()) ready_.erase(it);
  block& b = blocks_.find(p)->second;
  b.state = block_state::in_use;
  b.requested = bytes;
  ready_bytes_ -= size;
  stats_.allocated_bytes.increase(static_cast<std::int64_t>(size));
  stats_.requested_bytes.increase(static_cast<std::int64_t>(bytes));
  stats_.allocations.increase(1);
  ++stats_.num_reuses;
  return p;
}

bool pinned_host_pool::fits_locked(std::size_t size) const noexcept {
  if (options_.host_limit == 0) return true;
  const std::size_t held = static_cast<std::size_t>(stats_.reserved_bytes.current) + room_held_;
  return held <= options_.host_limit && size <= options_.host_limit - held;
}

// Pins a new buffer with room already claimed in room_held_ (released here in every outcome).
// nullptr when the device has no more pinned memory.
void* pinned_host_pool::pin(std::size_t size, std::size_t bytes) {
  void* p = nullptr;
  try {
    p = device_.allocate_pinned(size);
  } catch (...) {
    std::lock_guard lock(mutex_);
    room_held_ -= size;
    ++stats_.num_pinned_alloc_failures;
    throw;
  }
  std::unique_lock lock(mutex_);
  room_held_ -= size;
  if (p == nullptr) {
    ++stats_.num_pinned_alloc_failures;
    return nullptr;
  }
  try {
    block b;
    b.size = size;
    b.requested = bytes;
    blocks_.emplace(p, std::move(b));
  } catch (...) {
    lock.unlock();
    device_.free_pinned(p);
    throw;
  }
  ++stats_.num_pinned_allocs;
  stats_.reserved_bytes.increase(static_cast<std::int64_t>(size));
  stats_.pinned_buffers.increase(1);
  stats_.allocated_bytes.increase(static_cast<std::int64_t>(size));
  stats_.requested_bytes.increase(static_cast<std::int64_t>(bytes));
  stats_.allocations.increase(1);
  return p;
}

// Steps 3 and 5 of Note [The allocation ladder].
void* pinned_host_pool::free_cached_and_pin(std::size_t size, std::size_t bytes,
                                            bool& device_refused) {
  std::vector<std::pair<void*, std::size_t>> victims;
  bool have_room = false;
  {
    std::lock_guard lock(mutex_);
    if (!device_refused && fits_locked(size)) {
      have_room = true;  // someone else made room meanwhile
      room_held_ += size;
    } else if (device_refused) {
      while (!ready_.empty()) pop_ready_locked(ready_.begin(), victims);
    } else {
      const std::size_t need = static_cast<std::size_t>(stats_.reserved_bytes.current) +
                               room_held_ + size - options_.host_limit;
      if (ready_bytes_ < need) return nullptr;  // freeing every ready buffer would not do
      if (auto it = ready_.lower_bound(need); it != ready_.end()) {
        pop_ready_locked(it, victims);
      } else {
        std::size_t freed = 0;
        while (freed < need) {
          freed += ready_.rbegin()->first;
          pop_ready_locked(std::prev(ready_.end()), victims);
        }
      }
    }
    if (!have_room && victims.empty()) return nullptr;
  }
  if (!have_room) {
    for (const auto& v : victims) device_.free_pinned(v.first);
    std::lock_guard lock(mutex_);
    release_detached_locked(victims);
    if (!fits_locked(size)) return nullptr;
    room_held_ += size;
  }
  if (void* p = pin(size, bytes)) return p;
  device_refused = true;
  return nullptr;
}

// Takes the last ready buffer of the class at `it` out of the pool for freeing; its bytes stay in
// reserved_bytes (as detached_bytes_) until release_detached_locked.
void pinned_host_pool::pop_ready_locked(std::map<std::size_t, std::vector<void*>>::iterator it,
                                        std::vector<std::pair<void*, std::size_t>>& victims) {
  const std::size_t size = it->first;
  void* p = it->second.back();
  victims.emplace_back(p, size);
  it->second.pop_back();
  if (it->second.empty()) ready_.erase(it);
  blocks_.erase(p);
  ready_bytes_ -= size;
  detached_bytes_ += size;
}

void pinned_host_pool::release_detached_locked(
    const std::vector<std::pair<void*, std::size_t>>& victims) noexcept {
  for (const auto& [ptr, size] : victims) {
    detached_bytes_ -= size;
    stats_.reserved_bytes.decrease(static_cast<std::int64_t>(size));
    stats_.pinned_buffers.decrease(1);
    ++stats_.num_pinned_frees;
  }
}

std::vector<pinned_host_pool::fence_snapshot> pinned_host_pool::snapshot_pending_locked(
    bool queryable_only) const {
  std::vector<fence_snapshot> out;
  out.reserve(pending_.size());
  for (const auto& [id, ptr] : pending_) {
    const block& b = blocks_.find(ptr)->second;
    if (queryable_only && std::any_of(b.fences.begin(), b.fences.end(),
                                      [](const fence& f) { return !f.recorded; })) {
      continue;
    }
    out.push_back({ptr, id, b.fences});
  }
  return out;
}

// Moves pending buffers whose events completed to ready (Note [Event-guarded reuse]).
void pinned_host_pool::collect_completed() {
  std::vector<fence_snapshot> snapshot;
  {
    std::lock_guard lock(mutex_);
    if (pending_.empty()) return;
    snapshot = snapshot_pending_locked(/*queryable_only=*/true);
  }
  std::vector<stream_t> not_done;  // streams with an incomplete event in this pass
  std::vector<const fence_snapshot*> done;
  for (const fence_snapshot& s : snapshot) {
    bool complete = true;
    for (const fence& f : s.fences) {
      if (std::find(not_done.begin(), not_done.end(), f.stream) != not_done.end()) {
        complete = false;
        break;
      }
      bool ok = false;
      try {
        ok = device_.query_event(f.event);
      } catch (const error&) {
        ok = false;  // unknown: leave it pending; a waiting step will surface a lasting fault
      }
      if (!ok) {
        not_done.push_back(f.stream);
        complete = false;
        break;
      }
    }
    if (complete) done.push_back(&s);
  }
  if (done.empty()) return;
  std::lock_guard lock(mutex_);
  for (const fence_snapshot* s : done) complete_fence_locked(s->ptr, s->fence_id);
}

// Waits for every pending buffer and makes it ready. Throws device_error if a wait fails; the
// buffers not yet waited for stay pending.
void pinned_host_pool::synchronize_pending() {
  std::vector<fence_snapshot> snapshot;
  {
    std::lock_guard lock(mutex_);
    if (pending_.empty()) return;
    snapshot = snapshot_pending_locked(/*queryable_only=*/false);
  }
  std::size_t waited = 0;
  try {
    for (const fence_snapshot& s : snapshot) {
      for (const fence& f : s.fences) {
        if (f.recorded) {
          device_.synchronize_event(f.event);
        } else {
          device_.synchronize();
        }
      }
      ++waited;
    }
  } catch (...) {
    std::lock_guard lock(mutex_);
    for (std::size_t i = 0; i < waited; ++i) {
      if (complete_fence_locked(snapshot[i].ptr, snapshot[i].fence_id)) ++stats_.num_event_syncs;
    }
    throw;
  }
  std::lock_guard lock(mutex_);
  for (const fence_snapshot& s : snapshot) {
    if (complete_fence_locked(s.ptr, s.fence_id)) ++stats_.num_event_syncs;
  }
}

void pinned_host_pool::make_ready_locked(void* ptr, block& b) {
  b.state = block_state::ready;
  ready_[b.size].push_back(ptr);
  ready_bytes_ += b.size;
}

// Applies "the fence of pending period `fence_id` completed" if the buffer is still in that
// period; a stale answer changes nothing.
bool pinned_host_pool::complete_fence_locked(void* ptr, std::uint64_t fence_id) {
  auto it = blocks_.find(ptr);
  if (it == blocks_.end()) return false;
  block& b = it->second;
  if (b.state != block_state::pending || b.fence_id != fence_id) return false;
  pending_.erase(fence_id);
  pending_bytes_ -= b.size;
  for (const fence& f : b.fences) {
    if (f.recorded) free_events_.push_back(f.event);
  }
  b.fences.clear();
  make_ready_locked(ptr, b);
  return true;
}

void pinned_host_pool::throw_out_of_memory_locked(std::size_t bytes, std::size_t size,
                                                  oom_cause cause) {
  ++stats_.num_ooms;
  auto exact = [](std::size_t n) { return fmt::format("{} ({} bytes)", human_bytes(n), n); };
  const auto in_use = static_cast<std::size_t>(stats_.allocated_bytes.current);
  std::string out = fmt::format("gpuswap: out of pinned host memory: tried to allocate {} on {}\n",
                                human_bytes(bytes), device_name_);
  out += fmt::format("  requested: {}", exact(bytes));
  if (size != 0) out += fmt::format(", rounded to {} bytes", size);
  out += fmt::format("\n  host_limit: {}\n",
                     options_.host_limit == 0 ? std::string("none") : exact(options_.host_limit));
  out += fmt::format("  in use: {} in {} buffers\n", exact(in_use), stats_.allocations.current);
  out += fmt::format("  cached: {}, of which {} awaiting events\n",
                     exact(ready_bytes_ + pending_bytes_), exact(pending_bytes_));
  switch (cause) {
    case oom_cause::too_large:
      out += "  hint: the request is larger than any buffer the pool can pin";
      break;
    case oom_cause::over_limit:
      out += "  hint: the request alone exceeds host_limit; raise host_limit "
             "(GPUSWAP_CONF=\"host_limit:...\") or stage it in smaller pieces";
      break;
    case oom_cause::limit:
      out += "  hint: the limit leaves no room once every cached buffer was freed; raise "
             "host_limit (GPUSWAP_CONF=\"host_limit:...\") or offload less at a time";
      break;
    case oom_cause::device:
      out += "  hint: the device has no more pinned host memory (every cached buffer was "
             "freed); lower host_limit in other processes or offload less at a time";
      break;
  }
  throw_out_of_memory(std::move(out));
}

}  // namespace gpuswap
