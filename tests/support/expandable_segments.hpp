#pragma once
// What the expandable-segment tests of the caching allocator share: a 1 GiB simulated device,
// allocator options with expandable segments under a budget, and the reserved bytes.
#include <cstddef>
#include <cstdint>

#include "allocator/caching_allocator.hpp"
#include "device/sim_device.hpp"

namespace gpuswap::testing_support {

inline sim_options expandable_sim(sim_backing backing = sim_backing::phantom) {
  sim_options o;
  o.device_capacity = std::size_t{1} << 30;
  o.backing = backing;
  return o;
}

inline caching_allocator_options expandable(std::size_t budget) {
  caching_allocator_options o;
  o.device_limit = budget;
  o.expandable_segments = true;
  return o;
}

inline std::int64_t reserved(const caching_allocator& a) {
  return a.stats().reserved_bytes.all().current;
}

}  // namespace gpuswap::testing_support
