#include "prefetcher/offload_planner.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include <fmt/format.h>

#include "allocator/oom_report.hpp"
#include "core/errors.hpp"
#include "prefetcher/memory_timeline.hpp"

namespace gpuswap {

// Note [Choosing what to offload]
// `auto` is a greedy loop around memory_timeline (Note [The iteration model]), which is the
// truth about a plan. Each round models the plan, then works on the steps over the budget,
// the most over first: for step p it adds tensors idle across p (last forward use before p,
// first backward use after p) until p's excess is covered, counting each one against every
// step it is idle across, so that a whole plateau of steps is dealt with in one round; a step
// that nothing idle across it can bring under the budget is given up (the plan will not fit,
// and says so, keeping the lowest peak it found). Once the peak fits, rounds work on the
// steps that fit only by waiting for swap-outs to free memory, with tensors whose copies hide
// or expose less than the wait, and stop when the exposed time no longer goes down. Then the
// tensors chosen last are tried out again and dropped if the plan fits as well without them.
// Last, the plan is compared with offloading every candidate, and the better one is kept
// (no_worse_than_all).
//
// Which tensor: first, one whose copies are expected to hide. The expected exposed time is a
// Capuchin-like cost from the step times of the last model run:
//   - swap-out: the D2H engine is first come first served, so the work issued before p
//     completes at C = max over steps q < p of (end(q) + D2H work issued at steps q..p-1).
//     Adding a tensor swapped out after step q adds its copy time to every term up to q; what
//     the new C overshoots the moment p becomes ready (beyond what the old C did) is exposed,
//     since p waits for memory.
//   - swap-in: run as early as backward begins (E), the H2D engine would have delivered the
//     tensors needed by step k at E + (H2D work needed by k); the slack of step k is its
//     modelled start minus that. A tensor first needed at step b exposes the part of its copy
//     time that exceeds the least slack from b on.
// Among tensors that hide (under 1 us exposed), the largest gain: the bytes taken off p, at
// most its excess, minus what is moved beyond the excess. Offloading the least bytes thus
// means the largest tensors that do not overshoot, then the one that overshoots least (with an
// excess of 15: two tensors of 10 rather than one of 60). When none hides, the best ratio of
// bytes taken off p (at most the excess) to exposed time. Ties go to fewer bytes, then to the
// longer idle interval (more room if timings move), then to the lower id.
//
// Cost: a round is linear in steps and tensors per tensor chosen, and there are at most
// max_rounds + prune_limit + 4 model runs, each linear in steps and tensors (about 10 us for
// 200 tensors), so a plan for hundreds of tensors takes a fraction of a millisecond.

namespace {

constexpr double hidden_below_ns = 1'000;
constexpr double exposed_tolerance_ns = 1;
constexpr int max_rounds = 24;
constexpr std::size_t prune_limit = 8;

std::string format_ns(double ns) { return fmt::format("{:.3f} ms", ns / 1e6); }

double copy_ns(std::size_t bytes, double bandwidth, double latency_ns) {
  return latency_ns + static_cast<double>(bytes) * 1e9 / bandwidth;
}

class auto_planner {
 public:
  auto_planner(const workload_profile& profile, const planner_options& options,
               memory_timeline& timeline, const std::vector<int>& candidates)
      : options_(options), timeline_(timeline) {
    const std::size_t n_steps = profile.steps.size();
    step_begin_.assign(n_steps + 1, 0.0);
    for (std::size_t s = 0; s < n_steps; ++s) {
      step_begin_[s + 1] = step_begin_[s] + profile.steps[s].compute_ns;
      if (first_backward_step_ < 0 && profile.steps[s].ph == phase::backward) {
        first_backward_step_ = static_cast<int>(s);
      }
    }
    for (int t : candidates) {
      const std::size_t bytes = profile.tensors[static_cast<std::size_t>(t)].bytes;
      candidates_.push_back(candidate{t, profile.last_forward_use(t),
                                      profile.first_backward_use(t), bytes,
                                      copy_ns(bytes, options.d2h_bandwidth, options.d2h_latency_ns),
                                      copy_ns(bytes, options.h2d_bandwidth, options.h2d_latency_ns),
                                      false});
    }
    offload_.assign(profile.tensors.size(), false);
  }

  std::vector<bool> run() {
    const std::size_t budget = options_.budget_bytes;
    const std::size_t n_steps = step_begin_.size() - 1;
    std::vector<bool> given_up(n_steps, false);
    std::vector<std::size_t> need(n_steps, 0);
    std::vector<std::size_t> picks;  // indices into candidates_, in the order chosen
    bool must = true;                // over the budget: any tensor that helps will do
    for (int round = 0; round < max_rounds; ++round) {
      const timeline_result& r = timeline_.simulate(offload_);
      if (r.peak_step < 0) break;
      if (must && r.peak_bytes <= budget) {
        must = false;
        std::fill(given_up.begin(), given_up.end(), false);
      }
      const double exposed_before = r.exposed_ns;
      for (std::size_t s = 0; s < n_steps; ++s) {
        const std::size_t bytes = must ? r.step_bytes[s] : r.step_demand_bytes[s];
        need[s] = !given_up[s] && bytes > budget ? bytes - budget : 0;
      }
      const std::size_t first_pick = picks.size();
      while (true) {
        const auto it = std::max_element(need.begin(), need.end());
        if (*it == 0) break;
        const auto p = static_cast<std::size_t>(it - need.begin());
        const double wait = r.step_stall_ns[p];
        if (any_idle_across(p)) prepare(r, p);
        while (need[p] > 0) {
          const std::size_t c = best_at(p, need[p]);
          if (c == none) break;
          const candidate& pick = candidates_[c];
          if (!must && last_exposed_ns_ >= hidden_below_ns && last_exposed_ns_ >= wait) break;
          take(c);
          picks.push_back(c);
          // Roughly off the device between its last forward use and first backward use.
          for (auto k = static_cast<std::size_t>(pick.last_forward) + 1;
               k < static_cast<std::size_t>(pick.first_backward); ++k) {
            need[k] -= std::min(need[k], pick.bytes);
          }
        }
        if (need[p] > 0) {
          given_up[p] = true;  // nothing (more) idle across it helps
          need[p] = 0;
        }
      }
      if (picks.size() == first_pick) break;
      if (!must &&
          timeline_.simulate(offload_).exposed_ns >= exposed_before - exposed_tolerance_ns) {
        for (std::size_t i = first_pick; i < picks.size(); ++i) set(picks[i], false);
        picks.resize(first_pick);
        break;
      }
    }
    prune(picks);
    return offload_;
  }

 private:
  static constexpr std::size_t none = static_cast<std::size_t>(-1);

  struct candidate {
    int tensor;
    int last_forward;
    int first_backward;
    std::size_t bytes;
    double d2h_ns;
    double h2d_ns;
    bool chosen;
  };

  struct choice {
    std::size_t index = none;
    bool hidden = false;
    double key = 0;  // gain when hidden, else reduction per exposed ns
    std::size_t bytes = 0;
    double idle_ns = 0;
    int tensor = 0;
  };

  // True when `a` is a better pick than `b`.
  static bool better(const choice& a, const choice& b) {
    if (b.index == none) return true;
    if (a.hidden != b.hidden) return a.hidden;
    const double scale = std::max(std::abs(a.key), std::abs(b.key));
    if (std::abs(a.key - b.key) > 1e-9 * scale) return a.key > b.key;
    if (a.bytes != b.bytes) return a.bytes < b.bytes;
    if (a.idle_ns != b.idle_ns) return a.idle_ns > b.idle_ns;
    return a.tensor < b.tensor;
  }

  static bool idle_across(const candidate& c, std::size_t step) {
    return static_cast<std::size_t>(c.last_forward) < step &&
           step < static_cast<std::size_t>(c.first_backward);
  }

  bool any_idle_across(std::size_t step) const {
    return std::any_of(candidates_.begin(), candidates_.end(),
                       [&](const candidate& c) { return !c.chosen && idle_across(c, step); });
  }

  void set(std::size_t index, bool chosen) {
    candidates_[index].chosen = chosen;
    offload_[static_cast<std::size_t>(candidates_[index].tensor)] = chosen;
  }

  // The cost model's state for target step p, from the last model run.
  void prepare(const timeline_result& r, std::size_t p) {
    const std::size_t n_steps = step_begin_.size() - 1;
    // Swap-outs: term(q) = end(q) + D2H work issued at steps q..p-1.
    term_.assign(p, 0.0);
    for (const candidate& c : candidates_) {
      if (c.chosen && static_cast<std::size_t>(c.last_forward) < p) {
        term_[static_cast<std::size_t>(c.last_forward)] += c.d2h_ns;
      }
    }
    double after = 0;
    for (std::size_t q = p; q-- > 0;) {
      after += term_[q];
      term_[q] = r.step_end_ns[q] + after;
    }
    ready_ = r.step_start_ns[p] - r.step_stall_ns[p];
    refresh_terms();
    // Swap-ins: slack(k) = start(k) - (E + H2D work needed by k).
    slack_.assign(n_steps, std::numeric_limits<double>::infinity());
    if (first_backward_step_ >= 0) {
      const auto b0 = static_cast<std::size_t>(first_backward_step_);
      const double earliest = r.step_start_ns[b0] - r.step_stall_ns[b0];
      std::fill(slack_.begin() + static_cast<std::ptrdiff_t>(b0), slack_.end(), 0.0);
      for (const candidate& c : candidates_) {
        if (c.chosen) slack_[static_cast<std::size_t>(c.first_backward)] += c.h2d_ns;
      }
      double needed = 0;
      for (std::size_t k = b0; k < n_steps; ++k) {
        needed += slack_[k];
        slack_[k] = r.step_start_ns[k] - (earliest + needed);
      }
    }
    refresh_slack();
  }

  void refresh_terms() {
    const std::size_t p = term_.size();
    const double neg_inf = -std::numeric_limits<double>::infinity();
    prefix_max_.assign(p, neg_inf);
    suffix_max_.assign(p + 1, neg_inf);
    for (std::size_t q = 0; q < p; ++q) {
      prefix_max_[q] = std::max(q > 0 ? prefix_max_[q - 1] : neg_inf, term_[q]);
    }
    for (std::size_t q = p; q-- > 0;) suffix_max_[q] = std::max(suffix_max_[q + 1], term_[q]);
    overshoot_ = p > 0 ? std::max(0.0, prefix_max_[p - 1] - ready_) : 0.0;
  }

  void refresh_slack() {
    const std::size_t n = slack_.size();
    slack_min_.assign(n + 1, std::numeric_limits<double>::infinity());
    for (std::size_t k = n; k-- > 0;) slack_min_[k] = std::min(slack_min_[k + 1], slack_[k]);
  }

  // Chooses candidate `index` and updates the round's state (the next model run recomputes it
  // exactly).
  void take(std::size_t index) {
    const candidate& c = candidates_[index];
    const auto q = static_cast<std::size_t>(c.last_forward);
    for (std::size_t k = 0; k <= q && k < term_.size(); ++k) term_[k] += c.d2h_ns;
    refresh_terms();
    for (auto k = static_cast<std::size_t>(c.first_backward); k < slack_.size(); ++k) {
      slack_[k] -= c.h2d_ns;
    }
    refresh_slack();
    set(index, true);
  }

  // The best candidate idle across step p to take `excess` bytes off it; sets
  // last_exposed_ns_ to its expected exposed time.
  std::size_t best_at(std::size_t p, std::size_t excess) {
    choice best;
    double best_exposed = 0;
    for (std::size_t index = 0; index < candidates_.size(); ++index) {
      const candidate& c = candidates_[index];
      if (c.chosen || c.bytes == 0 || !idle_across(c, p)) continue;
      const auto q = static_cast<std::size_t>(c.last_forward);
      const auto b = static_cast<std::size_t>(c.first_backward);
      const double completion = std::max(prefix_max_[q] + c.d2h_ns, suffix_max_[q + 1]);
      const double d2h_exposed = std::max(0.0, std::max(0.0, completion - ready_) - overshoot_);
      const double h2d_exposed = std::max(0.0, c.h2d_ns - std::max(0.0, slack_min_[b]));
      const double exposed = d2h_exposed + h2d_exposed;
      const double reduction = static_cast<double>(std::min(c.bytes, excess));
      choice option;
      option.index = index;
      option.hidden = exposed < hidden_below_ns;
      option.key = option.hidden
                       ? reduction - static_cast<double>(c.bytes > excess ? c.bytes - excess : 0)
                       : reduction / exposed;
      option.bytes = c.bytes;
      option.idle_ns = step_begin_[b] - step_begin_[q + 1];
      option.tensor = c.tensor;
      if (better(option, best)) {
        best = option;
        best_exposed = exposed;
      }
    }
    last_exposed_ns_ = best_exposed;
    return best.index;
  }

  // Drops chosen tensors the plan does not need, last chosen first (at most prune_limit
  // tries: the overshoot is in the last picks).
  void prune(const std::vector<std::size_t>& picks) {
    if (picks.empty()) return;
    const timeline_result& current = timeline_.simulate(offload_);
    double exposed = current.exposed_ns;
    const std::size_t allowed = std::max(current.peak_bytes, options_.budget_bytes);
    std::size_t tries = 0;
    for (auto it = picks.rbegin(); it != picks.rend() && tries < prune_limit; ++it, ++tries) {
      set(*it, false);
      const timeline_result& r = timeline_.simulate(offload_);
      if (r.peak_bytes <= allowed && r.exposed_ns <= exposed + exposed_tolerance_ns) {
        exposed = r.exposed_ns;
      } else {
        set(*it, true);
      }
    }
  }

  const planner_options& options_;
  memory_timeline& timeline_;
  std::vector<double> step_begin_;  // projected, no stalls; size steps+1
  int first_backward_step_ = -1;
  std::vector<candidate> candidates_;
  std::vector<bool> offload_;  // per tensor: the plan being built
  // The round's state (prepare, take, best_at).
  double ready_ = 0, overshoot_ = 0, last_exposed_ns_ = 0;
  std::vector<double> term_, prefix_max_, suffix_max_, slack_, slack_min_;
};

// The greedy is a heuristic: where offloading every candidate models better (it fits where the
// greedy's plan does not, a lower peak where neither fits, or less exposed time), that plan is
// the answer. One more model run buys the guarantee that `auto` never does worse than `all`.
std::vector<bool> no_worse_than_all(memory_timeline& timeline, std::vector<bool> chosen,
                                    const std::vector<int>& candidates, std::size_t budget) {
  const timeline_result& mine = timeline.simulate(chosen);
  const std::size_t my_peak = mine.peak_bytes;
  const double my_exposed = mine.exposed_ns;
  std::vector<bool> all(chosen.size(), false);
  for (int t : candidates) all[static_cast<std::size_t>(t)] = true;
  const timeline_result& theirs = timeline.simulate(all);
  const bool i_fit = my_peak <= budget;
  const bool they_fit = theirs.peak_bytes <= budget;
  if (they_fit != i_fit) return they_fit ? all : chosen;
  if (!they_fit) return theirs.peak_bytes < my_peak ? all : chosen;
  return theirs.exposed_ns < my_exposed - exposed_tolerance_ns ? all : chosen;
}

}  // namespace

void planner_options::validate() const {
  const auto positive = [](std::string_view key, double value) {
    if (!(value > 0) || value == std::numeric_limits<double>::infinity()) {
      throw_config_error(key, fmt::format("{}", value),
                         "a positive, finite number of bytes per second");
    }
  };
  const auto non_negative = [](std::string_view key, double value) {
    if (!(value >= 0) || value == std::numeric_limits<double>::infinity()) {
      throw_config_error(key, fmt::format("{}", value), "a finite number of nanoseconds >= 0");
    }
  };
  positive("d2h_bandwidth", d2h_bandwidth);
  positive("h2d_bandwidth", h2d_bandwidth);
  non_negative("d2h_latency_ns", d2h_latency_ns);
  non_negative("h2d_latency_ns", h2d_latency_ns);
}

bool offload_candidate(const workload_profile& profile, int tensor) {
  const tensor_info& t = profile.tensors[static_cast<std::size_t>(tensor)];
  if (!t.offloadable || t.bytes == 0) return false;
  const int first_backward = profile.first_backward_use(tensor);
  return first_backward >= 0 && first_backward - profile.last_forward_use(tensor) >= 2;
}

offload_plan plan_offload(const workload_profile& profile, const planner_options& options) {
  options.validate();
  profile.validate();
  const int n_tensors = static_cast<int>(profile.tensors.size());
  std::vector<int> candidates;
  for (int t = 0; t < n_tensors; ++t) {
    if (offload_candidate(profile, t)) candidates.push_back(t);
  }

  memory_timeline timeline(profile, options);
  offload_plan plan;
  plan.offload.assign(static_cast<std::size_t>(n_tensors), false);
  plan.no_offload_peak_bytes = timeline.simulate(plan.offload).peak_bytes;

  switch (options.policy) {
    case offload_policy::none:
      break;
    case offload_policy::all:
    case offload_policy::conv:
      for (int t : candidates) {
        const auto i = static_cast<std::size_t>(t);
        plan.offload[i] = options.policy == offload_policy::all || profile.tensors[i].conv_input;
      }
      break;
    case offload_policy::auto_:
      if (options.budget_bytes != 0 && plan.no_offload_peak_bytes > options.budget_bytes) {
        plan.offload = auto_planner(profile, options, timeline, candidates).run();
        plan.offload = no_worse_than_all(timeline, std::move(plan.offload), candidates,
                                         options.budget_bytes);
      }
      break;
  }

  const timeline_result& r = timeline.simulate(plan.offload);
  int count = 0;
  for (int t = 0; t < n_tensors; ++t) {
    if (plan.offload[static_cast<std::size_t>(t)]) {
      plan.offloaded_bytes += profile.tensors[static_cast<std::size_t>(t)].bytes;
      ++count;
    }
  }
  plan.predicted_peak_bytes = r.peak_bytes;
  plan.predicted_exposed_ns = r.exposed_ns;
  plan.fits = options.budget_bytes == 0 || r.peak_bytes <= options.budget_bytes;
  plan.explain = fmt::format(
      "{}: offload {} of {} candidate tensors ({}); peak {} -> {}, budget {}; {} of copies "
      "exposed",
      to_string(options.policy), count, candidates.size(), human_bytes(plan.offloaded_bytes),
      human_bytes(plan.no_offload_peak_bytes), human_bytes(plan.predicted_peak_bytes),
      options.budget_bytes == 0 ? std::string("unlimited") : human_bytes(options.budget_bytes),
      format_ns(plan.predicted_exposed_ns));
  if (!plan.fits) plan.explain += "; does not fit the budget";
  return plan;
}

}  // namespace gpuswap
