// The caching allocator's expandable segments: large-pool memory as address space reserved
// per stream with device pages mapped and unmapped on demand (Note [Expandable segments]).
#include <algorithm>
#include <utility>
#include <vector>

#include "allocator/caching_allocator.hpp"
#include "allocator/caching_allocator_stats_math.hpp"
#include "profiler/event_recorder.hpp"

namespace gpuswap {

using namespace caching_detail;

// Note [Expandable segments]
// A plain segment is one piece of memory at one address, so a free block can only serve a
// request that fits inside it. Near the budget that strands memory: a training step that swaps
// activations in and out frees gigabytes in pieces between live blocks, and the next 3 GiB
// request finds no piece big enough while the free bytes would cover it twice. The OOM ladder
// can only release segments that are wholly free, and the swap engine then evicts tensors the
// plan meant to keep. (Measured: VGG-16 at batch 256 on h100-pcie5 at 50% of its peak; plans
// whose bytes fit ran 40-50% slower than the byte count predicted.)
//
// With expandable_segments (PyTorch's expandable_segments:True), each stream's large requests
// come from address space reserved once (device::reserve_address_range, reservation_budgets
// budgets of it, which costs no memory), tiled by blocks like any segment. Blocks are the usual
// states plus `unmapped`: address space with no memory behind it, always whole pages. The
// budget counts mapped bytes: a segment's `mapped` is its size minus its unmapped blocks, and
// that is what reserved_bytes holds.
//   - A request the free blocks cannot serve looks for a run of consecutive free and unmapped
//     blocks of its stream long enough to hold it, placed at the start or the end of the run,
//     where the fewest bytes need mapping, and maps those pages if the budget's headroom
//     allows (grow_expandable). The pages mapped become a free block, merged with the free
//     blocks around it, and the request takes it as any free block.
//   - Releasing memory (the OOM ladder, empty_cache) unmaps the whole pages inside free blocks
//     (unmap_free_pages), the largest first when only some bytes are wanted. The ends of a
//     free block that share a page with a live neighbour stay mapped, as free slivers.
//     Like cudaFree, unmapping must not pull memory from under work still enqueued on the
//     block's stream (the driver does not wait; PyTorch synchronises the stream): the blocks
//     being unmapped are set aside (`unmapping`, out of the pool and the figures, in
//     in_flight_bytes_) while an event recorded on each stream is waited for with the lock
//     dropped (Note [Work in flight on released segments]); a failed wait puts them back.
//   - A page is mapped exactly when some block that is neither unmapped nor unmapping covers
//     part of it, because unmapped blocks always begin and end on page boundaries: so the pages
//     to map for a placement are the unmapped blocks' parts of the pages it covers, and the
//     pages a free block can give back are the whole pages inside it.
// map_pages and unmap_pages are called with mutex_ held: like create_event they do not wait for
// device work (the unmap's wait came before, without the lock), and mapping under the lock
// keeps a placement's pages from being taken by another thread between choosing and mapping.
// Reserving address space drops the lock (NVTX registers the range, which must not happen
// under mutex_). The small pool keeps its 2 MiB segments: its blocks pack into them already.

namespace {

// An expandable segment reserves this many budgets of address space: live blocks can scatter
// over at most one budget's worth of it, so a run long enough for any request is left, and
// one reservation per stream is the rule (another is made if none is). CUDA has 2^48 bytes.
constexpr std::size_t reservation_budgets = 4;

// Free memory, or address space pages can be mapped into.
bool is_available(const block& b) noexcept {
  return b.state == block_state::free || b.state == block_state::unmapped;
}

bool has_memory(const block& b) noexcept {
  return b.state != block_state::unmapped && b.state != block_state::unmapping;
}

// The unmapped bytes of [lo, hi) in the run of free and unmapped blocks that starts at b.
std::size_t unmapped_bytes(const block* b, std::uintptr_t lo, std::uintptr_t hi) noexcept {
  std::size_t n = 0;
  for (; b != nullptr && b->address < hi && is_available(*b); b = b->next) {
    if (b->state != block_state::unmapped) continue;
    const std::uintptr_t begin = std::max(b->address, lo);
    const std::uintptr_t end = std::min(b->address + b->size, hi);
    if (begin < end) n += end - begin;
  }
  return n;
}

}  // namespace

void caching_allocator::unmap_all_pages(device& dev, const segment& seg) noexcept {
  // Walks the blocks without allocating: the destructor calls it.
  std::uintptr_t begin = 0;
  bool open = false;
  for (const block* b = seg.first; b != nullptr; b = b->next) {
    if (has_memory(*b) && !open) {
      begin = b->address;
      open = true;
    } else if (!has_memory(*b) && open) {
      dev.unmap_pages(reinterpret_cast<void*>(begin), b->address - begin);
      open = false;
    }
  }
  if (open) dev.unmap_pages(reinterpret_cast<void*>(begin), seg.base + seg.size - begin);
}

void caching_allocator::split_block(block& b, std::size_t offset, block& tail) noexcept {
  tail.address = b.address + offset;
  tail.size = b.size - offset;
  tail.stream = b.stream;
  tail.seg = b.seg;
  tail.pool = b.pool;
  tail.state = b.state;
  tail.prev = &b;
  tail.next = b.next;
  if (b.next != nullptr) b.next->prev = &tail;
  b.next = &tail;
  b.size = offset;
}

void caching_allocator::merge_unmapped_locked(block* b) noexcept {
  if (block* prev = b->prev; prev != nullptr && prev->state == block_state::unmapped) {
    prev->size += b->size;
    prev->next = b->next;
    if (b->next != nullptr) b->next->prev = prev;
    recycle_block_object(b);
    b = prev;
  }
  if (block* next = b->next; next != nullptr && next->state == block_state::unmapped) {
    b->size += next->size;
    b->next = next->next;
    if (next->next != nullptr) next->next->prev = b;
    recycle_block_object(next);
  }
}

caching_allocator::placement caching_allocator::find_placement_locked(const request& req) {
  placement best;
  for (auto& [base, seg] : segments_) {
    if (!seg.expandable || seg.stream != req.stream) continue;
    block* b = seg.first;
    while (b != nullptr) {
      if (!is_available(*b)) {
        b = b->next;
        continue;
      }
      block* first = b;
      const std::uintptr_t run_begin = b->address;
      std::uintptr_t run_end = run_begin;
      for (; b != nullptr && is_available(*b); b = b->next) run_end = b->address + b->size;
      if (run_end - run_begin < req.size) continue;
      // At either end of the run, or starting or ending with one of its free blocks, so that
      // a free block between unmapped spans is extended rather than left out.
      const auto consider = [&](std::uintptr_t begin) {
        begin = std::clamp(begin, run_begin, run_end - req.size);
        const std::size_t cost = unmapped_bytes(first, round_down(begin, page_size_),
                                                round_up(begin + req.size, page_size_));
        if (cost < best.cost) best = placement{&seg, first, begin, req.size, cost};
      };
      consider(run_begin);
      consider(run_end - req.size);
      for (const block* f = first; f != b; f = f->next) {
        if (f->state != block_state::free) continue;
        consider(f->address);
        consider(f->address + f->size >= req.size ? f->address + f->size - req.size : 0);
      }
    }
  }
  return best;
}

std::size_t caching_allocator::make_room_expandable(std::unique_lock<std::mutex>& lock,
                                                    const request& req) {
  ++stats_.num_cache_flushes;
  const placement p = find_placement_locked(req);
  if (p.seg == nullptr) return 0;
  const auto reserved = static_cast<std::size_t>(stats_.reserved_bytes.all().current);
  const std::size_t used = reserved + in_flight_bytes_;
  const std::size_t headroom = used < budget_ ? budget_ - used : 0;
  if (p.cost <= headroom) return 0;  // the device, not the budget, refused the pages
  return unmap_free_pages(lock, p.cost - headroom, &p);
}

block* caching_allocator::grow_expandable(std::unique_lock<std::mutex>& lock,
                                          const request& req) {
  placement best = find_placement_locked(req);
  if (best.seg == nullptr) {
    // No run of this stream's address space is long enough (or it has none yet): reserve.
    std::size_t bytes = round_up(std::max(reservation_budgets * budget_, req.size), page_size_);
    lock.unlock();
    void* ptr = nullptr;
    try {
      ptr = dev_.reserve_address_range(bytes);
      // Short of address space (many streams, or a device of terabytes): less, down to what
      // this request needs.
      const std::size_t least = round_up(req.size, page_size_);
      while (ptr == nullptr && bytes > least) {
        bytes = std::max(round_up(bytes / 2, page_size_), least);
        ptr = dev_.reserve_address_range(bytes);
      }
    } catch (...) {
      lock.lock();
      throw;
    }
    if (ptr != nullptr && hooks_) nvtx_pool_.register_segment(ptr, bytes);
    lock.lock();
    if (ptr == nullptr) return nullptr;  // address space exhausted: out of memory
    const auto base = reinterpret_cast<std::uintptr_t>(ptr);
    block* b = nullptr;
    try {
      large_pool_.add_stream(req.stream);
      b = new_block_object();
      segment& seg = segments_.try_emplace(base).first->second;
      seg.base = base;
      seg.size = bytes;
      seg.pool = pool_kind::large;
      seg.stream = req.stream;
      seg.first = b;
      seg.expandable = true;
      seg.mapped = 0;
    } catch (...) {
      if (b != nullptr) recycle_block_object(b);
      lock.unlock();
      if (hooks_) nvtx_pool_.unregister_segment(ptr);
      dev_.release_address_range(ptr, bytes);
      lock.lock();
      throw;
    }
    b->address = base;
    b->size = bytes;
    b->stream = req.stream;
    b->seg = &segments_.find(base)->second;
    b->pool = pool_kind::large;
    b->state = block_state::unmapped;
    add(stats_.segment, pool_kind::large, 1);
    best = find_placement_locked(req);  // the lock was dropped: decided again from what is there now
    if (best.seg == nullptr) return nullptr;
  }

  const auto reserved = static_cast<std::size_t>(stats_.reserved_bytes.all().current);
  const std::size_t used = reserved + in_flight_bytes_;
  if (used > budget_ || best.cost > budget_ - used) return nullptr;

  // The unmapped parts of the pages the placement covers, and the block objects their splits
  // need, before anything changes.
  struct piece {
    block* b;
    std::uintptr_t begin;
    std::uintptr_t end;
  };
  const std::uintptr_t lo = round_down(best.begin, page_size_);
  const std::uintptr_t hi = round_up(best.begin + req.size, page_size_);
  std::vector<piece> pieces;
  std::vector<block*> spares;
  const auto give_back_spares = [&] {
    for (block* s : spares) recycle_block_object(s);
    spares.clear();
  };
  try {
    for (block* b = best.first; b != nullptr && b->address < hi && is_available(*b);
         b = b->next) {
      if (b->state != block_state::unmapped) continue;
      const std::uintptr_t begin = std::max(b->address, lo);
      const std::uintptr_t end = std::min(b->address + b->size, hi);
      if (begin < end) pieces.push_back(piece{b, begin, end});
    }
    spares.reserve(2 * pieces.size());
    for (std::size_t i = 0; i < 2 * pieces.size(); ++i) spares.push_back(new_block_object());
  } catch (...) {
    give_back_spares();
    throw;
  }

  std::size_t mapped = 0;  // pieces mapped so far
  const auto undo = [&] {
    for (std::size_t i = 0; i < mapped; ++i) {
      dev_.unmap_pages(reinterpret_cast<void*>(pieces[i].begin), pieces[i].end - pieces[i].begin);
    }
    give_back_spares();
  };
  try {
    for (; mapped < pieces.size(); ++mapped) {
      const piece& p = pieces[mapped];
      if (!dev_.map_pages(reinterpret_cast<void*>(p.begin), p.end - p.begin)) break;
    }
  } catch (...) {
    undo();
    throw;
  }
  if (mapped != pieces.size()) {
    undo();  // the device is out of memory below the budget
    return nullptr;
  }

  // Each piece becomes a free block of its own, merged with the free blocks around it.
  std::size_t total = 0;
  for (const piece& p : pieces) {
    block* b = p.b;
    if (p.begin > b->address) {
      block* tail = spares.back();
      spares.pop_back();
      split_block(*b, p.begin - b->address, *tail);
      b = tail;
    }
    if (p.end < b->address + b->size) {
      block* tail = spares.back();
      spares.pop_back();
      split_block(*b, p.end - b->address, *tail);
    }
    const std::size_t bytes = b->size;
    best.seg->mapped += bytes;
    add(stats_.reserved_bytes, pool_kind::large, signed_size(bytes));
    ++stats_.num_device_allocs;
    total += bytes;
    b->state = block_state::free;
    merge_and_insert_locked(b);
    if (hooks_ && recorder_.enabled()) {
      trace_segment(event_kind::segment_map, p.begin, bytes, stats_.allocated_bytes.all().current,
                    stats_.reserved_bytes.all().current);
    }
  }
  give_back_spares();

  // The free block that now holds the placement; it starts at or before it.
  block* target = best.seg->first;
  while (target->address + target->size <= best.begin) target = target->next;
  return take_block_locked(*target, req, /*in_pool=*/true);
}

std::size_t caching_allocator::unmap_free_pages(std::unique_lock<std::mutex>& lock,
                                                std::size_t wanted, const placement* keep) {
  // The pages `keep` would map or reuse: unmapping them would only have them mapped again.
  const std::uintptr_t keep_lo = keep != nullptr ? round_down(keep->begin, page_size_) : 0;
  const std::uintptr_t keep_hi =
      keep != nullptr ? round_up(keep->begin + keep->size, page_size_) : 0;
  struct victim {
    block* b;
    std::uintptr_t begin;  // the whole pages inside it
    std::uintptr_t end;
  };
  std::vector<victim> victims;
  for (auto& [base, seg] : segments_) {
    if (!seg.expandable) continue;
    for (block* b = seg.first; b != nullptr; b = b->next) {
      if (b->state != block_state::free) continue;
      if (keep != nullptr && &seg == keep->seg && b->address < keep_hi &&
          b->address + b->size > keep_lo) {
        continue;
      }
      const std::uintptr_t begin = round_up(b->address, page_size_);
      const std::uintptr_t end = round_down(b->address + b->size, page_size_);
      if (end > begin) victims.push_back(victim{b, begin, end});
    }
  }
  if (victims.empty()) return 0;
  if (wanted != SIZE_MAX) {
    std::sort(victims.begin(), victims.end(), [](const victim& a, const victim& b) {
      return a.end - a.begin > b.end - b.begin;
    });
    std::size_t sum = 0;
    std::size_t enough = 0;
    while (enough < victims.size() && sum < wanted) {
      sum += victims[enough].end - victims[enough].begin;
      ++enough;
    }
    victims.resize(enough);
  }

  // Everything that may throw comes before the first change.
  std::vector<block*> spares;
  std::vector<stream_t> streams;
  try {
    spares.reserve(2 * victims.size());
    for (std::size_t i = 0; i < 2 * victims.size(); ++i) spares.push_back(new_block_object());
    for (const victim& v : victims) {
      if (std::find(streams.begin(), streams.end(), v.b->stream) == streams.end()) {
        streams.push_back(v.b->stream);
      }
    }
  } catch (...) {
    for (block* s : spares) recycle_block_object(s);
    throw;
  }

  // Out of the pool and the figures while the lock is dropped; the free ends that share a page
  // with a live neighbour stay in the pool.
  std::size_t total = 0;
  for (victim& v : victims) {
    block* b = v.b;
    pool_erase_locked(*b);
    if (v.begin > b->address) {
      block* tail = spares.back();
      spares.pop_back();
      split_block(*b, v.begin - b->address, *tail);
      pool_insert_locked(*b);
      b = tail;
    }
    if (v.end < b->address + b->size) {
      block* tail = spares.back();
      spares.pop_back();
      split_block(*b, v.end - b->address, *tail);
      pool_insert_locked(*tail);
    }
    b->state = block_state::unmapping;
    v.b = b;
    b->seg->mapped -= b->size;
    sub(stats_.reserved_bytes, pool_kind::large, signed_size(b->size));
    total += b->size;
  }
  for (block* s : spares) recycle_block_object(s);
  in_flight_bytes_ += total;  // still counted against the budget until unmapped

  if (std::exception_ptr failure = wait_for_streams(lock, streams)) {
    for (const victim& v : victims) {
      v.b->seg->mapped += v.b->size;
      add(stats_.reserved_bytes, pool_kind::large, signed_size(v.b->size));
      v.b->state = block_state::free;
      merge_and_insert_locked(v.b);
    }
    settle_in_flight_locked(total);
    std::rethrow_exception(failure);
  }
  // An unmapping block is never merged with (merges take free or unmapped neighbours), so
  // every victim is still its own block here, until its own merge below.
  for (const victim& v : victims) {
    const std::uintptr_t address = v.b->address;
    const std::size_t bytes = v.b->size;
    dev_.unmap_pages(v.b->ptr(), bytes);
    ++stats_.num_device_frees;
    v.b->state = block_state::unmapped;
    merge_unmapped_locked(v.b);
    if (hooks_ && recorder_.enabled()) {
      trace_segment(event_kind::segment_release, address, bytes,
                    stats_.allocated_bytes.all().current, stats_.reserved_bytes.all().current);
    }
  }
  settle_in_flight_locked(total);
  return total;
}

void caching_allocator::release_empty_reservations(std::unique_lock<std::mutex>& lock) {
  std::vector<std::pair<void*, std::size_t>> released;
  for (const auto& [base, seg] : segments_) {
    if (seg.expandable && seg.mapped == 0 && seg.first->next == nullptr &&
        seg.first->state == block_state::unmapped) {
      released.emplace_back(reinterpret_cast<void*>(base), seg.size);
    }
  }
  if (released.empty()) return;
  // Forgotten before the device has them back, as in release_whole_segments.
  for (const auto& [ptr, bytes] : released) {
    auto it = segments_.find(reinterpret_cast<std::uintptr_t>(ptr));
    recycle_block_object(it->second.first);
    segments_.erase(it);
    sub(stats_.segment, pool_kind::large, 1);
  }
  lock.unlock();
  for (const auto& [ptr, bytes] : released) {
    if (hooks_) nvtx_pool_.unregister_segment(ptr);
    dev_.release_address_range(ptr, bytes);
  }
  lock.lock();
}

}  // namespace gpuswap
