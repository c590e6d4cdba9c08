#include "prefetcher/prefetcher.hpp"

#include <algorithm>
#include <limits>

namespace gpuswap {

// Note [Lookahead]
// Swap-ins run one after another on the single H2D engine, in order of first backward use (the
// order backward needs them). Each takes h2d_latency_ns + bytes / h2d_bandwidth. Walking that
// queue from its end, the latest start that keeps everything behind a tensor on time is
//   finish(i) = min(deadline(i), start(i+1)),  start(i) = finish(i) - duration(i)
// where deadline(i) is the projected start of its first backward use, from the measured step
// times (no stalls: a stall shifts every later step alike, so the differences hold), or of the
// part of that step that reads it (tensor_info::needed_at, Note [Inside a step] in
// memory_timeline.cpp). The
// latest starts grow along the queue. At the start of backward step s a tensor is issued when
// waiting for the next step boundary would make it late, i.e. when its latest start is before
// the end of step s; since the latest starts grow, the tensors issued form a prefix of what is
// still pending. The budget bounds the prefix too: a tensor whose bytes do not fit in what is
// free stops the walk (issuing one behind it first would only delay it further), except for
// tensors that step s reads itself, which are demanded anyway. one_layer walks the same queue
// with vDNN's rule instead of the latest starts. Under both, a tensor is never issued at or
// before its last forward use: it has not been swapped out yet.
//
// The latest starts depend only on the profile, the plan and the link, so they are computed
// once per plan (set_offload, linear); issue_before costs O(tensors issued + steps walked),
// which lets memory_timeline run the prefetcher inside the planner's loop.

// Note [Held until used]
// A swap-in takes its block when it is issued and holds it until its tensor's last use, so it
// must fit beside every step from the one that issues it to the one that first reads it, not
// only beside the first: backward's steps grow and shrink (each one's error signals, the
// tensors it reads), and a later step that needs more than the issuing one finds the budget
// taken. The allocator then evicts, furthest next use first, which is often a tensor the plan
// keeps; it comes back on demand and evicts the next. VGG-16 at batch 256 on an H100 under
// half its peak, with the plan `auto` makes for it (input, relu1_1, pool1, relu2_1, pool2):
// 4.06x with 6 evictions and 6 demand fetches in 3 iterations; with this check 2.49x and none.
// So a tensor that its step does not demand is returned only if
//   bytes returned before it in this walk + its bytes + growth(s, u) <= free at s,
// where growth(s, u) is the most that any step k in s..u-1 holds (its scratch and the tensors
// not offloaded alive in it) beyond the tensors not offloaded held as s begins. Offloaded
// tensors already back are in the free figure though some may be freed before u: the check
// errs on the side of waiting. memory_timeline runs the same prefetcher, so the plan sees the
// same waits, and its peak no longer includes steps crowded by swap-ins issued too early.

prefetcher::prefetcher(const workload_profile& profile, const offload_plan& plan,
                       prefetch_options options)
    : options_(options) {
  init(profile);
  set_offload(plan.offload);
}

prefetcher::prefetcher(const workload_profile& profile, const std::vector<bool>& offload,
                       prefetch_options options)
    : options_(options) {
  init(profile);
  set_offload(offload);
}

void prefetch_options::validate() const {
  // The same checks as the planner's link figures.
  planner_options link;
  link.h2d_bandwidth = h2d_bandwidth;
  link.h2d_latency_ns = h2d_latency_ns;
  link.validate();
}

void prefetcher::init(const workload_profile& profile) {
  options_.validate();
  profile.validate();
  const std::size_t n_steps = profile.steps.size();
  phases_.resize(n_steps);
  step_start_ns_.assign(n_steps + 1, 0.0);
  step_own_bytes_.assign(n_steps, 0);
  for (std::size_t s = 0; s < n_steps; ++s) {
    phases_[s] = profile.steps[s].ph;
    step_start_ns_[s + 1] = step_start_ns_[s] + profile.steps[s].compute_ns;
    if (s < profile.step_scratch_bytes.size()) step_own_bytes_[s] = profile.step_scratch_bytes[s];
  }
  scratch_ = step_own_bytes_;
  const int n_tensors = static_cast<int>(profile.tensors.size());
  tensor_bytes_.assign(static_cast<std::size_t>(n_tensors), 0);
  tensor_producer_.assign(static_cast<std::size_t>(n_tensors), -1);
  tensor_last_use_.assign(static_cast<std::size_t>(n_tensors), -1);
  for (int t = 0; t < n_tensors; ++t) {
    const auto i = static_cast<std::size_t>(t);
    tensor_bytes_[i] = profile.tensors[i].bytes;
    tensor_producer_[i] = profile.tensors[i].producer_step;
    tensor_last_use_[i] = std::max(profile.tensors[i].producer_step, profile.last_use(t));
  }
  by_need_.clear();
  for (int t = 0; t < n_tensors; ++t) {
    const tensor_info& info = profile.tensors[static_cast<std::size_t>(t)];
    if (info.producer_step >= 0 && static_cast<std::size_t>(info.producer_step) < n_steps) {
      step_own_bytes_[static_cast<std::size_t>(info.producer_step)] += info.bytes;
    }
    const int first_use = profile.first_backward_use(t);
    if (first_use < 0) continue;  // never needed back: nothing to fetch
    // Note [Inside a step] in memory_timeline.cpp: a piece needed by a later part of its step
    // is due when that part starts.
    const auto u = static_cast<std::size_t>(first_use);
    const double needed_ns = step_start_ns_[u] + info.needed_at * profile.steps[u].compute_ns;
    by_need_.push_back(
        entry{t, info.bytes, profile.last_forward_use(t), first_use, needed_ns, 0.0});
  }
  std::sort(by_need_.begin(), by_need_.end(), [](const entry& a, const entry& b) {
    if (a.first_use != b.first_use) return a.first_use < b.first_use;
    return a.needed_ns != b.needed_ns ? a.needed_ns < b.needed_ns : a.tensor < b.tensor;
  });
  position_.assign(static_cast<std::size_t>(n_tensors), -1);
}

void prefetcher::set_offload(const std::vector<bool>& offload) {
  for (const entry& e : queue_) position_[static_cast<std::size_t>(e.tensor)] = -1;
  queue_.clear();
  for (const entry& e : by_need_) {
    const auto t = static_cast<std::size_t>(e.tensor);
    if (t < offload.size() && offload[t]) queue_.push_back(e);
  }
  double next_start = std::numeric_limits<double>::infinity();
  for (std::size_t i = queue_.size(); i-- > 0;) {
    entry& e = queue_[i];
    const double duration =
        options_.h2d_latency_ns + static_cast<double>(e.bytes) * 1e9 / options_.h2d_bandwidth;
    const double finish = std::min(e.needed_ns, next_start);
    e.latest_start_ns = finish - duration;
    next_start = e.latest_start_ns;
    position_[static_cast<std::size_t>(e.tensor)] = static_cast<int>(i);
  }
  issued_.assign(queue_.size(), 0);
  first_pending_ = 0;

  // Note [Held until used]: the bytes each step holds besides the offloaded tensors, as
  // running sums over +bytes at a tensor's first step and -bytes after its last.
  const std::size_t n_steps = phases_.size();
  std::vector<std::ptrdiff_t> during(n_steps + 1, 0), before(n_steps + 1, 0);
  for (std::size_t t = 0; t < tensor_bytes_.size(); ++t) {
    if (t < offload.size() && offload[t]) continue;
    const int first = tensor_producer_[t], last = tensor_last_use_[t];
    if (first < 0 || static_cast<std::size_t>(last) >= n_steps) continue;
    const auto b = static_cast<std::ptrdiff_t>(tensor_bytes_[t]);
    during[static_cast<std::size_t>(first)] += b;
    during[static_cast<std::size_t>(last) + 1] -= b;
    before[static_cast<std::size_t>(first) + 1] += b;
    before[static_cast<std::size_t>(last) + 1] -= b;
  }
  kept_during_.assign(n_steps, 0);
  kept_before_.assign(n_steps, 0);
  std::ptrdiff_t in_step = 0, at_start = 0;
  for (std::size_t k = 0; k < n_steps; ++k) {
    in_step += during[k];
    at_start += before[k];
    kept_during_[k] = scratch_[k] + static_cast<std::size_t>(std::max<std::ptrdiff_t>(0, in_step));
    kept_before_[k] = static_cast<std::size_t>(std::max<std::ptrdiff_t>(0, at_start));
  }
}

std::vector<int> prefetcher::issue_before(int step, std::size_t free_budget_bytes) {
  std::vector<int> out;
  issue_before(step, free_budget_bytes, out);
  return out;
}

void prefetcher::issue_before(int step, std::size_t free_budget_bytes, std::vector<int>& out) {
  if (step < 0 || static_cast<std::size_t>(step) >= phases_.size()) return;
  const auto s = static_cast<std::size_t>(step);
  if (phases_[s] != phase::backward || options_.policy == prefetch_policy::none) return;

  std::size_t available =
      free_budget_bytes > step_own_bytes_[s] ? free_budget_bytes - step_own_bytes_[s] : 0;
  const double step_end = step_start_ns_[s + 1];
  // Note [Held until used]: the most any step from s up to (not including) `through` holds.
  std::size_t taken = 0;
  std::size_t most = kept_during_[s];
  std::size_t through = s + 1;
  for (std::size_t i = first_pending_; i < queue_.size(); ++i) {
    if (issued_[i] != 0) continue;
    const entry& e = queue_[i];
    const bool demanded = e.first_use <= step;
    if (!demanded) {
      // Not yet swapped out (its last forward use is still ahead): nothing to fetch yet.
      if (step <= e.ready_after_step) continue;
      const bool due = options_.policy == prefetch_policy::one_layer
                           ? e.first_use == step + 1
                           : e.latest_start_ns < step_end;
      if (!due || e.bytes > available) break;
      for (; through < static_cast<std::size_t>(e.first_use); ++through) {
        most = std::max(most, kept_during_[through]);
      }
      const std::size_t growth = most > kept_before_[s] ? most - kept_before_[s] : 0;
      if (free_budget_bytes < growth || free_budget_bytes - growth < taken ||
          free_budget_bytes - growth - taken < e.bytes) {
        break;
      }
    }
    taken += e.bytes;
    available -= std::min(available, e.bytes);
    issued_[i] = 1;
    out.push_back(e.tensor);
  }
  while (first_pending_ < queue_.size() && issued_[first_pending_] != 0) ++first_pending_;
}

void prefetcher::unissue(int tensor) {
  if (tensor < 0 || static_cast<std::size_t>(tensor) >= position_.size()) return;
  const int pos = position_[static_cast<std::size_t>(tensor)];
  if (pos < 0) return;
  issued_[static_cast<std::size_t>(pos)] = 0;
  first_pending_ = std::min(first_pending_, static_cast<std::size_t>(pos));
}

void prefetcher::reset() {
  std::fill(issued_.begin(), issued_.end(), std::uint8_t{0});
  first_pending_ = 0;
}

bool prefetcher::issued(int tensor) const {
  if (tensor < 0 || static_cast<std::size_t>(tensor) >= position_.size()) return false;
  const int pos = position_[static_cast<std::size_t>(tensor)];
  return pos >= 0 && issued_[static_cast<std::size_t>(pos)] != 0;
}

double prefetcher::latest_start_ns(int tensor) const {
  constexpr double none = std::numeric_limits<double>::quiet_NaN();
  if (tensor < 0 || static_cast<std::size_t>(tensor) >= position_.size()) return none;
  const int pos = position_[static_cast<std::size_t>(tensor)];
  return pos < 0 ? none : queue_[static_cast<std::size_t>(pos)].latest_start_ns;
}

}  // namespace gpuswap
