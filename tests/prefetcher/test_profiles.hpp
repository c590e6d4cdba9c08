#pragma once
// Hand-built workload profiles shared by the prefetcher tests.
#include <cstddef>
#include <string>
#include <vector>

#include "prefetcher/workload_profile.hpp"

namespace gpuswap::testing {

// A chain of layers: forward 0..L-1 are steps 0..L-1, backward L-1..0 are steps L..2L-1.
// Tensor i is layer i's output: produced at step i, read by forward step i+1 and by the backward
// step of layer i+1 (step 2L-2-i), which needs its input. The last one feeds the loss: read by
// backward step L only, and not offloadable. Every step takes step_ns.
inline workload_profile chain(const std::vector<std::size_t>& bytes, double step_ns = 1e6,
                              std::size_t resident = 0) {
  const int layers = static_cast<int>(bytes.size());
  workload_profile p;
  for (int i = 0; i < layers; ++i) p.steps.push_back(step_info{phase::forward, i, step_ns});
  for (int i = layers - 1; i >= 0; --i) p.steps.push_back(step_info{phase::backward, i, step_ns});
  for (int i = 0; i < layers; ++i) {
    tensor_info t;
    t.id = i;
    t.bytes = bytes[static_cast<std::size_t>(i)];
    t.producer_step = i;
    t.name = "layer" + std::to_string(i) + ".out";
    if (i + 1 < layers) {
      t.use_steps = {i + 1, 2 * layers - 2 - i};
    } else {
      t.use_steps = {layers};
      t.offloadable = false;
    }
    p.tensors.push_back(t);
  }
  p.resident_bytes = resident;
  return p;
}

constexpr std::size_t mb = 1'000'000;  // decimal, so that copy times come out round

}  // namespace gpuswap::testing
