#pragma once
// reference_math: real forward and backward of the layer kinds of model_spec, in plain
// single-threaded C++, for the small networks the demo and the end-to-end tests train on the
// simulator's `real` backing (the workload runner launches these as simulated kernels).
//
// Deterministic: every loop runs in a fixed order and nothing depends on threads or addresses,
// so the same inputs give bit-identical outputs on every run.
//
// Layouts (per layer; a batch is batch-major, sample after sample)
//   activations  NHWC for images ([H, W, C] per sample), row-major otherwise
//   conv params  weights [C_out][k][k][C_in], then biases [C_out] (when the layer has them)
//   fc params    weights [outputs][inputs], then biases [outputs]; per_position fc applies to
//                each of the `rows` positions of a sample
//   batchnorm    gamma [C], then beta [C]
// batchnorm is training-mode batch normalisation over batch x rows (everything but the channel,
// the last dimension), with biased variance and eps 1e-5; no running statistics are kept (the
// networks here only train). Its backward recomputes the statistics from the input.
//
// Accumulation: layer_backward ADDS (+=) into grad_inputs and grad_params. Each call computes
// its whole contribution first and then adds it element by element, so a tensor read by two
// later layers gets old + a + b, and because float addition is commutative the result is the
// same whichever of the two backward calls runs first.
//
// softmax_xent is the loss: layer_forward writes its probabilities; softmax_xent_forward also
// takes the labels and returns the loss (the mean over batch x rows), and softmax_xent_backward
// is its backward (layer_backward refuses it: it needs the labels).
//
// The double overloads run the same code in float64; the gradient-check tests use them.
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "tools/model_spec.hpp"

namespace gpuswap {

void layer_forward(const layer_spec& layer, int batch, std::span<const float* const> inputs,
                   const float* params, float* out);
void layer_forward(const layer_spec& layer, int batch, std::span<const double* const> inputs,
                   const double* params, double* out);

// grad_inputs[i] may be nullptr (that input needs no gradient), and so may grad_params.
// Only what layer.backward_needs_input / backward_needs_output say is read: the other input
// pointers and `out` may be nullptr. `params` may be nullptr for kinds without parameters.
void layer_backward(const layer_spec& layer, int batch, std::span<const float* const> inputs,
                    const float* out, const float* grad_out, const float* params,
                    std::span<float* const> grad_inputs, float* grad_params);
void layer_backward(const layer_spec& layer, int batch, std::span<const double* const> inputs,
                    const double* out, const double* grad_out, const double* params,
                    std::span<double* const> grad_inputs, double* grad_params);

// labels: batch x layer.rows class indices in [0, layer.in_channels). Writes the probabilities
// to `probs` and returns the mean loss.
float softmax_xent_forward(const layer_spec& layer, int batch, const float* logits,
                           const int* labels, float* probs);
double softmax_xent_forward(const layer_spec& layer, int batch, const double* logits,
                            const int* labels, double* probs);
// Adds d(mean loss)/d(logits) = (probs - one_hot(labels)) / (batch x rows) into grad_logits.
void softmax_xent_backward(const layer_spec& layer, int batch, const float* probs,
                           const int* labels, float* grad_logits);
void softmax_xent_backward(const layer_spec& layer, int batch, const double* probs,
                           const int* labels, double* grad_logits);

// Deterministic initialisation of the layer's param_elems parameters from (seed, layer.index):
// conv/fc weights uniform in +-sqrt(6 / fan_in) (He), biases in +-1/sqrt(fan_in), norms
// gamma 1 and beta 0, embedding and transformer weights in +-0.02.
void init_params(const layer_spec& layer, float* params, std::uint64_t seed);

// Deterministic synthetic data: batch x input_elems_per_sample inputs and batch x
// labels_per_sample labels (labels may be nullptr when the model has no loss). Each class has a
// fixed random pattern (the same for every seed) and a sample is its class's pattern plus
// noise drawn from `seed`, so the task is learnable. Token inputs (an embedding reads the
// network input) are ids in [0, vocab) stored as floats.
void make_batch(const model_spec& model, int batch, std::uint64_t seed, float* inputs,
                int* labels);

// params -= lr * grads.
void sgd_update(float* params, const float* grads, std::size_t n, float lr);
// momentum = mu * momentum + grads; params -= lr * momentum.
void sgd_momentum_update(float* params, const float* grads, float* momentum, std::size_t n,
                         float lr, float mu);

// The whole network on host memory, in the order the workload runner uses: forward in layer
// order, backward in reverse layer order. The unlimited-memory reference the end-to-end tests
// compare a budgeted run against.
std::vector<std::vector<float>> init_model_params(const model_spec& model, std::uint64_t seed);
// Sets grads (resized like params) to this step's parameter gradients and returns the loss.
// The model must end with softmax_xent and have reference math for every layer.
float reference_train_step(const model_spec& model, int batch,
                           const std::vector<std::vector<float>>& params, const float* inputs,
                           const int* labels, std::vector<std::vector<float>>& grads);

}  // namespace gpuswap
