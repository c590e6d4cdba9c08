#pragma once
// allocator_stats: what the caching allocator holds, in PyTorch's vocabulary, so that figures
// read the same as torch.cuda.memory_stats().
//
// Glossary (a "block" is a piece of a "segment", the unit obtained from the device)
//   allocation            blocks handed to callers and not yet freed
//   segment               device allocations held (cached or in use)
//   active                blocks allocated, or freed but still awaiting another stream's events
//   inactive_split        free blocks that are part of a split segment (fragmentation)
//   allocated_bytes       bytes of `allocation` blocks (rounded sizes)
//   reserved_bytes        bytes of `segment`
//   active_bytes          bytes of `active` blocks
//   inactive_split_bytes  bytes of `inactive_split` blocks
//   requested_bytes       bytes callers asked for, over `active` blocks (before rounding)
#include <array>
#include <cstddef>
#include <cstdint>
#include <nlohmann/json_fwd.hpp>

namespace gpuswap {

// One quantity over time: its value now, its highest value since the last reset_peak, and the
// running totals of what was added and taken away (so `allocated - freed == current`).
struct stat {
  std::int64_t current = 0;
  std::int64_t peak = 0;
  std::int64_t allocated = 0;
  std::int64_t freed = 0;

  void increase(std::int64_t amount) noexcept {
    current += amount;
    allocated += amount;
    if (current > peak) peak = current;
  }
  void decrease(std::int64_t amount) noexcept {
    current -= amount;
    freed += amount;
  }
  void reset_peak() noexcept { peak = current; }
  friend bool operator==(const stat&, const stat&) = default;
};

// Which pool a figure covers: both, requests <= 1 MiB, or larger ones.
enum class stat_pool : std::size_t { all = 0, small = 1, large = 2 };
inline constexpr std::size_t stat_pool_count = 3;

struct stat_array {
  std::array<stat, stat_pool_count> by_pool{};
  stat& operator[](stat_pool pool) noexcept { return by_pool[static_cast<std::size_t>(pool)]; }
  const stat& operator[](stat_pool pool) const noexcept {
    return by_pool[static_cast<std::size_t>(pool)];
  }
  const stat& all() const noexcept { return (*this)[stat_pool::all]; }
  friend bool operator==(const stat_array&, const stat_array&) = default;
};

struct allocator_stats {
  stat_array allocation;
  stat_array segment;
  stat_array active;
  stat_array inactive_split;
  stat_array allocated_bytes;
  stat_array reserved_bytes;
  stat_array active_bytes;
  stat_array inactive_split_bytes;
  stat_array requested_bytes;

  // Allocations that missed the cache and device allocation, and went down the OOM ladder.
  std::uint64_t num_alloc_retries = 0;
  // Allocations that failed with out_of_memory.
  std::uint64_t num_ooms = 0;
  // Times cached segments were handed back to the device (empty_cache and the OOM ladder).
  std::uint64_t num_cache_flushes = 0;
  // Successful device allocate/free calls for segments.
  std::uint64_t num_device_allocs = 0;
  std::uint64_t num_device_frees = 0;
  // deallocate() of a pointer this allocator did not hand out (ignored; a caller bug).
  std::uint64_t num_invalid_frees = 0;

  void reset_peak() noexcept;
  // Every stat as {current, peak, allocated, freed} per pool, the counters, and
  // "fragmentation": inactive_split_bytes / reserved_bytes (0 when nothing is reserved).
  nlohmann::json to_json() const;
  friend bool operator==(const allocator_stats&, const allocator_stats&) = default;
};

}  // namespace gpuswap
