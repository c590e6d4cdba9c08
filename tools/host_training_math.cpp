#include "tools/host_training_math.hpp"

#include <cstring>
#include <utility>

#include "tools/reference_math.hpp"

namespace gpuswap {

host_training_math::host_training_math(device& dev, stream_t stream, const model_spec& model, int batch,
                                       bool compute)
    : dev_(dev), stream_(stream), model_(model), batch_(batch), compute_(compute) {}

training_math_kind host_training_math::kind() const noexcept {
  return compute_ ? training_math_kind::host_reference : training_math_kind::modelled;
}

void host_training_math::prepare() {
  labels_.resize(model_.labels_per_sample() * static_cast<std::size_t>(batch_));
}

void host_training_math::launch(const modelled_kernel& modelled, std::function<void()> fn) {
  dev_.launch(stream_, modelled.cost, compute_ ? std::move(fn) : std::function<void()>(), modelled.touched);
}

void host_training_math::init_layer(const layer_spec& layer, float* params, float* grads, std::uint64_t seed,
                                    const modelled_kernel& modelled) {
  launch(modelled, [&layer, params, grads, seed] {
    init_params(layer, params, seed);
    std::memset(grads, 0, layer.param_elems * sizeof(float));
  });
}

void host_training_math::zero(void* ptr, std::size_t bytes, const modelled_kernel& modelled) {
  launch(modelled, [ptr, bytes] { std::memset(ptr, 0, bytes); });
}

void host_training_math::load_batch(std::uint64_t seed, float* pinned_inputs) {
  if (compute_) make_batch(model_, batch_, seed, pinned_inputs, labels_.data());
}

void host_training_math::forward(const layer_spec& layer, std::span<const float* const> inputs,
                                 const float* params, float* out, float* loss_out,
                                 const modelled_kernel& modelled) {
  if (layer.op == layer_kind::softmax_xent) {
    launch(modelled, [&layer, b = batch_, in = inputs[0], labels = labels_.data(), out, loss_out] {
      const float loss = softmax_xent_forward(layer, b, in, labels, out);
      if (loss_out != nullptr) *loss_out = loss;
    });
  } else {
    launch(modelled, [&layer, b = batch_, in = std::vector<const float*>(inputs.begin(), inputs.end()), params,
                      out] { layer_forward(layer, b, in, params, out); });
  }
}

void host_training_math::backward(const layer_spec& layer, std::span<const float* const> inputs,
                                  const float* out, const float* grad_out, const float* params,
                                  std::span<float* const> grad_inputs, float* grad_params,
                                  const modelled_kernel& modelled) {
  if (layer.op == layer_kind::softmax_xent) {
    launch(modelled, [&layer, b = batch_, out, labels = labels_.data(), g = grad_inputs[0]] {
      softmax_xent_backward(layer, b, out, labels, g);
    });
  } else {
    launch(modelled, [&layer, b = batch_, in = std::vector<const float*>(inputs.begin(), inputs.end()), out,
                      grad_out, params, gin = std::vector<float*>(grad_inputs.begin(), grad_inputs.end()),
                      grad_params] { layer_backward(layer, b, in, out, grad_out, params, gin, grad_params); });
  }
}

void host_training_math::update(const layer_spec& layer, float* params, float* grads, float lr,
                                std::vector<float>* keep_gradients, const modelled_kernel& modelled) {
  launch(modelled, [params, grads, n = layer.param_elems, lr, keep_gradients] {
    if (keep_gradients != nullptr) keep_gradients->assign(grads, grads + n);
    sgd_update(params, grads, n, lr);
    std::memset(grads, 0, n * sizeof(float));
  });
}

std::vector<float> host_training_math::read(const float* ptr, std::size_t n) {
  if (!compute_ || ptr == nullptr) return {};
  return std::vector<float>(ptr, ptr + n);
}

}  // namespace gpuswap
