#pragma once
// make_device: the one place that picks a Device backend, so that tools, integrations and tests
// ask for "a GPU if there is one" the same way and report the same reason when there is none.
#include <memory>
#include <string>
#include <string_view>

#include "core/config.hpp"
#include "device/device.hpp"
#include "device/sim_device.hpp"

namespace gpuswap {

enum class backend_choice {
  auto_,  // cuda when a CUDA device can be opened, else sim (logged once, with the reason)
  cuda,   // cuda or no_cuda_device
  sim,    // the simulated device, always
};

std::string_view to_string(backend_choice choice) noexcept;
// The choice the config key `backend` names.
backend_choice backend_choice_of(backend_kind kind) noexcept;

struct device_request {
  backend_choice backend = backend_choice::auto_;
  // The device ordinal for whichever backend is chosen; it overrides sim.ordinal.
  int ordinal = 0;
  // Used when the simulator is chosen (sim, or auto without a CUDA device).
  sim_options sim;
};

// cuda: a cuda_device, or throws no_cuda_device (always, when gpuswap was built without the
// CUDA backend). sim: a sim_device (its options are validated; config_error if out of range).
// auto_: a cuda_device if one can be opened at `ordinal`, else a sim_device, with one info line
// in the log saying why it fell back. Other device_errors from opening a present GPU propagate:
// a broken GPU is not silently replaced by a model.
std::unique_ptr<device> make_device(const device_request& request);

// True if a CUDA device can be used (the driver loads and reports at least one device);
// otherwise `why`, if given, receives the reason (the failing call and its error, or that the
// CUDA backend was compiled out). A missing device is an answer here, never an exception.
bool cuda_available(std::string* why = nullptr);

}  // namespace gpuswap
