#pragma once
// gpu_math: reference_math's per-layer entry points, run on a CUDA device by the kernels of
// device/cuda_kernels. Same arguments, same layouts, same meaning (forward overwrites `out`;
// backward ADDS into grad_inputs and grad_params, each element receiving old + its whole
// contribution; nullptr gradients are skipped; only what backward_needs_input/_output say is
// read), with three differences:
//   - every pointer is device memory of the device that owns `native_stream` (a cudaStream_t,
//     from device::native_stream; nullptr is the legacy default stream), and the calls only
//     enqueue: results are there once the stream has run them;
//   - softmax_xent's loss is written to `*loss`, one float in device memory, instead of being
//     returned (reading it back is a copy on the stream), and the labels are in device memory.
//     A label outside [0, classes) cannot throw from a kernel: it makes the loss and its row's
//     gradient NaN;
//   - float only (reference_math's float64 overloads exist for its gradient checks).
// Results are deterministic (two runs give the same bits: see Note [Deterministic kernels] in
// device/cuda_kernels.cu) and agree with reference_math within rounding.
//
// Errors: the argument checks reference_math makes (batch, input count, kinds without math)
// throw the same config_errors before anything is enqueued. A failed launch throws device_error
// naming the kernel; no_cuda_device when the process cannot use a GPU, or when this build has no
// CUDA kernels ("no CUDA kernels in this build").
#include <cstddef>
#include <span>
#include <string>

#include "tools/model_spec.hpp"

namespace gpuswap {

// True when this build has the CUDA kernels and a CUDA device can be used; otherwise `why` (if
// given) receives the reason. Never throws.
bool gpu_math_available(std::string* why = nullptr);

void gpu_layer_forward(const layer_spec& layer, int batch, std::span<const float* const> inputs,
                       const float* params, float* out, void* native_stream);

void gpu_layer_backward(const layer_spec& layer, int batch, std::span<const float* const> inputs,
                        const float* out, const float* grad_out, const float* params,
                        std::span<float* const> grad_inputs, float* grad_params,
                        void* native_stream);

// Writes the probabilities to `probs` and the mean loss over batch x rows to `*loss`.
void gpu_softmax_xent_forward(const layer_spec& layer, int batch, const float* logits,
                              const int* labels, float* probs, float* loss,
                              void* native_stream);
// Adds (probs - one_hot(labels)) / (batch x rows) into grad_logits.
void gpu_softmax_xent_backward(const layer_spec& layer, int batch, const float* probs,
                               const int* labels, float* grad_logits, void* native_stream);

// params -= lr * grads.
void gpu_sgd_update(float* params, const float* grads, std::size_t n, float lr,
                    void* native_stream);
// momentum = mu * momentum + grads; params -= lr * momentum.
void gpu_sgd_momentum_update(float* params, const float* grads, float* momentum, std::size_t n,
                             float lr, float mu, void* native_stream);

// Zeroes `bytes` bytes of device memory in stream order (the runner's memset of gradients and
// error signals).
void gpu_fill_zero(void* ptr, std::size_t bytes, void* native_stream);

}  // namespace gpuswap
