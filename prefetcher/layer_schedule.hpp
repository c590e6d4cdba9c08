#pragma once
// layer_schedule: the order of an iteration's steps (forward i, backward i), learned from the
// markers an integration or the workload runner places around each step, and each step's
// compute time measured with device events on the compute stream (modelled time on the
// simulated device, event timing on CUDA).
//
// The first completed iteration defines the order. Each later one is checked against it: a
// different sequence is logged (once per schedule) and becomes the order. steps() always holds
// the last completed iteration's order and times, ready to become a workload_profile's steps.
//
// Not thread-safe: the training thread that enqueues the steps calls it. end_iteration blocks
// until the iteration's last event completes; the other calls only record events.
//
// The markers are also Nsight's view of the step (Note [Schedule ranges]): an NVTX iteration
// range from an iteration's first begin_step to end_iteration, and a layer range from each
// begin_step to its end_step, pushed and popped on the calling (training) thread, so whoever
// places the markers, the runner or an integration, gets the same ranges.
#include <cstddef>
#include <optional>
#include <vector>

#include "device/device.hpp"
#include "prefetcher/workload_profile.hpp"
#include "profiler/nvtx_ranges.hpp"

namespace gpuswap {

class device_timeline;

class layer_schedule {
 public:
  layer_schedule(device& dev, stream_t compute);
  ~layer_schedule();
  layer_schedule(const layer_schedule&) = delete;
  layer_schedule& operator=(const layer_schedule&) = delete;

  // Records an event on the compute stream (events come from a small pool reused every
  // iteration). Beginning a step while another is open ends that one first (logged).
  void begin_step(phase ph, int layer);
  // Ends the open step; a call that names another step than the open one is logged and
  // ignored.
  void end_step(phase ph, int layer);
  // Waits for this iteration's events and takes the measured times. An iteration without
  // steps is ignored.
  void end_iteration();

  // Order and measured compute_ns of the last completed iteration; empty before the first.
  const std::vector<step_info>& steps() const noexcept { return steps_; }
  int iterations_completed() const noexcept { return iterations_; }
  // Index (into steps()) of the step in progress, or of the last one begun in this iteration;
  // -1 before the first begin_step of an iteration.
  int current_step() const noexcept { return static_cast<int>(current_.size()) - 1; }
  // Copies the measured times into `profile`'s steps when they are in the same order (same
  // phases and layers); returns whether it did.
  bool apply_to(workload_profile& profile) const;

  // With a timeline, end_iteration also places each step on the host clock: it keeps the
  // times (step_times) and records layer_begin/layer_end trace events for the profiler.
  void set_timeline(const device_timeline* timeline) noexcept { timeline_ = timeline; }
  struct step_time {
    double begin_ns;
    double end_ns;
  };
  // Per step of the last completed iteration (empty without a timeline).
  const std::vector<step_time>& step_times() const noexcept { return step_times_; }
  // Events made so far (two per step of the longest iteration; reused every iteration).
  std::size_t pooled_events() const noexcept { return pool_.size(); }

 private:
  struct marked_step {
    phase ph;
    int layer;
    event_t begin;
    event_t end;
    bool ended;
  };

  event_t take_event();

  device& dev_;
  stream_t compute_;
  std::vector<event_t> pool_;   // every event made; the first pool_used_ are this iteration's
  std::size_t pool_used_ = 0;
  std::vector<marked_step> current_;
  std::vector<step_info> steps_;
  int iterations_ = 0;
  bool mismatch_logged_ = false;
  // Open NVTX ranges; the layer range nests inside the iteration range.
  std::optional<nvtx_iteration_range> iteration_range_;
  std::optional<nvtx_layer_range> layer_range_;
  const device_timeline* timeline_ = nullptr;
  std::vector<step_time> step_times_;
};

}  // namespace gpuswap
