#pragma once
// oom_report: the figures of a failed device allocation and the message built from them. The
// message says exactly where the memory went, one field a line, so a user can tell at a glance
// whether to raise the budget, offload more, or fight fragmentation.
#include <cstddef>
#include <optional>
#include <string>

#include "allocator/reclaimer.hpp"
#include "core/human_bytes.hpp"
#include "device/device.hpp"

namespace gpuswap {

struct oom_report {
  std::size_t requested = 0;  // bytes the caller asked for
  std::size_t rounded = 0;    // the block size that was searched for (0 if it overflowed)
  std::string device_name;
  int device_ordinal = 0;
  std::size_t budget = 0;  // device_limit, or physical capacity when unset
  bool budget_is_device_limit = false;
  memory_info physical;                            // device::memory() at the time of the failure
  std::size_t allocated = 0;                       // bytes of blocks handed to callers
  std::size_t reserved = 0;                        // bytes of segments held
  std::size_t max_split_size = 0;                  // SIZE_MAX when unset
  std::size_t largest_free_block = 0;              // the biggest cached block, on any stream
  std::optional<external_memory_report> external;  // absent when no reporter is set

  std::size_t cached() const noexcept { return reserved > allocated ? reserved - allocated : 0; }
};

// The out_of_memory message: a headline, then one "label: value" line per field:
//   requested, device, budget, physical, allocated, cached, swapped out, pinned host, hint.
std::string format_oom_message(const oom_report& report);

}  // namespace gpuswap
