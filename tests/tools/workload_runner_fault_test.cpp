// End to end under device faults: a budgeted training run in which one device call fails (the
// n-th copy, allocation, event record or wait, for every n a run reaches) either completes with
// exactly the numbers of the fault-free run, or throws one of gpuswap's defined errors. Never a
// crash, a hang, a leak (ASan), a budget overrun, or different numbers returned as if fine.
#include <gtest/gtest.h>

#include <cstring>
#include <exception>
#include <iostream>
#include <new>
#include <string>
#include <vector>

#include "allocator/caching_allocator.hpp"
#include "core/errors.hpp"
#include "core/logging.hpp"
#include "device/sim_device.hpp"
#include "tools/model_spec.hpp"
#include "tools/workload_runner.hpp"
#include "support/small_sim.hpp"

namespace gpuswap {
namespace {

constexpr std::size_t mib = std::size_t{1} << 20;
constexpr int batch = 128;  // 1 MiB activations
constexpr int steps = 2;

using testing_support::small_real_device;

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

bool same_bits(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!same_bits(a[i], b[i])) return false;
  }
  return true;
}

// The failed calls log errors by design; a few hundred of them would bury a real failure.
class quiet_log {
 public:
  quiet_log() : saved_(get_log_level()) { set_log_level(log_level::off); }
  ~quiet_log() { set_log_level(saved_); }
  quiet_log(const quiet_log&) = delete;
  quiet_log& operator=(const quiet_log&) = delete;

 private:
  log_level saved_;
};

class training_under_faults : public testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_ = new model_spec(model_spec::load_named("tiny_cnn"));
    sim_device dev(small_real_device());
    runner_options o = options();
    o.device_limit = 0;
    o.policy = offload_policy::none;
    reference_ = new run_report(run_workload(dev, *model_, o));
    // 80% of the peak in whole segments: binding and feasible (workload_runner_test.cpp).
    constexpr std::size_t unit = caching_allocator::round_large;
    budget_ = (reference_->peak_allocated_bytes * 80 / 100 + unit - 1) / unit * unit;
  }
  static void TearDownTestSuite() {
    delete reference_;
    delete model_;
    reference_ = nullptr;
    model_ = nullptr;
  }

  static runner_options options() {
    runner_options o;
    o.batch = batch;
    o.steps = steps;
    o.keep_tensors = true;
    o.device_limit = budget_;
    o.policy = offload_policy::all;
    o.prefetch = prefetch_policy::one_layer;
    return o;
  }

  enum class outcome { completed, defined_error, fault_not_reached };

  // One run with the n-th call of `kind` failing.
  static outcome run_with_fault(sim_call kind, std::uint64_t n, std::string& what) {
    sim_device dev(small_real_device());
    const std::uint64_t before = dev.calls(kind);
    dev.fail_nth(kind, n);
    outcome result = outcome::completed;
    try {
      const run_report r = run_workload(dev, *model_, options());
      if (dev.calls(kind) - before < n) return outcome::fault_not_reached;
      // Whatever failed was absorbed: the run must then be indistinguishable from a clean one.
      EXPECT_TRUE(same_bits(r.losses, reference_->losses)) << "losses, fault at call " << n;
      EXPECT_TRUE(same_bits(r.last_gradients, reference_->last_gradients)) << "gradients, fault at call " << n;
      EXPECT_TRUE(same_bits(r.final_params, reference_->final_params)) << "parameters, fault at call " << n;
      EXPECT_LE(r.peak_reserved_bytes, r.budget_bytes) << "fault at call " << n;
    } catch (const error& e) {  // device_error, config_error and the rest of gpuswap's own
      what = e.what();
      result = outcome::defined_error;
    } catch (const std::bad_alloc& e) {  // out_of_memory
      what = e.what();
      result = outcome::defined_error;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "fault at call " << n << " threw an undefined error: " << e.what();
    }
    // A run that threw must still have reached the fault: nothing else may fail.
    EXPECT_GE(dev.calls(kind) - before, n) << "the run failed before the injected fault: " << what;
    return result;
  }

  // The call numbers to fail: all of the first 30, the last few, and a stride between, so that
  // each kind costs a bounded number of runs however many calls a run makes.
  static std::vector<std::uint64_t> call_numbers(std::uint64_t total) {
    constexpr std::uint64_t head = 30, tail = 4, middle = 12;
    std::vector<std::uint64_t> ns;
    for (std::uint64_t n = 1; n <= total; ++n) {
      const bool in_head = n <= head;
      const bool in_tail = n + tail > total;
      const std::uint64_t stride = total > head + tail ? (total - head - tail) / middle + 1 : 1;
      if (in_head || in_tail || (n - head) % stride == 0) ns.push_back(n);
    }
    ns.push_back(total + 1);  // one past the last: must not be reached
    return ns;
  }

  void sweep(sim_call kind) {
    SCOPED_TRACE(std::string("failing ") + std::string(to_string(kind)));
    ASSERT_GT(budget_, 0U);
    // How many calls of this kind a clean budgeted run makes.
    std::uint64_t total = 0;
    {
      sim_device dev(small_real_device());
      const run_report r = run_workload(dev, *model_, options());
      ASSERT_GT(r.swaps.bytes_out, 0U) << "the budget does not bind; the sweep would not exercise swapping";
      ASSERT_TRUE(same_bits(r.losses, reference_->losses));
      total = dev.calls(kind);
    }
    ASSERT_GT(total, 0U);
    quiet_log quiet;
    int completed = 0, errors = 0;
    for (std::uint64_t n : call_numbers(total)) {
      std::string what;
      switch (run_with_fault(kind, n, what)) {
        case outcome::completed: ++completed; break;
        case outcome::defined_error: ++errors; break;
        case outcome::fault_not_reached: EXPECT_EQ(n, total + 1) << "a run made fewer calls than the clean one"; break;
      }
      if (HasFailure()) {
        ADD_FAILURE() << "stopping the sweep at call " << n << " of " << total;
        return;
      }
    }
    RecordProperty(std::string(to_string(kind)) + "_calls", static_cast<int>(total));
    std::cerr << to_string(kind) << ": " << total << " calls; faults absorbed " << completed
              << ", defined errors " << errors << '\n';
    EXPECT_GT(completed + errors, 0);
  }

  static model_spec* model_;
  static run_report* reference_;
  static std::size_t budget_;
};

model_spec* training_under_faults::model_ = nullptr;
run_report* training_under_faults::reference_ = nullptr;
std::size_t training_under_faults::budget_ = 0;

TEST_F(training_under_faults, copy) { sweep(sim_call::copy); }
TEST_F(training_under_faults, device_alloc) { sweep(sim_call::device_alloc); }
TEST_F(training_under_faults, pinned_alloc) { sweep(sim_call::pinned_alloc); }
TEST_F(training_under_faults, event_record) { sweep(sim_call::event_record); }
TEST_F(training_under_faults, event_wait) { sweep(sim_call::event_wait); }
TEST_F(training_under_faults, launch) { sweep(sim_call::launch); }

}  // namespace
}  // namespace gpuswap
