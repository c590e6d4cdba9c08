#pragma once
// workload_runner: trains a model_spec for a few steps on a Device through gpuswap's caching
// allocator, swap engine, offload planner and prefetcher, with layer markers, and reports what
// happened. The demo, `gpuswap simulate` and the end-to-end tests all run through it.
//
// On the simulator's real backing the network is computed for real (tools/reference_math as
// simulated kernels), and on a CUDA device by tools/gpu_math's kernels, so a budgeted run can be
// compared bit for bit with an unlimited one on the same device; on phantom backing only the
// modelled costs run, which is how VGG-16 at batch 256 fits in a test. tools/training_math.hpp
// is the seam: the runner picks one implementation per run and calls it for every step.
//
// Iteration 0 runs with a plan made from estimated step times; it measures the real ones
// (layer_schedule), and every later iteration runs with a plan made from those.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "allocator/swap_engine.hpp"
#include "core/config.hpp"
#include "device/device.hpp"
#include "prefetcher/offload_planner.hpp"
#include "tools/model_spec.hpp"
#include "tools/training_math.hpp"

namespace gpuswap {

class live_stats_writer;

struct runner_options {
  int batch = 0;  // 0: the model's default batch
  int steps = 3;
  std::size_t device_limit = 0;  // 0: the device's physical memory
  std::size_t host_limit = 0;    // pinned host bytes; 0: no limit
  // caching_allocator_options::expandable_segments (config key expandable_segments).
  bool expandable_segments = false;
  offload_policy policy = offload_policy::none;
  prefetch_policy prefetch = prefetch_policy::lookahead;
  std::uint64_t seed = 1;
  float learning_rate = 0.01f;
  // Keep the last step's parameter gradients and the final parameters (real math only).
  bool keep_tensors = false;
  // Compute for real when the model has reference math and the device can run it: the
  // simulator's real backing (host functions) or a CUDA device with gpu_math's kernels (see
  // make_training_math); false: model the costs only.
  bool real_math = true;
  // Where to publish live figures for `gpuswap top` after every step; nullptr: nowhere.
  live_stats_writer* live_stats = nullptr;
};

struct run_report {
  std::string model;
  std::string device_name;
  int batch = 0;
  int steps = 0;
  bool real_math = false;
  training_math_kind math = training_math_kind::modelled;  // what computed the network
  std::size_t budget_bytes = 0;        // the allocator's budget
  offload_plan plan;                   // the plan of the last iteration
  std::size_t peak_reserved_bytes = 0; // device memory held at the peak
  std::size_t peak_allocated_bytes = 0;
  swap_stats swaps;
  std::uint64_t pinned_allocations = 0;  // new pinned buffers over the whole run
  std::uint64_t pinned_allocations_after_first_step = 0;
  std::vector<float> losses;            // per step (real math); empty otherwise
  std::vector<double> step_ns;          // per step, host clock (modelled on the simulator)
  std::vector<double> compute_ns;       // per step: the sum of measured step times
  std::vector<std::vector<float>> last_gradients;  // per parameterised layer
  std::vector<std::vector<float>> final_params;

  // The median step time of the steps after the first (the steady state), or the first's
  // when there is only one.
  double steady_step_ns() const;
  double steady_compute_ns() const;
};

// Throws out_of_memory when the model cannot run within the budget even with offload, and
// config_error for options the model cannot honour.
run_report run_workload(device& dev, const model_spec& model, const runner_options& options);

}  // namespace gpuswap
