#pragma once
// Helpers the caching allocator's two source files (caching_allocator.cpp and
// caching_allocator_expandable.cpp) share: rounding, and moving a figure of one pool in its
// stat_array together with the all-pools figure.
#include <cstddef>
#include <cstdint>

#include "allocator/allocator_stats.hpp"
#include "allocator/block.hpp"

namespace gpuswap::caching_detail {

constexpr std::size_t round_up(std::size_t value, std::size_t unit) noexcept {
  return (value + unit - 1) / unit * unit;
}

constexpr std::size_t round_down(std::size_t value, std::size_t unit) noexcept {
  return value / unit * unit;
}

inline stat_pool stat_pool_of(pool_kind kind) noexcept {
  return kind == pool_kind::small ? stat_pool::small : stat_pool::large;
}

// add and sub run a dozen times per allocation and free; GCC left them out of line, which
// showed as a call per stat in profiles of the hot path.
[[gnu::always_inline]] inline void add(stat_array& a, pool_kind kind,
                                       std::int64_t amount) noexcept {
  a[stat_pool::all].increase(amount);
  a[stat_pool_of(kind)].increase(amount);
}

[[gnu::always_inline]] inline void sub(stat_array& a, pool_kind kind,
                                       std::int64_t amount) noexcept {
  a[stat_pool::all].decrease(amount);
  a[stat_pool_of(kind)].decrease(amount);
}

inline std::int64_t signed_size(std::size_t n) noexcept { return static_cast<std::int64_t>(n); }

}  // namespace gpuswap::caching_detail
