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

// Two layers (forward steps 0, 1; backward 2 for layer 1, 3 for layer 0), 1 ms each. Layer 0
// runs as two parts of half its step each (Note [Inside a step] in memory_timeline.cpp), each
// keeping a 100 MB piece for its backward: tensor 0 made by the first part (over 0..0.5 of step
// 0 in forward, 0.5..1 of step 3 in backward), tensor 1 by the second (0.5..1 forward, 0..0.5
// backward). Tensor 2, layer 1's 100 MB state, is one piece over its whole steps. With
// `whole_steps` every position is left at its default (each tensor made at its step's start
// and sent out at its end).
inline workload_profile two_part_layer(bool whole_steps = false) {
  workload_profile p;
  p.steps = {step_info{phase::forward, 0, 1e6}, step_info{phase::forward, 1, 1e6},
             step_info{phase::backward, 1, 1e6}, step_info{phase::backward, 0, 1e6}};
  const auto piece = [&](int id, int producer, int use, const char* name) {
    tensor_info t;
    t.id = id;
    t.bytes = 100 * mb;
    t.producer_step = producer;
    t.use_steps = {use};
    t.name = name;
    p.tensors.push_back(t);
  };
  piece(0, 0, 3, "layer0.saved.first");
  piece(1, 0, 3, "layer0.saved.second");
  piece(2, 1, 2, "layer1.saved");
  if (!whole_steps) {
    p.tensors[0].sent_at = 0.5;
    p.tensors[0].needed_at = 0.5;
    p.tensors[1].made_at = 0.5;
    p.tensors[1].freed_at = 0.5;
  }
  return p;
}

}  // namespace gpuswap::testing
