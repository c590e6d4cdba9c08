#pragma once
// cuda_kernels: the GPU counterparts of tools/reference_math's layer math, as host-side
// launchers over device memory. This header includes no CUDA header (tools/ includes it), so
// pointers are plain floats, shapes plain ints, and a stream is the `void*` that
// device::native_stream gives (a cudaStream_t; nullptr is the legacy default stream).
//
// Defined only when gpuswap_device was built with its kernels (GPUSWAP_HAVE_CUDA_KERNELS: the
// CUDA toolkit and a CUDA compiler were found); tools/gpu_math is the adapter that reports
// "no CUDA kernels in this build" otherwise.
//
// Semantics are reference_math's, kernel for kernel:
//   layouts     activations NHWC (images) or row-major [rows][features]; a batch is
//               batch-major. conv params: weights [C_out][k_h][k_w][C_in], then biases [C_out]
//               when the layer has them; fc params: weights [outputs][inputs], then biases
//               [outputs]; batchnorm params: gamma [C], then beta [C].
//   overwrite   every *_forward, softmax_forward and copy write their output.
//   accumulate  every *_backward* and accumulate ADD (+=) their contribution into the gradient
//               they are given, each element receiving old + (its whole contribution), like
//               reference_math's Note [Contribution then add].
//
// Every launcher enqueues on `native_stream` and returns without waiting. Launches go to the
// calling thread's current CUDA device, which must be the stream's device (cuda_device's
// streams are made on its ordinal; a one-GPU process never changes it). A failed launch throws
// device_error naming the kernel (no_cuda_device when the process cannot use a GPU at all);
// errors the kernel meets while it runs surface, as CUDA's do, at a later synchronisation.
// A launcher with nothing to do (zero elements) enqueues nothing.
//
// See Note [Deterministic kernels] in cuda_kernels.cu: no atomics; each output element is
// computed by one thread, summing in the order reference_math sums, so two runs are bit-identical
// (and, FMA contraction being off, agree with the CPU bit for bit wherever the math is only
// additions and multiplications).
#include <cstddef>

namespace gpuswap::cuda_kernels {

// conv (NHWC): out_h = (in_h + 2 pad - kernel_h) / stride + 1, likewise out_w.
struct conv_geometry {
  int batch = 0;
  int in_h = 0, in_w = 0, in_channels = 0;
  int out_h = 0, out_w = 0, out_channels = 0;
  int kernel_h = 0, kernel_w = 0, stride = 1, pad = 0;
  bool bias = true;
};

// maxpool/avgpool (NHWC, channels kept). Windows are clipped to the input; avg divides by the
// full kernel_h * kernel_w.
struct pool_geometry {
  int batch = 0;
  int in_h = 0, in_w = 0, channels = 0;
  int out_h = 0, out_w = 0;
  int kernel_h = 0, kernel_w = 0, stride = 1, pad = 0;
};

// --- conv -------------------------------------------------------------------------------------
void conv_forward(const conv_geometry& g, const float* x, const float* params, float* y,
                  void* native_stream);
// gx += d(loss)/dx.
void conv_backward_input(const conv_geometry& g, const float* gy, const float* params, float* gx,
                         void* native_stream);
// gparams += d(loss)/d(weights), then d(loss)/d(biases) (laid out like params).
void conv_backward_params(const conv_geometry& g, const float* x, const float* gy,
                          float* gparams, void* native_stream);

// --- fc: `rows` rows of `inputs` features -> `outputs` features ---------------------------------
void fc_forward(std::size_t rows, int inputs, int outputs, bool bias, const float* x,
                const float* params, float* y, void* native_stream);
void fc_backward_input(std::size_t rows, int inputs, int outputs, const float* gy,
                       const float* params, float* gx, void* native_stream);
void fc_backward_params(std::size_t rows, int inputs, int outputs, bool bias, const float* x,
                        const float* gy, float* gparams, void* native_stream);

// --- elementwise ------------------------------------------------------------------------------
void relu_forward(std::size_t n, const float* x, float* y, void* native_stream);
// gx += y > 0 ? gy : 0 (relu's backward reads its output, as reference_math's does).
void relu_backward(std::size_t n, const float* y, const float* gy, float* gx,
                   void* native_stream);
// y = inputs[0] + inputs[1] + ... , summed left to right. `inputs` is a host array of `count`
// (1 or more) device pointers.
void add_forward(std::size_t n, const float* const* inputs, int count, float* y,
                 void* native_stream);
// dst += src (add's and flatten's backward).
void accumulate(std::size_t n, const float* src, float* dst, void* native_stream);
// dst = src (flatten's forward); device to device, stream-ordered.
void copy(std::size_t n, const float* src, float* dst, void* native_stream);
// Sets `bytes` bytes at `ptr` to zero, stream-ordered (gradient buffers before a backward).
void fill_zero(void* ptr, std::size_t bytes, void* native_stream);

// --- pooling ----------------------------------------------------------------------------------
void maxpool_forward(const pool_geometry& g, const float* x, float* y, void* native_stream);
// The first maximum of each window in scan order (rows, then columns) takes the gradient.
void maxpool_backward(const pool_geometry& g, const float* x, const float* gy, float* gx,
                      void* native_stream);
void avgpool_forward(const pool_geometry& g, const float* x, float* y, void* native_stream);
void avgpool_backward(const pool_geometry& g, const float* gy, float* gx, void* native_stream);

// --- batchnorm: training mode over `rows` rows of `channels`, biased variance, eps 1e-5, in
// float64 like reference_math; backward recomputes the statistics from x --------------------
void batchnorm_forward(std::size_t rows, int channels, const float* x, const float* params,
                       float* y, void* native_stream);
// gx (may be null) += dx; gparams (may be null) += dgamma, then dbeta.
void batchnorm_backward(std::size_t rows, int channels, const float* x, const float* gy,
                        const float* params, float* gx, float* gparams, void* native_stream);

// --- softmax cross-entropy over the last dimension (`classes`) of `rows` rows ----------------
void softmax_forward(std::size_t rows, int classes, const float* logits, float* probs,
                     void* native_stream);
// *loss (device-accessible memory, one float) = the mean over rows of -log softmax(label), in
// float64 rounded to float as reference_math's softmax_xent_forward returns it. `labels` holds
// `rows` class indices in device memory; a label outside [0, classes) makes the loss NaN
// (reference_math throws; a kernel cannot).
void softmax_xent_loss(std::size_t rows, int classes, const float* logits, const int* labels,
                       float* loss, void* native_stream);
// gx += (probs - one_hot(labels)) / rows. A row with a label outside [0, classes) gets NaN.
void softmax_xent_backward(std::size_t rows, int classes, const float* probs, const int* labels,
                           float* gx, void* native_stream);

// --- optimiser --------------------------------------------------------------------------------
// params -= lr * grads.
void sgd_update(std::size_t n, float lr, float* params, const float* grads, void* native_stream);
// momentum = mu * momentum + grads; params -= lr * momentum.
void sgd_momentum_update(std::size_t n, float lr, float mu, float* params, const float* grads,
                         float* momentum, void* native_stream);

}  // namespace gpuswap::cuda_kernels
