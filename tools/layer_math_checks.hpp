#pragma once
// The argument checks shared by the two implementations of a layer's math, reference_math (on
// the host) and gpu_math (CUDA kernels), so that both refuse the same calls with the same
// config_error messages.
#include <string_view>

#include "tools/model_spec.hpp"

namespace gpuswap {

// Throws config_error for the layer's kind: `what` says why it has no math here.
[[noreturn]] void throw_no_layer_math(const layer_spec& layer, std::string_view what);
// Throws config_error unless batch >= 1.
void check_layer_batch(const layer_spec& layer, int batch);
// Throws config_error unless the layer is the softmax cross-entropy loss.
void check_loss_layer(const layer_spec& layer);

}  // namespace gpuswap
