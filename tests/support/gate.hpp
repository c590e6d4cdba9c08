#pragma once
// gate: holds simulated kernels back in real time until the test opens it, so that a test can
// keep work in flight on a stream while it checks what the host side does meanwhile (an
// allocator that must not reuse a block yet, a pool that must not hand a buffer back).
//
// Kernels hold a copy of the gate's future, never the gate, so a gate may go out of scope before
// they run. It opens when destroyed, so that no stream worker stays blocked past a failed
// assertion, and a kernel waits at most `limit`: a broken wait then fails its test instead of
// hanging it.
#include <chrono>
#include <future>

#include "device/sim_device.hpp"

namespace gpuswap::testing_support {

class gate {
 public:
  static constexpr std::chrono::seconds limit{20};

  gate() : future_(promise_.get_future().share()) {}
  ~gate() { open(); }
  gate(const gate&) = delete;
  gate& operator=(const gate&) = delete;

  void open() {
    if (!opened_) {
      opened_ = true;
      promise_.set_value();
    }
  }
  // Blocks until open(), or for `limit`.
  void wait() const { (void)future_.wait_for(limit); }
  // For a kernel body that waits on the gate itself.
  std::shared_future<void> future() const { return future_; }

  // Enqueues on `stream` a kernel that waits for the gate, modelled as `cost_ns` (one second by
  // default, so that events after it stay incomplete by the modelled clock until the host
  // synchronises).
  void launch(sim_device& dev, stream_t stream, double cost_ns = 1e9) const {
    kernel_cost cost;
    cost.fixed_ns = cost_ns;
    dev.launch(stream, cost, [f = future_] { (void)f.wait_for(limit); }, {});
  }

 private:
  std::promise<void> promise_;
  std::shared_future<void> future_;
  bool opened_ = false;
};

}  // namespace gpuswap::testing_support
