#include "device/device_factory.hpp"

#include <utility>

#include "core/errors.hpp"
#include "core/logging.hpp"
#if defined(GPUSWAP_HAVE_CUDA)
#include "device/cuda_device.hpp"
#endif

namespace gpuswap {

namespace {

constexpr std::string_view compiled_out = "gpuswap was built without the CUDA backend";

std::unique_ptr<device> make_sim(const device_request& request) {
  sim_options options = request.sim;
  options.ordinal = request.ordinal;
  return std::make_unique<sim_device>(std::move(options));
}

std::unique_ptr<device> make_cuda([[maybe_unused]] int ordinal) {
#if defined(GPUSWAP_HAVE_CUDA)
  return std::make_unique<cuda_device>(ordinal);
#else
  throw_no_cuda_device("make_device", "gpuswap_cuda_compiled_out", compiled_out);
#endif
}

}  // namespace

std::string_view to_string(backend_choice choice) noexcept {
  switch (choice) {
    case backend_choice::auto_: return "auto";
    case backend_choice::cuda: return "cuda";
    case backend_choice::sim: return "sim";
  }
  return "?";
}

std::unique_ptr<device> make_device(const device_request& request) {
  switch (request.backend) {
    case backend_choice::cuda:
      return make_cuda(request.ordinal);
    case backend_choice::sim:
      return make_sim(request);
    case backend_choice::auto_:
      break;
  }
  try {
    return make_cuda(request.ordinal);
  } catch (const no_cuda_device& e) {
    log().info("backend auto fell back to the simulated device: {}", e.what());
  }
  return make_sim(request);
}

bool cuda_available(std::string* why) {
#if defined(GPUSWAP_HAVE_CUDA)
  return cuda_device::device_count(why) > 0;
#else
  if (why != nullptr) *why = compiled_out;
  return false;
#endif
}

backend_choice backend_choice_of(backend_kind kind) noexcept {
  switch (kind) {
    case backend_kind::cuda: return backend_choice::cuda;
    case backend_kind::sim: return backend_choice::sim;
    case backend_kind::auto_: break;
  }
  return backend_choice::auto_;
}

}  // namespace gpuswap
