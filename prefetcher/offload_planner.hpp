#pragma once
// offload_planner: which tensors of an iteration go to the host during forward and come back
// for backward.
//
//   none   nothing.
//   all    vDNN: every offloadable tensor that backward needs and that is idle for at least one
//          step between its last forward use and its first backward use (each layer's saved
//          input).
//   conv   vDNN: the same, restricted to convolution inputs.
//   auto   the least bytes that make the predicted peak fit the budget, preferring tensors whose
//          copies hide under compute (Note [Choosing what to offload] in offload_planner.cpp).
//
// The plan assumes the runner does what memory_timeline models (Note [The iteration model] in
// memory_timeline.cpp): swap an offloaded tensor out right after its last forward use, and at
// the start of each backward step issue the swap-ins that a `prefetcher` built from the same
// profile, plan and link figures returns.
#include <cstddef>
#include <string>
#include <vector>

#include "core/config.hpp"
#include "prefetcher/workload_profile.hpp"

namespace gpuswap {

struct planner_options {
  offload_policy policy = offload_policy::auto_;
  std::size_t budget_bytes = 0;  // device_limit; 0 = unlimited (then `auto` offloads nothing)
  double d2h_bandwidth = 12e9;   // bytes/s
  double h2d_bandwidth = 12e9;
  double d2h_latency_ns = 10'000;
  double h2d_latency_ns = 10'000;
  // How the runner will bring tensors back: the model issues swap-ins as this policy would.
  prefetch_policy prefetch = prefetch_policy::lookahead;

  // Throws config_error naming the field when a bandwidth is not positive or a latency is
  // negative.
  void validate() const;
};

struct offload_plan {
  std::vector<bool> offload;  // per tensor
  std::size_t no_offload_peak_bytes = 0;
  std::size_t predicted_peak_bytes = 0;  // with this plan (memory_timeline)
  std::size_t offloaded_bytes = 0;
  double predicted_exposed_ns = 0;  // copy time the model expects NOT to hide under compute
  bool fits = true;                 // predicted_peak <= budget (or no budget)
  std::string explain;              // a short human summary
};

// Deterministic; runs the memory_timeline model a few times per chosen tensor.
// Throws config_error for invalid options or an inconsistent profile
// (workload_profile::validate).
offload_plan plan_offload(const workload_profile& profile, const planner_options& options);

// The tensors `all` would offload: offloadable, needed by backward, idle for at least one step
// in between. `conv` is these restricted to conv_input.
bool offload_candidate(const workload_profile& profile, int tensor);

}  // namespace gpuswap
