// gpu_math: the CUDA kernels against reference_math. With a GPU, every layer kind with real math
// runs forward and backward on small random shapes on both, and must agree within a tolerance
// (the largest difference at most `tolerance` times the largest magnitude of the CPU's result);
// running the same GPU computation again must give the same bits; and a whole demo_cnn training
// step (forward, loss, backward, sgd) must match reference_train_step. Without a GPU those
// tests are skipped with the reason, and the no-GPU tests check that the entry points fail with
// a gpuswap device error rather than crash. The argument checks run everywhere.
#include "tools/gpu_math.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/errors.hpp"
#include "device/device.hpp"
#include "device/device_factory.hpp"
#include "support/cuda_test_backend.hpp"
#include "tools/model_spec.hpp"
#include "tools/reference_math.hpp"

namespace gpuswap {
namespace {

// GPU against CPU, per layer: the kernels sum in reference_math's order with FMA contraction
// off, so most kinds should agree exactly; softmax's exp and log may differ in the last bit.
constexpr double tolerance = 1e-4;
// A whole training step: differences in the loss's last bits travel back through 34 layers.
constexpr double step_tolerance = 1e-3;

model_spec net(const std::string& input, const std::string& layers) {
  return model_spec::parse_text(
      R"({"name": "t", "input": )" + input + R"(, "layers": [)" + layers + "]}", "t.json");
}

std::vector<float> random_floats(std::size_t n, std::mt19937_64& gen, float lo = -1.0F,
                                 float hi = 1.0F) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

// Largest |gpu - cpu| over largest |cpu|; also counts bit-identical elements for the log.
struct comparison {
  double max_error = 0, max_magnitude = 0;
  std::size_t identical = 0, size = 0;
  double relative() const { return max_error / std::max(max_magnitude, 1e-30); }
};

comparison compare(const std::vector<float>& gpu, const std::vector<float>& cpu) {
  comparison c;
  c.size = cpu.size();
  for (std::size_t i = 0; i < cpu.size() && i < gpu.size(); ++i) {
    const double err = std::fabs(static_cast<double>(gpu[i]) - static_cast<double>(cpu[i]));
    c.max_error = std::isnan(err) ? err : std::max(c.max_error, err);  // a NaN sticks
    c.max_magnitude = std::max(c.max_magnitude, std::fabs(static_cast<double>(cpu[i])));
    if (std::memcmp(&gpu[i], &cpu[i], sizeof(float)) == 0) ++c.identical;
  }
  return c;
}

void expect_close(const std::vector<float>& gpu, const std::vector<float>& cpu, double tol,
                  const std::string& what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  const comparison c = compare(gpu, cpu);
  std::printf("[gpu_math] %-40s max relative error %.3g, %zu of %zu elements bit-identical\n",
              what.c_str(), c.relative(), c.identical, c.size);
  EXPECT_LE(c.relative(), tol) << what << ": max |gpu - cpu| " << c.max_error
                               << " against a largest |cpu| of " << c.max_magnitude;
}

void expect_same_bits(const std::vector<float>& a, const std::vector<float>& b,
                      const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0)
      << what << ": two GPU runs of the same computation differ";
}

// --- argument checks (no device needed: they come before anything is enqueued) ----------------

TEST(GpuMathArguments, RejectsWhatReferenceMathRejects) {
  const model_spec m = net("[4, 4, 3]",
                           R"({"name": "r", "kind": "relu"},
                              {"name": "a", "kind": "add", "inputs": ["r", "input"]},
                              {"name": "loss", "kind": "softmax_xent"})");
  const layer_spec& relu = m.layer("r");
  const layer_spec& add = m.layer("a");
  const layer_spec& loss = m.layer("loss");
  float dummy = 0;
  const float* one[] = {&dummy};
  float* grad_one[] = {&dummy};
  EXPECT_THROW(gpu_layer_forward(relu, 0, one, nullptr, &dummy, nullptr), config_error);
  EXPECT_THROW(gpu_layer_forward(add, 1, one, nullptr, &dummy, nullptr), config_error);
  EXPECT_THROW(gpu_layer_backward(add, 1, one, nullptr, &dummy, nullptr, grad_one, nullptr,
                                  nullptr),
               config_error);
  EXPECT_THROW(gpu_layer_backward(loss, 1, one, &dummy, &dummy, nullptr, grad_one, nullptr,
                                  nullptr),
               config_error);
  int label = 0;
  EXPECT_THROW(gpu_softmax_xent_forward(relu, 1, &dummy, &label, &dummy, &dummy, nullptr),
               config_error);
  EXPECT_THROW(gpu_softmax_xent_backward(relu, 1, &dummy, &label, &dummy, nullptr), config_error);
  EXPECT_THROW(gpu_softmax_xent_forward(loss, 0, &dummy, &label, &dummy, &dummy, nullptr),
               config_error);

  const model_spec t = model_spec::parse_text(
      R"({"name": "t", "input": [8, 16],
          "layers": [{"name": "blk", "kind": "transformer", "heads": 2}]})",
      "t.json");
  EXPECT_THROW(gpu_layer_forward(t.layer("blk"), 1, one, nullptr, &dummy, nullptr), config_error);
}

// --- without a GPU ---------------------------------------------------------------------------

class GpuMathWithoutGpu : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_available()) GTEST_SKIP() << "a CUDA device is present: the no-GPU checks do not apply";
  }
};

TEST_F(GpuMathWithoutGpu, IsNotAvailableAndSaysWhy) {
  std::string why;
  EXPECT_FALSE(gpu_math_available(&why));
  EXPECT_FALSE(why.empty());
  EXPECT_FALSE(gpu_math_available());
}

// Each entry point throws a gpuswap device error naming what failed (the kernel, or the missing
// kernels); twice, so that the first failure leaves nothing behind that changes the second. The
// pointers are host memory that no kernel ever reaches: the launch itself fails.
TEST_F(GpuMathWithoutGpu, EntryPointsFailWithADeviceError) {
  const model_spec m = net("[6, 6, 2]",
                           R"({"name": "c", "kind": "conv", "out_channels": 2, "kernel": 3},
                              {"name": "r", "kind": "relu"},
                              {"name": "p", "kind": "maxpool", "kernel": 2},
                              {"name": "f", "kind": "fc", "outputs": 3},
                              {"name": "loss", "kind": "softmax_xent"})");
  std::vector<float> host(4096, 0.0F);
  std::vector<int> labels(8, 0);
  float* p = host.data();
  const float* in[] = {p};
  float* grad_in[] = {p};
  const bool kernels = []() {
    std::string why;
    gpu_math_available(&why);
    return why.find("no CUDA kernels in this build") == std::string::npos;
  }();
  struct entry {
    std::string kernel;
    std::function<void()> call;
  };
  const std::vector<entry> entries = {
      {"conv_forward_kernel", [&] { gpu_layer_forward(m.layer("c"), 2, in, p, p, nullptr); }},
      {"conv_backward_input_kernel",
       [&] { gpu_layer_backward(m.layer("c"), 2, in, p, p, p, grad_in, p, nullptr); }},
      {"relu_forward_kernel", [&] { gpu_layer_forward(m.layer("r"), 2, in, nullptr, p, nullptr); }},
      {"maxpool_backward_kernel",
       [&] { gpu_layer_backward(m.layer("p"), 2, in, p, p, nullptr, grad_in, nullptr, nullptr); }},
      {"fc_forward_kernel", [&] { gpu_layer_forward(m.layer("f"), 2, in, p, p, nullptr); }},
      {"softmax_forward_kernel",
       [&] { gpu_softmax_xent_forward(m.layer("loss"), 2, p, labels.data(), p, p, nullptr); }},
      {"softmax_xent_backward_kernel",
       [&] { gpu_softmax_xent_backward(m.layer("loss"), 2, p, labels.data(), p, nullptr); }},
      {"sgd_kernel", [&] { gpu_sgd_update(p, p, 16, 0.1F, nullptr); }},
      {"sgd_momentum_kernel", [&] { gpu_sgd_momentum_update(p, p, p, 16, 0.1F, 0.9F, nullptr); }},
      {"cudaMemsetAsync", [&] { gpu_fill_zero(p, 64, nullptr); }},
  };
  for (int attempt = 0; attempt < 2; ++attempt) {
    for (const entry& e : entries) {
      SCOPED_TRACE(e.kernel);
      try {
        e.call();
        ADD_FAILURE() << "no exception without a CUDA device";
      } catch (const no_cuda_device& ex) {
        const std::string what = ex.what();
        if (kernels) {
          EXPECT_NE(what.find(e.kernel), std::string::npos) << what;
          EXPECT_EQ(ex.error_name().rfind("cudaError", 0), 0U) << ex.error_name();
        } else {
          EXPECT_NE(what.find("no CUDA kernels in this build"), std::string::npos) << what;
        }
      } catch (const std::exception& ex) {
        ADD_FAILURE() << "expected no_cuda_device, got: " << ex.what();
      }
    }
  }
  // Nothing was written through the host pointers.
  EXPECT_TRUE(std::all_of(host.begin(), host.end(), [](float v) { return v == 0.0F; }));
}

// --- with a GPU --------------------------------------------------------------------------------

class GpuMath : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!gpu_math_available(&why)) GTEST_SKIP() << "no GPU math here (" << why << ")";
    dev_ = testing_support::cuda_test_backend::make(&why);
    if (dev_ == nullptr) GTEST_SKIP() << "no CUDA device here (" << why << ")";
    stream_ = dev_->create_stream(stream_priority::normal);
    native_ = dev_->native_stream(stream_);
  }

  void TearDown() override {
    if (dev_ == nullptr) return;
    dev_->synchronize();
    for (void* p : owned_) dev_->free_device(p);
    dev_->destroy_stream(stream_);
  }

  template <typename T>
  T* upload(const std::vector<T>& v) {
    void* p = dev_->allocate_device(std::max<std::size_t>(v.size() * sizeof(T), sizeof(T)));
    if (p == nullptr) throw std::bad_alloc();
    owned_.push_back(p);
    if (!v.empty()) {
      dev_->copy_async(p, v.data(), v.size() * sizeof(T), copy_kind::host_to_device, stream_);
    }
    dev_->synchronize_stream(stream_);  // v may go away
    return static_cast<T*>(p);
  }

  float* zeros(std::size_t n) { return upload(std::vector<float>(n, 0.0F)); }

  std::vector<float> download(const float* p, std::size_t n) {
    std::vector<float> v(n);
    if (n > 0) dev_->copy_async(v.data(), p, n * sizeof(float), copy_kind::device_to_host, stream_);
    dev_->synchronize_stream(stream_);
    return v;
  }

  // Forward and backward of `name` on the CPU and twice on the GPU. Gradients start from random
  // values, so that accumulation (+=) is checked, not just the contribution.
  void check_layer(const model_spec& m, const std::string& name, int batch,
                   bool input_grads = true, std::uint64_t seed = 7) {
    const layer_spec& l = m.layer(name);
    const std::string tag = name + " (" + l.kind + ")";
    SCOPED_TRACE(tag);
    std::mt19937_64 gen(seed);
    const std::size_t n_in = static_cast<std::size_t>(batch) * l.in_elems_per_sample;
    const std::size_t n_out = static_cast<std::size_t>(batch) * l.out_elems_per_sample;
    std::vector<std::vector<float>> x;
    for (std::size_t k = 0; k < l.inputs.size(); ++k) x.push_back(random_floats(n_in, gen));
    const std::vector<float> params = random_floats(l.param_elems, gen);
    const std::vector<float> gy = random_floats(n_out, gen);
    std::vector<std::vector<float>> gx0;
    for (std::size_t k = 0; k < l.inputs.size(); ++k) gx0.push_back(random_floats(n_in, gen));
    const std::vector<float> gp0 = random_floats(l.param_elems, gen);

    // CPU.
    std::vector<const float*> x_cpu;
    for (const auto& v : x) x_cpu.push_back(v.data());
    const float* p_cpu = params.empty() ? nullptr : params.data();
    std::vector<float> y_cpu(n_out);
    layer_forward(l, batch, x_cpu, p_cpu, y_cpu.data());
    std::vector<std::vector<float>> gx_cpu = gx0;
    std::vector<float*> gx_cpu_ptrs;
    for (auto& v : gx_cpu) gx_cpu_ptrs.push_back(input_grads ? v.data() : nullptr);
    std::vector<float> gp_cpu = gp0;
    layer_backward(l, batch, x_cpu, y_cpu.data(), gy.data(), p_cpu, gx_cpu_ptrs,
                   gp_cpu.empty() ? nullptr : gp_cpu.data());

    struct run {
      std::vector<float> y, gp;
      std::vector<std::vector<float>> gx;
    };
    const auto gpu_run = [&]() {
      std::vector<const float*> x_dev;
      for (const auto& v : x) x_dev.push_back(upload(v));
      const float* p_dev = params.empty() ? nullptr : upload(params);
      float* y_dev = zeros(n_out);
      gpu_layer_forward(l, batch, x_dev, p_dev, y_dev, native_);
      std::vector<float*> gx_dev;
      for (const auto& v : gx0) gx_dev.push_back(input_grads ? upload(v) : nullptr);
      float* gp_dev = gp0.empty() ? nullptr : upload(gp0);
      gpu_layer_backward(l, batch, x_dev, y_dev, upload(gy), p_dev, gx_dev, gp_dev, native_);
      run r;
      r.y = download(y_dev, n_out);
      for (float* g : gx_dev) r.gx.push_back(g == nullptr ? std::vector<float>() : download(g, n_in));
      if (gp_dev != nullptr) r.gp = download(gp_dev, l.param_elems);
      return r;
    };
    const run first = gpu_run();
    const run second = gpu_run();

    expect_close(first.y, y_cpu, tolerance, tag + " forward");
    expect_same_bits(first.y, second.y, tag + " forward");
    for (std::size_t k = 0; k < l.inputs.size(); ++k) {
      const std::string what = tag + " grad input " + std::to_string(k);
      if (!input_grads) {
        EXPECT_TRUE(first.gx[k].empty());
        continue;
      }
      expect_close(first.gx[k], gx_cpu[k], tolerance, what);
      expect_same_bits(first.gx[k], second.gx[k], what);
    }
    if (l.param_elems > 0) {
      expect_close(first.gp, gp_cpu, tolerance, tag + " grad params");
      expect_same_bits(first.gp, second.gp, tag + " grad params");
    }
  }

  std::unique_ptr<device> dev_;
  stream_t stream_{};
  void* native_ = nullptr;
  std::vector<void*> owned_;
};

TEST_F(GpuMath, Conv) {
  const std::string input = "[7, 9, 3]";
  check_layer(net(input, R"({"name": "k3s1p1", "kind": "conv", "out_channels": 8, "kernel": 3,
                             "stride": 1, "pad": 1})"),
              "k3s1p1", 3);
  check_layer(net(input, R"({"name": "k3s2p0_nobias", "kind": "conv", "out_channels": 5,
                             "kernel": 3, "stride": 2, "bias": false})"),
              "k3s2p0_nobias", 3);
  check_layer(net(input, R"({"name": "k1", "kind": "conv", "out_channels": 4, "kernel": 1})"),
              "k1", 3);
  check_layer(net(input, R"({"name": "k5s2p2", "kind": "conv", "out_channels": 6, "kernel": 5,
                             "stride": 2, "pad": 2})"),
              "k5s2p2", 3);
  // Stride above the kernel: some inputs lie in no window and get a zero contribution.
  check_layer(net(input, R"({"name": "k2s3", "kind": "conv", "out_channels": 3, "kernel": 2,
                             "stride": 3})"),
              "k2s3", 3);
  // Parameter gradients only.
  check_layer(net(input, R"({"name": "k3", "kind": "conv", "out_channels": 4, "kernel": 3,
                             "pad": 1})"),
              "k3", 2, /*input_grads=*/false);
}

TEST_F(GpuMath, Fc) {
  check_layer(net("[3, 4, 5]", R"({"name": "flat", "kind": "fc", "outputs": 7})"), "flat", 4);
  check_layer(net("[3, 4, 5]", R"({"name": "nobias", "kind": "fc", "outputs": 6, "bias": false})"),
              "nobias", 3);
  check_layer(net("[6, 10]", R"({"name": "per_position", "kind": "fc", "outputs": 3,
                                 "per_position": true})"),
              "per_position", 2);
}

TEST_F(GpuMath, ReluAddFlatten) {
  check_layer(net("[5, 6, 3]", R"({"name": "relu", "kind": "relu"})"), "relu", 3);
  check_layer(net("[5, 6, 3]", R"({"name": "flatten", "kind": "flatten"})"), "flatten", 3);
  check_layer(net("[5, 6, 3]", R"({"name": "r1", "kind": "relu"},
                                  {"name": "r2", "kind": "relu", "inputs": ["input"]},
                                  {"name": "add3", "kind": "add", "inputs": ["r1", "r2", "input"]})"),
              "add3", 3);
  // More inputs than one launch takes (the sum is chunked, still left to right).
  std::string layers;
  std::string names;
  for (int i = 0; i < 11; ++i) {
    layers += R"({"name": "r)" + std::to_string(i) + R"(", "kind": "relu", "inputs": ["input"]},)";
    names += (i > 0 ? ", " : "") + std::string("\"r") + std::to_string(i) + "\"";
  }
  const model_spec wide =
      net("[4, 4, 2]", layers + R"({"name": "add11", "kind": "add", "inputs": [)" + names + "]}");
  check_layer(wide, "add11", 2);
}

TEST_F(GpuMath, Pools) {
  for (const char* kind : {"maxpool", "avgpool"}) {
    const std::string k = std::string(R"("kind": ")") + kind + R"(")";
    check_layer(net("[7, 7, 3]", R"({"name": "k2", )" + k + R"(, "kernel": 2})"), "k2", 3);
    check_layer(net("[7, 7, 3]", R"({"name": "k3s2p1", )" + k + R"(, "kernel": 3, "stride": 2,
                                     "pad": 1})"),
                "k3s2p1", 3);
    check_layer(net("[7, 6, 3]", R"({"name": "k3s1", )" + k + R"(, "kernel": 3, "stride": 1})"),
                "k3s1", 3);
    check_layer(net("[5, 4, 3]", R"({"name": "global", )" + k + R"(, "global": true})"), "global",
                3);
  }
}

TEST_F(GpuMath, Batchnorm) {
  const model_spec image = net("[4, 5, 6]", R"({"name": "bn", "kind": "batchnorm"})");
  check_layer(image, "bn", 3);
  check_layer(image, "bn", 2, /*input_grads=*/false);
  const model_spec flat = net("[12]", R"({"name": "bn", "kind": "batchnorm"})");
  check_layer(flat, "bn", 5);
}

TEST_F(GpuMath, SoftmaxCrossEntropy) {
  for (const auto& [input, batch] : {std::pair<std::string, int>{"[10]", 6}, {"[5, 7]", 3}}) {
    const model_spec m = net(input, R"({"name": "loss", "kind": "softmax_xent"})");
    const layer_spec& l = m.layer("loss");
    SCOPED_TRACE(input);
    const std::size_t rows = static_cast<std::size_t>(batch) * l.rows;
    const std::size_t n = rows * l.in_channels;
    std::mt19937_64 gen(11);
    const std::vector<float> logits = random_floats(n, gen, -4.0F, 4.0F);
    std::vector<int> labels(rows);
    for (auto& v : labels) v = static_cast<int>(gen() % static_cast<std::uint64_t>(l.in_channels));
    const std::vector<float> g0 = random_floats(n, gen);

    std::vector<float> probs_cpu(n);
    const float loss_cpu = softmax_xent_forward(l, batch, logits.data(), labels.data(),
                                                probs_cpu.data());
    std::vector<float> g_cpu = g0;
    softmax_xent_backward(l, batch, probs_cpu.data(), labels.data(), g_cpu.data());

    std::vector<float> first_probs, first_grad;
    float first_loss = 0;
    for (int run = 0; run < 2; ++run) {
      const float* logits_dev = upload(logits);
      const int* labels_dev = upload(labels);
      float* probs_dev = zeros(n);
      float* loss_dev = zeros(1);
      gpu_softmax_xent_forward(l, batch, logits_dev, labels_dev, probs_dev, loss_dev, native_);
      float* g_dev = upload(g0);
      gpu_softmax_xent_backward(l, batch, probs_dev, labels_dev, g_dev, native_);
      // layer_forward on the loss writes the probabilities alone.
      float* probs2_dev = zeros(n);
      const float* in[] = {logits_dev};
      gpu_layer_forward(l, batch, in, nullptr, probs2_dev, native_);
      const std::vector<float> probs = download(probs_dev, n);
      const std::vector<float> grad = download(g_dev, n);
      const float loss = download(loss_dev, 1)[0];
      expect_same_bits(download(probs2_dev, n), probs, "layer_forward's probabilities");
      if (run == 0) {
        expect_close(probs, probs_cpu, tolerance, "softmax probabilities " + input);
        expect_close(grad, g_cpu, tolerance, "softmax_xent backward " + input);
        expect_close({loss}, {loss_cpu}, tolerance, "softmax_xent loss " + input);
        first_probs = probs;
        first_grad = grad;
        first_loss = loss;
      } else {
        expect_same_bits(probs, first_probs, "probabilities");
        expect_same_bits(grad, first_grad, "softmax_xent backward");
        expect_same_bits({loss}, {first_loss}, "loss");
      }
    }
  }
}

// A label outside the classes cannot throw from a kernel: the loss and its row's gradient are
// NaN, the other rows' gradients are not.
TEST_F(GpuMath, BadLabelGivesNaN) {
  const model_spec m = net("[4]", R"({"name": "loss", "kind": "softmax_xent"})");
  const layer_spec& l = m.layer("loss");
  const std::vector<float> logits = {1, 2, 3, 4, 4, 3, 2, 1};
  const int* labels = upload(std::vector<int>{1, 9});
  float* probs = zeros(8);
  float* loss = zeros(1);
  float* grad = zeros(8);
  const float* logits_dev = upload(logits);
  gpu_softmax_xent_forward(l, 2, logits_dev, labels, probs, loss, native_);
  gpu_softmax_xent_backward(l, 2, probs, labels, grad, native_);
  EXPECT_TRUE(std::isnan(download(loss, 1)[0]));
  const std::vector<float> g = download(grad, 8);
  for (int j = 0; j < 4; ++j) EXPECT_FALSE(std::isnan(g[j])) << j;
  for (int j = 4; j < 8; ++j) EXPECT_TRUE(std::isnan(g[j])) << j;
}

TEST_F(GpuMath, Sgd) {
  std::mt19937_64 gen(3);
  const std::size_t n = 1000;
  const std::vector<float> p0 = random_floats(n, gen), g = random_floats(n, gen),
                           m0 = random_floats(n, gen);
  std::vector<float> p_cpu = p0, pm_cpu = p0, m_cpu = m0;
  sgd_update(p_cpu.data(), g.data(), n, 0.05F);
  sgd_momentum_update(pm_cpu.data(), g.data(), m_cpu.data(), n, 0.05F, 0.9F);

  float* p_dev = upload(p0);
  float* pm_dev = upload(p0);
  float* m_dev = upload(m0);
  const float* g_dev = upload(g);
  gpu_sgd_update(p_dev, g_dev, n, 0.05F, native_);
  gpu_sgd_momentum_update(pm_dev, g_dev, m_dev, n, 0.05F, 0.9F, native_);
  expect_close(download(p_dev, n), p_cpu, tolerance, "sgd");
  expect_close(download(pm_dev, n), pm_cpu, tolerance, "sgd momentum: params");
  expect_close(download(m_dev, n), m_cpu, tolerance, "sgd momentum: momentum");

  float* z = upload(p0);
  gpu_fill_zero(z, n * sizeof(float), native_);
  EXPECT_EQ(download(z, n), std::vector<float>(n, 0.0F));
}

// The demo's network: one training step through gpu_math in reference_train_step's order
// (forward in layer order, backward in reverse into zeroed gradients), then sgd.
TEST_F(GpuMath, DemoCnnTrainingStep) {
  const model_spec m = model_spec::load_named("demo_cnn");
  constexpr int batch = 4;
  constexpr std::uint64_t seed = 5;
  constexpr float lr = 0.05F;
  const std::vector<std::vector<float>> params = init_model_params(m, seed);
  std::vector<float> inputs(static_cast<std::size_t>(batch) * m.input_elems_per_sample());
  std::vector<int> labels(static_cast<std::size_t>(batch) * m.labels_per_sample());
  make_batch(m, batch, seed, inputs.data(), labels.data());
  std::vector<std::vector<float>> grads_cpu;
  const float loss_cpu = reference_train_step(m, batch, params, inputs.data(), labels.data(),
                                              grads_cpu);
  std::vector<std::vector<float>> updated_cpu = params;
  for (std::size_t i = 0; i < params.size(); ++i) {
    sgd_update(updated_cpu[i].data(), grads_cpu[i].data(), params[i].size(), lr);
  }

  struct step {
    float loss = 0;
    std::vector<std::vector<float>> grads, updated;
  };
  const auto gpu_step = [&]() {
    const std::size_t n_layers = m.layers.size();
    std::vector<float*> p(n_layers, nullptr), g(n_layers, nullptr), out(n_layers), gout(n_layers);
    for (const layer_spec& l : m.layers) {
      const auto i = static_cast<std::size_t>(l.index);
      if (l.param_elems > 0) {
        p[i] = upload(params[i]);
        g[i] = upload(std::vector<float>(l.param_elems, 1.0F));
        gpu_fill_zero(g[i], l.param_elems * sizeof(float), native_);
      }
      const std::size_t n = static_cast<std::size_t>(batch) * l.out_elems_per_sample;
      out[i] = upload(std::vector<float>(n, 0.0F));
      gout[i] = upload(std::vector<float>(n, 0.0F));
    }
    const float* x = upload(inputs);
    const int* labels_dev = upload(labels);
    float* loss_dev = zeros(1);
    const auto tensor = [&](int producer) -> const float* {
      return producer < 0 ? x : out[static_cast<std::size_t>(producer)];
    };
    std::vector<const float*> in;
    for (const layer_spec& l : m.layers) {
      const auto i = static_cast<std::size_t>(l.index);
      in.clear();
      for (int q : l.inputs) in.push_back(tensor(q));
      if (l.op == layer_kind::softmax_xent) {
        gpu_softmax_xent_forward(l, batch, in[0], labels_dev, out[i], loss_dev, native_);
      } else {
        gpu_layer_forward(l, batch, in, p[i], out[i], native_);
      }
    }
    std::vector<float*> gin;
    for (auto it = m.layers.rbegin(); it != m.layers.rend(); ++it) {
      const layer_spec& l = *it;
      const auto i = static_cast<std::size_t>(l.index);
      in.clear();
      gin.clear();
      for (int q : l.inputs) {
        in.push_back(tensor(q));
        gin.push_back(q < 0 ? nullptr : gout[static_cast<std::size_t>(q)]);
      }
      if (l.op == layer_kind::softmax_xent) {
        gpu_softmax_xent_backward(l, batch, out[i], labels_dev, gin[0], native_);
      } else {
        gpu_layer_backward(l, batch, in, out[i], gout[i], p[i], gin, g[i], native_);
      }
    }
    step s;
    s.loss = download(loss_dev, 1)[0];
    for (const layer_spec& l : m.layers) {
      const auto i = static_cast<std::size_t>(l.index);
      s.grads.push_back(g[i] == nullptr ? std::vector<float>() : download(g[i], l.param_elems));
      if (p[i] != nullptr) gpu_sgd_update(p[i], g[i], l.param_elems, lr, native_);
      s.updated.push_back(p[i] == nullptr ? std::vector<float>() : download(p[i], l.param_elems));
    }
    return s;
  };
  const step first = gpu_step();
  const step second = gpu_step();

  ASSERT_TRUE(std::isfinite(loss_cpu));
  expect_close({first.loss}, {loss_cpu}, step_tolerance, "demo_cnn loss");
  expect_same_bits({first.loss}, {second.loss}, "demo_cnn loss");
  for (const layer_spec& l : m.layers) {
    if (l.param_elems == 0) continue;
    const auto i = static_cast<std::size_t>(l.index);
    expect_close(first.grads[i], grads_cpu[i], step_tolerance, "demo_cnn grad " + l.name);
    expect_same_bits(first.grads[i], second.grads[i], "demo_cnn grad " + l.name);
    expect_close(first.updated[i], updated_cpu[i], tolerance, "demo_cnn sgd " + l.name);
    expect_same_bits(first.updated[i], second.updated[i], "demo_cnn sgd " + l.name);
  }
}

}  // namespace
}  // namespace gpuswap
