#include "allocator/block_pool.hpp"

namespace gpuswap {

// The blocks belong to caching_allocator; the pool only unlinks them so that their hooks are
// not left pointing into a destroyed tree.
block_pool::~block_pool() { set_.clear(); }

void block_pool::insert(block& b) noexcept { set_.insert(b); }

void block_pool::erase(block& b) noexcept { set_.erase(set_.iterator_to(b)); }

bool block_pool::contains(const block& b) const noexcept {
  if (!b.free_hook.is_linked()) return false;
  auto it = set_.find(b);
  return it != set_.end() && &*it == &b;
}

block* block_pool::best_fit(stream_t stream, std::size_t size, std::size_t max_split_size,
                            std::size_t oversize_slack) noexcept {
  auto it = set_.lower_bound(key{stream, size}, key_order{});
  if (it == set_.end() || it->stream != stream) return nullptr;
  // The first candidate is the smallest that fits; if it breaks the max_split_size rule every
  // larger one does too.
  if (size < max_split_size && it->size >= max_split_size) return nullptr;
  if (size >= max_split_size && it->size - size >= oversize_slack) return nullptr;
  return &*it;
}

}  // namespace gpuswap
