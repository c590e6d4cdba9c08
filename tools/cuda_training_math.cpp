#include "tools/cuda_training_math.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <exception>
#include <numeric>

#include "allocator/caching_allocator.hpp"
#include "allocator/pinned_host_pool.hpp"
#include "core/errors.hpp"
#include "core/logging.hpp"
#include "tools/gpu_math.hpp"
#include "tools/reference_math.hpp"

namespace gpuswap {

// Note [Host results on a GPU]
// The loss and the kept gradients are copied D2H on the compute stream right after the kernel
// that produces them (before the update kernels change the gradients), into pinned staging that
// nothing else writes until the runner's next synchronize; on_synchronized, called after it,
// moves them into the caller's host memory. So the runner reads no more than it did on the
// simulator and adds no synchronization of its own. Host inputs go the other way: init_params
// and the labels are written into pinned memory first and copied H2D in stream order; the
// pinned labels buffer is rewritten only by the next load_batch, after the iteration
// synchronized, and each layer's initial parameters have their own staging slot.

namespace {

std::size_t parameter_count(const model_spec& model) {
  return std::accumulate(model.layers.begin(), model.layers.end(), std::size_t{0},
                         [](std::size_t n, const layer_spec& l) { return n + l.param_elems; });
}

}  // namespace

cuda_training_math::cuda_training_math(const training_math_context& c)
    : dev_(c.dev),
      alloc_(c.alloc),
      pool_(c.pool),
      stream_(c.stream),
      native_(c.dev.native_stream(c.stream)),
      model_(c.model),
      batch_(c.batch),
      label_count_(c.model.labels_per_sample() * static_cast<std::size_t>(c.batch)),
      staging_floats_(parameter_count(c.model)) {}

cuda_training_math::~cuda_training_math() {
  alloc_.deallocate(labels_);
  alloc_.deallocate(loss_);
  pool_.deallocate(labels_pinned_);
  pool_.deallocate(loss_pinned_);
  pool_.deallocate(staging_);
}

void cuda_training_math::prepare() {
  labels_ = static_cast<int*>(alloc_.allocate(label_count_ * sizeof(int), stream_));
  loss_ = static_cast<float*>(alloc_.allocate(sizeof(float), stream_));
  labels_pinned_ = static_cast<int*>(pool_.allocate(label_count_ * sizeof(int)));
  loss_pinned_ = static_cast<float*>(pool_.allocate(sizeof(float)));
  staging_ = static_cast<float*>(pool_.allocate(staging_floats_ * sizeof(float)));
}

float* cuda_training_math::staging_slot(std::size_t n) {
  if (staging_used_ + n > staging_floats_) {
    throw_error(fmt::format("cuda_training_math: {} floats of staging asked with {} of {} in use (a read "
                            "before the device synchronized?)",
                            n, staging_used_, staging_floats_));
  }
  float* slot = staging_ + staging_used_;
  staging_used_ += n;
  return slot;
}

void cuda_training_math::init_layer(const layer_spec& layer, float* params, float* grads, std::uint64_t seed,
                                    const modelled_kernel& /*modelled*/) {
  const std::size_t n = layer.param_elems;
  float* host = staging_slot(n);
  init_params(layer, host, seed);
  dev_.copy_async(params, host, n * sizeof(float), copy_kind::host_to_device, stream_);
  gpu_fill_zero(grads, n * sizeof(float), native_);
}

void cuda_training_math::zero(void* ptr, std::size_t bytes, const modelled_kernel& /*modelled*/) {
  gpu_fill_zero(ptr, bytes, native_);
}

void cuda_training_math::load_batch(std::uint64_t seed, float* pinned_inputs) {
  make_batch(model_, batch_, seed, pinned_inputs, labels_pinned_);
  dev_.copy_async(labels_, labels_pinned_, label_count_ * sizeof(int), copy_kind::host_to_device, stream_);
}

void cuda_training_math::forward(const layer_spec& layer, std::span<const float* const> inputs,
                                 const float* params, float* out, float* loss_out,
                                 const modelled_kernel& /*modelled*/) {
  if (layer.op != layer_kind::softmax_xent) {
    gpu_layer_forward(layer, batch_, inputs, params, out, native_);
    return;
  }
  gpu_softmax_xent_forward(layer, batch_, inputs[0], labels_, out, loss_, native_);
  if (loss_out != nullptr) {
    dev_.copy_async(loss_pinned_, loss_, sizeof(float), copy_kind::device_to_host, stream_);
    loss_to_ = loss_out;
  }
}

void cuda_training_math::backward(const layer_spec& layer, std::span<const float* const> inputs,
                                  const float* out, const float* grad_out, const float* params,
                                  std::span<float* const> grad_inputs, float* grad_params,
                                  const modelled_kernel& /*modelled*/) {
  if (layer.op == layer_kind::softmax_xent) {
    gpu_softmax_xent_backward(layer, batch_, out, labels_, grad_inputs[0], native_);
  } else {
    gpu_layer_backward(layer, batch_, inputs, out, grad_out, params, grad_inputs, grad_params, native_);
  }
}

void cuda_training_math::update(const layer_spec& layer, float* params, float* grads, float lr,
                                std::vector<float>* keep_gradients, const modelled_kernel& /*modelled*/) {
  const std::size_t n = layer.param_elems;
  if (keep_gradients != nullptr) {
    float* host = staging_slot(n);
    dev_.copy_async(host, grads, n * sizeof(float), copy_kind::device_to_host, stream_);
    pending_.push_back({keep_gradients, host, n});
  }
  gpu_sgd_update(params, grads, n, lr, native_);
  gpu_fill_zero(grads, n * sizeof(float), native_);
}

void cuda_training_math::on_synchronized() {
  if (loss_to_ != nullptr) *loss_to_ = *loss_pinned_;
  loss_to_ = nullptr;
  for (const pending_read& r : pending_) r.to->assign(r.from, r.from + r.n);
  pending_.clear();
  staging_used_ = 0;
}

std::vector<float> cuda_training_math::read(const float* ptr, std::size_t n) {
  if (ptr == nullptr || n == 0) return {};
  // Parameters fit the staging; anything larger gets pinned memory of its own for the read.
  const bool own = n > staging_floats_ - std::min(staging_used_, staging_floats_);
  float* host = own ? static_cast<float*>(pool_.allocate(n * sizeof(float))) : staging_slot(n);
  std::vector<float> v;
  try {
    dev_.copy_async(host, ptr, n * sizeof(float), copy_kind::device_to_host, stream_);
    dev_.synchronize_stream(stream_);
    v.assign(host, host + n);
  } catch (...) {
    if (own) {
      // The copy may still be in flight: the buffer is reusable only after the stream's work.
      try {
        pool_.record_stream(host, stream_);
      } catch (const std::exception& e) {
        log().error("cuda_training_math: record_stream after a failed read: {}", e.what());
      }
      pool_.deallocate(host);
    }
    throw;
  }
  if (own) {
    pool_.deallocate(host);
  } else {
    staging_used_ -= n;
  }
  return v;
}

}  // namespace gpuswap
