#pragma once
// Simulated devices the tests share.
#include <cstddef>

#include "device/sim_device.hpp"

namespace gpuswap::testing_support {

// The device the training tests run their small real-math networks on: vDNN's Titan X
// timings, real bytes, 256 MiB of device memory and 1 GiB of host memory.
inline sim_options small_real_device() {
  constexpr std::size_t mib = std::size_t{1} << 20;
  sim_options o = sim_preset("titan-x-pcie3");
  o.backing = sim_backing::real;
  o.device_capacity = 256 * mib;
  o.host_capacity = 1024 * mib;
  return o;
}

// The simulator's defaults with `capacity` bytes of device memory: the allocator tests' device.
inline sim_options sim_with_capacity(std::size_t capacity = std::size_t{1} << 30) {
  sim_options o;
  o.device_capacity = capacity;
  return o;
}

// A GPU preset's timings with phantom bytes and room for the largest model's unlimited run
// (GPT-7B), as `gpuswap simulate` has them.
inline sim_options phantom_gpu(const char* gpu) {
  sim_options so = sim_preset(gpu);
  so.backing = sim_backing::phantom;
  so.device_capacity = std::size_t{1} << 40;
  so.host_capacity = std::size_t{1} << 42;
  return so;
}

}  // namespace gpuswap::testing_support
