#pragma once
// cuda_training_math: the training step as tools/gpu_math's kernels on the native stream of the
// runner's compute stream on a cuda_device. Its memory is not host-addressable, so everything
// crossing between host and device is a copy on that stream through pinned staging:
//   in   parameters (init_params on the host, then H2D) and each batch's labels (H2D);
//   out  the loss (one float), the kept gradients and, on request, any buffer (D2H).
// See Note [Host results on a GPU] in the .cpp for when those copies are read.
//
// The labels and loss live in device memory from the runner's caching allocator, so they count
// against its budget like everything else the run holds. Pinned staging comes from the runner's
// pinned_host_pool, once, in prepare(): later steps allocate no new pinned memory.
#include <cstdint>
#include <vector>

#include "tools/training_math.hpp"

namespace gpuswap {

class cuda_training_math final : public training_math {
 public:
  // Everything in `context` outlives this object. Allocates nothing until prepare().
  explicit cuda_training_math(const training_math_context& context);
  // Gives back the labels, loss and staging buffers: the device must be idle (the runner
  // synchronizes before it destroys its training_math).
  ~cuda_training_math() override;

  training_math_kind kind() const noexcept override { return training_math_kind::cuda_kernels; }
  void prepare() override;
  void init_layer(const layer_spec& layer, float* params, float* grads, std::uint64_t seed,
                  const modelled_kernel& modelled) override;
  void zero(void* ptr, std::size_t bytes, const modelled_kernel& modelled) override;
  void load_batch(std::uint64_t seed, float* pinned_inputs) override;
  void forward(const layer_spec& layer, std::span<const float* const> inputs, const float* params,
               float* out, float* loss_out, const modelled_kernel& modelled) override;
  void backward(const layer_spec& layer, std::span<const float* const> inputs, const float* out,
                const float* grad_out, const float* params, std::span<float* const> grad_inputs,
                float* grad_params, const modelled_kernel& modelled) override;
  void update(const layer_spec& layer, float* params, float* grads, float lr,
              std::vector<float>* keep_gradients, const modelled_kernel& modelled) override;
  void on_synchronized() override;
  std::vector<float> read(const float* ptr, std::size_t n) override;

 private:
  // `n` floats of pinned staging no enqueued copy uses; reusable after on_synchronized.
  float* staging_slot(std::size_t n);

  struct pending_read {
    std::vector<float>* to;
    const float* from;  // pinned staging
    std::size_t n;
  };

  device& dev_;
  caching_allocator& alloc_;
  pinned_host_pool& pool_;
  const stream_t stream_;
  void* const native_;  // the cudaStream_t of stream_
  const model_spec& model_;
  const int batch_;
  const std::size_t label_count_;
  const std::size_t staging_floats_;  // every parameter of the model
  int* labels_ = nullptr;             // device
  float* loss_ = nullptr;             // device, one float
  int* labels_pinned_ = nullptr;
  float* loss_pinned_ = nullptr;
  float* staging_ = nullptr;          // pinned
  std::size_t staging_used_ = 0;      // floats handed out since the last on_synchronized
  float* loss_to_ = nullptr;          // where on_synchronized delivers the loss
  std::vector<pending_read> pending_;
};

}  // namespace gpuswap
