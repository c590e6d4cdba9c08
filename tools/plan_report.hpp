#pragma once
// plan_report: the memory and FLOP estimate of `gpuswap plan --model M --batch B [--json]`,
// per layer and in total, in the field's own accounting (REFERENCE.md, "Why activations
// dominate"): parameters, their gradients, optimizer state (SGD momentum: one more copy of the
// parameters), the activations kept from forward for backward, the error signals (activation
// gradients) alive during backward, and convolution workspace (im2col lowering, k*k times the
// input, of one image at a time: Note [Workspace per image] in plan_report.cpp). The offload
// plan itself is the planner's (prefetcher/); this is the demand it plans against.
//
// JSON shape (byte figures and FLOPs for the whole batch, except workspace: one image):
//   {"model", "batch", "dtype_bytes", "input_shape", "optimizer": "sgd_momentum",
//    "input_saved_bytes",
//    "layers": [{"index", "name", "kind", "inputs": [names; "input" = the network input],
//                "out_shape", "params", "param_bytes", "grad_bytes", "optimizer_bytes",
//                "output_bytes", "output_saved" (a backward reads the output),
//                "saved_bytes" (the output if saved, plus a transformer's saved state),
//                "workspace_bytes", "fwd_macs", "fwd_flops", "bwd_flops"}],
//    "totals": {"params", "param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes",
//               "peak_error_signal_bytes", "peak_workspace_bytes", "training_bytes",
//               "inference_bytes", "fwd_macs", "fwd_flops", "bwd_flops", "step_flops"}}
// training_bytes = parameters + gradients + optimizer state + activations + the peak error
// signals + the peak workspace (as if every transient peak coincided: an upper estimate).
// inference_bytes = parameters + the peak of layer outputs alive at once in a forward pass
// that keeps nothing for backward + the peak workspace.
#include <cstddef>
#include <string>

#include <nlohmann/json.hpp>

#include "tools/model_spec.hpp"

namespace gpuswap {

nlohmann::json plan_json(const model_spec& model, int batch);
std::string plan_text(const model_spec& model, int batch);

// The totals plan_json reports, for callers that want numbers rather than JSON.
struct plan_totals {
  std::size_t params = 0;
  std::size_t param_bytes = 0, grad_bytes = 0, optimizer_bytes = 0;
  std::size_t activation_bytes = 0;
  std::size_t peak_error_signal_bytes = 0;
  std::size_t peak_workspace_bytes = 0;
  std::size_t training_bytes = 0, inference_bytes = 0;
  double fwd_flops = 0, bwd_flops = 0;
};
plan_totals compute_plan_totals(const model_spec& model, int batch);

}  // namespace gpuswap
