#pragma once
// prefetcher: when, during backward, to issue the swap-in of each offloaded tensor.
//
//   lookahead  just in time on the single H2D engine, from the measured step times: a tensor
//              is issued at the last step boundary that still lets every tensor queued behind it
//              arrive before its first backward use (Note [Lookahead] in prefetcher.cpp), so the
//              copies hide without crowding the budget.
//   one_layer  vDNN: at backward step s, the tensors first needed at step s+1.
//   none       nothing at all: the runner fetches each tensor synchronously when backward asks
//              (like save_on_cpu).
// Under lookahead and one_layer a tensor first needed by the very step is returned whatever
// the budget (it is demanded anyway); any other must fit beside what every step until its use
// holds (Note [Held until used] in prefetcher.cpp). Each tensor is returned once per iteration
// (reset() starts the next one), or again after unissue().
//
// Pure logic, no device; one training thread calls it (not thread-safe).
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/config.hpp"
#include "prefetcher/offload_planner.hpp"
#include "prefetcher/workload_profile.hpp"

namespace gpuswap {

struct prefetch_options {
  prefetch_policy policy = prefetch_policy::lookahead;
  double h2d_bandwidth = 12e9;  // bytes/s
  double h2d_latency_ns = 10'000;

  // Throws config_error naming the field when the bandwidth is not positive or the latency is
  // negative.
  void validate() const;
};

class prefetcher {
 public:
  // Copies what it needs from the profile and the plan; neither must outlive the call.
  // Throws config_error for an inconsistent profile (workload_profile::validate).
  prefetcher(const workload_profile& profile, const offload_plan& plan, prefetch_options options);
  prefetcher(const workload_profile& profile, const std::vector<bool>& offload,
             prefetch_options options);

  // Called at the start of step `step` with the device bytes still free under the budget
  // (budget minus what is allocated now, counted as the profile counts it: a step's scratch is
  // not held before the step; SIZE_MAX when there is no budget). What the step itself is about
  // to allocate (its scratch and the tensors it produces) is taken out of it here, and what any
  // later step before a tensor's first use holds beyond what is held now (Note [Held until
  // used]). Returns the offloaded tensor ids whose swap-in to issue now, in issue order;
  // nothing for forward steps. Tensors first needed by `step` (or earlier, if never issued)
  // come first whatever the budget; the others only while their bytes fit, in order (one that
  // does not fit holds back those behind it). A tensor is not returned before the step after
  // its last forward use (it is not swapped out yet).
  std::vector<int> issue_before(int step, std::size_t free_budget_bytes);
  // The same, appending to `out` (no allocation once `out` has grown).
  void issue_before(int step, std::size_t free_budget_bytes, std::vector<int>& out);
  // `tensor`, returned by issue_before, could not be brought in after all (the allocator had
  // no block for it yet): it is pending again, and the next issue_before considers it first.
  void unissue(int tensor);
  // A new iteration: every tensor may be issued again.
  void reset();
  // Replaces the plan (same profile and options) and resets; cheaper than a new prefetcher,
  // which is what memory_timeline needs inside the planner's loop.
  void set_offload(const std::vector<bool>& offload);

  // Whether `tensor` was returned by issue_before since the last reset.
  bool issued(int tensor) const;
  // Lookahead's latest modelled start of the tensor's H2D, in ns from the start of the
  // iteration (measured step times, no stalls; negative when it falls before the iteration);
  // NaN for a tensor that is not offloaded.
  double latest_start_ns(int tensor) const;

 private:
  struct entry {
    int tensor;
    std::size_t bytes;
    int ready_after_step;  // last forward use: the swap-out happens after it
    int first_use;         // first backward use
    double needed_ns;      // when it must be back: the projected start of its part of first_use
    double latest_start_ns;
  };

  void init(const workload_profile& profile);

  prefetch_options options_;
  std::vector<phase> phases_;
  std::vector<double> step_start_ns_;  // size steps+1: projected start of each step, then the end
  std::vector<std::size_t> step_own_bytes_;  // scratch + tensors produced by the step
  // Note [Held until used]. Per tensor: bytes, producer step, last use.
  std::vector<std::size_t> tensor_bytes_;
  std::vector<int> tensor_producer_, tensor_last_use_;
  std::vector<std::size_t> scratch_;     // per step
  // Per step, under the current plan: the scratch and the tensors not offloaded that the step
  // holds (kept_during_), and the tensors not offloaded held as it begins (kept_before_).
  std::vector<std::size_t> kept_during_, kept_before_;
  std::vector<entry> by_need_;         // every tensor backward reads, by (first backward use, id)
  std::vector<entry> queue_;           // the offloaded ones, same order, with latest starts
  std::vector<int> position_;          // tensor -> index in queue_, -1 if not offloaded
  std::vector<std::uint8_t> issued_;   // per queue_ entry
  std::size_t first_pending_ = 0;      // queue_ entries before it are all issued
};

}  // namespace gpuswap
