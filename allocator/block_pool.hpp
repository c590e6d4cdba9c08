#pragma once
// block_pool: the free-block index of one caching_allocator pool (small or large).
//
// The small pool keeps, per stream, one free list per exact block size with a bitmap of the
// non-empty ones (size_class_bins, Note [Segregated fit]): best fit, insertion and removal in
// constant time. The large pool's sizes are unbounded, so it keeps an intrusive red-black tree
// ordered by (stream, size, address): best fit for a stream is one lower_bound. Neither
// allocates on insert or erase; the small pool's per-stream lists are made by add_stream, which
// the allocator calls when it maps a segment, before any block of that stream can be freed.
#include <boost/intrusive/set.hpp>
#include <cstddef>
#include <memory>
#include <vector>

#include "allocator/block.hpp"
#include "allocator/size_class_bins.hpp"

namespace gpuswap {

class block_pool {
 public:
  explicit block_pool(pool_kind kind) noexcept : kind_(kind) {}
  block_pool(const block_pool&) = delete;
  block_pool& operator=(const block_pool&) = delete;
  ~block_pool();

  pool_kind kind() const noexcept { return kind_; }
  // Makes the pool ready to hold free blocks of `stream`; idempotent. Must precede the first
  // insert of a block of that stream. May throw bad_alloc; then nothing changed.
  void add_stream(stream_t stream);

  // Preconditions: b.state == free, b not in any pool, b.size > 0, add_stream(b.stream) done.
  void insert(block& b) noexcept {
    if (kind_ == pool_kind::small) {
      bins_of(b.stream)->insert(b);
    } else {
      tree_.insert(b);
    }
  }
  // Precondition: b is in this pool.
  void erase(block& b) noexcept {
    if (kind_ == pool_kind::small) {
      bins_of(b.stream)->erase(b);
    } else {
      tree_.erase(tree_.iterator_to(b));
    }
  }
  bool contains(const block& b) const noexcept;

  // Fast bins of the small pool (Note [Deferred coalescing], caching_allocator.cpp).
  // Preconditions of push_deferred: kind() == small, b.state == deferred, add_stream done.
  // False when the bin cannot grow (size_class_bins::push_deferred).
  bool push_deferred(block& b) noexcept { return bins_of(b.stream)->push_deferred(b); }
  // A deferred block of `stream` of exactly `size` (a rounded small request), or {nullptr, 0}.
  size_class_bins::popped_block pop_deferred(stream_t stream, std::size_t size) noexcept {
    size_class_bins* bins = bins_of(stream);
    return bins != nullptr ? bins->pop_deferred(size) : size_class_bins::popped_block{};
  }
  std::size_t deferred_size(stream_t stream) const noexcept {
    const size_class_bins* bins = bins_of(stream);
    return bins != nullptr ? bins->deferred_size() : 0;
  }
  // Takes the deferred blocks of `stream` out and calls f(block&) on each.
  template <typename F>
  void drain_deferred(stream_t stream, F&& f) {
    if (size_class_bins* bins = bins_of(stream)) bins->drain_deferred(f);
  }
  template <typename F>
  void drain_all_deferred(F&& f) {
    for (const auto& bins : bins_) bins->drain_deferred(f);
  }
  // Gives back the fast bins' memory where they are empty (empty_cache).
  void shrink_deferred() noexcept {
    for (const auto& bins : bins_) bins->shrink_deferred();
  }
  bool deferred_links_consistent() const noexcept {
    for (const auto& bins : bins_) {
      if (!bins->deferred_links_consistent()) return false;
    }
    return true;
  }
  // f(stream of the fast bin, block).
  template <typename F>
  void for_each_deferred(F&& f) const {
    for (const auto& bins : bins_) {
      bins->for_each_deferred([&](const block& b) { f(bins->stream(), b); });
    }
  }

  // The smallest free block of `stream` with size >= `size`, or nullptr. Follows PyTorch's
  // max_split_size rule: a request below max_split_size never takes a block of max_split_size
  // or more (those are kept whole for large requests), and a request of max_split_size or more
  // takes a block only if it wastes less than `oversize_slack` bytes.
  block* best_fit(stream_t stream, std::size_t size, std::size_t max_split_size,
                  std::size_t oversize_slack) noexcept {
    block* b = nullptr;
    if (kind_ == pool_kind::small) {
      const size_class_bins* bins = bins_of(stream);
      if (bins == nullptr) return nullptr;
      b = bins->smallest_at_least(size);
    } else {
      b = tree_best_fit(stream, size);
    }
    if (b == nullptr) return nullptr;
    // The first candidate is the smallest that fits; if it breaks the max_split_size rule every
    // larger one does too.
    if (size < max_split_size && b->size >= max_split_size) return nullptr;
    if (size >= max_split_size && b->size - size >= oversize_slack) return nullptr;
    return b;
  }

  std::size_t size() const noexcept;
  bool empty() const noexcept { return size() == 0; }

  template <typename F>
  void for_each(F&& f) const {
    for (const auto& bins : bins_) bins->for_each(f);
    for (const block& b : tree_) f(b);
  }

 private:
  // Streams are few (a compute stream or a handful), so a scan beats a map.
  size_class_bins* bins_of(stream_t stream) const noexcept {
    for (const auto& bins : bins_) {
      if (bins->stream() == stream) return bins.get();
    }
    return nullptr;
  }
  block* tree_best_fit(stream_t stream, std::size_t size) noexcept;

  struct key {
    stream_t stream;
    std::size_t size;
  };
  struct order {
    bool operator()(const block& a, const block& b) const noexcept {
      if (a.stream != b.stream) return a.stream < b.stream;
      if (a.size != b.size) return a.size < b.size;
      return a.address < b.address;
    }
  };
  // Orders keys before every block of their stream and size (address 0 is below any block).
  struct key_order {
    bool operator()(const block& a, const key& k) const noexcept {
      if (a.stream != k.stream) return a.stream < k.stream;
      return a.size < k.size;
    }
    bool operator()(const key& k, const block& b) const noexcept {
      if (k.stream != b.stream) return k.stream < b.stream;
      return k.size <= b.size;
    }
  };
  using hook = boost::intrusive::member_hook<
      block, boost::intrusive::set_member_hook<boost::intrusive::optimize_size<true>>,
      &block::tree_hook>;
  using tree_type = boost::intrusive::set<block, hook, boost::intrusive::compare<order>,
                                          boost::intrusive::constant_time_size<true>>;

  pool_kind kind_;
  std::vector<std::unique_ptr<size_class_bins>> bins_;  // small pool: one per stream
  tree_type tree_;                                       // large pool
};

}  // namespace gpuswap
