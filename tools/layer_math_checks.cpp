#include "tools/layer_math_checks.hpp"

#include <fmt/format.h>

#include "core/errors.hpp"

namespace gpuswap {

void throw_no_layer_math(const layer_spec& l, std::string_view what) {
  throw_config_error("kind", l.kind,
                     "conv, fc, relu, maxpool, avgpool, add, batchnorm, flatten, softmax_xent",
                     fmt::format("layer {}: {}", l.name, what));
}

void check_layer_batch(const layer_spec& l, int batch) {
  if (batch < 1) {
    throw_config_error("batch", fmt::format("{}", batch), "a batch of 1 or more",
                       fmt::format("layer {}", l.name));
  }
}

void check_loss_layer(const layer_spec& l) {
  if (l.op != layer_kind::softmax_xent) {
    throw_no_layer_math(l, "softmax_xent_* called on a non-loss layer");
  }
}

}  // namespace gpuswap
