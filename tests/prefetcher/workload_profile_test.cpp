#include "prefetcher/workload_profile.hpp"

#include <gtest/gtest.h>

#include "test_profiles.hpp"

namespace gpuswap {
namespace {

using testing::chain;

TEST(workload_profile, uses_split_into_forward_and_backward) {
  // Steps 0..3 forward, 4..7 backward.
  const workload_profile p = chain({10, 20, 30, 40});
  EXPECT_EQ(p.last_forward_use(0), 1);
  EXPECT_EQ(p.first_backward_use(0), 6);
  EXPECT_EQ(p.last_use(0), 6);
  EXPECT_EQ(p.first_backward_use(2), 4);
  // The loss input has no forward use: its producer step stands in.
  EXPECT_EQ(p.last_forward_use(3), 3);
  EXPECT_EQ(p.first_backward_use(3), 4);
}

TEST(workload_profile, next_use_after_is_the_first_use_at_or_after_the_step) {
  const workload_profile p = chain({10, 20, 30, 40});
  EXPECT_EQ(p.next_use_after(0, 0), 1);
  EXPECT_EQ(p.next_use_after(0, 1), 1);
  EXPECT_EQ(p.next_use_after(0, 2), 6);
  EXPECT_EQ(p.next_use_after(0, 6), 6);
  EXPECT_EQ(p.next_use_after(0, 7), -1);
}

TEST(workload_profile, tensor_without_uses_lives_only_in_its_producer_step) {
  workload_profile p = chain({10, 20});
  p.tensors[1].use_steps.clear();
  EXPECT_EQ(p.last_use(1), 1);
  EXPECT_EQ(p.last_forward_use(1), 1);
  EXPECT_EQ(p.first_backward_use(1), -1);
  EXPECT_EQ(p.next_use_after(1, 0), -1);
}

TEST(workload_profile, forward_use_after_a_backward_one_still_counts_as_forward) {
  // A second forward pass after backward (e.g. a recompute) reads the tensor again.
  workload_profile p = chain({10, 20, 30});
  p.steps.push_back(step_info{phase::forward, 9, 1e6});
  p.tensors[0].use_steps.push_back(6);
  EXPECT_EQ(p.last_forward_use(0), 6);
  EXPECT_EQ(p.first_backward_use(0), 4);
  EXPECT_EQ(p.last_use(0), 6);
}

TEST(workload_profile, total_compute_sums_the_steps) {
  const workload_profile p = chain({1, 2, 3}, 2'500);
  EXPECT_DOUBLE_EQ(p.total_compute_ns(), 6 * 2'500.0);
}

TEST(workload_profile, check_accepts_a_consistent_profile) {
  EXPECT_EQ(chain({1, 2, 3}).check(), "");
}

TEST(workload_profile, check_names_each_inconsistency) {
  {
    workload_profile p = chain({1, 2, 3});
    p.tensors[1].id = 7;
    EXPECT_NE(p.check().find("id 7"), std::string::npos) << p.check();
  }
  {
    workload_profile p = chain({1, 2, 3});
    p.tensors[0].use_steps = {4, 1};
    EXPECT_NE(p.check().find("ascending"), std::string::npos) << p.check();
  }
  {
    workload_profile p = chain({1, 2, 3});
    p.tensors[2].use_steps = {1};  // before its producer step 2
    EXPECT_NE(p.check().find("producer"), std::string::npos) << p.check();
  }
  {
    workload_profile p = chain({1, 2, 3});
    p.tensors[0].use_steps = {1, 6};
    EXPECT_NE(p.check().find("step 6"), std::string::npos) << p.check();
  }
  {
    workload_profile p = chain({1, 2, 3});
    p.tensors[0].producer_step = -1;
    EXPECT_NE(p.check().find("producer_step -1"), std::string::npos) << p.check();
  }
  {
    workload_profile p = chain({1, 2, 3});
    p.step_scratch_bytes = {1, 2};
    EXPECT_NE(p.check().find("step_scratch_bytes"), std::string::npos) << p.check();
  }
  {
    workload_profile p = chain({1, 2, 3});
    p.steps[2].compute_ns = -1;
    EXPECT_NE(p.check().find("compute_ns"), std::string::npos) << p.check();
  }
  {
    workload_profile p = chain({1, 2, 3});
    p.tensors[1].needed_at = 1.5;
    EXPECT_NE(p.check().find("inside a step"), std::string::npos) << p.check();
  }
}

}  // namespace
}  // namespace gpuswap
