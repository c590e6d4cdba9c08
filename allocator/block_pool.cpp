#include "allocator/block_pool.hpp"

namespace gpuswap {

// The blocks belong to caching_allocator; the pool only unlinks them so that their hooks are
// not left pointing into a destroyed index.
block_pool::~block_pool() { tree_.clear(); }

void block_pool::add_stream(stream_t stream) {
  if (kind_ != pool_kind::small || bins_of(stream) != nullptr) return;
  bins_.reserve(bins_.size() + 1);
  bins_.push_back(std::make_unique<size_class_bins>(stream));
}

bool block_pool::contains(const block& b) const noexcept {
  if (kind_ == pool_kind::small) {
    const size_class_bins* bins = bins_of(b.stream);
    return bins != nullptr && bins->contains(b);
  }
  if (!b.tree_hook.is_linked()) return false;
  auto it = tree_.find(b);
  return it != tree_.end() && &*it == &b;
}

std::size_t block_pool::size() const noexcept {
  std::size_t n = tree_.size();
  for (const auto& bins : bins_) n += bins->size();
  return n;
}

block* block_pool::tree_best_fit(stream_t stream, std::size_t size) noexcept {
  auto it = tree_.lower_bound(key{stream, size}, key_order{});
  if (it == tree_.end() || it->stream != stream) return nullptr;
  return &*it;
}

}  // namespace gpuswap
