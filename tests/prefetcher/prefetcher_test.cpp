#include "prefetcher/prefetcher.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <map>
#include <vector>

#include "core/errors.hpp"
#include "test_profiles.hpp"

namespace gpuswap {
namespace {

using testing::chain;
using testing::mb;

constexpr std::size_t unlimited = std::numeric_limits<std::size_t>::max();

// Eight layers: forward steps 0..7, backward 8..15; tensor i (layer i's output) is first needed
// back at step 14 - i. Tensors 0..5 offloaded, each 60 MB.
workload_profile eight_layers(double step_ns) {
  return chain({60 * mb, 60 * mb, 60 * mb, 60 * mb, 60 * mb, 60 * mb, 10 * mb, 10 * mb}, step_ns);
}
const std::vector<bool> first_six = {true, true, true, true, true, true, false, false};

prefetch_options link(prefetch_policy policy, double bandwidth) {
  return prefetch_options{policy, bandwidth, 0};
}

// Runs one iteration; returns, per tensor, the step it was issued at.
std::map<int, int> issue_steps(prefetcher& pf, const workload_profile& p,
                               std::size_t free_bytes = unlimited) {
  std::map<int, int> at;
  for (int s = 0; s < static_cast<int>(p.steps.size()); ++s) {
    for (int t : pf.issue_before(s, free_bytes)) {
      EXPECT_FALSE(at.contains(t)) << "tensor " << t << " issued twice";
      at[t] = s;
    }
  }
  return at;
}

TEST(prefetcher_lookahead, issues_just_in_time_in_order_of_need) {
  // Copies 0.6 ms (60 MB at 100 GB/s) under 1 ms steps: each tensor goes one step ahead.
  const workload_profile p = eight_layers(1e6);
  prefetcher pf(p, first_six, link(prefetch_policy::lookahead, 100e9));
  std::vector<std::vector<int>> per_step;
  for (int s = 0; s < 16; ++s) per_step.push_back(pf.issue_before(s, unlimited));
  for (int s = 0; s < 8; ++s) EXPECT_TRUE(per_step[static_cast<std::size_t>(s)].empty()) << s;
  // Tensor 5 is needed at step 9 (latest start 8.4 ms, inside step 8), tensor 0 at step 14.
  for (int t = 0; t < 6; ++t) {
    EXPECT_EQ(per_step[static_cast<std::size_t>(13 - t)], std::vector<int>{t}) << "tensor " << t;
  }
  EXPECT_DOUBLE_EQ(pf.latest_start_ns(0), 14e6 - 0.6e6);
  EXPECT_TRUE(std::isnan(pf.latest_start_ns(7)));
}

TEST(prefetcher_lookahead, a_piece_is_due_when_the_part_that_reads_it_starts) {
  // Tensor 1 is read by the first half of step 3, tensor 0 by the second (from 3.5 ms): at
  // 200 GB/s each copy takes 0.5 ms, so tensor 0 may start as late as 3 ms, and tensor 1, which
  // is needed first, comes first.
  const workload_profile p = testing::two_part_layer();
  prefetcher pf(p, std::vector<bool>{true, true, false}, link(prefetch_policy::lookahead, 200e9));
  EXPECT_DOUBLE_EQ(pf.latest_start_ns(0), 3e6);
  EXPECT_DOUBLE_EQ(pf.latest_start_ns(1), 2.5e6);
  EXPECT_EQ(pf.issue_before(2, 100 * mb), std::vector<int>{1});

  // Both needed when step 3 starts: by id, each half a millisecond ahead of the other.
  const workload_profile whole = testing::two_part_layer(true);
  prefetcher pw(whole, std::vector<bool>{true, true, false}, link(prefetch_policy::lookahead, 200e9));
  EXPECT_DOUBLE_EQ(pw.latest_start_ns(0), 2e6);
  EXPECT_DOUBLE_EQ(pw.latest_start_ns(1), 2.5e6);
}

TEST(prefetcher_lookahead, issues_earlier_when_steps_are_short_or_copies_long) {
  const workload_profile p = eight_layers(1e6);
  prefetcher normal(p, first_six, link(prefetch_policy::lookahead, 100e9));
  const auto base = issue_steps(normal, p);

  const workload_profile short_steps = eight_layers(0.25e6);
  prefetcher quick(short_steps, first_six, link(prefetch_policy::lookahead, 100e9));
  const auto early = issue_steps(quick, short_steps);

  prefetcher slow_link(p, first_six, link(prefetch_policy::lookahead, 20e9));
  const auto slow = issue_steps(slow_link, p);

  ASSERT_EQ(base.size(), 6u);
  ASSERT_EQ(early.size(), 6u);
  ASSERT_EQ(slow.size(), 6u);
  // Tensor 5 goes at the first backward step in all three.
  for (int t = 0; t < 5; ++t) {
    EXPECT_LT(early.at(t), base.at(t)) << "tensor " << t;
    EXPECT_LT(slow.at(t), base.at(t)) << "tensor " << t;
  }
  // 3 ms copies (60 MB at 20 GB/s) back to back, one needed each ms: tensor 0 (needed at
  // 14 ms) starts by 11 ms, tensor 1 by 8 ms, ... tensor 3 by 2 ms: before backward, so
  // tensors 5..3 all go at the first backward step.
  EXPECT_EQ(slow.at(5), 8);
  EXPECT_EQ(slow.at(4), 8);
  EXPECT_EQ(slow.at(3), 8);
  EXPECT_EQ(slow.at(2), 8);   // latest start 5 ms
  EXPECT_EQ(slow.at(1), 8);   // latest start 8 ms is before the end of step 8 (9 ms)
  EXPECT_EQ(slow.at(0), 11);  // latest start 11 ms: issuing as step 11 starts is on time
}

TEST(prefetcher_lookahead, never_issues_beyond_the_free_budget_except_what_the_step_needs) {
  const workload_profile p = eight_layers(0.25e6);  // wants several tensors in flight
  prefetcher pf(p, first_six, link(prefetch_policy::lookahead, 100e9));
  std::map<int, int> at;
  std::size_t most_per_step = 0;
  for (int s = 0; s < 16; ++s) {
    const std::vector<int> issued = pf.issue_before(s, 130 * mb);  // room for two
    std::size_t optional = 0;
    for (int t : issued) {
      at[t] = s;
      if (p.first_backward_use(t) != s) optional += p.tensors[static_cast<std::size_t>(t)].bytes;
    }
    EXPECT_LE(optional, 130 * mb) << "step " << s;
    most_per_step = std::max(most_per_step, issued.size());
  }
  EXPECT_EQ(at.size(), 6u);
  EXPECT_EQ(most_per_step, 2u);  // without the budget it issues more at once

  // No room at all: each tensor comes only when its step needs it.
  prefetcher tight(p, first_six, link(prefetch_policy::lookahead, 100e9));
  const auto demanded = issue_steps(tight, p, 0);
  for (int t = 0; t < 6; ++t) EXPECT_EQ(demanded.at(t), 14 - t);
}

TEST(prefetcher_lookahead, the_step_own_allocations_come_out_of_the_free_budget) {
  workload_profile p = eight_layers(1e6);
  p.step_scratch_bytes.assign(16, 0);
  prefetcher pf(p, first_six, link(prefetch_policy::lookahead, 100e9));
  EXPECT_EQ(pf.issue_before(8, 60 * mb), std::vector<int>{5});

  p.step_scratch_bytes[8] = 1;  // one byte short now
  prefetcher short_of_room(p, first_six, link(prefetch_policy::lookahead, 100e9));
  EXPECT_TRUE(short_of_room.issue_before(8, 60 * mb).empty());
}

TEST(prefetcher_lookahead, a_tensor_that_does_not_fit_holds_back_those_behind_it) {
  workload_profile p = eight_layers(0.25e6);
  p.tensors[5].bytes = 200 * mb;  // needed first
  prefetcher pf(p, first_six, link(prefetch_policy::lookahead, 100e9));
  // At step 8, tensors 5, 4, ... are all due; 5 does not fit in 150 MB, so nothing goes.
  EXPECT_TRUE(pf.issue_before(8, 150 * mb).empty());
  // At step 9 tensor 5 is demanded: it goes whatever the budget, and takes all of it.
  EXPECT_EQ(pf.issue_before(9, 150 * mb), std::vector<int>{5});
  // At step 10 tensor 4 is demanded (60 MB), and 3 fits in the 90 MB left, 2 does not.
  EXPECT_EQ(pf.issue_before(10, 150 * mb), (std::vector<int>{4, 3}));
}

// Note [Held until used]: a swap-in holds its block until its tensor's use, so it must fit
// beside every step in between, not only beside the step that issues it.
TEST(prefetcher_lookahead, a_swap_in_must_fit_beside_every_step_until_its_use) {
  workload_profile p = eight_layers(0.25e6);  // tensors 5, 4, 3, 2 are due at step 8
  p.step_scratch_bytes.assign(16, 0);
  p.step_scratch_bytes[9] = 50 * mb;  // backward step 9 (tensor 5's use) needs 50 MB more
  prefetcher pf(p, first_six, link(prefetch_policy::lookahead, 100e9));
  // At step 8, 130 MB are free and step 8 holds what it held as it began: tensor 5 fits.
  // Tensor 4 (needed at step 10) would fit beside step 8 too (60 + 60 <= 130), but not beside
  // step 9, which holds tensor 5 and its 50 MB of scratch: 60 + 60 + 50 > 130.
  EXPECT_EQ(pf.issue_before(8, 130 * mb), std::vector<int>{5});
  // Once step 9's scratch is not in the way any more, it goes.
  EXPECT_EQ(pf.issue_before(10, 130 * mb), (std::vector<int>{4, 3}));

  p.step_scratch_bytes[9] = 10 * mb;  // now all three fit through step 9: 60 + 60 + 10 <= 130
  prefetcher roomy(p, first_six, link(prefetch_policy::lookahead, 100e9));
  EXPECT_EQ(roomy.issue_before(8, 130 * mb), (std::vector<int>{5, 4}));
}

// A tensor kept on the device counts in every step it is alive in, not only where it is made.
TEST(prefetcher_lookahead, tensors_kept_on_the_device_count_until_their_last_use) {
  workload_profile p = eight_layers(0.25e6);
  // Tensor 6 (10 MB, kept) is read again at step 9 instead of 8, and now weighs 50 MB.
  p.tensors[6].bytes = 50 * mb;
  p.tensors[6].use_steps = {7, 9};
  prefetcher pf(p, first_six, link(prefetch_policy::lookahead, 100e9));
  // At step 8 tensor 6 is already held (it is in the free figure): step 9 holds no more than
  // step 8 besides tensor 5, so both 5 and 4 fit in 130 MB.
  EXPECT_EQ(pf.issue_before(8, 130 * mb), (std::vector<int>{5, 4}));
}

TEST(prefetcher, a_tensor_handed_back_is_issued_again_first) {
  const workload_profile p = eight_layers(1e6);
  prefetcher pf(p, first_six, link(prefetch_policy::lookahead, 100e9));
  ASSERT_EQ(pf.issue_before(8, unlimited), std::vector<int>{5});
  pf.unissue(5);  // no block for it after all
  EXPECT_FALSE(pf.issued(5));
  EXPECT_EQ(pf.issue_before(9, unlimited), (std::vector<int>{5, 4}));
  EXPECT_TRUE(pf.issued(5));
  pf.unissue(7);   // not offloaded: nothing to hand back
  pf.unissue(-1);  // nor out of range
  EXPECT_EQ(pf.issue_before(10, unlimited), std::vector<int>{3});
}

TEST(prefetcher_lookahead, not_before_the_tensor_was_swapped_out) {
  // A tensor produced in backward (step 9) and read again at step 12: offloaded in between,
  // it cannot be fetched before step 10 even though its copy is long.
  workload_profile p = eight_layers(1e6);
  tensor_info t;
  t.id = 8;
  t.bytes = 500 * mb;
  t.producer_step = 9;
  t.use_steps = {12};
  p.tensors.push_back(t);
  std::vector<bool> offload(9, false);
  offload[8] = true;
  prefetcher pf(p, offload, link(prefetch_policy::lookahead, 100e9));  // 5 ms copy
  EXPECT_TRUE(pf.issue_before(8, unlimited).empty());
  EXPECT_TRUE(pf.issue_before(9, unlimited).empty());
  EXPECT_EQ(pf.issue_before(10, unlimited), std::vector<int>{8});
}

TEST(prefetcher_one_layer, issues_exactly_one_step_ahead) {
  for (double step_ns : {0.25e6, 1e6, 10e6}) {
    const workload_profile p = eight_layers(step_ns);
    prefetcher pf(p, first_six, link(prefetch_policy::one_layer, 20e9));
    const auto at = issue_steps(pf, p);
    ASSERT_EQ(at.size(), 6u);
    for (int t = 0; t < 6; ++t) EXPECT_EQ(at.at(t), 13 - t) << "tensor " << t;
  }
}

TEST(prefetcher_one_layer, first_backward_step_also_takes_what_it_needs_itself) {
  workload_profile p = eight_layers(1e6);
  std::vector<bool> offload = first_six;
  offload[6] = true;  // tensor 6 is first needed at step 8, the first backward step
  prefetcher pf(p, offload, link(prefetch_policy::one_layer, 100e9));
  EXPECT_EQ(pf.issue_before(8, unlimited), (std::vector<int>{6, 5}));
}

TEST(prefetcher_none, issues_nothing) {
  const workload_profile p = eight_layers(1e6);
  prefetcher pf(p, first_six, link(prefetch_policy::none, 100e9));
  EXPECT_TRUE(issue_steps(pf, p).empty());
}

TEST(prefetcher, each_tensor_once_per_iteration_and_again_after_reset) {
  const workload_profile p = eight_layers(0.25e6);
  prefetcher pf(p, first_six, link(prefetch_policy::lookahead, 100e9));
  const auto first = issue_steps(pf, p);
  EXPECT_EQ(first.size(), 6u);
  EXPECT_TRUE(pf.issued(0));
  EXPECT_TRUE(issue_steps(pf, p).empty());  // same iteration: nothing again
  pf.reset();
  EXPECT_FALSE(pf.issued(0));
  EXPECT_EQ(issue_steps(pf, p), first);
}

TEST(prefetcher, takes_the_plan_from_an_offload_plan) {
  const workload_profile p = eight_layers(1e6);
  offload_plan plan;
  plan.offload = first_six;
  prefetcher pf(p, plan, link(prefetch_policy::one_layer, 100e9));
  EXPECT_EQ(pf.issue_before(8, unlimited), std::vector<int>{5});
  EXPECT_TRUE(pf.issue_before(3, unlimited).empty());    // forward step
  EXPECT_TRUE(pf.issue_before(-1, unlimited).empty());   // out of range
  EXPECT_TRUE(pf.issue_before(16, unlimited).empty());
}

TEST(prefetcher, rejects_a_bad_link_and_an_inconsistent_profile) {
  const workload_profile p = eight_layers(1e6);
  EXPECT_THROW(prefetcher(p, first_six, link(prefetch_policy::lookahead, 0)), config_error);
  workload_profile bad = p;
  bad.tensors[0].use_steps = {99};
  EXPECT_THROW(prefetcher(bad, first_six, link(prefetch_policy::lookahead, 100e9)), config_error);
}

}  // namespace
}  // namespace gpuswap
