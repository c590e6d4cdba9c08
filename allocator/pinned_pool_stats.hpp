#pragma once
// pinned_pool_stats: a snapshot of what the pinned host pool holds and has done, in the shape of
// PyTorch's allocator statistics (each figure as current / peak / allocated / freed) so that the
// CLI, the live stats segment and the C API report host and device memory the same way.
#include <cstddef>
#include <cstdint>

#include <nlohmann/json_fwd.hpp>

#include "allocator/allocator_stats.hpp"  // stat: current / peak / allocated / freed

namespace gpuswap {

struct pinned_pool_stats {
  stat allocated_bytes;  // size-class bytes handed to callers and not yet given back
  stat requested_bytes;  // bytes callers asked for (allocated_bytes minus rounding)
  stat reserved_bytes;   // pinned bytes the pool holds from the device: in use + cached
  stat allocations;      // live allocations (a count)
  stat pinned_buffers;   // pinned buffers held (a count)

  std::size_t cached_bytes = 0;   // reserved but not in use: reusable now or after events
  std::size_t pending_bytes = 0;  // part of cached_bytes still waiting for stream events
  std::size_t host_limit = 0;     // the pool's limit (0 = none)

  std::uint64_t num_pinned_allocs = 0;          // successful device allocate_pinned calls
  std::uint64_t num_pinned_alloc_failures = 0;  // allocate_pinned calls that returned null/threw
  std::uint64_t num_pinned_frees = 0;           // device free_pinned calls
  std::uint64_t num_reuses = 0;                 // allocations served from the cache
  std::uint64_t num_event_syncs = 0;  // cached buffers the pool had to wait for (limit ladder)
  std::uint64_t num_fence_failures = 0;  // event creates/records that failed on deallocate
  std::uint64_t num_ooms = 0;            // out_of_memory thrown
  std::uint64_t num_unknown_pointers = 0;  // deallocate/record_stream of a pointer not in use

  // {"allocated_bytes": {"current", "peak", "allocated", "freed"}, ..., "num_ooms": n}
  nlohmann::json to_json() const;
};

}  // namespace gpuswap
