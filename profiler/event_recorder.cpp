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
struct event_recorder::ring {
  explicit ring(std::size_t capacity)
      : slots_(std::make_unique<trace_event[]>(capacity)), mask_(capacity - 1) {}

  bool push(const trace_event& event) noexcept {
    const std::uint64_t h = head_.load(std::memory_order_relaxed);
    if (h - producer_tail_ > mask_) {
      producer_tail_ = tail_.load(std::memory_order_acquire);
      if (h - producer_tail_ > mask_) {
        dropped_.store(dropped_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
        return false;
      }
    }
    slots_[h & mask_] = event;
    head_.store(h + 1, std::memory_order_release);
    return true;
  }

  // Consumer side; the caller holds the recorder's mutex_.
  void drain_into(std::vector<trace_event>* out) {
    const std::uint64_t t = tail_.load(std::memory_order_relaxed);
    const std::uint64_t h = head_.load(std::memory_order_acquire);
    if (out != nullptr) {
      out->reserve(out->size() + static_cast<std::size_t>(h - t));
      for (std::uint64_t i = t; i != h; ++i) out->push_back(slots_[i & mask_]);
    }
    tail_.store(h, std::memory_order_release);
  }

  std::uint64_t dropped() const noexcept { return dropped_.load(std::memory_order_relaxed); }

  alignas(64) std::atomic<std::uint64_t> head_{0};
  std::uint64_t producer_tail_ = 0;  // producer's private copy of tail_
  std::atomic<std::uint64_t> dropped_{0};
  alignas(64) std::atomic<std::uint64_t> tail_{0};
  std::atomic<bool> owner_exited_{false};
  std::unique_ptr<trace_event[]> slots_;
  std::uint64_t mask_;
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

// A one-entry cache in front of thread_rings, made of trivially destructible thread_locals so
// the fast path has no guard and still works (by falling back to a drop) during thread exit.
thread_local std::uint64_t tls_cached_id = 0;
thread_local event_recorder::ring* tls_cached_ring = nullptr;
thread_local bool tls_exiting = false;
thread_local thread_rings tls_rings;

thread_rings::~thread_rings() {
  tls_exiting = true;
  tls_cached_id = 0;
  tls_cached_ring = nullptr;
  for (auto& entry : entries) {
    if (auto r = entry.second.lock()) r->owner_exited_.store(true, std::memory_order_release);
  }
}

}  // namespace

event_recorder::event_recorder(std::size_t ring_capacity)
    : id_(next_recorder_id.fetch_add(1, std::memory_order_relaxed)),
      capacity_(std::bit_ceil(std::max<std::size_t>(ring_capacity, 2))) {}

event_recorder::~event_recorder() = default;

void event_recorder::record_enabled(const trace_event& event) noexcept {
  ring* r = (tls_cached_id == id_) ? tls_cached_ring : find_or_register_ring();
  if (r == nullptr) {
    unregistered_dropped_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  r->push(event);
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
    tls_cached_id = id_;
    tls_cached_ring = found;
    return found;
  } catch (...) {
    // Out of memory (or a failed lock) while tracing must not fail the traced program.
    return nullptr;
  }
}

std::vector<trace_event> event_recorder::collect() {
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
