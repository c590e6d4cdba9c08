#pragma once
// memory_timeline: the planner's model of one iteration under an offload plan — device bytes
// at each step, when each step starts and ends, and how much copy time shows (Note [The
// iteration model] in memory_timeline.cpp). Deterministic and cheap (linear in steps plus
// tensors log tensors), so the planner can run it once per decision.
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "prefetcher/offload_planner.hpp"
#include "prefetcher/prefetcher.hpp"
#include "prefetcher/workload_profile.hpp"

namespace gpuswap {

struct timeline_result {
  // Per step, indexed like workload_profile::steps.
  std::vector<std::size_t> step_bytes;  // resident + scratch + tensors on the device in the step
  // What step_bytes would be had the step not waited for swap-outs to end (equal unless the
  // step was over the budget when it became ready).
  std::vector<std::size_t> step_demand_bytes;
  std::vector<double> step_start_ns;    // after any stall
  std::vector<double> step_end_ns;
  std::vector<double> step_stall_ns;  // waited before starting: for swap-ins or for memory
  // Per tensor; meaningful for the offloaded ones only (others: -1).
  std::vector<double> d2h_end_ns;   // its device copy is freed then
  std::vector<int> prefetch_step;   // the step at whose start its swap-in is issued
  std::vector<double> h2d_end_ns;   // back on the device
  std::size_t peak_bytes = 0;
  int peak_step = -1;     // the first step at peak_bytes; -1 with no steps
  double compute_ns = 0;  // sum of the steps' compute_ns
  double total_ns = 0;    // modelled end of the iteration
  double exposed_ns = 0;  // total_ns - compute_ns: copy time that did not hide
};

class memory_timeline {
 public:
  // Keeps a reference to `profile`, which must outlive it and not change. Throws config_error
  // for an inconsistent profile (workload_profile::validate). Not thread-safe: simulate()
  // reuses the object's buffers.
  memory_timeline(const workload_profile& profile, const planner_options& options);

  // Models one iteration with `offload` (per tensor; missing entries count as false; a tensor
  // with no backward use after its last forward use is never offloaded). The result stays
  // valid until the next call.
  const timeline_result& simulate(const std::vector<bool>& offload);
  const timeline_result& result() const noexcept { return result_; }

 private:
  // Tensors listed by stretch (compressed rows: ids of stretch s are ids[first[s]..first[s+1])).
  struct by_step {
    std::vector<std::size_t> first;
    std::vector<int> ids;
  };
  static by_step group(std::size_t n_steps, const std::vector<int>& step_of);

  const workload_profile& profile_;
  planner_options options_;
  std::vector<std::size_t> bytes_;
  std::vector<int> first_backward_use_;
  std::vector<int> last_forward_use_;
  // Note [Inside a step]: the stretches the model runs, in order; step s is stretches
  // first_stretch_[s]..first_stretch_[s+1]-1.
  std::vector<std::size_t> first_stretch_;
  std::vector<double> stretch_ns_;
  // Per tensor, the stretch of each of its events.
  by_step by_producer_, by_last_forward_use_, by_first_backward_use_, by_last_use_;
  std::vector<std::size_t> scratch_;  // per step
  timeline_result result_;
  prefetcher prefetcher_;
  // Scratch buffers reused across simulate() calls.
  std::vector<bool> offloaded_;
  std::vector<std::uint8_t> offloaded_flag_;  // the same, cheaper to read
  // Swap-outs in flight, (end, tensor), from releases_head_ on. The D2H engine is first come
  // first served, so they end in the order they were issued.
  std::vector<std::pair<double, int>> releases_;
  std::size_t releases_head_ = 0;
  std::vector<int> issued_;
};

// The peak of memory_timeline(profile, options).simulate(offload).
std::size_t predicted_peak(const workload_profile& profile, const std::vector<bool>& offload,
                           const planner_options& options);

}  // namespace gpuswap
