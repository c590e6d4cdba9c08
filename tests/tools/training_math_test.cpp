// training_math: which implementation make_training_math picks for a device and model, and that
// a whole training step driven through the interface (init, batch, forward, loss, backward into
// zeroed error signals, update) gives reference_train_step's numbers. On the simulator's real
// backing the host implementation must match bit for bit (it runs reference_math itself); on a
// GPU the CUDA implementation must match within rounding and repeat bit for bit, and is skipped,
// visibly, without one.
#include "tools/training_math.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "allocator/caching_allocator.hpp"
#include "allocator/pinned_host_pool.hpp"
#include "device/sim_device.hpp"
#include "support/cuda_test_backend.hpp"
#include "tools/gpu_math.hpp"
#include "tools/model_spec.hpp"
#include "tools/reference_math.hpp"

namespace gpuswap {
namespace {

constexpr std::size_t mib = std::size_t{1} << 20;
constexpr std::uint64_t init_seed = 3;
constexpr std::uint64_t batch_seed = 3017;
constexpr float lr = 0.05F;

sim_options small_device(sim_backing backing) {
  sim_options o = sim_preset("titan-x-pcie3");
  o.backing = backing;
  o.device_capacity = 256 * mib;
  o.host_capacity = 1024 * mib;
  return o;
}

// What the runner gives a training_math, on one device.
struct rig {
  explicit rig(device& d)
      : dev(d),
        alloc(d, caching_allocator_options{}),
        pool(d, pinned_host_pool_options{}),
        stream(d.create_stream(stream_priority::normal)) {}
  ~rig() {
    dev.synchronize();
    math.reset();
    for (void* p : owned) alloc.deallocate(p);
    pool.deallocate(pinned);
    dev.destroy_stream(stream);
  }
  rig(const rig&) = delete;
  rig& operator=(const rig&) = delete;

  std::unique_ptr<training_math> make(const model_spec& m, int batch, bool real_math = true,
                                      std::string* why = nullptr) {
    return make_training_math({dev, alloc, pool, stream, m, batch}, real_math, why);
  }

  float* buffer(std::size_t floats) {
    void* p = alloc.allocate(floats * sizeof(float), stream);
    owned.push_back(p);
    return static_cast<float*>(p);
  }

  device& dev;
  caching_allocator alloc;
  pinned_host_pool pool;
  stream_t stream;
  std::unique_ptr<training_math> math;
  std::vector<void*> owned;
  void* pinned = nullptr;
};

struct step_result {
  float loss = std::nanf("");
  std::vector<std::vector<float>> grads;    // per layer, as kept by update
  std::vector<std::vector<float>> updated;  // per layer, read after the update
};

// One training step through `r.math`, in reference_train_step's order.
step_result train_one_step(rig& r, const model_spec& m, int batch) {
  training_math& math = *r.math;
  const modelled_kernel none{};
  math.prepare();
  const std::size_t n_layers = m.layers.size();
  std::vector<float*> params(n_layers, nullptr), grads(n_layers, nullptr), outs(n_layers), errors(n_layers);
  for (const layer_spec& l : m.layers) {
    const auto i = static_cast<std::size_t>(l.index);
    if (l.param_elems > 0) {
      params[i] = r.buffer(l.param_elems);
      grads[i] = r.buffer(l.param_elems);
      math.init_layer(l, params[i], grads[i], init_seed, none);
    }
    const std::size_t n = static_cast<std::size_t>(batch) * l.out_elems_per_sample;
    outs[i] = r.buffer(n);
    errors[i] = r.buffer(n);
    math.zero(errors[i], n * sizeof(float), none);
  }
  r.dev.synchronize();  // as the runner's setup does (training_math.hpp, "Call order")
  math.on_synchronized();
  const std::size_t input_bytes = static_cast<std::size_t>(batch) * m.input_elems_per_sample() * sizeof(float);
  r.pinned = r.pool.allocate(input_bytes);
  float* x = r.buffer(input_bytes / sizeof(float));
  math.load_batch(batch_seed, static_cast<float*>(r.pinned));
  r.dev.copy_async(x, r.pinned, input_bytes, copy_kind::host_to_device, r.stream);

  const auto tensor = [&](int producer) -> const float* {
    return producer < 0 ? x : outs[static_cast<std::size_t>(producer)];
  };
  step_result s;
  std::vector<const float*> in;
  for (const layer_spec& l : m.layers) {
    const auto i = static_cast<std::size_t>(l.index);
    in.clear();
    for (int q : l.inputs) in.push_back(tensor(q));
    math.forward(l, in, params[i], outs[i], l.op == layer_kind::softmax_xent ? &s.loss : nullptr, none);
  }
  std::vector<float*> gin;
  for (auto it = m.layers.rbegin(); it != m.layers.rend(); ++it) {
    const layer_spec& l = *it;
    const auto i = static_cast<std::size_t>(l.index);
    in.clear();
    gin.clear();
    for (int q : l.inputs) {
      in.push_back(tensor(q));
      gin.push_back(q < 0 ? nullptr : errors[static_cast<std::size_t>(q)]);
    }
    math.backward(l, in, outs[i], errors[i], params[i], gin, grads[i], none);
  }
  s.grads.assign(n_layers, {});
  for (const layer_spec& l : m.layers) {
    const auto i = static_cast<std::size_t>(l.index);
    if (params[i] != nullptr) math.update(l, params[i], grads[i], lr, &s.grads[i], none);
  }
  r.dev.synchronize();
  math.on_synchronized();
  for (const layer_spec& l : m.layers) {
    const auto i = static_cast<std::size_t>(l.index);
    s.updated.push_back(params[i] == nullptr ? std::vector<float>() : math.read(params[i], l.param_elems));
  }
  return s;
}

struct reference_step {
  float loss = 0;
  std::vector<std::vector<float>> grads, updated;
};

reference_step reference(const model_spec& m, int batch) {
  reference_step r;
  r.updated = init_model_params(m, init_seed);
  std::vector<float> x(static_cast<std::size_t>(batch) * m.input_elems_per_sample());
  std::vector<int> labels(static_cast<std::size_t>(batch) * m.labels_per_sample());
  make_batch(m, batch, batch_seed, x.data(), labels.data());
  r.loss = reference_train_step(m, batch, r.updated, x.data(), labels.data(), r.grads);
  for (std::size_t i = 0; i < r.updated.size(); ++i) {
    sgd_update(r.updated[i].data(), r.grads[i].data(), r.updated[i].size(), lr);
  }
  return r;
}

testing::AssertionResult same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return testing::AssertionFailure() << "sizes " << a.size() << " vs " << b.size();
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) {
      return testing::AssertionFailure() << "element " << i << ": " << a[i] << " vs " << b[i];
    }
  }
  return testing::AssertionSuccess();
}

// Largest |a - b| over the largest |b|.
double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  double err = 0, mag = 0;
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) {
    const double d = std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i]));
    err = std::isnan(d) ? d : std::max(err, d);
    mag = std::max(mag, std::fabs(static_cast<double>(b[i])));
  }
  return err / std::max(mag, 1e-30);
}

model_spec net(const std::string& input, const std::string& layers) {
  return model_spec::parse_text(R"({"name": "t", "input": )" + input + R"(, "layers": [)" + layers + "]}",
                                "t.json");
}

// --- the choice -----------------------------------------------------------------------------

TEST(TrainingMathChoice, RealBackingComputesWithTheHostReference) {
  sim_device dev(small_device(sim_backing::real));
  rig r(dev);
  std::string why = "untouched";
  const auto math = r.make(model_spec::load_named("demo_cnn"), 4, true, &why);
  EXPECT_EQ(math->kind(), training_math_kind::host_reference);
  EXPECT_TRUE(math->computes());
  EXPECT_EQ(why, "untouched");
}

TEST(TrainingMathChoice, EverythingElseIsModelledAndSaysWhy) {
  const model_spec demo = model_spec::load_named("demo_cnn");
  struct modelled_case {
    std::string name;
    sim_backing backing;
    model_spec model;
    bool real_math;
    std::string reason;
  };
  const std::vector<modelled_case> cases = {
      {"phantom backing", sim_backing::phantom, demo, true, "phantom"},
      {"real math off", sim_backing::real, demo, false, "real math is off"},
      {"no loss", sim_backing::real, net("[4, 4, 3]", R"({"name": "r", "kind": "relu"})"), true, "no softmax_xent"},
      {"cost model only", sim_backing::real,
       net("[8, 16]", R"({"name": "blk", "kind": "transformer", "heads": 2},
                         {"name": "loss", "kind": "softmax_xent"})"),
       true, "blk"},
  };
  for (const modelled_case& c : cases) {
    SCOPED_TRACE(c.name);
    sim_device dev(small_device(c.backing));
    rig r(dev);
    std::string why;
    const auto math = r.make(c.model, 2, c.real_math, &why);
    EXPECT_EQ(math->kind(), training_math_kind::modelled);
    EXPECT_FALSE(math->computes());
    EXPECT_NE(why.find(c.reason), std::string::npos) << why;
  }
}

TEST(TrainingMathChoice, KindsHaveNames) {
  EXPECT_EQ(to_string(training_math_kind::modelled), "modelled");
  EXPECT_EQ(to_string(training_math_kind::host_reference), "host_reference");
  EXPECT_EQ(to_string(training_math_kind::cuda_kernels), "cuda_kernels");
  for (auto k : {training_math_kind::modelled, training_math_kind::host_reference, training_math_kind::cuda_kernels}) {
    EXPECT_FALSE(describe(k).empty());
  }
}

// --- the host implementation against reference_train_step, bit for bit -------------------------

class TrainingMathHost : public testing::TestWithParam<const char*> {};

TEST_P(TrainingMathHost, OneStepIsReferenceTrainStepBitForBit) {
  const model_spec m = model_spec::load_named(GetParam());
  const int batch = 4;
  const reference_step want = reference(m, batch);
  sim_device dev(small_device(sim_backing::real));
  rig r(dev);
  r.math = r.make(m, batch);
  ASSERT_EQ(r.math->kind(), training_math_kind::host_reference);
  const step_result got = train_one_step(r, m, batch);

  ASSERT_TRUE(std::isfinite(want.loss) && want.loss > 0) << want.loss;
  EXPECT_TRUE(same_bits({got.loss}, {want.loss})) << "loss";
  int with_params = 0;
  for (const layer_spec& l : m.layers) {
    const auto i = static_cast<std::size_t>(l.index);
    SCOPED_TRACE(l.name);
    EXPECT_TRUE(same_bits(got.grads[i], want.grads[i])) << "gradients";
    EXPECT_TRUE(same_bits(got.updated[i], want.updated[i])) << "updated parameters";
    if (l.param_elems > 0) ++with_params;
  }
  EXPECT_GT(with_params, 0);
}

INSTANTIATE_TEST_SUITE_P(models, TrainingMathHost, testing::Values("tiny_cnn", "tiny_resnet", "demo_cnn"),
                         [](const testing::TestParamInfo<const char*>& i) { return std::string(i.param); });

// The modelled implementation makes the same launches without functions: nothing is computed,
// so the memory the host version would have written keeps what it had.
TEST(TrainingMathModelled, ComputesNothing) {
  const model_spec m = net("[4]", R"({"name": "fc", "kind": "fc", "outputs": 3},
                                     {"name": "loss", "kind": "softmax_xent"})");
  sim_device dev(small_device(sim_backing::real));
  rig r(dev);
  r.math = r.make(m, 2, /*real_math=*/false);
  r.math->prepare();
  const layer_spec& fc = m.layer("fc");
  float* p = r.buffer(fc.param_elems);
  float* g = r.buffer(fc.param_elems);
  // The simulator's real backing is host memory: the test reads and writes it directly.
  const std::vector<float> sentinel(fc.param_elems, 7.0F);
  std::memcpy(p, sentinel.data(), sentinel.size() * sizeof(float));
  const std::uint64_t launches = dev.calls(sim_call::launch);
  r.math->init_layer(fc, p, g, init_seed, {});
  r.math->zero(p, sizeof(float), {});
  EXPECT_EQ(dev.calls(sim_call::launch) - launches, 2U) << "the modelled launches are still made";
  dev.synchronize();
  r.math->on_synchronized();
  std::vector<float> after(fc.param_elems);
  std::memcpy(after.data(), p, after.size() * sizeof(float));
  EXPECT_TRUE(same_bits(after, sentinel));
  EXPECT_TRUE(r.math->read(p, fc.param_elems).empty());
}

// --- the CUDA implementation (skipped, visibly, without a GPU) -------------------------------

class TrainingMathCuda : public testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!gpu_math_available(&why)) GTEST_SKIP() << "no GPU math: " << why;
    dev_ = testing_support::cuda_test_backend::make(&why);
    if (dev_ == nullptr) GTEST_SKIP() << "no CUDA device: " << why;
  }
  std::unique_ptr<device> dev_;
};

TEST_F(TrainingMathCuda, IsChosenForACudaDevice) {
  rig r(*dev_);
  std::string why;
  const auto math = r.make(model_spec::load_named("demo_cnn"), 4, true, &why);
  EXPECT_EQ(math->kind(), training_math_kind::cuda_kernels) << why;
}

// Within rounding of the CPU (softmax's exp and log may differ in the last bits, and the
// difference travels back through the network), and bit for bit from one run to the next.
TEST_F(TrainingMathCuda, OneStepMatchesReferenceTrainStepAndRepeats) {
  constexpr double step_tolerance = 1e-3;
  for (const char* name : {"tiny_resnet", "demo_cnn"}) {
    SCOPED_TRACE(name);
    const model_spec m = model_spec::load_named(name);
    const int batch = 4;
    const reference_step want = reference(m, batch);
    step_result runs[2];
    for (step_result& s : runs) {
      rig r(*dev_);
      r.math = r.make(m, batch);
      ASSERT_EQ(r.math->kind(), training_math_kind::cuda_kernels);
      s = train_one_step(r, m, batch);
    }
    EXPECT_LE(relative_error({runs[0].loss}, {want.loss}), step_tolerance) << runs[0].loss << " vs " << want.loss;
    EXPECT_TRUE(same_bits({runs[0].loss}, {runs[1].loss})) << "loss";
    for (const layer_spec& l : m.layers) {
      if (l.param_elems == 0) continue;
      const auto i = static_cast<std::size_t>(l.index);
      SCOPED_TRACE(l.name);
      EXPECT_LE(relative_error(runs[0].grads[i], want.grads[i]), step_tolerance) << "gradients";
      EXPECT_LE(relative_error(runs[0].updated[i], want.updated[i]), step_tolerance) << "updated parameters";
      EXPECT_TRUE(same_bits(runs[0].grads[i], runs[1].grads[i])) << "gradients, run to run";
      EXPECT_TRUE(same_bits(runs[0].updated[i], runs[1].updated[i])) << "parameters, run to run";
    }
  }
}

}  // namespace
}  // namespace gpuswap
