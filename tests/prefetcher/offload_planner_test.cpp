#include "prefetcher/offload_planner.hpp"

#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "core/errors.hpp"
#include "prefetcher/memory_timeline.hpp"
#include "test_profiles.hpp"

namespace gpuswap {
namespace {

using testing::chain;
using testing::mb;

planner_options link(offload_policy policy, std::size_t budget, double bandwidth = 100e9) {
  planner_options o;
  o.policy = policy;
  o.budget_bytes = budget;
  o.d2h_bandwidth = bandwidth;
  o.h2d_bandwidth = bandwidth;
  o.d2h_latency_ns = 0;
  o.h2d_latency_ns = 0;
  return o;
}

std::vector<int> chosen(const offload_plan& plan) {
  std::vector<int> out;
  for (std::size_t i = 0; i < plan.offload.size(); ++i) {
    if (plan.offload[i]) out.push_back(static_cast<int>(i));
  }
  return out;
}

// Four layers, steps 0..7: tensor 0 (100 MB) and 1 (200 MB) are idle across the forward /
// backward turn; tensor 2 is read by the first backward step right after its last forward use
// (never idle), tensor 3 feeds the loss (not offloadable). Peak 650 MB at step 3.
workload_profile four_layers() { return chain({100 * mb, 200 * mb, 300 * mb, 50 * mb}); }

TEST(offload_planner, none_offloads_nothing) {
  const offload_plan plan = plan_offload(four_layers(), link(offload_policy::none, 400 * mb));
  EXPECT_TRUE(chosen(plan).empty());
  EXPECT_EQ(plan.no_offload_peak_bytes, 650 * mb);
  EXPECT_EQ(plan.predicted_peak_bytes, 650 * mb);
  EXPECT_FALSE(plan.fits);
  EXPECT_NE(plan.explain.find("does not fit"), std::string::npos) << plan.explain;
}

TEST(offload_planner, all_offloads_every_saved_input_that_is_idle) {
  const offload_plan plan = plan_offload(four_layers(), link(offload_policy::all, 0));
  EXPECT_EQ(chosen(plan), (std::vector<int>{0, 1}));
  EXPECT_EQ(plan.offloaded_bytes, 300 * mb);
  EXPECT_TRUE(plan.fits);  // no budget
  EXPECT_NE(plan.explain.find("all: offload 2 of 2"), std::string::npos) << plan.explain;
}

TEST(offload_planner, conv_offloads_only_convolution_inputs) {
  workload_profile p = four_layers();
  p.tensors[1].conv_input = true;
  p.tensors[2].conv_input = true;  // a conv input, but never idle
  const offload_plan plan = plan_offload(p, link(offload_policy::conv, 0));
  EXPECT_EQ(chosen(plan), std::vector<int>{1});
}

TEST(offload_planner, candidates_exclude_unneeded_unoffloadable_and_never_idle_tensors) {
  workload_profile p = four_layers();
  EXPECT_TRUE(offload_candidate(p, 0));
  EXPECT_TRUE(offload_candidate(p, 1));
  EXPECT_FALSE(offload_candidate(p, 2));  // backward reads it right after its forward use
  EXPECT_FALSE(offload_candidate(p, 3));  // not offloadable
  p.tensors[0].use_steps = {1};           // not needed by backward
  EXPECT_FALSE(offload_candidate(p, 0));
}

TEST(offload_planner, auto_offloads_nothing_when_everything_fits_or_there_is_no_budget) {
  for (std::size_t budget : {std::size_t{0}, 650 * mb, 1000 * mb}) {
    const offload_plan plan = plan_offload(four_layers(), link(offload_policy::auto_, budget));
    EXPECT_TRUE(chosen(plan).empty()) << budget;
    EXPECT_TRUE(plan.fits) << budget;
    EXPECT_EQ(plan.predicted_peak_bytes, 650 * mb);
    EXPECT_DOUBLE_EQ(plan.predicted_exposed_ns, 0);
  }
}

// Seven layers, 1 ms steps, 100 GB/s: tensors 0 and 1 (60 MB, 0.6 ms copies) leave early in
// forward; tensor 4 (100 MB) leaves after step 5, and its 1 ms copy cannot end before the peak
// step 6 (the 130 MB loss input arrives) starts. Peak 380 MB; budget 280 MB: 100 MB must go.
workload_profile hideable_and_not() {
  return chain({60 * mb, 60 * mb, 10 * mb, 10 * mb, 100 * mb, 10 * mb, 130 * mb});
}

TEST(offload_planner, auto_prefers_two_hideable_tensors_to_one_that_cannot_hide) {
  const workload_profile p = hideable_and_not();
  const planner_options o = link(offload_policy::auto_, 280 * mb);
  // The premise: tensor 4 alone would fit with fewer bytes, but its copies show.
  memory_timeline tl(p, o);
  std::vector<bool> big_only(7, false);
  big_only[4] = true;
  const timeline_result& big = tl.simulate(big_only);
  ASSERT_LE(big.peak_bytes, 280 * mb);
  ASSERT_GT(big.exposed_ns, 0.5e6);

  const offload_plan plan = plan_offload(p, o);
  EXPECT_EQ(chosen(plan), (std::vector<int>{0, 1}));
  EXPECT_TRUE(plan.fits);
  EXPECT_LE(plan.predicted_peak_bytes, 280 * mb);
  EXPECT_EQ(plan.no_offload_peak_bytes, 380 * mb);
  EXPECT_DOUBLE_EQ(plan.predicted_exposed_ns, 0);
}

TEST(offload_planner, auto_fits_with_fewer_bytes_than_all) {
  const workload_profile p = hideable_and_not();
  const offload_plan all = plan_offload(p, link(offload_policy::all, 280 * mb));
  const offload_plan automatic = plan_offload(p, link(offload_policy::auto_, 280 * mb));
  EXPECT_EQ(chosen(all), (std::vector<int>{0, 1, 2, 3, 4}));
  ASSERT_TRUE(all.fits);
  ASSERT_TRUE(automatic.fits);
  EXPECT_LT(automatic.offloaded_bytes, all.offloaded_bytes);
  EXPECT_LE(automatic.predicted_exposed_ns, all.predicted_exposed_ns);
}

TEST(offload_planner, auto_takes_the_least_bytes_among_hideable_tensors) {
  // Six layers, 1 ms steps: peak 96 MB at step 5, budget 81 MB, so 15 MB must go. Tensor 0
  // (60 MB) would do alone; tensors 1 and 2 (10 MB each, 0.1 ms copies) do it with 20 MB and
  // hide as well. Tensor 3 (1 MB) leaves after step 4 and cannot be gone by step 5.
  const workload_profile p = chain({60 * mb, 10 * mb, 10 * mb, 1 * mb, 1 * mb, 14 * mb});
  const offload_plan plan = plan_offload(p, link(offload_policy::auto_, 81 * mb));
  EXPECT_EQ(plan.no_offload_peak_bytes, 96 * mb);
  EXPECT_EQ(chosen(plan), (std::vector<int>{1, 2}));
  EXPECT_EQ(plan.offloaded_bytes, 20 * mb);
  EXPECT_TRUE(plan.fits);
  EXPECT_DOUBLE_EQ(plan.predicted_exposed_ns, 0);
}

TEST(offload_planner, auto_says_when_nothing_fits_and_keeps_its_best_effort) {
  const workload_profile p = hideable_and_not();
  // 100 MB: below what the loss input needs with the tensors in use at the peak step.
  const offload_plan plan = plan_offload(p, link(offload_policy::auto_, 100 * mb));
  EXPECT_FALSE(plan.fits);
  EXPECT_LT(plan.predicted_peak_bytes, plan.no_offload_peak_bytes);
  EXPECT_NE(plan.explain.find("does not fit"), std::string::npos) << plan.explain;
}

TEST(offload_planner, auto_is_deterministic) {
  const workload_profile p = hideable_and_not();
  const planner_options o = link(offload_policy::auto_, 250 * mb, 30e9);
  const offload_plan a = plan_offload(p, o);
  const offload_plan b = plan_offload(p, o);
  EXPECT_EQ(a.offload, b.offload);
  EXPECT_EQ(a.predicted_peak_bytes, b.predicted_peak_bytes);
  EXPECT_EQ(a.explain, b.explain);
}

TEST(offload_planner, predicted_figures_come_from_the_memory_timeline) {
  const workload_profile p = hideable_and_not();
  const planner_options o = link(offload_policy::all, 250 * mb, 30e9);
  const offload_plan plan = plan_offload(p, o);
  memory_timeline tl(p, o);
  const timeline_result& r = tl.simulate(plan.offload);
  EXPECT_EQ(plan.predicted_peak_bytes, r.peak_bytes);
  EXPECT_DOUBLE_EQ(plan.predicted_exposed_ns, r.exposed_ns);
  EXPECT_EQ(plan.fits, r.peak_bytes <= 250 * mb);
}

// Eight transformer-like blocks of four tensors (1, 3, 1 and 4 units of 64 MB, produced by
// steps of 0.3, 5, 3 and 12 ms; backward twice as long), 1 GB resident, 25 GB/s each way.
workload_profile transformer_like() {
  std::vector<std::size_t> bytes;
  for (int block = 0; block < 8; ++block) {
    for (std::size_t units : {1, 3, 1, 4}) bytes.push_back(units * 64 * mb);
  }
  bytes.back() = 32 * mb;
  workload_profile p = chain(bytes, 1e6, 1000 * mb);
  const double forward_ns[] = {0.3e6, 5e6, 3e6, 12e6};
  const int layers = static_cast<int>(bytes.size());
  for (int i = 0; i < layers; ++i) {
    p.steps[static_cast<std::size_t>(i)].compute_ns = forward_ns[i % 4];
    p.steps[static_cast<std::size_t>(2 * layers - 1 - i)].compute_ns = 2 * forward_ns[i % 4];
  }
  return p;
}

TEST(offload_planner, auto_hides_what_all_exposes_on_a_transformer_like_stack) {
  const workload_profile p = transformer_like();
  const offload_plan all = plan_offload(p, link(offload_policy::all, 2300 * mb, 25e9));
  const offload_plan automatic = plan_offload(p, link(offload_policy::auto_, 2300 * mb, 25e9));
  ASSERT_TRUE(all.fits);
  ASSERT_GT(all.predicted_exposed_ns, 1e6);  // offloading everything clogs the link
  EXPECT_TRUE(automatic.fits) << automatic.explain;
  EXPECT_LE(automatic.predicted_exposed_ns, all.predicted_exposed_ns / 3) << automatic.explain;
  EXPECT_LT(chosen(automatic).size(), chosen(all).size());
  EXPECT_LT(automatic.offloaded_bytes, all.offloaded_bytes);
}

// Random chains: whenever `all` fits, `auto` fits too, with no more bytes and no more exposed
// time than `all`.
TEST(offload_planner, auto_never_does_worse_than_all_on_random_chains) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> size(1, 100);
  std::uniform_real_distribution<double> step(0.1e6, 3e6);
  int compared = 0;
  for (int trial = 0; trial < 200; ++trial) {
    const int layers = 4 + trial % 20;
    std::vector<std::size_t> bytes;
    for (int i = 0; i < layers; ++i) bytes.push_back(static_cast<std::size_t>(size(rng)) * mb);
    workload_profile p = chain(bytes, 1e6, 50 * mb);
    for (step_info& s : p.steps) s.compute_ns = step(rng);
    const std::size_t peak = plan_offload(p, link(offload_policy::none, 0)).no_offload_peak_bytes;
    const std::size_t budget = peak - (peak - 50 * mb) * static_cast<std::size_t>(trial % 7) / 10;
    const offload_plan all = plan_offload(p, link(offload_policy::all, budget, 20e9));
    const offload_plan automatic = plan_offload(p, link(offload_policy::auto_, budget, 20e9));
    if (automatic.fits) {
      EXPECT_LE(automatic.predicted_peak_bytes, budget);
    }
    if (!all.fits) continue;
    ++compared;
    EXPECT_TRUE(automatic.fits) << "trial " << trial << ": " << automatic.explain;
    EXPECT_LE(automatic.offloaded_bytes, all.offloaded_bytes) << "trial " << trial;
    EXPECT_LE(automatic.predicted_exposed_ns, all.predicted_exposed_ns + 1)
        << "trial " << trial << ": " << automatic.explain << " / " << all.explain;
  }
  EXPECT_GT(compared, 50);
}

TEST(offload_planner, rejects_bad_options_and_inconsistent_profiles) {
  planner_options o = link(offload_policy::auto_, 100 * mb);
  o.h2d_bandwidth = 0;
  EXPECT_THROW(plan_offload(four_layers(), o), config_error);
  o = link(offload_policy::auto_, 100 * mb);
  o.d2h_latency_ns = -1;
  EXPECT_THROW(plan_offload(four_layers(), o), config_error);
  workload_profile p = four_layers();
  p.tensors[0].use_steps = {5, 1};
  EXPECT_THROW(plan_offload(p, link(offload_policy::all, 0)), config_error);
}

TEST(offload_planner, an_empty_profile_fits_with_nothing_to_offload) {
  const offload_plan plan = plan_offload(workload_profile{}, link(offload_policy::auto_, 1));
  EXPECT_TRUE(plan.offload.empty());
  EXPECT_TRUE(plan.fits);
  EXPECT_EQ(plan.predicted_peak_bytes, 0u);
}

}  // namespace
}  // namespace gpuswap
