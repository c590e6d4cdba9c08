#pragma once
// workload_graph: a model_spec at a batch size turned into the iteration the runner executes and
// the planner reasons about: the step order (forward 0..L-1, backward L-1..0), the tensors that
// live across steps with their producer and use steps, and each step's modelled cost.
//
// Tensors: the network input; each layer's output; and, for layers that keep their own state for
// backward (a transformer block's saved activations, saved_bytes_per_sample_override), that
// state, as the pieces its operators save (Note [A block's saved pieces] in workload_graph.cpp).
// Error signals (gradients of tensors) are not tensors here: they are short-lived scratch the
// runner allocates in backward and frees as soon as they are consumed.
#include <cstddef>
#include <vector>

#include "device/device.hpp"
#include "prefetcher/workload_profile.hpp"
#include "tools/model_spec.hpp"

namespace gpuswap {

// One operator of a layer whose step the runner carries out as several kernels: its share of
// the step's cost (forward and backward alike) and the state pieces it saves in forward, which
// its backward reads and then frees.
struct layer_part {
  double share = 1;
  std::vector<int> saved;  // tensor ids
};

struct workload_graph {
  static constexpr int no_tensor = -1;

  int batch = 0;
  int layers = 0;
  workload_profile profile;
  std::vector<int> output_tensor;  // per layer: its output tensor
  // Per layer: its operators in forward order (backward runs them in reverse); empty for a
  // layer that keeps no state of its own, which runs as one kernel each way.
  std::vector<std::vector<layer_part>> parts;
  int input_tensor = no_tensor;    // the network input
  std::vector<kernel_cost> forward_cost;   // per layer
  std::vector<kernel_cost> backward_cost;  // per layer
  std::size_t param_bytes = 0;             // all layers' parameters (gradients: as many again)

  int forward_step(int layer) const noexcept { return layer; }
  int backward_step(int layer) const noexcept { return 2 * layers - 1 - layer; }
  // The tensor a layer input index (-1: network input) refers to.
  int tensor_of(int producer_layer) const noexcept {
    return producer_layer < 0 ? input_tensor : output_tensor[static_cast<std::size_t>(producer_layer)];
  }
};

// Builds the graph. Step compute times are filled from `estimate` (ns for a kernel cost), e.g.
// sim_device::kernel_ns, until measured ones replace them.
template <typename Estimate>
workload_graph build_workload_graph(const model_spec& model, int batch, Estimate&& estimate);

// The non-template part: everything but the time estimates (compute_ns left 0).
workload_graph build_workload_graph(const model_spec& model, int batch);

template <typename Estimate>
workload_graph build_workload_graph(const model_spec& model, int batch, Estimate&& estimate) {
  workload_graph g = build_workload_graph(model, batch);
  for (int l = 0; l < g.layers; ++l) {
    g.profile.steps[static_cast<std::size_t>(g.forward_step(l))].compute_ns =
        estimate(g.forward_cost[static_cast<std::size_t>(l)]);
    g.profile.steps[static_cast<std::size_t>(g.backward_step(l))].compute_ns =
        estimate(g.backward_cost[static_cast<std::size_t>(l)]);
  }
  return g;
}

}  // namespace gpuswap
