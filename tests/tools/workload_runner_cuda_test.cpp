// End to end on a real GPU: the demo's network trained by gpu_math's kernels on a cuda_device
// under a device budget below half of what it needs gives bit for bit the losses, gradients and
// parameters of the unlimited run on the same GPU, within the budget, through every offload
// policy; and it learns what the simulator's reference math learns, within rounding. Skipped,
// visibly, without a GPU or without the kernels in this build.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/errors.hpp"
#include "device/sim_device.hpp"
#include "support/cuda_test_backend.hpp"
#include "tools/gpu_math.hpp"
#include "tools/model_spec.hpp"
#include "tools/training_math.hpp"
#include "tools/workload_runner.hpp"

namespace gpuswap {
namespace {

constexpr int steps = 3;  // iteration 0 on estimated step times, then measured ones
constexpr double budget_fraction = 0.45;  // the demo's

testing::AssertionResult same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return testing::AssertionFailure() << "sizes " << a.size() << " vs " << b.size();
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) {
      return testing::AssertionFailure() << "element " << i << ": " << a[i] << " vs " << b[i];
    }
  }
  return testing::AssertionSuccess();
}

testing::AssertionResult same_bits(const std::vector<std::vector<float>>& a,
                                   const std::vector<std::vector<float>>& b) {
  if (a.size() != b.size()) return testing::AssertionFailure() << "tensor counts " << a.size() << " vs " << b.size();
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (auto r = same_bits(a[i], b[i]); !r) return r << " (tensor " << i << ")";
  }
  return testing::AssertionSuccess();
}

class WorkloadRunnerCuda : public testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!gpu_math_available(&why)) GTEST_SKIP() << "no GPU math: " << why;
    if (testing_support::cuda_test_backend::make(&why) == nullptr) GTEST_SKIP() << "no CUDA device: " << why;
  }

  // Each run on a device of its own, as the demo's two runs are in two processes' worth of state.
  static run_report run_on_gpu(const model_spec& m, const runner_options& o) {
    std::string why;
    std::unique_ptr<device> dev = testing_support::cuda_test_backend::make(&why);
    if (dev == nullptr) throw_error("the CUDA device went away: " + why);
    return run_workload(*dev, m, o);
  }

  static runner_options base_options(const model_spec& m) {
    runner_options o;
    o.batch = m.default_batch;
    o.steps = steps;
    o.keep_tensors = true;
    return o;
  }
};

TEST_F(WorkloadRunnerCuda, DemoCnnBelowHalfItsPeakIsBitIdenticalToTheUnlimitedRun) {
  const model_spec m = model_spec::load_named("demo_cnn");
  const run_report unlimited = run_on_gpu(m, base_options(m));
  ASSERT_EQ(unlimited.math, training_math_kind::cuda_kernels);
  ASSERT_TRUE(unlimited.real_math);
  ASSERT_EQ(unlimited.losses.size(), static_cast<std::size_t>(steps));
  for (float loss : unlimited.losses) ASSERT_TRUE(std::isfinite(loss) && loss > 0) << loss;
  ASSERT_FALSE(unlimited.last_gradients.empty());
  ASSERT_EQ(unlimited.final_params.size(), unlimited.last_gradients.size());
  EXPECT_EQ(unlimited.swaps.bytes_out, 0U);

  const std::size_t peak = unlimited.peak_allocated_bytes;
  const auto budget = static_cast<std::size_t>(static_cast<double>(peak) * budget_fraction);
  ASSERT_LT(budget, peak / 2) << "the budget must be below half of what the network needs";

  for (offload_policy policy : {offload_policy::all, offload_policy::conv, offload_policy::auto_}) {
    SCOPED_TRACE(std::string("policy ") + std::string(to_string(policy)));
    runner_options o = base_options(m);
    o.device_limit = budget;
    o.policy = policy;
    o.prefetch = prefetch_policy::lookahead;
    run_report r;
    try {
      r = run_on_gpu(m, o);
    } catch (const out_of_memory& e) {
      ADD_FAILURE() << "out of memory under a budget of " << budget << " bytes: " << e.what();
      continue;
    }
    EXPECT_EQ(r.math, training_math_kind::cuda_kernels);
    EXPECT_EQ(r.budget_bytes, budget);
    EXPECT_LE(r.peak_reserved_bytes, r.budget_bytes);
    EXPECT_GT(r.swaps.bytes_out, 0U) << "the budget does not bind";
    EXPECT_GT(r.swaps.bytes_in, 0U);
    EXPECT_EQ(r.swaps.failed_swap_outs, 0U);
    EXPECT_EQ(r.swaps.failed_swap_ins, 0U);
    EXPECT_TRUE(same_bits(r.losses, unlimited.losses)) << "losses";
    EXPECT_TRUE(same_bits(r.last_gradients, unlimited.last_gradients)) << "last gradients";
    EXPECT_TRUE(same_bits(r.final_params, unlimited.final_params)) << "final parameters";
  }
}

// The GPU trains the same network the simulator does: its losses agree with reference_math's
// within rounding (the kernels sum in reference_math's order; exp and log may differ in the
// last bits). Catches what bit-identity between two GPU runs cannot, such as labels that never
// reached the device.
TEST_F(WorkloadRunnerCuda, DemoCnnLossesAgreeWithTheSimulator) {
  const model_spec m = model_spec::load_named("demo_cnn");
  runner_options o = base_options(m);
  const run_report gpu = run_on_gpu(m, o);
  sim_options so = sim_preset("titan-x-pcie3");
  so.backing = sim_backing::real;
  sim_device sim(so);
  const run_report cpu = run_workload(sim, m, o);
  ASSERT_EQ(cpu.math, training_math_kind::host_reference);
  ASSERT_EQ(gpu.losses.size(), cpu.losses.size());
  for (std::size_t i = 0; i < gpu.losses.size(); ++i) {
    EXPECT_NEAR(gpu.losses[i], cpu.losses[i], 1e-3 * std::fabs(cpu.losses[i])) << "step " << i;
  }
}

}  // namespace
}  // namespace gpuswap
