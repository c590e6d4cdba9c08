// Prefetching in backward where the budget is about one step's working set: a swap-in must
// fit beside every step until its use (Note [Held until used] in prefetcher/prefetcher.cpp),
// counted as the profile counts (Note [Prefetching as the profile counts] in
// tools/workload_runner.cpp), and one the cache cannot place yet is tried again at the next
// step rather than left to a demand fetch. On the simulator's modelled clock, so the figures
// are exact and repeat run to run.
#include <gtest/gtest.h>

#include <cstddef>

#include "device/sim_device.hpp"
#include "prefetcher/offload_planner.hpp"
#include "support/small_sim.hpp"
#include "tools/model_spec.hpp"
#include "tools/workload_runner.hpp"

namespace gpuswap {
namespace {

using testing_support::phantom_gpu;

struct budgeted_runs {
  run_report unlimited;
  run_report offloaded;
};

// The model at batch 256 with modelled math, unlimited and then `auto` under half the
// unlimited run's peak (simulate's "--budget 50%").
budgeted_runs auto_under_half(const char* model_name, const char* gpu) {
  const model_spec model = model_spec::load_named(model_name);
  const sim_options so = phantom_gpu(gpu);
  runner_options o;
  o.batch = 256;
  o.steps = 3;
  o.real_math = false;
  budgeted_runs r;
  {
    sim_device dev(so);
    r.unlimited = run_workload(dev, model, o);
  }
  o.device_limit = r.unlimited.peak_reserved_bytes / 2;
  o.policy = offload_policy::auto_;
  sim_device dev(so);
  r.offloaded = run_workload(dev, model, o);
  return r;
}

// VGG-16 on an H100: the budget (10.75 GiB) is barely above its largest step's working set
// (10.22 GiB). `auto` was at 2.71x, offloading relu1_2's 3 GiB output, whose swap-in could only
// begin at backward conv2_1 and stalled pool1 for 57 ms. Its plan now (input, relu1_1, pool1,
// relu2_1, pool2) ran at 4.06x on the old prefetcher: swap-ins issued where they fitted the
// issuing step crowded a later one before their use, and the allocator evicted (6 evictions,
// 6 demand fetches). Weighed against every step until their use, 2.49x; with the runner's
// error signals counted once, 2.42x.
TEST(prefetch_under_a_tight_budget, vgg16_on_an_h100_swap_ins_wait_for_room_until_their_use) {
  const budgeted_runs r = auto_under_half("vgg16", "h100-pcie5");
  const run_report& a = r.offloaded;
  EXPECT_LE(a.peak_reserved_bytes, a.budget_bytes);
  EXPECT_GT(a.swaps.bytes_out, 0U);
  // Modelled clock: exact, not a timing.
  EXPECT_LT(a.steady_step_ns(), 2.45 * r.unlimited.steady_step_ns());
}

// ResNet-50 on an H100: swap-ins the prefetcher returned found the bytes in the budget but no
// block in the cache; left on the host, they came back on demand as their step began (11
// demand fetches in 3 iterations). Handed back to the prefetcher, they go a step or two later.
TEST(prefetch_under_a_tight_budget, resnet50_on_an_h100_retries_a_swap_in_that_found_no_block) {
  const budgeted_runs r = auto_under_half("resnet50", "h100-pcie5");
  const run_report& a = r.offloaded;
  EXPECT_LE(a.peak_reserved_bytes, a.budget_bytes);
  EXPECT_GT(a.swaps.prefetches, 0U);
  EXPECT_EQ(a.swaps.demand_fetches, 0U);
  EXPECT_EQ(a.swaps.evictions, 0U);
}

}  // namespace
}  // namespace gpuswap
