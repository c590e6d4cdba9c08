#include "profiler/event_recorder.hpp"

#include <algorithm>
#include <bit>
#include <new>
#include <utility>

namespace gpuswap {

// Note [Recorder memory ordering]
// Each ring has one producer (the thread that owns it) and one consumer at a time (whoever holds
// the recorder's mutex_ in collect/clear). head_ counts events written, tail_ events read; both
// only grow, and the slot of event n is n & mask_.
//
//   producer: writes slot[head & mask], then head.store(head + 1, release).
//   consumer: h = head.load(acquire), copies slots [tail, h), then tail.store(h, release).
//   producer, before reusing a slot: tail.load(acquire).
//
// The release/acquire pair on head publishes the slot contents to the consumer; the pair on
// tail tells the producer the consumer has finished copying a slot before the producer writes
// it again. No slot is ever read and written at once, so slots need not be atomic. The
// producer keeps a private copy of tail and reloads the shared one only when the ring looks
// full, so the fast path touches the consumer's cache line only when needed.
//
// A thread that exits stores owner_exited (release) after its last push; collect() loads it
// (acquire) before draining, so once it sees the flag the drain gets every event and the ring
// can be retired. The enabled flag is relaxed: it publishes no data, and a record() racing
// with enable(false) may or may not be kept, which is all a tracer needs.
// dropped_ is written by the producer only; the consumer reads it relaxed (a count, not a
// publication).

// Note [Compact block events]
// Allocations and frees are most of a trace's events and all of the allocator hot path's
// tracing cost. A 56-byte trace_event per call costs both instructions (building it, two calls
// deep) and memory traffic: at 10,000 live blocks the ring's stream of new lines evicts the
// allocator's own blocks and index from L2. So record_block() is inline and writes a 16-byte
// record to a second ring of the thread: the time, and one word packing the kind, the address
// and the size, both in 512-byte units (the allocator's rounding; others take the slow path).
// The stream, the same call after call on one thread, is not repeated: a tag_stream record
// goes into the ring when it changes, and the drain carries it forward to the records after.
// A stream record that is dropped (ring full) leaves the producer's stream unchanged, so the
// next call tries it again and no record is read with the wrong stream. Anything that does not
// fit (another kind, an unaligned address or size, 4 GiB or more) goes to the full ring.
//
// Within one thread the two rings must come out in the order the thread recorded into them
// (on the simulator every event of a step may carry the same modelled time, so time cannot
// order them). Each full event therefore carries block_seq, the number of block records its
// thread had written before it, and the drain merges: block records with index < block_seq go
// before it. A drain takes an exact prefix of the thread's sequence: it reads the block ring's
// head b1 first, then the full ring's, and stops at the first full event with block_seq > b1
// (recorded after a block record it does not take). Reading the heads the other way round let
// a full event recorded between the two reads come out one collect later than block records
// the thread wrote after it (EventRecorder.ConcurrentWritersWithSmallRingsCountEveryDrop
// caught it under TSan).
//
// Where the cost of "on" goes, and what did not cut it (`gpuswap bench alloc`, "on %" at
// 1,000 / 10,000 / 100,000 live blocks, medians of 5-10 runs alternating binaries; this code
// measured +9..12 / +16..20 / +9..18 beside each). Without the clock calls (time 0): +6/+15/+21;
// the clock calls alone, no recording: +5/+6/+3; a 1,024-slot ring cleared every 256 calls,
// so that it stays in L1: +8/+9/+10. So at 10,000 and more live blocks, where the allocator's
// own blocks fill the core's L2, most of it is the ring's 16 bytes an event moving through the
// cache. Tried on that: non-temporal stores (+650/+510/+120: every allocator call takes its
// mutex, and a locked instruction waits until streaming stores have reached memory, partial
// lines worst), the same for whole lines staged in L1 (+190/+170/+120), clflushopt or
// cldemote of each finished line (+156/+112/+84, +54/+57/+18), prefetchw 4 to 16 lines ahead
// of the writes, and a 1 KiB staging buffer copied to the ring every 64 records: none better
// than plain stores. The clock calls became one inline load on the simulator (Note [Published
// host clock] in device/device.cpp): +11.3/+21.6/+14.6 -> +9.0/+17.4/+16.4 (medians of 5 runs
// alternating binaries).

namespace {

using recorder_detail::block_record;
using recorder_detail::tls_cache;

// A record() event and its place among the thread's block records.
struct alignas(64) full_slot {
  trace_event event;
  std::uint64_t block_seq = 0;
};

}  // namespace

struct event_recorder::ring {
  explicit ring(std::size_t capacity) : full(capacity), blocks(capacity) {}

  bool push(const trace_event& event) noexcept {
    return full.push(full_slot{event, blocks.records.written()});
  }

  // Consumer side; the caller holds the recorder's mutex_. Note [Compact block events].
  void drain_into(std::vector<trace_event>* out) {
    const std::uint64_t b0 = blocks.records.first();
    const std::uint64_t b1 = blocks.records.last();  // before the full ring's head: see the Note
    const std::uint64_t f0 = full.first();
    std::uint64_t f1 = full.last();
    // Full events recorded after block b1: they and what follows wait for the next drain.
    for (std::uint64_t f = f0; f != f1; ++f) {
      if (full.at(f).block_seq > b1) {
        f1 = f;
        break;
      }
    }
    std::uint64_t b = b0;
    auto take_blocks_until = [&](std::uint64_t end) {
      for (; b != end; ++b) {
        const block_record& r = blocks.records.at(b);
        const std::uint64_t tag = r.word & 3;
        if (tag == recorder_detail::tag_stream) {
          blocks.consumer_stream = std::bit_cast<std::uintptr_t>(r.time_ns);
          continue;
        }
        if (out == nullptr) continue;
        const std::uint64_t unit = recorder_detail::record_unit;
        const std::uint64_t address = (r.word >> 2 & ((std::uint64_t{1} << recorder_detail::address_bits) - 1)) * unit;
        const std::uint64_t bytes = (r.word >> (2 + recorder_detail::address_bits)) * unit;
        trace_event e = trace_event::marker(
            tag == recorder_detail::tag_alloc ? event_kind::alloc : event_kind::free, r.time_ns,
            trace_track::host, address, bytes);
        e.stream = blocks.consumer_stream;
        out->push_back(e);
      }
    };
    if (out != nullptr) {
      out->reserve(out->size() + static_cast<std::size_t>((f1 - f0) + (b1 - b0)));
    }
    for (std::uint64_t f = f0; f != f1; ++f) {
      const full_slot& slot = full.at(f);
      take_blocks_until(std::max(b, slot.block_seq));  // never below: see the Note
      if (out != nullptr) out->push_back(slot.event);
    }
    take_blocks_until(b1);
    full.consume(f1);
    blocks.records.consume(b1);
  }

  std::uint64_t dropped() const noexcept {
    return full.dropped() + blocks.records.dropped();
  }

  spsc_ring<full_slot> full;
  recorder_detail::block_ring blocks;
  std::atomic<bool> owner_exited_{false};
};

namespace {

std::atomic<std::uint64_t> next_recorder_id{1};

// The rings this thread writes to, one per recorder it has recorded into (almost always just
// the global one). The recorder owns its rings, so a destroyed recorder frees them; the thread
// keeps weak references, used only to mark its rings when it exits. A raw ring pointer from
// here is used only inside a call on the live recorder that owns the ring, which retires a
// ring only after its thread has exited.
struct thread_rings {
  std::vector<std::pair<std::uint64_t, std::weak_ptr<event_recorder::ring>>> entries;
  ~thread_rings();
};

// tls_cache (event_recorder.hpp) is a one-entry cache in front of thread_rings.
thread_local bool tls_exiting = false;
thread_local thread_rings tls_rings;

thread_rings::~thread_rings() {
  tls_exiting = true;
  tls_cache = {};
  for (auto& entry : entries) {
    if (auto r = entry.second.lock()) r->owner_exited_.store(true, std::memory_order_release);
  }
}

}  // namespace

event_recorder::event_recorder(std::size_t ring_capacity)
    : id_(next_recorder_id.fetch_add(1, std::memory_order_relaxed)),
      capacity_(std::bit_ceil(std::max<std::size_t>(ring_capacity, 2))) {}

event_recorder::~event_recorder() = default;

event_recorder::ring* event_recorder::this_thread_ring() noexcept {
  ring* r = tls_cache.recorder_id == id_ ? static_cast<ring*>(tls_cache.ring)
                                         : find_or_register_ring();
  if (r == nullptr) unregistered_dropped_.fetch_add(1, std::memory_order_relaxed);
  return r;
}

void event_recorder::record_enabled(const trace_event& event) noexcept {
  if (ring* r = this_thread_ring()) r->push(event);
}

// Note [Compact block events]: the first record of a thread, a change of stream, or a value
// the 16-byte record cannot hold.
void event_recorder::record_block_slow(event_kind kind, double time_ns, std::uintptr_t address,
                                       std::uint64_t bytes, std::uintptr_t stream) noexcept {
  using namespace recorder_detail;
  ring* r = this_thread_ring();
  if (r == nullptr) return;
  std::uint64_t word = 0;
  if (!pack_block_word(kind, address, bytes, word)) {
    trace_event e = trace_event::marker(kind, time_ns, trace_track::host, address, bytes);
    e.stream = stream;
    r->push(e);
    return;
  }
  block_ring& blocks = r->blocks;
  if (blocks.stream != stream) {
    if (!blocks.records.push(block_record{std::bit_cast<double>(stream), tag_stream})) return;
    blocks.stream = stream;
  }
  blocks.records.push(block_record{time_ns, word});
}

event_recorder::ring* event_recorder::find_or_register_ring() noexcept {
  if (tls_exiting) return nullptr;
  try {
    ring* found = nullptr;
    for (auto& entry : tls_rings.entries) {
      if (entry.first == id_) found = entry.second.lock().get();  // alive: *this owns it
    }
    if (found == nullptr) {
      // Forget recorders that are gone, so a thread that outlives many does not pile them up.
      std::erase_if(tls_rings.entries, [](const auto& entry) { return entry.second.expired(); });
      auto fresh = std::make_shared<ring>(capacity_);
      tls_rings.entries.reserve(tls_rings.entries.size() + 1);
      {
        std::lock_guard lock(mutex_);
        rings_.push_back(fresh);
      }
      found = fresh.get();
      tls_rings.entries.emplace_back(id_, fresh);  // cannot throw: reserved
    }
    tls_cache = {id_, found, &found->blocks};
    return found;
  } catch (...) {
    // Out of memory (or a failed lock) while tracing must not fail the traced program.
    return nullptr;
  }
}

std::uint64_t event_recorder::add_collect_hook(std::function<void()> hook) {
  std::lock_guard lock(hooks_mutex_);
  const std::uint64_t id = next_hook_id_++;
  collect_hooks_.emplace_back(id, std::move(hook));
  return id;
}

void event_recorder::remove_collect_hook(std::uint64_t id) {
  std::lock_guard lock(hooks_mutex_);
  std::erase_if(collect_hooks_, [id](const auto& h) { return h.first == id; });
}

void event_recorder::run_collect_hooks() {
  std::lock_guard lock(hooks_mutex_);
  for (const auto& h : collect_hooks_) h.second();
}

std::vector<trace_event> event_recorder::collect() {
  run_collect_hooks();
  std::vector<trace_event> out;
  {
    std::lock_guard lock(mutex_);
    auto keep = rings_.begin();
    for (auto& r : rings_) {
      const bool exited = r->owner_exited_.load(std::memory_order_acquire);
      r->drain_into(&out);
      if (exited) {
        retired_dropped_ += r->dropped();
      } else {
        *keep++ = std::move(r);
      }
    }
    rings_.erase(keep, rings_.end());
  }
  std::stable_sort(out.begin(), out.end(), [](const trace_event& a, const trace_event& b) {
    return a.time_ns < b.time_ns;
  });
  return out;
}

void event_recorder::clear() {
  run_collect_hooks();
  std::lock_guard lock(mutex_);
  auto keep = rings_.begin();
  for (auto& r : rings_) {
    const bool exited = r->owner_exited_.load(std::memory_order_acquire);
    r->drain_into(nullptr);
    if (exited) {
      retired_dropped_ += r->dropped();
    } else {
      *keep++ = std::move(r);
    }
  }
  rings_.erase(keep, rings_.end());
  dropped_baseline_ = total_dropped_locked();
}

std::uint64_t event_recorder::total_dropped_locked() const noexcept {
  std::uint64_t total = retired_dropped_ + unregistered_dropped_.load(std::memory_order_relaxed);
  for (const auto& r : rings_) total += r->dropped();
  return total;
}

std::uint64_t event_recorder::dropped() const {
  std::lock_guard lock(mutex_);
  return total_dropped_locked() - dropped_baseline_;
}

std::size_t event_recorder::ring_count() const {
  std::lock_guard lock(mutex_);
  return rings_.size();
}

event_recorder& global_recorder() noexcept {
  // Leaked on purpose: threads may still record while static destructors run.
  static event_recorder* const recorder = new event_recorder();
  return *recorder;
}

}  // namespace gpuswap
