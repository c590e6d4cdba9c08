#include "prefetcher/layer_schedule.hpp"

#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "device/device_factory.hpp"
#include "device/sim_device.hpp"

namespace gpuswap {
namespace {

struct marked {
  phase ph;
  int layer;
  kernel_cost cost;
};

void run_iteration(sim_device& dev, stream_t s, layer_schedule& schedule,
                   const std::vector<marked>& steps) {
  for (const marked& m : steps) {
    // Work between steps (the optimizer, a data copy) is not any step's time.
    dev.launch(s, kernel_cost{0, 0, 7'000}, [] {}, {});
    schedule.begin_step(m.ph, m.layer);
    dev.launch(s, m.cost, [] {}, {});
    dev.launch(s, kernel_cost{0, 0, 1'000}, [] {}, {});
    schedule.end_step(m.ph, m.layer);
  }
  schedule.end_iteration();
}

class layer_schedule_sim : public ::testing::Test {
 protected:
  sim_device dev_;
  stream_t compute_ = dev_.create_stream(stream_priority::normal);
  layer_schedule schedule_{dev_, compute_};

  double ns(const kernel_cost& cost) { return dev_.kernel_ns(cost) + 1'000; }
};

TEST_F(layer_schedule_sim, learns_the_order_and_measures_each_step_in_modelled_time) {
  const std::vector<marked> steps = {{phase::forward, 0, {2e9, 0, 0}},
                                     {phase::forward, 1, {6e9, 0, 0}},
                                     {phase::backward, 1, {12e9, 0, 0}},
                                     {phase::backward, 0, {4e9, 0, 500}}};
  EXPECT_TRUE(schedule_.steps().empty());
  EXPECT_EQ(schedule_.iterations_completed(), 0);
  run_iteration(dev_, compute_, schedule_, steps);
  ASSERT_EQ(schedule_.steps().size(), 4u);
  EXPECT_EQ(schedule_.iterations_completed(), 1);
  for (std::size_t i = 0; i < steps.size(); ++i) {
    const step_info& got = schedule_.steps()[i];
    EXPECT_EQ(got.ph, steps[i].ph) << i;
    EXPECT_EQ(got.layer, steps[i].layer) << i;
    EXPECT_NEAR(got.compute_ns, ns(steps[i].cost), 1e-3) << i;
  }
}

TEST_F(layer_schedule_sim, later_iterations_update_the_times) {
  run_iteration(dev_, compute_, schedule_,
                {{phase::forward, 0, {2e9, 0, 0}}, {phase::backward, 0, {4e9, 0, 0}}});
  run_iteration(dev_, compute_, schedule_,
                {{phase::forward, 0, {3e9, 0, 0}}, {phase::backward, 0, {5e9, 0, 0}}});
  EXPECT_EQ(schedule_.iterations_completed(), 2);
  ASSERT_EQ(schedule_.steps().size(), 2u);
  EXPECT_NEAR(schedule_.steps()[0].compute_ns, ns({3e9, 0, 0}), 1e-3);
  EXPECT_NEAR(schedule_.steps()[1].compute_ns, ns({5e9, 0, 0}), 1e-3);
}

TEST_F(layer_schedule_sim, a_different_order_is_relearned) {
  run_iteration(dev_, compute_, schedule_,
                {{phase::forward, 0, {2e9, 0, 0}}, {phase::backward, 0, {4e9, 0, 0}}});
  run_iteration(dev_, compute_, schedule_,
                {{phase::forward, 0, {2e9, 0, 0}},
                 {phase::forward, 1, {2e9, 0, 0}},
                 {phase::backward, 1, {4e9, 0, 0}},
                 {phase::backward, 0, {4e9, 0, 0}}});
  ASSERT_EQ(schedule_.steps().size(), 4u);
  EXPECT_EQ(schedule_.steps()[1].layer, 1);
  EXPECT_EQ(schedule_.steps()[2].ph, phase::backward);
}

TEST_F(layer_schedule_sim, current_step_follows_the_markers) {
  EXPECT_EQ(schedule_.current_step(), -1);
  schedule_.begin_step(phase::forward, 0);
  EXPECT_EQ(schedule_.current_step(), 0);
  schedule_.end_step(phase::forward, 0);
  EXPECT_EQ(schedule_.current_step(), 0);  // the last one begun
  schedule_.begin_step(phase::backward, 0);
  EXPECT_EQ(schedule_.current_step(), 1);
  schedule_.end_step(phase::backward, 0);
  schedule_.end_iteration();
  EXPECT_EQ(schedule_.current_step(), -1);
}

TEST_F(layer_schedule_sim, begin_while_open_ends_the_open_step_and_stray_ends_are_ignored) {
  schedule_.begin_step(phase::forward, 0);
  dev_.launch(compute_, kernel_cost{2e9, 0, 0}, [] {}, {});
  schedule_.begin_step(phase::forward, 1);  // forward 0 ends here
  dev_.launch(compute_, kernel_cost{6e9, 0, 0}, [] {}, {});
  schedule_.end_step(phase::backward, 3);  // not the open step: ignored
  dev_.launch(compute_, kernel_cost{4e9, 0, 0}, [] {}, {});
  schedule_.end_step(phase::forward, 1);
  schedule_.end_step(phase::forward, 1);  // nothing open: ignored
  schedule_.end_iteration();
  ASSERT_EQ(schedule_.steps().size(), 2u);
  EXPECT_NEAR(schedule_.steps()[0].compute_ns, dev_.kernel_ns({2e9, 0, 0}), 1e-3);
  EXPECT_NEAR(schedule_.steps()[1].compute_ns,
              dev_.kernel_ns({6e9, 0, 0}) + dev_.kernel_ns({4e9, 0, 0}), 1e-3);
}

TEST_F(layer_schedule_sim, an_open_step_ends_with_the_iteration_and_empty_iterations_do_not_count) {
  schedule_.end_iteration();
  EXPECT_EQ(schedule_.iterations_completed(), 0);
  schedule_.begin_step(phase::forward, 0);
  dev_.launch(compute_, kernel_cost{2e9, 0, 0}, [] {}, {});
  schedule_.end_iteration();
  EXPECT_EQ(schedule_.iterations_completed(), 1);
  ASSERT_EQ(schedule_.steps().size(), 1u);
  EXPECT_NEAR(schedule_.steps()[0].compute_ns, dev_.kernel_ns({2e9, 0, 0}), 1e-3);
}

TEST_F(layer_schedule_sim, apply_to_copies_times_into_a_profile_of_the_same_order) {
  run_iteration(dev_, compute_, schedule_,
                {{phase::forward, 0, {2e9, 0, 0}}, {phase::backward, 0, {4e9, 0, 0}}});
  workload_profile p;
  p.steps = {{phase::forward, 0, 1}, {phase::backward, 0, 1}};
  EXPECT_TRUE(schedule_.apply_to(p));
  EXPECT_NEAR(p.steps[1].compute_ns, ns({4e9, 0, 0}), 1e-3);

  workload_profile other;
  other.steps = {{phase::forward, 0, 1}, {phase::backward, 1, 1}};
  EXPECT_FALSE(schedule_.apply_to(other));
  EXPECT_EQ(other.steps[1].compute_ns, 1);
}

TEST_F(layer_schedule_sim, many_iterations_reuse_the_event_pool) {
  // A leak of events would grow without bound; the pool holds two per step.
  for (int i = 0; i < 50; ++i) {
    run_iteration(dev_, compute_, schedule_,
                  {{phase::forward, 0, {2e9, 0, 0}}, {phase::backward, 0, {4e9, 0, 0}}});
  }
  EXPECT_EQ(schedule_.iterations_completed(), 50);
  EXPECT_EQ(schedule_.pooled_events(), 4u);
}

TEST(layer_schedule_cuda, measures_event_time_on_a_real_gpu) {
  std::string why;
  if (!cuda_available(&why)) GTEST_SKIP() << "no CUDA device here (" << why << ")";
  device_request request;
  request.backend = backend_choice::cuda;
  std::unique_ptr<device> dev = make_device(request);
  const stream_t s = dev->create_stream(stream_priority::normal);
  {
    layer_schedule schedule(*dev, s);
    schedule.begin_step(phase::forward, 0);
    // A host function on the stream holds it for at least 2 ms.
    dev->launch(s, kernel_cost{}, [] { std::this_thread::sleep_for(std::chrono::milliseconds(2)); },
                {});
    schedule.end_step(phase::forward, 0);
    schedule.end_iteration();
    ASSERT_EQ(schedule.steps().size(), 1u);
    EXPECT_GE(schedule.steps()[0].compute_ns, 1.9e6);
  }
  dev->destroy_stream(s);
}

}  // namespace
}  // namespace gpuswap
