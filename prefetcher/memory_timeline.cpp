#include "prefetcher/memory_timeline.hpp"

#include <algorithm>
#include <limits>

namespace gpuswap {

// Note [The iteration model]
// One iteration as the runner carries it out with the swap engine, on three engines: compute
// (the steps, back to back), one D2H copy engine and one H2D copy engine, each first come first
// served. A copy of b bytes takes latency + b / bandwidth.
//
//   - A tensor occupies the device from the start of its producer step. One that is not
//     offloaded is freed at the end of its last use.
//   - An offloaded tensor is swapped out at the end of its last forward use (the swap engine
//     can only move a buffer nobody holds): its D2H queues behind earlier swap-outs, and its
//     device block is freed when the D2H ends (the allocator keeps a block until the copy that
//     reads it is done).
//   - At the start of each backward step the prefetcher (same profile, plan and link) says
//     which swap-ins to issue, given the budget minus what is allocated then; a tensor the step
//     reads that nobody issued is issued then too (prefetch `none`: a synchronous fetch). A
//     swap-in allocates its block when issued, and its H2D starts when the engine is free and
//     its D2H has ended (until then both blocks count). It is freed at the end of its last use.
//   - A step starts when the previous one has ended, the swap-ins of the tensors it reads have
//     arrived and its memory fits the budget: when it does not, the step waits for swap-outs in
//     flight, in order of completion, until it fits or none is left (the allocator waits for
//     swap-outs before it reports out of memory).
//   - The memory of a step is resident_bytes + its scratch + every tensor on the device at any
//     moment of the step, taken when it starts: a tensor whose D2H ends during the step counts.
// The model ignores the allocator's rounding and fragmentation, and the host's own time.

// Note [Inside a step]
// A step that the runner carries out as several kernels (Note [Parts of a step] in
// tools/workload_runner.cpp) allocates, sends out and frees its tensors part by part: a
// transformer block's saved pieces are made as forward reaches their operator and leave when
// it has run, and in backward each part waits only for its own pieces and frees them when it is
// done. Taken as made at the start of the step and sent out at its end, GPT-7B on a Titan X
// under a quarter of its peak was predicted to expose 17 s of copies per iteration, and the
// run hid 98% of them. So each tensor says where inside its steps its events fall (made_at,
// sent_at, needed_at, freed_at, as fractions of the step's compute time), and the model cuts
// each step into stretches at those positions, with the step's compute time shared out by
// their lengths. The rules of Note [The iteration model] then apply to stretches instead of
// steps: a tensor occupies the device from the start of the stretch that makes it, its swap-out
// is issued at the end of the stretch that sends it, a stretch starts when the swap-ins it needs
// have arrived and its memory fits, and a tensor is freed at the end of the stretch that frees
// it. The step's scratch counts in every stretch of the step, and the prefetcher is still asked
// at the start of each backward step only (which is when the runner asks it); a tensor needed
// by a later stretch that nobody issued is issued when that stretch becomes ready. A step's
// figures are over its stretches: the most bytes of any, the sum of their stalls, taken as
// waited before the step (start = the first stretch's start plus the later stretches' stalls,
// so that start + compute = end as with whole steps). With every position at its default, each
// step is one stretch and the model is the step model, to the bit.

memory_timeline::by_step memory_timeline::group(std::size_t n_steps,
                                                const std::vector<int>& step_of) {
  by_step g;
  g.first.assign(n_steps + 1, 0);
  for (int s : step_of) {
    if (s >= 0) ++g.first[static_cast<std::size_t>(s) + 1];
  }
  for (std::size_t s = 0; s < n_steps; ++s) g.first[s + 1] += g.first[s];
  g.ids.resize(g.first[n_steps]);
  std::vector<std::size_t> next(g.first.begin(), g.first.end() - 1);
  for (std::size_t t = 0; t < step_of.size(); ++t) {  // ascending ids within each step
    if (step_of[t] >= 0) g.ids[next[static_cast<std::size_t>(step_of[t])]++] = static_cast<int>(t);
  }
  return g;
}

memory_timeline::memory_timeline(const workload_profile& profile, const planner_options& options)
    : profile_(profile),
      options_(options),
      prefetcher_(profile, std::vector<bool>{},
                  prefetch_options{options.prefetch, options.h2d_bandwidth,
                                   options.h2d_latency_ns}) {
  options.validate();
  const std::size_t n_steps = profile.steps.size();
  const std::size_t n_tensors = profile.tensors.size();
  bytes_.resize(n_tensors);
  first_backward_use_.resize(n_tensors);
  last_forward_use_.resize(n_tensors);
  std::vector<int> last(n_tensors);
  for (std::size_t i = 0; i < n_tensors; ++i) {
    const int t = static_cast<int>(i);
    bytes_[i] = profile.tensors[i].bytes;
    last_forward_use_[i] = profile.last_forward_use(t);
    first_backward_use_[i] = profile.first_backward_use(t);
    last[i] = profile.last_use(t);
  }

  // Note [Inside a step]: each step's cuts, then its stretches.
  std::vector<std::vector<double>> cuts(n_steps, std::vector<double>{0.0, 1.0});
  const auto cut = [&](int step, double at) {
    if (step >= 0) cuts[static_cast<std::size_t>(step)].push_back(at);
  };
  for (std::size_t i = 0; i < n_tensors; ++i) {
    const tensor_info& t = profile.tensors[i];
    cut(t.producer_step, t.made_at);
    cut(last_forward_use_[i], t.sent_at);
    cut(first_backward_use_[i], t.needed_at);
    cut(last[i], t.freed_at);
  }
  first_stretch_.assign(n_steps + 1, 0);
  stretch_ns_.clear();
  for (std::size_t s = 0; s < n_steps; ++s) {
    std::vector<double>& c = cuts[s];
    std::sort(c.begin(), c.end());
    c.erase(std::unique(c.begin(), c.end()), c.end());
    for (std::size_t k = 0; k + 1 < c.size(); ++k) {
      stretch_ns_.push_back(profile.steps[s].compute_ns * (c[k + 1] - c[k]));
    }
    first_stretch_[s + 1] = stretch_ns_.size();
  }
  // The stretch starting at or last before `at` (ends = false), or the one ending at or first
  // after it (ends = true).
  const auto stretch_at = [&](int step, double at, bool ends) {
    if (step < 0) return -1;
    const std::vector<double>& c = cuts[static_cast<std::size_t>(step)];
    const auto past = ends ? std::lower_bound(c.begin(), c.end(), at)
                           : std::upper_bound(c.begin(), c.end(), at);
    const auto k = static_cast<std::size_t>(past - c.begin());
    const std::size_t index = std::min(k > 0 ? k - 1 : 0, c.size() - 2);
    return static_cast<int>(first_stretch_[static_cast<std::size_t>(step)] + index);
  };
  const auto starting = [&](int step, double at) { return stretch_at(step, at, false); };
  const auto ending = [&](int step, double at) { return stretch_at(step, at, true); };
  std::vector<int> made(n_tensors), sent(n_tensors), needed(n_tensors), freed(n_tensors);
  for (std::size_t i = 0; i < n_tensors; ++i) {
    const tensor_info& t = profile.tensors[i];
    made[i] = starting(t.producer_step, t.made_at);
    sent[i] = ending(last_forward_use_[i], t.sent_at);
    needed[i] = starting(first_backward_use_[i], t.needed_at);
    freed[i] = ending(last[i], t.freed_at);
  }
  const std::size_t n_stretches = stretch_ns_.size();
  by_producer_ = group(n_stretches, made);
  by_last_forward_use_ = group(n_stretches, sent);
  by_first_backward_use_ = group(n_stretches, needed);
  by_last_use_ = group(n_stretches, freed);
  scratch_.assign(n_steps, 0);
  for (std::size_t s = 0; s < n_steps && s < profile.step_scratch_bytes.size(); ++s) {
    scratch_[s] = profile.step_scratch_bytes[s];
  }
}

const timeline_result& memory_timeline::simulate(const std::vector<bool>& offload) {
  const std::size_t n_steps = profile_.steps.size();
  const std::size_t n_tensors = bytes_.size();
  const std::size_t budget = options_.budget_bytes;
  timeline_result& r = result_;
  r.step_bytes.assign(n_steps, 0);
  r.step_demand_bytes.assign(n_steps, 0);
  r.step_start_ns.assign(n_steps, 0.0);
  r.step_end_ns.assign(n_steps, 0.0);
  r.step_stall_ns.assign(n_steps, 0.0);
  r.d2h_end_ns.assign(n_tensors, -1.0);
  r.prefetch_step.assign(n_tensors, -1);
  r.h2d_end_ns.assign(n_tensors, -1.0);
  r.peak_bytes = 0;
  r.peak_step = -1;
  r.compute_ns = profile_.total_compute_ns();

  offloaded_.assign(n_tensors, false);
  offloaded_flag_.assign(n_tensors, 0);
  bool any = false;
  for (std::size_t t = 0; t < n_tensors && t < offload.size(); ++t) {
    const bool off = offload[t] && first_backward_use_[t] > last_forward_use_[t];
    offloaded_[t] = off;
    offloaded_flag_[t] = off ? 1 : 0;
    any = any || off;
  }
  prefetcher_.set_offload(offloaded_);
  const std::uint8_t* offloaded = offloaded_flag_.data();

  const double d2h_ns_per_byte = 1e9 / options_.d2h_bandwidth;
  const double h2d_ns_per_byte = 1e9 / options_.h2d_bandwidth;
  releases_.clear();
  releases_head_ = 0;
  std::size_t on_device = 0;  // tensor bytes allocated now
  double d2h_free = 0, h2d_free = 0, previous_end = 0;
  const auto release_until = [&](double time) {
    while (releases_head_ < releases_.size() && releases_[releases_head_].first <= time) {
      on_device -= bytes_[static_cast<std::size_t>(releases_[releases_head_].second)];
      ++releases_head_;
    }
  };
  const auto issue = [&](int t, std::size_t step, double ready) {
    const auto i = static_cast<std::size_t>(t);
    const double start = std::max({ready, h2d_free, r.d2h_end_ns[i]});
    h2d_free = start + options_.h2d_latency_ns + static_cast<double>(bytes_[i]) * h2d_ns_per_byte;
    r.h2d_end_ns[i] = h2d_free;
    r.prefetch_step[i] = static_cast<int>(step);
    on_device += bytes_[i];
  };

  for (std::size_t s = 0; s < n_steps; ++s) {
    const bool backward = profile_.steps[s].ph == phase::backward;
    const std::size_t fixed = profile_.resident_bytes + scratch_[s];
    for (std::size_t f = first_stretch_[s]; f < first_stretch_[s + 1]; ++f) {
      const bool first = f == first_stretch_[s];
      const double ready = previous_end;
      release_until(ready);
      if (any && backward) {
        if (first) {
          const std::size_t held = profile_.resident_bytes + on_device;
          const std::size_t free = budget == 0 ? std::numeric_limits<std::size_t>::max()
                                               : (budget > held ? budget - held : 0);
          issued_.clear();
          prefetcher_.issue_before(static_cast<int>(s), free, issued_);
          for (int t : issued_) issue(t, s, ready);
        }
        for (std::size_t k = by_first_backward_use_.first[f]; k < by_first_backward_use_.first[f + 1]; ++k) {
          const int t = by_first_backward_use_.ids[k];
          if (offloaded[t] != 0 && r.prefetch_step[static_cast<std::size_t>(t)] < 0) {
            issue(t, s, ready);
          }
        }
      }
      for (std::size_t k = by_producer_.first[f]; k < by_producer_.first[f + 1]; ++k) {
        on_device += bytes_[static_cast<std::size_t>(by_producer_.ids[k])];
      }
      double start = ready;
      for (std::size_t k = by_first_backward_use_.first[f]; k < by_first_backward_use_.first[f + 1]; ++k) {
        const auto t = static_cast<std::size_t>(by_first_backward_use_.ids[k]);
        if (offloaded[t] != 0) start = std::max(start, r.h2d_end_ns[t]);
      }
      release_until(start);
      const std::size_t demand = fixed + on_device;
      while (budget != 0 && fixed + on_device > budget && releases_head_ < releases_.size()) {
        start = std::max(start, releases_[releases_head_].first);
        release_until(start);
      }
      const double end = start + stretch_ns_[f];
      const std::size_t bytes = fixed + on_device;
      if (first) {
        r.step_bytes[s] = bytes;
        r.step_demand_bytes[s] = demand;
        r.step_start_ns[s] = start;
        r.step_stall_ns[s] = start - ready;
      } else {
        r.step_bytes[s] = std::max(r.step_bytes[s], bytes);
        r.step_demand_bytes[s] = std::max(r.step_demand_bytes[s], demand);
        r.step_start_ns[s] += start - ready;
        r.step_stall_ns[s] += start - ready;
      }
      r.step_end_ns[s] = end;
      if (r.step_bytes[s] > r.peak_bytes || r.peak_step < 0) {
        r.peak_bytes = r.step_bytes[s];
        r.peak_step = static_cast<int>(s);
      }

      for (std::size_t k = by_last_use_.first[f]; k < by_last_use_.first[f + 1]; ++k) {
        const auto t = static_cast<std::size_t>(by_last_use_.ids[k]);
        // An offloaded tensor's last use is a backward use, after it came back.
        if (offloaded[t] == 0 || r.prefetch_step[t] >= 0) on_device -= bytes_[t];
      }
      for (std::size_t k = by_last_forward_use_.first[f]; k < by_last_forward_use_.first[f + 1]; ++k) {
        const auto t = static_cast<std::size_t>(by_last_forward_use_.ids[k]);
        if (offloaded[t] == 0) continue;
        d2h_free = std::max(end, d2h_free) + options_.d2h_latency_ns +
                   static_cast<double>(bytes_[t]) * d2h_ns_per_byte;
        r.d2h_end_ns[t] = d2h_free;
        releases_.emplace_back(d2h_free, static_cast<int>(t));
      }
      previous_end = end;
    }
  }
  r.total_ns = previous_end;
  r.exposed_ns = std::max(0.0, r.total_ns - r.compute_ns);
  return r;
}

std::size_t predicted_peak(const workload_profile& profile, const std::vector<bool>& offload,
                           const planner_options& options) {
  memory_timeline timeline(profile, options);
  return timeline.simulate(offload).peak_bytes;
}

}  // namespace gpuswap
