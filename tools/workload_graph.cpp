#include "tools/workload_graph.hpp"

#include <algorithm>

namespace gpuswap {

namespace {

void add_use(tensor_info& t, int step) {
  auto it = std::lower_bound(t.use_steps.begin(), t.use_steps.end(), step);
  if (it == t.use_steps.end() || *it != step) t.use_steps.insert(it, step);
}

}  // namespace

workload_graph build_workload_graph(const model_spec& model, int batch) {
  workload_graph g;
  g.batch = batch;
  g.layers = static_cast<int>(model.layers.size());
  const auto b = static_cast<std::size_t>(batch);
  const auto dt = static_cast<std::size_t>(model.dtype_bytes);
  workload_profile& p = g.profile;

  for (int l = 0; l < g.layers; ++l) p.steps.push_back(step_info{phase::forward, l, 0});
  for (int l = g.layers - 1; l >= 0; --l) p.steps.push_back(step_info{phase::backward, l, 0});
  p.step_scratch_bytes.assign(p.steps.size(), 0);

  auto new_tensor = [&](std::size_t bytes, int producer_step, std::string name) {
    tensor_info t;
    t.id = static_cast<int>(p.tensors.size());
    t.bytes = bytes;
    t.producer_step = producer_step;
    t.name = std::move(name);
    p.tensors.push_back(std::move(t));
    return p.tensors.back().id;
  };

  // The network input exists before the first step; it is "produced" by step 0.
  g.input_tensor = new_tensor(model.input_elems_per_sample() * b * dt, 0, "input");
  g.output_tensor.assign(model.layers.size(), workload_graph::no_tensor);
  g.state_tensor.assign(model.layers.size(), workload_graph::no_tensor);
  for (const layer_spec& layer : model.layers) {
    const int l = layer.index;
    g.output_tensor[static_cast<std::size_t>(l)] =
        new_tensor(layer.out_elems_per_sample * b * dt, g.forward_step(l), layer.name + ".out");
    if (layer.saved_bytes_per_sample_override > 0) {
      g.state_tensor[static_cast<std::size_t>(l)] = new_tensor(
          layer.saved_bytes_per_sample_override * b, g.forward_step(l), layer.name + ".saved");
    }
  }

  for (const layer_spec& layer : model.layers) {
    const int l = layer.index;
    for (int in : layer.inputs) {
      tensor_info& t = p.tensors[static_cast<std::size_t>(g.tensor_of(in))];
      add_use(t, g.forward_step(l));
      if (layer.backward_needs_input) add_use(t, g.backward_step(l));
      if (layer.op == layer_kind::conv) t.conv_input = true;
    }
    tensor_info& out = p.tensors[static_cast<std::size_t>(g.output_tensor[static_cast<std::size_t>(l)])];
    if (layer.backward_needs_output) add_use(out, g.backward_step(l));
    if (const int s = g.state_tensor[static_cast<std::size_t>(l)]; s != workload_graph::no_tensor) {
      add_use(p.tensors[static_cast<std::size_t>(s)], g.backward_step(l));
    }

    // Costs: FLOPs from the spec; memory traffic reads the inputs and parameters and writes
    // the output (backward: about twice that), which is what bounds the elementwise kinds.
    const double in_bytes = static_cast<double>(layer.in_elems_per_sample * layer.inputs.size() * b * dt);
    const double out_bytes = static_cast<double>(layer.out_elems_per_sample * b * dt);
    const double param_bytes = static_cast<double>(layer.param_elems * dt);
    g.forward_cost.push_back(
        kernel_cost{layer.fwd_flops_per_sample * batch, in_bytes + out_bytes + param_bytes, 0});
    g.backward_cost.push_back(kernel_cost{layer.bwd_flops_per_sample * batch,
                                          2 * (in_bytes + out_bytes + param_bytes), 0});
    g.param_bytes += layer.param_elems * dt;

    // Scratch while the step runs: the conv lowering workspace; in backward also the error
    // signals of the output and of each input.
    // One image at a time is lowered (Note [Workspace per image] in tools/plan_report.cpp).
    const std::size_t workspace = layer.workspace_elems_per_sample * dt;
    p.step_scratch_bytes[static_cast<std::size_t>(g.forward_step(l))] = workspace;
    p.step_scratch_bytes[static_cast<std::size_t>(g.backward_step(l))] =
        workspace + layer.out_elems_per_sample * b * dt +
        layer.in_elems_per_sample * layer.inputs.size() * b * dt;
  }
  // Parameters, their gradients, and the labels stay on the device all along.
  p.resident_bytes = 2 * g.param_bytes + model.labels_per_sample() * b * sizeof(int);

  // The loss's input and output never leave (the loss reads its probabilities right back);
  // tensors nobody reads after they are made are never worth moving either.
  for (tensor_info& t : p.tensors) {
    if (t.use_steps.empty()) t.use_steps.push_back(t.producer_step);
  }
  if (const int loss = model.loss_layer(); loss >= 0) {
    p.tensors[static_cast<std::size_t>(g.output_tensor[static_cast<std::size_t>(loss)])].offloadable = false;
  }
  return g;
}

}  // namespace gpuswap
