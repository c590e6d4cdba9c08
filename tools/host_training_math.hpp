#pragma once
// host_training_math: tools/reference_math as host functions launched through device::launch,
// each with the modelled cost the simulator charges for it. On the simulator's real backing
// device memory is host memory, so the functions compute on it in stream order and write the
// loss and kept gradients straight into the caller's host memory from the kernel (see
// training_math.hpp, "Host results"). With `compute` false the same launches go without
// functions: the modelled costs alone (phantom backing, models without reference math), which
// is also what a cuda_device makes of them (it ignores costs and has nothing to run).
#include <cstdint>
#include <functional>
#include <vector>

#include "tools/training_math.hpp"

namespace gpuswap {

class host_training_math final : public training_math {
 public:
  // `dev`, `model` outlive this object; every launch goes to `stream`.
  host_training_math(device& dev, stream_t stream, const model_spec& model, int batch, bool compute);

  training_math_kind kind() const noexcept override;
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
  void on_synchronized() override {}
  std::vector<float> read(const float* ptr, std::size_t n) override;

 private:
  void launch(const modelled_kernel& modelled, std::function<void()> fn);

  device& dev_;
  const stream_t stream_;
  const model_spec& model_;
  const int batch_;
  const bool compute_;
  // The batch's labels in host memory, which the loss kernels read; written by load_batch while
  // no kernel runs (the previous iteration synchronized).
  std::vector<int> labels_;
};

}  // namespace gpuswap
