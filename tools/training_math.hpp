#pragma once
// training_math: the arithmetic of a training step (initialise, forward, loss, backward, SGD)
// as the workload runner asks for it, on whichever device it runs. The runner owns the memory,
// the swap engine, the schedule and the order of the work; a training_math turns each step into
// device work on the runner's compute stream. Three implementations, chosen once per run by
// make_training_math:
//   host_training_math (computes)  tools/reference_math as host functions, through
//                                  device::launch on the simulator's real backing (its memory is
//                                  host memory), with the modelled cost of each kernel;
//   host_training_math (modelled)  the same launches without functions: the simulator's phantom
//                                  backing, models without reference math, real_math off;
//   cuda_training_math             tools/gpu_math's kernels on the compute stream of a
//                                  cuda_device, whose memory the host cannot read: what the
//                                  runner reads (loss, kept gradients, parameters) is copied
//                                  device to host through pinned memory.
//
// Contract for every call: pointers are device memory (from the runner's caching allocator or
// the swap engine) acquired for the compute stream; each call only enqueues on that stream, in
// call order, and returns. `modelled` is the kernel the simulator should charge for the call
// (its cost and the buffers it touches); implementations on a real GPU ignore it.
//
// Call order (the runner's): prepare; init_layer for every layer with parameters; a device
// synchronize and on_synchronized; then per iteration load_batch, forward and backward steps
// (zero for each error signal), update, a device synchronize and on_synchronized; read only
// after an on_synchronized. Host staging an implementation uses for one phase is recycled at
// the on_synchronized that ends it.
//
// Host results: forward writes the loss to `*loss_out` and update copies gradients to
// `*keep_gradients`, both host memory owned by the caller, which are valid only once the device
// has completed all enqueued work and the runner has called on_synchronized(). The host
// implementation writes them from the kernel itself; the CUDA one at on_synchronized().
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "device/device.hpp"
#include "tools/model_spec.hpp"

namespace gpuswap {

class caching_allocator;
class pinned_host_pool;

enum class training_math_kind {
  modelled,       // costs only: nothing is computed
  host_reference, // reference_math as simulated kernels (host-addressable device memory)
  cuda_kernels,   // gpu_math on a CUDA device
};

// "modelled", "host_reference", "cuda_kernels": the JSON value of the demo's "math" key.
std::string_view to_string(training_math_kind kind) noexcept;
// One line for people: what computed the network.
std::string_view describe(training_math_kind kind) noexcept;

// What the simulator charges for one kernel; a real GPU ignores it. `touched` is read during the
// call only.
struct modelled_kernel {
  kernel_cost cost;
  std::span<const touched_buffer> touched;
};

class training_math {
 public:
  virtual ~training_math() = default;
  training_math(const training_math&) = delete;
  training_math& operator=(const training_math&) = delete;

  virtual training_math_kind kind() const noexcept = 0;
  // False for the modelled implementation: there are no losses, gradients or parameters to read.
  bool computes() const noexcept { return kind() != training_math_kind::modelled; }

  // Once, before anything else: allocates what the implementation keeps for the whole run (on
  // CUDA the labels and loss buffers, through the runner's caching allocator, so they count
  // against the budget, and pinned staging). Throws out_of_memory like the allocator.
  virtual void prepare() = 0;

  // The layer's parameters from init_params(layer, seed) and its gradients zeroed.
  virtual void init_layer(const layer_spec& layer, float* params, float* grads, std::uint64_t seed,
                          const modelled_kernel& modelled) = 0;
  // Zeroes `bytes` bytes (an error signal before backward adds into it).
  virtual void zero(void* ptr, std::size_t bytes, const modelled_kernel& modelled) = 0;
  // make_batch(model, batch, seed): the inputs into `pinned_inputs` (host memory, pinned: the
  // runner copies it to the input tensor) and the labels where the loss kernels read them.
  // Called at the start of an iteration, after the previous one synchronized.
  virtual void load_batch(std::uint64_t seed, float* pinned_inputs) = 0;

  // reference_math's layer_forward, or for the loss layer softmax_xent_forward with the batch's
  // labels, its loss going to *loss_out (host memory; see "Host results" above).
  virtual void forward(const layer_spec& layer, std::span<const float* const> inputs,
                       const float* params, float* out, float* loss_out,
                       const modelled_kernel& modelled) = 0;
  // reference_math's layer_backward, or for the loss layer softmax_xent_backward with the
  // batch's labels (out = the probabilities, grad_inputs[0] = the logits' error signal).
  virtual void backward(const layer_spec& layer, std::span<const float* const> inputs,
                        const float* out, const float* grad_out, const float* params,
                        std::span<float* const> grad_inputs, float* grad_params,
                        const modelled_kernel& modelled) = 0;
  // keep_gradients (may be null) receives the gradients as they are before the update; then
  // params -= lr * grads and the gradients are zeroed for the next step.
  virtual void update(const layer_spec& layer, float* params, float* grads, float lr,
                      std::vector<float>* keep_gradients, const modelled_kernel& modelled) = 0;

  // The runner synchronized the device: every host result enqueued so far is delivered.
  virtual void on_synchronized() = 0;
  // The `n` floats at device address `ptr`, read now (the device must be idle, after
  // on_synchronized). Only for implementations that compute.
  virtual std::vector<float> read(const float* ptr, std::size_t n) = 0;

 protected:
  training_math() = default;
};

// What make_training_math needs; everything outlives the training_math it makes.
struct training_math_context {
  device& dev;
  caching_allocator& alloc;
  pinned_host_pool& pool;
  stream_t stream;  // the runner's compute stream: every call enqueues here
  const model_spec& model;
  int batch = 0;
};

// The implementation for this device and model (Note [Choosing the training math] in
// training_math.cpp): host_reference on the simulator's real backing, cuda_kernels on a
// cuda_device when gpu_math_available(), modelled when `real_math` is false, when the model
// cannot be computed (no loss layer, a layer without reference math) or when neither applies;
// `why`, if given, receives the reason for a modelled choice. Allocates nothing (see prepare).
std::unique_ptr<training_math> make_training_math(const training_math_context& context,
                                                  bool real_math, std::string* why = nullptr);

}  // namespace gpuswap
