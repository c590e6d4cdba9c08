#include "tools/training_math.hpp"

#include <algorithm>

#include "device/sim_device.hpp"
#include "tools/cuda_training_math.hpp"
#include "tools/gpu_math.hpp"
#include "tools/host_training_math.hpp"
#if defined(GPUSWAP_HAVE_CUDA)
#include "device/cuda_device.hpp"
#endif

namespace gpuswap {

// Note [Choosing the training math]
// Chosen once per run, from the device, never per call: the simulator's real backing computes
// with reference_math in host functions (its device memory is host memory); a cuda_device
// computes with gpu_math's kernels when this build has them and the process can use the GPU;
// everything else (the phantom backing, a model without a loss or with a layer that has only a
// cost model, real_math off, a GPU without kernels) runs the modelled costs alone. The modelled
// choice makes the same launches as the host one, without functions, so the simulator's clock
// and every figure it produces are the same whether or not the math is computed. A cuda_device
// is recognised by its type, not by "not the simulator", so that a test's own device (a probe
// or fault-injecting wrapper) is never handed GPU kernels.

std::string_view to_string(training_math_kind kind) noexcept {
  switch (kind) {
    case training_math_kind::modelled: return "modelled";
    case training_math_kind::host_reference: return "host_reference";
    case training_math_kind::cuda_kernels: return "cuda_kernels";
  }
  return "unknown";
}

std::string_view describe(training_math_kind kind) noexcept {
  switch (kind) {
    case training_math_kind::modelled: return "modelled costs only (nothing computed)";
    case training_math_kind::host_reference: return "reference math as simulated kernels";
    case training_math_kind::cuda_kernels: return "CUDA kernels on the GPU";
  }
  return "unknown";
}

namespace {

bool is_cuda_device([[maybe_unused]] device& dev) {
#if defined(GPUSWAP_HAVE_CUDA)
  return dynamic_cast<cuda_device*>(&dev) != nullptr;
#else
  return false;
#endif
}

// Why the model cannot be computed, or empty when it can.
std::string cannot_compute(const model_spec& model) {
  if (model.loss_layer() < 0) return "the model has no softmax_xent loss layer";
  const auto it = std::find_if(model.layers.begin(), model.layers.end(),
                               [](const layer_spec& l) { return !l.has_reference_math(); });
  if (it != model.layers.end()) return "layer " + it->name + " (" + it->kind + ") has a cost model only";
  return {};
}

}  // namespace

std::unique_ptr<training_math> make_training_math(const training_math_context& c, bool real_math,
                                                  std::string* why) {
  const auto modelled = [&c, why](std::string reason) {
    if (why != nullptr) *why = std::move(reason);
    return std::make_unique<host_training_math>(c.dev, c.stream, c.model, c.batch, /*compute=*/false);
  };
  if (!real_math) return modelled("real math is off");
  if (std::string reason = cannot_compute(c.model); !reason.empty()) return modelled(std::move(reason));
  if (auto* sim = dynamic_cast<sim_device*>(&c.dev)) {
    if (sim->options().backing != sim_backing::real) return modelled("the simulated device has phantom backing");
    return std::make_unique<host_training_math>(c.dev, c.stream, c.model, c.batch, /*compute=*/true);
  }
  if (!is_cuda_device(c.dev)) return modelled(c.dev.name() + " is neither the simulator nor a CUDA device");
  std::string unavailable;
  if (!gpu_math_available(&unavailable)) return modelled("no GPU math: " + unavailable);
  return std::make_unique<cuda_training_math>(c);
}

}  // namespace gpuswap
