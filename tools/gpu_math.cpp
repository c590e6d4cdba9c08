#include "tools/gpu_math.hpp"

#include <string_view>

#include <fmt/format.h>

#include "core/errors.hpp"
#include "device/cuda_kernels.hpp"
#include "device/device_factory.hpp"
#include "tools/layer_math_checks.hpp"

namespace gpuswap {

// Note [Kernels compiled out]
// device/cuda_kernels.hpp is included in every build, but its launchers are defined only when
// gpuswap_device was built with a CUDA compiler (GPUSWAP_HAVE_CUDA_KERNELS). Each entry point
// below calls them inside `if constexpr (kernels_compiled)`: in a build without them that branch
// is a discarded statement, which names the launchers without odr-using them, so the program
// links and the entry point reports no_cuda_device instead.

namespace {

#if defined(GPUSWAP_HAVE_CUDA_KERNELS)
constexpr bool kernels_compiled = true;
#else
constexpr bool kernels_compiled = false;
#endif

constexpr std::string_view no_kernels_reason =
    "no CUDA kernels in this build (gpuswap was configured without a CUDA compiler)";

[[noreturn]] void no_kernels(std::string_view call) {
  throw_no_cuda_device(call, "gpuswap_no_cuda_kernels", no_kernels_reason);
}

cuda_kernels::conv_geometry conv_of(const layer_spec& l, int batch) {
  cuda_kernels::conv_geometry g;
  g.batch = batch;
  g.in_h = l.in_h;
  g.in_w = l.in_w;
  g.in_channels = l.in_channels;
  g.out_h = l.out_h;
  g.out_w = l.out_w;
  g.out_channels = l.out_channels;
  g.kernel_h = l.kernel_h;
  g.kernel_w = l.kernel_w;
  g.stride = l.stride;
  g.pad = l.pad;
  g.bias = l.bias;
  return g;
}

cuda_kernels::pool_geometry pool_of(const layer_spec& l, int batch) {
  cuda_kernels::pool_geometry g;
  g.batch = batch;
  g.in_h = l.in_h;
  g.in_w = l.in_w;
  g.channels = l.in_channels;
  g.out_h = l.out_h;
  g.out_w = l.out_w;
  g.kernel_h = l.kernel_h;
  g.kernel_w = l.kernel_w;
  g.stride = l.stride;
  g.pad = l.pad;
  return g;
}

// batch x rows: the row count of the row-wise kinds (fc, batchnorm, softmax_xent).
std::size_t rows_of(const layer_spec& l, int batch) {
  return static_cast<std::size_t>(batch) * static_cast<std::size_t>(l.rows);
}

}  // namespace

bool gpu_math_available(std::string* why) {
  if constexpr (!kernels_compiled) {
    if (why != nullptr) *why = std::string(no_kernels_reason);
    return false;
  } else {
    return cuda_available(why);
  }
}

void gpu_layer_forward(const layer_spec& l, int batch, std::span<const float* const> in,
                       const float* params, float* y, void* native_stream) {
  check_layer_batch(l, batch);
  if (in.size() != l.inputs.size()) {
    throw_no_layer_math(l, fmt::format("given {} inputs, expects {}", in.size(), l.inputs.size()));
  }
  if (!l.has_reference_math()) throw_no_layer_math(l, "this kind is cost-model only (no reference math)");
  if constexpr (!kernels_compiled) {
    no_kernels("gpu_layer_forward");
  } else {
    namespace k = cuda_kernels;
    void* const s = native_stream;
    const std::size_t n_in = static_cast<std::size_t>(batch) * l.in_elems_per_sample;
    const float* x = in[0];
    switch (l.op) {
      case layer_kind::conv: k::conv_forward(conv_of(l, batch), x, params, y, s); return;
      case layer_kind::fc:
        k::fc_forward(rows_of(l, batch), l.in_channels, l.out_channels, l.bias, x, params, y, s);
        return;
      case layer_kind::relu: k::relu_forward(n_in, x, y, s); return;
      case layer_kind::maxpool: k::maxpool_forward(pool_of(l, batch), x, y, s); return;
      case layer_kind::avgpool: k::avgpool_forward(pool_of(l, batch), x, y, s); return;
      case layer_kind::add:
        k::add_forward(n_in, in.data(), static_cast<int>(in.size()), y, s);
        return;
      case layer_kind::batchnorm:
        k::batchnorm_forward(rows_of(l, batch), l.in_channels, x, params, y, s);
        return;
      case layer_kind::flatten: k::copy(n_in, x, y, s); return;
      case layer_kind::softmax_xent:
        k::softmax_forward(rows_of(l, batch), l.in_channels, x, y, s);
        return;
      case layer_kind::transformer:
      case layer_kind::embedding:
      case layer_kind::layernorm: break;
    }
    throw_no_layer_math(l, "this kind is cost-model only (no reference math)");
  }
}

void gpu_layer_backward(const layer_spec& l, int batch, std::span<const float* const> in,
                        const float* y, const float* gy, const float* params,
                        std::span<float* const> gin, float* gparams, void* native_stream) {
  check_layer_batch(l, batch);
  if (in.size() != l.inputs.size() || gin.size() != l.inputs.size()) {
    throw_no_layer_math(l, fmt::format("given {} inputs and {} input gradients, expects {}", in.size(),
                           gin.size(), l.inputs.size()));
  }
  if (l.op == layer_kind::softmax_xent) {
    throw_no_layer_math(l, "the loss's backward needs the labels: use softmax_xent_backward");
  }
  if (!l.has_reference_math()) throw_no_layer_math(l, "this kind is cost-model only (no reference math)");
  if constexpr (!kernels_compiled) {
    no_kernels("gpu_layer_backward");
  } else {
    namespace k = cuda_kernels;
    void* const s = native_stream;
    const std::size_t n_in = static_cast<std::size_t>(batch) * l.in_elems_per_sample;
    const float* x = in[0];
    float* gx = gin[0];
    switch (l.op) {
      case layer_kind::conv:
        if (gx != nullptr) k::conv_backward_input(conv_of(l, batch), gy, params, gx, s);
        if (gparams != nullptr) k::conv_backward_params(conv_of(l, batch), x, gy, gparams, s);
        return;
      case layer_kind::fc: {
        const std::size_t rows = rows_of(l, batch);
        if (gx != nullptr) {
          k::fc_backward_input(rows, l.in_channels, l.out_channels, gy, params, gx, s);
        }
        if (gparams != nullptr) {
          k::fc_backward_params(rows, l.in_channels, l.out_channels, l.bias, x, gy, gparams, s);
        }
        return;
      }
      case layer_kind::relu:
        if (gx != nullptr) k::relu_backward(n_in, y, gy, gx, s);
        return;
      case layer_kind::maxpool:
        if (gx != nullptr) k::maxpool_backward(pool_of(l, batch), x, gy, gx, s);
        return;
      case layer_kind::avgpool:
        if (gx != nullptr) k::avgpool_backward(pool_of(l, batch), gy, gx, s);
        return;
      case layer_kind::add:
        for (float* g : gin) {
          if (g != nullptr) k::accumulate(n_in, gy, g, s);
        }
        return;
      case layer_kind::batchnorm:
        k::batchnorm_backward(rows_of(l, batch), l.in_channels, x, gy, params, gx, gparams, s);
        return;
      case layer_kind::flatten:
        if (gx != nullptr) k::accumulate(n_in, gy, gx, s);
        return;
      case layer_kind::softmax_xent:
      case layer_kind::transformer:
      case layer_kind::embedding:
      case layer_kind::layernorm: break;
    }
    throw_no_layer_math(l, "this kind is cost-model only (no reference math)");
  }
}

void gpu_softmax_xent_forward(const layer_spec& l, int batch, const float* logits,
                              const int* labels, float* probs, float* loss,
                              void* native_stream) {
  check_loss_layer(l);
  check_layer_batch(l, batch);
  if constexpr (!kernels_compiled) {
    no_kernels("gpu_softmax_xent_forward");
  } else {
    const std::size_t rows = rows_of(l, batch);
    cuda_kernels::softmax_forward(rows, l.in_channels, logits, probs, native_stream);
    cuda_kernels::softmax_xent_loss(rows, l.in_channels, logits, labels, loss, native_stream);
  }
}

void gpu_softmax_xent_backward(const layer_spec& l, int batch, const float* probs,
                               const int* labels, float* grad_logits, void* native_stream) {
  check_loss_layer(l);
  check_layer_batch(l, batch);
  if constexpr (!kernels_compiled) {
    no_kernels("gpu_softmax_xent_backward");
  } else {
    if (grad_logits == nullptr) return;
    cuda_kernels::softmax_xent_backward(rows_of(l, batch), l.in_channels, probs, labels,
                                        grad_logits, native_stream);
  }
}

void gpu_sgd_update(float* params, const float* grads, std::size_t n, float lr,
                    void* native_stream) {
  if constexpr (!kernels_compiled) {
    no_kernels("gpu_sgd_update");
  } else {
    cuda_kernels::sgd_update(n, lr, params, grads, native_stream);
  }
}

void gpu_sgd_momentum_update(float* params, const float* grads, float* momentum, std::size_t n,
                             float lr, float mu, void* native_stream) {
  if constexpr (!kernels_compiled) {
    no_kernels("gpu_sgd_momentum_update");
  } else {
    cuda_kernels::sgd_momentum_update(n, lr, mu, params, grads, momentum, native_stream);
  }
}

void gpu_fill_zero(void* ptr, std::size_t bytes, void* native_stream) {
  if constexpr (!kernels_compiled) {
    no_kernels("gpu_fill_zero");
  } else {
    cuda_kernels::fill_zero(ptr, bytes, native_stream);
  }
}

}  // namespace gpuswap
