#pragma once
// workload_profile: what the planner and the prefetcher know about one training iteration.
//
// A training iteration is a fixed sequence of steps (forward 0..n-1, then backward n-1..0).
// Tensors are the activations (layer outputs) that live across steps; each has the step that
// produces it and the steps that read it. The profile is filled from the model (the workload
// runner, which knows the layer graph) or learned from the first iteration (layer_schedule),
// and carries the compute time of each step measured on that first iteration.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace gpuswap {

enum class phase : std::uint8_t { forward, backward };

struct step_info {
  phase ph = phase::forward;
  int layer = 0;
  double compute_ns = 0;  // measured (or estimated) time of this step's kernels
};

struct tensor_info {
  int id = 0;                    // index in workload_profile::tensors
  std::size_t bytes = 0;
  int producer_step = 0;         // index in workload_profile::steps
  std::vector<int> use_steps;    // ascending step indices that read the tensor (forward and backward)
  bool conv_input = false;       // input of a convolution layer (vDNN's `conv` policy)
  bool offloadable = true;       // false for tensors gpuswap must keep (e.g. the loss input)
  std::string name;              // for plans and traces, e.g. "conv3_2.out"
  // Where inside its steps the tensor's events fall, as fractions of the step's compute time
  // (Note [Inside a step] in memory_timeline.cpp). The defaults are whole steps: allocated when
  // the producer step starts, swapped out when its last forward use ends, needed when its first
  // backward use starts, freed when its last use ends.
  double made_at = 0;    // in producer_step
  double sent_at = 1;    // in last_forward_use(): its swap-out is issued then
  double needed_at = 0;  // in first_backward_use(): it must be on the device then
  double freed_at = 1;   // in last_use()
};

struct workload_profile {
  std::vector<step_info> steps;
  std::vector<tensor_info> tensors;
  // Bytes on the device for the whole iteration that offload cannot move: parameters,
  // gradients, optimizer state, and a workspace reserve.
  std::size_t resident_bytes = 0;
  // Extra bytes each step needs while it runs besides its tensors (error signals, workspace);
  // indexed like steps. Empty means none.
  std::vector<std::size_t> step_scratch_bytes;

  // Index of the first forward step at or after `step` that the tensor is read in, or of the
  // first backward use; -1 when none remains.
  int next_use_after(int tensor, int step) const;
  // The last forward-phase use (or the producer step when none): after it, the tensor is idle
  // until its first backward use.
  int last_forward_use(int tensor) const;
  // The first backward-phase use; -1 when the tensor is not needed by backward.
  int first_backward_use(int tensor) const;
  // The last use of all; after it the tensor is freed.
  int last_use(int tensor) const;

  // Added for the planner and its tests (prefetcher/).
  // Sum of the steps' compute_ns: the iteration's time when no copy is exposed.
  double total_compute_ns() const;
  // Empty when the profile is consistent (ids match positions, steps in range, use_steps
  // strictly ascending and not before the producer, step_scratch_bytes empty or sized like
  // steps, compute_ns not negative, positions inside a step within 0..1); else a description
  // of the first problem found.
  std::string check() const;
  // Throws config_error (key "workload_profile", the problem as the value) unless check() is
  // empty.
  void validate() const;
};

}  // namespace gpuswap
