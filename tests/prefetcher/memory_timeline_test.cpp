#include "prefetcher/memory_timeline.hpp"

#include <gtest/gtest.h>

#include <vector>

#include "test_profiles.hpp"

namespace gpuswap {
namespace {

using testing::chain;
using testing::mb;

// Four layers (steps 0..3 forward, 4..7 backward), 1 ms each, outputs of 100, 200, 300 and 50
// MB (the last feeds the loss), 1000 MB resident. Copies: 200 GB/s, no latency, so 100 MB
// take 0.5 ms.
workload_profile four_layers() {
  return chain({100 * mb, 200 * mb, 300 * mb, 50 * mb}, 1e6, 1000 * mb);
}

planner_options fast_link() {
  planner_options o;
  o.d2h_bandwidth = 200e9;
  o.h2d_bandwidth = 200e9;
  o.d2h_latency_ns = 0;
  o.h2d_latency_ns = 0;
  return o;
}

std::vector<std::size_t> in_mb(const std::vector<std::size_t>& bytes) {
  std::vector<std::size_t> out;
  for (std::size_t b : bytes) out.push_back(b / mb);
  return out;
}

TEST(memory_timeline, without_offload_each_tensor_lives_from_producer_to_last_use) {
  const workload_profile p = four_layers();
  memory_timeline tl(p, fast_link());
  const timeline_result& r = tl.simulate(std::vector<bool>(4, false));
  // s0 +t0, s1 +t1, s2 +t2, s3 +t3 (peak), s4 reads t2,t3 then frees them, s5 frees t1,
  // s6 frees t0.
  EXPECT_EQ(in_mb(r.step_bytes),
            (std::vector<std::size_t>{1100, 1300, 1600, 1650, 1650, 1300, 1100, 1000}));
  EXPECT_EQ(r.peak_bytes, 1650 * mb);
  EXPECT_EQ(r.peak_step, 3);  // the first step at the peak
  EXPECT_DOUBLE_EQ(r.total_ns, 8e6);
  EXPECT_DOUBLE_EQ(r.exposed_ns, 0);
  EXPECT_EQ(predicted_peak(p, std::vector<bool>(4, false), fast_link()), 1650 * mb);
}

TEST(memory_timeline, offloaded_tensor_leaves_when_its_copy_ends_and_returns_when_prefetched) {
  const workload_profile p = four_layers();
  memory_timeline tl(p, fast_link());
  const timeline_result& r = tl.simulate({true, false, false, false});
  // t0's D2H starts after its last forward use (end of s1, 2 ms) and ends at 2.5 ms: still on
  // the device while s2 starts, gone for s3. Lookahead brings it back at the start of s5
  // (latest start 6 - 0.5 = 5.5 ms is before s5 ends) for its first backward use at s6.
  EXPECT_EQ(in_mb(r.step_bytes),
            (std::vector<std::size_t>{1100, 1300, 1600, 1550, 1550, 1300, 1100, 1000}));
  EXPECT_EQ(r.peak_bytes, 1600 * mb);
  EXPECT_EQ(r.peak_step, 2);
  EXPECT_DOUBLE_EQ(r.d2h_end_ns[0], 2.5e6);
  EXPECT_EQ(r.prefetch_step[0], 5);
  EXPECT_DOUBLE_EQ(r.h2d_end_ns[0], 5.5e6);
  EXPECT_DOUBLE_EQ(r.exposed_ns, 0);
  EXPECT_EQ(r.prefetch_step[1], -1);
}

TEST(memory_timeline, scratch_counts_in_its_step_only) {
  workload_profile p = four_layers();
  p.step_scratch_bytes = {0, 0, 0, 0, 10 * mb, 0, 0, 500 * mb};
  memory_timeline tl(p, fast_link());
  const timeline_result& r = tl.simulate(std::vector<bool>(4, false));
  EXPECT_EQ(in_mb(r.step_bytes),
            (std::vector<std::size_t>{1100, 1300, 1600, 1650, 1660, 1300, 1100, 1500}));
  EXPECT_EQ(r.peak_step, 4);
}

TEST(memory_timeline, step_over_budget_waits_for_swap_outs_in_flight) {
  const workload_profile p = four_layers();
  planner_options o = fast_link();
  o.budget_bytes = 1600 * mb;
  memory_timeline tl(p, o);
  // t1 (200 MB, 1 ms) leaves after s2: its D2H runs 3..4 ms, so s3 (1650 MB with it) waits.
  const timeline_result& r = tl.simulate({false, true, false, false});
  EXPECT_DOUBLE_EQ(r.step_stall_ns[3], 1e6);
  EXPECT_DOUBLE_EQ(r.step_start_ns[3], 4e6);
  EXPECT_EQ(r.step_bytes[3], 1450 * mb);
  EXPECT_EQ(r.step_demand_bytes[3], 1650 * mb);
  EXPECT_EQ(r.peak_bytes, 1600 * mb);
  // The budget also holds t1's prefetch back at s4 (only 150 MB free): s5 waits for it.
  EXPECT_EQ(r.prefetch_step[1], 5);
  EXPECT_DOUBLE_EQ(r.step_stall_ns[5], 1e6);
  EXPECT_DOUBLE_EQ(r.exposed_ns, 2e6);

  // Without a budget nothing waits: the copy's bytes count in s3 instead.
  memory_timeline unlimited(p, fast_link());
  const timeline_result& u = unlimited.simulate({false, true, false, false});
  EXPECT_DOUBLE_EQ(u.step_stall_ns[3], 0);
  EXPECT_EQ(u.step_bytes[3], 1650 * mb);
}

TEST(memory_timeline, prefetch_none_fetches_on_demand_and_the_step_waits) {
  const workload_profile p = four_layers();
  planner_options o = fast_link();
  o.prefetch = prefetch_policy::none;
  memory_timeline tl(p, o);
  const timeline_result& r = tl.simulate({true, false, false, false});
  EXPECT_EQ(r.prefetch_step[0], 6);
  EXPECT_DOUBLE_EQ(r.step_stall_ns[6], 0.5e6);
  EXPECT_DOUBLE_EQ(r.exposed_ns, 0.5e6);
  EXPECT_EQ(r.step_bytes[5], 1200 * mb);  // t0 not back yet
}

TEST(memory_timeline, swap_in_waits_for_its_swap_out_and_both_copies_count) {
  const workload_profile p = four_layers();
  planner_options o = fast_link();
  o.d2h_bandwidth = 20e9;  // t0's D2H: 5 ms, from 2 to 7 ms
  memory_timeline tl(p, o);
  const timeline_result& r = tl.simulate({true, false, false, false});
  EXPECT_DOUBLE_EQ(r.d2h_end_ns[0], 7e6);
  EXPECT_EQ(r.prefetch_step[0], 5);
  EXPECT_DOUBLE_EQ(r.h2d_end_ns[0], 7.5e6);  // after the D2H, not at 5.5 ms
  EXPECT_DOUBLE_EQ(r.step_stall_ns[6], 1.5e6);
  // In s5 the old block (its D2H still reading it) and the new one are both on the device.
  EXPECT_EQ(r.step_bytes[5], 1400 * mb);
}

TEST(memory_timeline, prefetch_held_back_by_the_budget_comes_on_demand) {
  const workload_profile p = four_layers();
  planner_options o = fast_link();
  o.budget_bytes = 1250 * mb;  // at s5 only 50 MB are free: t0 (100 MB) must wait for s6
  memory_timeline tl(p, o);
  const timeline_result& r = tl.simulate({true, false, false, false});
  EXPECT_EQ(r.prefetch_step[0], 6);
  EXPECT_DOUBLE_EQ(r.step_stall_ns[6], 0.5e6);

  memory_timeline roomy(p, fast_link());
  EXPECT_EQ(roomy.simulate({true, false, false, false}).prefetch_step[0], 5);
}

// Note [Held until used] in prefetcher.cpp: the model runs the prefetcher, so a swap-in that
// would crowd a later step before its use is not issued early, and the peak stays what the
// steps themselves need.
TEST(memory_timeline, a_prefetch_does_not_crowd_a_later_step_before_its_use) {
  // Eight layers of 60 MB (the last two 10 MB, kept), 0.6 ms copies; forward steps of 1 ms (each
  // swap-out ends within the next step), backward steps of 0.25 ms: at backward step 8 the
  // lookahead wants four tensors on their way. Step 9 has 50 MB of scratch.
  workload_profile p = chain({60 * mb, 60 * mb, 60 * mb, 60 * mb, 60 * mb, 60 * mb, 10 * mb, 10 * mb}, 0.25e6);
  for (int s = 0; s < 8; ++s) p.steps[static_cast<std::size_t>(s)].compute_ns = 1e6;
  p.step_scratch_bytes.assign(16, 0);
  p.step_scratch_bytes[9] = 50 * mb;
  planner_options o;
  o.budget_bytes = 150 * mb;  // 130 MB free as backward begins (tensors 6 and 7 held)
  o.h2d_bandwidth = 100e9;
  o.d2h_bandwidth = 100e9;
  o.h2d_latency_ns = 0;
  o.d2h_latency_ns = 0;
  memory_timeline tl(p, o);
  const timeline_result& r =
      tl.simulate({true, true, true, true, true, true, false, false});
  EXPECT_EQ(r.prefetch_step[5], 8);
  EXPECT_EQ(r.prefetch_step[4], 10);  // not beside step 9 with tensor 5 and its scratch
  EXPECT_LE(r.peak_bytes, o.budget_bytes);
  EXPECT_EQ(r.step_bytes[9], 110 * mb);  // tensor 5 and the scratch, nothing issued early
}

TEST(memory_timeline, tensor_without_backward_use_is_never_offloaded) {
  workload_profile p = four_layers();
  p.tensors[0].use_steps = {1};
  memory_timeline tl(p, fast_link());
  const timeline_result& r = tl.simulate({true, false, false, false});
  EXPECT_EQ(r.d2h_end_ns[0], -1);
  EXPECT_EQ(r.step_bytes[2], 1500 * mb);  // freed after its last use at s1
}

TEST(memory_timeline, results_repeat_exactly) {
  const workload_profile p = chain({5 * mb, 70 * mb, 3 * mb, 40 * mb, 9 * mb, 1 * mb}, 0.3e6, mb);
  planner_options o = fast_link();
  o.budget_bytes = 60 * mb;
  memory_timeline a(p, o);
  memory_timeline b(p, o);
  const std::vector<bool> plan = {true, true, false, true, false, false};
  const timeline_result ra = a.simulate(plan);
  a.simulate(std::vector<bool>(6, false));
  const timeline_result& rb = b.simulate(plan);
  EXPECT_EQ(ra.step_bytes, rb.step_bytes);
  EXPECT_EQ(ra.step_start_ns, rb.step_start_ns);
  EXPECT_EQ(a.simulate(plan).step_bytes, ra.step_bytes);
}

// Note [Inside a step]. Budget 200 MB, copies 0.5 ms per 100 MB both ways.
TEST(memory_timeline, pieces_made_sent_needed_and_freed_inside_their_steps) {
  planner_options o = fast_link();
  o.budget_bytes = 200 * mb;
  const std::vector<bool> pieces = {true, true, false};

  // Made and sent part by part: tensor 0 leaves over 0.5..1 ms while the second part runs, so
  // step 1 finds the room for tensor 2 at once. In backward, lookahead brings tensor 1 back
  // for the first part of step 3 and tensor 0 under it, for the second part.
  const workload_profile p = testing::two_part_layer();
  memory_timeline tl(p, o);
  const timeline_result& r = tl.simulate(pieces);
  EXPECT_DOUBLE_EQ(r.d2h_end_ns[0], 1e6);
  EXPECT_DOUBLE_EQ(r.d2h_end_ns[1], 1.5e6);
  EXPECT_EQ(in_mb(r.step_bytes), (std::vector<std::size_t>{200, 200, 200, 200}));
  EXPECT_DOUBLE_EQ(r.step_stall_ns[1], 0);
  EXPECT_EQ(r.prefetch_step[1], 2);
  EXPECT_DOUBLE_EQ(r.h2d_end_ns[1], 2.5e6);
  EXPECT_EQ(r.prefetch_step[0], 3);
  EXPECT_DOUBLE_EQ(r.h2d_end_ns[0], 3.5e6);
  EXPECT_DOUBLE_EQ(r.step_start_ns[3], 3e6);
  EXPECT_DOUBLE_EQ(r.total_ns, 4e6);
  EXPECT_DOUBLE_EQ(r.exposed_ns, 0);

  // The same tensors at whole steps: both pieces leave after step 0, step 1 waits for the
  // first D2H (0.5 ms), and step 3 for the second piece's H2D, which the budget held back
  // until then (0.5 ms more).
  const workload_profile whole = testing::two_part_layer(true);
  memory_timeline tw(whole, o);
  const timeline_result& w = tw.simulate(pieces);
  EXPECT_DOUBLE_EQ(w.step_stall_ns[1], 0.5e6);
  EXPECT_DOUBLE_EQ(w.step_stall_ns[3], 0.5e6);
  EXPECT_DOUBLE_EQ(w.exposed_ns, 1e6);
}

TEST(memory_timeline, a_wait_inside_a_step_counts_as_its_stall) {
  // H2D at 100 GB/s (1 ms per piece): tensor 1 comes back under step 2, tensor 0, demanded at
  // the start of step 3 (no room before), arrives 0.5 ms after its part was ready.
  planner_options o = fast_link();
  o.budget_bytes = 200 * mb;
  o.h2d_bandwidth = 100e9;
  const workload_profile p = testing::two_part_layer();
  memory_timeline tl(p, o);
  const timeline_result& r = tl.simulate({true, true, false});
  EXPECT_DOUBLE_EQ(r.h2d_end_ns[1], 3e6);
  EXPECT_DOUBLE_EQ(r.h2d_end_ns[0], 4e6);
  EXPECT_DOUBLE_EQ(r.step_stall_ns[3], 0.5e6);
  EXPECT_DOUBLE_EQ(r.step_start_ns[3], 3.5e6);  // start + compute = end, as for a whole step
  EXPECT_DOUBLE_EQ(r.step_end_ns[3], 4.5e6);
  EXPECT_DOUBLE_EQ(r.exposed_ns, 0.5e6);
}

TEST(memory_timeline, a_step_holds_at_its_peak_what_its_parts_hold_at_most) {
  // No offload, no budget: step 0 ends with both pieces, step 3 starts with both; step 1 also
  // holds its own piece.
  const workload_profile p = testing::two_part_layer();
  memory_timeline tl(p, fast_link());
  const timeline_result& r = tl.simulate({});
  EXPECT_EQ(in_mb(r.step_bytes), (std::vector<std::size_t>{200, 300, 300, 200}));
  EXPECT_EQ(r.peak_step, 1);
}

TEST(memory_timeline, an_empty_profile_has_no_peak_step) {
  const workload_profile p;
  memory_timeline tl(p, fast_link());
  const timeline_result& r = tl.simulate({});
  EXPECT_EQ(r.peak_step, -1);
  EXPECT_EQ(r.peak_bytes, 0u);
  EXPECT_DOUBLE_EQ(r.total_ns, 0);
}

}  // namespace
}  // namespace gpuswap
