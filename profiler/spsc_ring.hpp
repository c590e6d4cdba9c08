#pragma once
// spsc_ring: a bounded single-producer, single-consumer ring of trivially copyable items, the
// storage of event_recorder's per-thread rings. The producer never waits: a push into a full
// ring is dropped and counted. See Note [Recorder memory ordering] (event_recorder.cpp).
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>

namespace gpuswap {

template <typename T>
class spsc_ring {
  static_assert(std::is_trivially_copyable_v<T>);

 public:
  // capacity: a power of two.
  explicit spsc_ring(std::size_t capacity)
      : slots_(std::make_unique<T[]>(capacity)), mask_(capacity - 1) {}
  spsc_ring(const spsc_ring&) = delete;
  spsc_ring& operator=(const spsc_ring&) = delete;

  // --- producer side (the owning thread only)
  // Items pushed so far, dropped ones not counted.
  std::uint64_t written() const noexcept { return head_.load(std::memory_order_relaxed); }
  bool push(const T& item) noexcept {
    const std::uint64_t h = head_.load(std::memory_order_relaxed);
    if (h - producer_tail_ > mask_) [[unlikely]] {
      producer_tail_ = tail_.load(std::memory_order_acquire);
      if (h - producer_tail_ > mask_) {
        dropped_.store(dropped_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
        return false;
      }
    }
    slots_[h & mask_] = item;
    head_.store(h + 1, std::memory_order_release);
    return true;
  }

  // --- consumer side (one at a time; event_recorder holds its mutex_)
  // [first(), last()) are the absolute indices of the readable items; at(i) reads one;
  // consume(n) hands the slots before index n back to the producer.
  std::uint64_t first() const noexcept { return tail_.load(std::memory_order_relaxed); }
  std::uint64_t last() const noexcept { return head_.load(std::memory_order_acquire); }
  const T& at(std::uint64_t i) const noexcept { return slots_[i & mask_]; }
  void consume(std::uint64_t n) noexcept { tail_.store(n, std::memory_order_release); }

  // Either side: drops so far.
  std::uint64_t dropped() const noexcept { return dropped_.load(std::memory_order_relaxed); }

 private:
  // head_ and everything push() reads on one line, tail_ alone on another, so that the
  // producer's fast path reads the line the consumer writes only when the ring looks full. (With
  // slots_ and mask_ beside tail_, every consume() cost the producer's next push a miss.)
  alignas(64) std::atomic<std::uint64_t> head_{0};
  std::uint64_t producer_tail_ = 0;  // the producer's copy of tail_
  std::atomic<std::uint64_t> dropped_{0};
  std::unique_ptr<T[]> slots_;
  std::uint64_t mask_;
  alignas(64) std::atomic<std::uint64_t> tail_{0};
};

}  // namespace gpuswap
