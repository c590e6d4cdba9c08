#include "tools/plan_report.hpp"

#include <algorithm>
#include <vector>

#include <fmt/format.h>

#include "core/human_bytes.hpp"
#include "core/errors.hpp"

namespace gpuswap {

// Note [Workspace per image]
// A convolution lowered to GEMM needs its input unrolled k*k times (im2col). Lowering the whole
// batch at once would make VGG-16's conv1_2 alone ask for 27.6 GiB at batch 256, more than the
// 28 GB vDNN measured for the whole network; implementations lower one image at a time (Caffe)
// or pick an algorithm that fits a workspace limit (cuDNN). The plan therefore charges each
// conv the lowering of one image, and the peak workspace is the largest such buffer.

namespace {

void check_batch(const model_spec& model, int batch) {
  if (batch < 1) {
    throw_config_error("batch", fmt::format("{}", batch), "a batch of 1 or more",
                       fmt::format("model {}", model.name));
  }
}

std::size_t tensor_bytes(const model_spec& m, int layer, int batch) {
  return m.tensor_elems_per_sample(layer) * static_cast<std::size_t>(m.dtype_bytes) *
         static_cast<std::size_t>(batch);
}

// Index of the last layer that reads tensor `t` (-1: the network input), or t when none does.
std::vector<int> last_readers(const model_spec& m) {
  // Slot 0 is the network input, slot t+1 the output of layer t.
  std::vector<int> last(m.layers.size() + 1);
  for (std::size_t t = 0; t < last.size(); ++t) last[t] = static_cast<int>(t) - 1;
  for (const auto& l : m.layers) {
    for (int in : l.inputs) {
      auto& slot = last[static_cast<std::size_t>(in + 1)];
      slot = std::max(slot, l.index);
    }
  }
  return last;
}

// Forward without keeping anything for backward: a tensor lives from the step that makes it
// to the last step that reads it.
std::size_t peak_forward_live(const model_spec& m, int batch) {
  const auto last = last_readers(m);
  std::size_t peak = 0;
  for (const auto& l : m.layers) {
    std::size_t live = 0;
    for (int t = -1; t <= l.index; ++t) {
      if (last[static_cast<std::size_t>(t + 1)] >= l.index) live += tensor_bytes(m, t, batch);
    }
    peak = std::max(peak, live);
  }
  return peak;
}

// Backward in reverse layer order: the gradient of layer t's output exists from the backward
// of its last reader (which creates it) to t's own backward (which consumes it). The loss's
// gradient with respect to its own output is never materialised, nor is the input's.
std::size_t peak_error_signals(const model_spec& m, int batch) {
  const auto last = last_readers(m);
  const int loss = m.loss_layer();
  std::size_t peak = 0;
  for (const auto& l : m.layers) {
    std::size_t live = 0;
    for (int t = 0; t <= l.index; ++t) {
      if (t == loss) continue;
      if (last[static_cast<std::size_t>(t + 1)] >= l.index) live += tensor_bytes(m, t, batch);
    }
    peak = std::max(peak, live);
  }
  return peak;
}

std::string shape_text(const std::vector<int>& shape) {
  return fmt::format("{}", fmt::join(shape, "x"));
}

std::string flops_text(double flops) {
  if (flops >= 1e12) return fmt::format("{:.2f} T", flops / 1e12);
  if (flops >= 1e9) return fmt::format("{:.2f} G", flops / 1e9);
  if (flops >= 1e6) return fmt::format("{:.2f} M", flops / 1e6);
  if (flops >= 1e3) return fmt::format("{:.2f} K", flops / 1e3);
  return fmt::format("{:.0f}", flops);
}

std::string count_text(std::size_t n) {
  if (n >= 1000000000) return fmt::format("{:.2f}G", static_cast<double>(n) / 1e9);
  if (n >= 1000000) return fmt::format("{:.2f}M", static_cast<double>(n) / 1e6);
  if (n >= 10000) return fmt::format("{:.1f}K", static_cast<double>(n) / 1e3);
  return fmt::format("{}", n);
}

}  // namespace

plan_totals compute_plan_totals(const model_spec& model, int batch) {
  check_batch(model, batch);
  plan_totals t;
  const auto d = static_cast<std::size_t>(model.dtype_bytes);
  t.params = model.param_count();
  t.param_bytes = t.params * d;
  t.grad_bytes = t.param_bytes;
  t.optimizer_bytes = t.param_bytes;
  t.activation_bytes = model.activation_bytes(batch);
  for (const auto& l : model.layers) {
    t.peak_workspace_bytes = std::max(t.peak_workspace_bytes, l.workspace_elems_per_sample * d);
  }
  t.peak_error_signal_bytes = peak_error_signals(model, batch);
  t.training_bytes = t.param_bytes + t.grad_bytes + t.optimizer_bytes + t.activation_bytes +
                     t.peak_error_signal_bytes + t.peak_workspace_bytes;
  t.inference_bytes = t.param_bytes + peak_forward_live(model, batch) + t.peak_workspace_bytes;
  t.fwd_flops = model.fwd_flops(batch);
  t.bwd_flops = model.bwd_flops(batch);
  return t;
}

nlohmann::json plan_json(const model_spec& model, int batch) {
  const plan_totals t = compute_plan_totals(model, batch);
  const auto b = static_cast<std::size_t>(batch);
  const auto d = static_cast<std::size_t>(model.dtype_bytes);
  nlohmann::json layers = nlohmann::json::array();
  for (const auto& l : model.layers) {
    nlohmann::json inputs = nlohmann::json::array();
    for (int in : l.inputs) {
      inputs.push_back(in < 0 ? std::string("input")
                              : model.layers[static_cast<std::size_t>(in)].name);
    }
    const std::size_t param_bytes = l.param_elems * d;
    layers.push_back({
        {"index", l.index},
        {"name", l.name},
        {"kind", l.kind},
        {"inputs", std::move(inputs)},
        {"out_shape", l.out_shape},
        {"params", l.param_elems},
        {"param_bytes", param_bytes},
        {"grad_bytes", param_bytes},
        {"optimizer_bytes", param_bytes},
        {"output_bytes", l.out_elems_per_sample * d * b},
        {"output_saved", model.tensor_saved_for_backward(l.index)},
        {"saved_bytes", model.saved_bytes_per_sample(l.index) * b},
        {"workspace_bytes", l.workspace_elems_per_sample * d},  // Note [Workspace per image]
        {"fwd_macs", l.fwd_flops_per_sample / 2 * batch},
        {"fwd_flops", l.fwd_flops_per_sample * batch},
        {"bwd_flops", l.bwd_flops_per_sample * batch},
    });
  }
  return {
      {"model", model.name},
      {"batch", batch},
      {"dtype_bytes", model.dtype_bytes},
      {"input_shape", model.input_shape},
      {"optimizer", "sgd_momentum"},
      {"input_saved_bytes", model.saved_bytes_per_sample(-1) * b},
      {"layers", std::move(layers)},
      {"totals",
       {
           {"params", t.params},
           {"param_bytes", t.param_bytes},
           {"grad_bytes", t.grad_bytes},
           {"optimizer_bytes", t.optimizer_bytes},
           {"activation_bytes", t.activation_bytes},
           {"peak_error_signal_bytes", t.peak_error_signal_bytes},
           {"peak_workspace_bytes", t.peak_workspace_bytes},
           {"training_bytes", t.training_bytes},
           {"inference_bytes", t.inference_bytes},
           {"fwd_macs", t.fwd_flops / 2},
           {"fwd_flops", t.fwd_flops},
           {"bwd_flops", t.bwd_flops},
           {"step_flops", t.fwd_flops + t.bwd_flops},
       }},
  };
}

std::string plan_text(const model_spec& model, int batch) {
  const plan_totals t = compute_plan_totals(model, batch);
  const auto b = static_cast<std::size_t>(batch);
  const auto d = static_cast<std::size_t>(model.dtype_bytes);
  std::size_t name_width = 5;
  for (const auto& l : model.layers) name_width = std::max(name_width, l.name.size());

  std::string out = fmt::format("model {}: batch {}, {} bytes per element, input {}\n", model.name,
                                batch, model.dtype_bytes, shape_text(model.input_shape));
  out += fmt::format("{:>4}  {:<{}}  {:<12}  {:<14}  {:>9}  {:>11}  {:>11}  {:>11}  {:>10}  "
                     "{:>10}\n",
                     "#", "layer", name_width, "kind", "output", "params", "weights*3",
                     "saved", "workspace", "fwd FLOP", "bwd FLOP");
  for (const auto& l : model.layers) {
    out += fmt::format(
        "{:>4}  {:<{}}  {:<12}  {:<14}  {:>9}  {:>11}  {:>11}  {:>11}  {:>10}  {:>10}\n", l.index,
        l.name, name_width, l.kind, shape_text(l.out_shape), count_text(l.param_elems),
        l.param_elems == 0 ? std::string("-") : human_bytes(3 * l.param_elems * d),
        model.saved_bytes_per_sample(l.index) == 0
            ? std::string("-")
            : human_bytes(model.saved_bytes_per_sample(l.index) * b),
        l.workspace_elems_per_sample == 0 ? std::string("-")
                                          : human_bytes(l.workspace_elems_per_sample * d),
        flops_text(l.fwd_flops_per_sample * batch), flops_text(l.bwd_flops_per_sample * batch));
  }
  out += "\n";
  const auto line = [&](std::string_view label, std::string value) {
    out += fmt::format("  {:<34} {}\n", label, value);
  };
  line("parameters", fmt::format("{} ({})", t.params, human_bytes(t.param_bytes)));
  line("parameter gradients", human_bytes(t.grad_bytes));
  line("optimizer state (SGD momentum)", human_bytes(t.optimizer_bytes));
  line("activations kept for backward",
       fmt::format("{} (network input {})", human_bytes(t.activation_bytes),
                   human_bytes(model.saved_bytes_per_sample(-1) * b)));
  line("peak error signals (backward)", human_bytes(t.peak_error_signal_bytes));
  line("peak conv workspace (im2col, 1 image)", human_bytes(t.peak_workspace_bytes));
  line("training, all at once", human_bytes(t.training_bytes));
  line("inference", human_bytes(t.inference_bytes));
  line("forward", fmt::format("{}FLOP ({}MAC)", flops_text(t.fwd_flops),
                              flops_text(t.fwd_flops / 2)));
  line("backward", fmt::format("{}FLOP", flops_text(t.bwd_flops)));
  return out;
}

}  // namespace gpuswap
