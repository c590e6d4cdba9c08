#include "prefetcher/workload_profile.hpp"

#include <algorithm>

#include <fmt/format.h>

#include "core/errors.hpp"

namespace gpuswap {

namespace {

bool is_forward(const workload_profile& p, int step) {
  return p.steps[static_cast<std::size_t>(step)].ph == phase::forward;
}

const tensor_info& tensor_at(const workload_profile& p, int tensor) {
  return p.tensors[static_cast<std::size_t>(tensor)];
}

}  // namespace

int workload_profile::next_use_after(int tensor, int step) const {
  const auto& uses = tensor_at(*this, tensor).use_steps;
  const auto it = std::lower_bound(uses.begin(), uses.end(), step);
  return it == uses.end() ? -1 : *it;
}

int workload_profile::last_forward_use(int tensor) const {
  const tensor_info& t = tensor_at(*this, tensor);
  int last = t.producer_step;
  for (int use : t.use_steps) {
    if (is_forward(*this, use)) last = std::max(last, use);
  }
  return last;
}

int workload_profile::first_backward_use(int tensor) const {
  for (int use : tensor_at(*this, tensor).use_steps) {
    if (!is_forward(*this, use)) return use;
  }
  return -1;
}

int workload_profile::last_use(int tensor) const {
  const tensor_info& t = tensor_at(*this, tensor);
  return t.use_steps.empty() ? t.producer_step : std::max(t.producer_step, t.use_steps.back());
}

double workload_profile::total_compute_ns() const {
  double total = 0;
  for (const step_info& s : steps) total += s.compute_ns;
  return total;
}

std::string workload_profile::check() const {
  const int n = static_cast<int>(steps.size());
  if (!step_scratch_bytes.empty() && step_scratch_bytes.size() != steps.size()) {
    return fmt::format("step_scratch_bytes has {} entries for {} steps", step_scratch_bytes.size(),
                       steps.size());
  }
  for (int s = 0; s < n; ++s) {
    if (!(steps[static_cast<std::size_t>(s)].compute_ns >= 0)) {
      return fmt::format("step {} has compute_ns {}", s,
                         steps[static_cast<std::size_t>(s)].compute_ns);
    }
  }
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const tensor_info& t = tensors[i];
    const auto label = [&] {
      return t.name.empty() ? fmt::format("tensor {}", i)
                            : fmt::format("tensor {} ({})", i, t.name);
    };
    if (t.id != static_cast<int>(i)) return fmt::format("{} has id {}", label(), t.id);
    if (t.producer_step < 0 || t.producer_step >= n) {
      return fmt::format("{} has producer_step {} outside 0..{}", label(), t.producer_step,
                         n - 1);
    }
    for (const double at : {t.made_at, t.sent_at, t.needed_at, t.freed_at}) {
      if (!(at >= 0 && at <= 1)) {
        return fmt::format("{} has a position {} inside a step outside 0..1", label(), at);
      }
    }
    int previous = t.producer_step - 1;
    for (int use : t.use_steps) {
      if (use >= n) return fmt::format("{} is used at step {} of {}", label(), use, n);
      if (use <= previous) {
        return fmt::format("{}: use_steps must be strictly ascending and not before the "
                           "producer step {}",
                           label(), t.producer_step);
      }
      previous = use;
    }
  }
  return {};
}

void workload_profile::validate() const {
  if (std::string problem = check(); !problem.empty()) {
    throw_config_error("workload_profile", problem, "a consistent workload profile");
  }
}

}  // namespace gpuswap
