#pragma once
// size_class_bins: the free blocks of one stream in the small pool, in one list per exact size.
//
// Note [Segregated fit]
// Small-pool blocks are multiples of 512 bytes no larger than their 2 MiB segment, so there are
// only 4,096 possible sizes. One intrusive list per size and a two-level bitmap of the
// non-empty lists (a summary word over 64 words) make best fit two count-trailing-zeros:
// the first non-empty list at or above the request's size holds blocks of exactly the
// smallest size that fits, which is what a best-fit tree would return, in constant time
// whatever the number of free blocks. A red-black tree walk instead touches ~log2(n) blocks
// scattered over memory, and at 100,000 live blocks those cache misses are the allocator's
// whole cost (Note [Hot path], caching_allocator.cpp). Within one size the most recently freed
// block comes first: its lines are the likeliest to be in cache. The large pool, whose sizes
// are unbounded, keeps the tree (block_pool).
#include <array>
#include <bit>
#include <boost/intrusive/list.hpp>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "allocator/block.hpp"

namespace gpuswap {

class size_class_bins {
 public:
  static constexpr std::size_t granularity = 512;
  static constexpr std::size_t class_count = 4096;  // sizes 512 B .. 2 MiB
  static constexpr std::size_t max_size = granularity * class_count;

  explicit size_class_bins(stream_t stream) noexcept : stream_(stream) {}
  size_class_bins(const size_class_bins&) = delete;
  size_class_bins& operator=(const size_class_bins&) = delete;
  // The blocks belong to caching_allocator: unlink them so that no hook points into freed lists.
  ~size_class_bins() {
    for (list& l : lists_) l.clear();
  }

  stream_t stream() const noexcept { return stream_; }
  std::size_t size() const noexcept { return count_; }

  // Preconditions: b.stream == stream(), b.size a non-zero multiple of granularity, at most
  // max_size, and b in no list.
  void insert(block& b) noexcept {
    const std::size_t c = class_of(b.size);
    lists_[c].push_front(b);
    words_[c >> 6] |= std::uint64_t{1} << (c & 63);
    summary_ |= std::uint64_t{1} << (c >> 6);
    ++count_;
  }

  // Precondition: b is in this object's lists.
  void erase(block& b) noexcept {
    const std::size_t c = class_of(b.size);
    list& l = lists_[c];
    l.erase(l.iterator_to(b));
    if (l.empty()) {
      std::uint64_t& word = words_[c >> 6];
      word &= ~(std::uint64_t{1} << (c & 63));
      if (word == 0) summary_ &= ~(std::uint64_t{1} << (c >> 6));
    }
    --count_;
  }

  // A free block of the smallest size >= `size` (size > 0), or nullptr.
  block* smallest_at_least(std::size_t size) const noexcept {
    if (size > max_size) return nullptr;
    const std::size_t c = class_of(size);
    std::size_t w = c >> 6;
    std::uint64_t bits = words_[w] & (~std::uint64_t{0} << (c & 63));
    if (bits == 0) {
      const std::uint64_t above = w + 1 < word_count ? summary_ >> (w + 1) << (w + 1) : 0;
      if (above == 0) return nullptr;
      w = static_cast<std::size_t>(std::countr_zero(above));
      bits = words_[w];
    }
    const std::size_t found = (w << 6) | static_cast<std::size_t>(std::countr_zero(bits));
    return const_cast<block*>(&lists_[found].front());
  }

  // Fast bins (Note [Deferred coalescing], caching_allocator.cpp): one LIFO per exact size of
  // blocks freed without merging. No bitmap: they are only ever asked for an exact size, and
  // drained all at once. Each LIFO is an array of (block, address) pairs, not a list through
  // the blocks (Note [Fast bins as arrays]).
  struct deferred_block {
    block* b = nullptr;
    std::uintptr_t address = 0;  // b->address, known without loading b
  };
  // A popped block, and the one the next pop of its size would return (for a prefetch).
  struct popped_block : deferred_block {
    deferred_block next;
  };
  // Preconditions: as insert's, and b in no fast bin. False, with nothing changed, when the
  // bin cannot grow (no memory); never after a pop from the same bin with no push since.
  bool push_deferred(block& b) noexcept {
    std::vector<deferred_block>& bin = deferred_[class_of(b.size)];
    try {
      bin.push_back(deferred_block{&b, b.address});
    } catch (...) {
      return false;
    }
    ++deferred_count_;
    return true;
  }
  // The most recently pushed deferred block of exactly `size` (a multiple of granularity),
  // taken out, or {nullptr, 0}. Reads nothing of the block itself.
  popped_block pop_deferred(std::size_t size) noexcept {
    if (size > max_size) return {};
    std::vector<deferred_block>& bin = deferred_[class_of(size)];
    if (bin.empty()) return {};
    popped_block top;
    static_cast<deferred_block&>(top) = bin.back();
    bin.pop_back();
    if (!bin.empty()) top.next = bin.back();
    --deferred_count_;
    return top;
  }
  std::size_t deferred_size() const noexcept { return deferred_count_; }
  // Takes every deferred block out, calling f(block&) on each after it left its bin (so that f
  // may recycle it).
  template <typename F>
  void drain_deferred(F&& f) {
    for (std::size_t c = 0; c < class_count && deferred_count_ != 0; ++c) {
      std::vector<deferred_block>& bin = deferred_[c];
      while (!bin.empty()) {
        block* b = bin.back().b;
        bin.pop_back();
        --deferred_count_;
        f(*b);
      }
    }
  }
  // Gives back the arrays' memory once they are empty (empty_cache).
  void shrink_deferred() noexcept {
    if (deferred_count_ != 0) return;
    for (std::vector<deferred_block>& bin : deferred_) bin.shrink_to_fit();
  }
  // Every entry's carried address is its block's, and every block is in the bin of its size
  // (for validate: a wrong one would put a block in the index under another address).
  bool deferred_links_consistent() const noexcept {
    std::size_t n = 0;
    for (std::size_t c = 0; c < class_count; ++c) {
      for (const deferred_block& d : deferred_[c]) {
        if (d.b == nullptr || d.address != d.b->address || class_of(d.b->size) != c) return false;
        ++n;
      }
    }
    return n == deferred_count_;
  }
  template <typename F>
  void for_each_deferred(F&& f) const {
    for (const std::vector<deferred_block>& bin : deferred_) {
      for (const deferred_block& d : bin) f(*d.b);
    }
  }

  bool contains(const block& b) const noexcept {
    if (!b.bin_hook.is_linked() || b.size == 0 || b.size > max_size) return false;
    for (const block& x : lists_[class_of(b.size)]) {
      if (&x == &b) return true;
    }
    return false;
  }

  template <typename F>
  void for_each(F&& f) const {
    for (const list& l : lists_) {
      for (const block& b : l) f(b);
    }
  }

 private:
  static constexpr std::size_t word_count = class_count / 64;
  // Sizes that are not multiples of granularity (requests, never blocks) round up.
  static std::size_t class_of(std::size_t size) noexcept {
    return (size + granularity - 1) / granularity - 1;
  }

  using hook = boost::intrusive::member_hook<block, boost::intrusive::list_member_hook<>,
                                             &block::bin_hook>;
  using list = boost::intrusive::list<block, hook, boost::intrusive::constant_time_size<false>>;

  stream_t stream_;
  std::size_t count_ = 0;
  std::uint64_t summary_ = 0;  // bit w: words_[w] != 0
  std::array<std::uint64_t, word_count> words_{};  // bit c % 64 of word c / 64: list c non-empty
  std::array<list, class_count> lists_;
  std::size_t deferred_count_ = 0;
  std::array<std::vector<deferred_block>, class_count> deferred_;  // fast bins, by size class
};

}  // namespace gpuswap
