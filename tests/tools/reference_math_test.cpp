#include "tools/reference_math.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/errors.hpp"
#include "tools/model_spec.hpp"

namespace gpuswap {
namespace {

model_spec net(const std::string& input, const std::string& layers) {
  return model_spec::parse_text(
      R"({"name": "t", "input": )" + input + R"(, "layers": [)" + layers + "]}", "t.json");
}

std::vector<double> random_vector(std::size_t n, std::mt19937_64& gen, double lo = -1.0,
                                  double hi = 1.0) {
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

template <typename To, typename From>
std::vector<To> convert(const std::vector<From>& v) {
  return std::vector<To>(v.begin(), v.end());
}

template <typename T>
std::vector<const T*> const_ptrs(const std::vector<std::vector<T>>& vs) {
  std::vector<const T*> out;
  for (const auto& v : vs) out.push_back(v.data());
  return out;
}

template <typename T>
std::vector<T*> mut_ptrs(std::vector<std::vector<T>>& vs) {
  std::vector<T*> out;
  for (auto& v : vs) out.push_back(v.data());
  return out;
}

// L = sum(out * r): dL/dout = r. Central differences in float64 against layer_backward, for every
// input element and every parameter; then the float instantiation against the double one.
void check_gradients(const layer_spec& l, int batch, std::uint64_t seed = 1) {
  SCOPED_TRACE(l.name + " (" + l.kind + ")");
  std::mt19937_64 gen(seed);
  const std::size_t n_in = static_cast<std::size_t>(batch) * l.in_elems_per_sample;
  const std::size_t n_out = static_cast<std::size_t>(batch) * l.out_elems_per_sample;
  std::vector<std::vector<double>> x;
  for (std::size_t k = 0; k < l.inputs.size(); ++k) x.push_back(random_vector(n_in, gen));
  std::vector<double> p = random_vector(l.param_elems, gen, 0.5, 1.5);
  const std::vector<double> r = random_vector(n_out, gen);

  const auto loss = [&]() {
    std::vector<double> y(n_out);
    layer_forward(l, batch, const_ptrs(x), p.data(), y.data());
    double s = 0;
    for (std::size_t i = 0; i < n_out; ++i) s += y[i] * r[i];
    return s;
  };
  std::vector<double> y(n_out);
  layer_forward(l, batch, const_ptrs(x), p.data(), y.data());
  std::vector<std::vector<double>> gx(x.size(), std::vector<double>(n_in, 0.0));
  std::vector<double> gp(l.param_elems, 0.0);
  layer_backward(l, batch, const_ptrs(x), y.data(), r.data(), p.data(), mut_ptrs(gx), gp.data());

  constexpr double eps = 1e-6;
  const auto numeric = [&](double& v) {
    const double keep = v;
    v = keep + eps;
    const double up = loss();
    v = keep - eps;
    const double down = loss();
    v = keep;
    return (up - down) / (2 * eps);
  };
  int bad = 0;
  for (std::size_t k = 0; k < x.size(); ++k) {
    for (std::size_t i = 0; i < n_in && bad < 5; ++i) {
      const double want = numeric(x[k][i]);
      if (std::abs(gx[k][i] - want) > 1e-6 * std::max(1.0, std::abs(want))) {
        ADD_FAILURE() << "d/d input " << k << "[" << i << "]: " << gx[k][i] << " vs " << want;
        ++bad;
      }
    }
  }
  for (std::size_t i = 0; i < l.param_elems && bad < 5; ++i) {
    const double want = numeric(p[i]);
    if (std::abs(gp[i] - want) > 1e-6 * std::max(1.0, std::abs(want))) {
      ADD_FAILURE() << "d/d param [" << i << "]: " << gp[i] << " vs " << want;
      ++bad;
    }
  }

  // The float instantiation computes the same thing.
  std::vector<std::vector<float>> xf;
  for (const auto& v : x) xf.push_back(convert<float>(v));
  const auto pf = convert<float>(p);
  const auto rf = convert<float>(r);
  std::vector<float> yf(n_out);
  layer_forward(l, batch, const_ptrs(xf), pf.data(), yf.data());
  std::vector<std::vector<float>> gxf(x.size(), std::vector<float>(n_in, 0.0F));
  std::vector<float> gpf(l.param_elems, 0.0F);
  layer_backward(l, batch, const_ptrs(xf), yf.data(), rf.data(), pf.data(), mut_ptrs(gxf),
                 gpf.data());
  for (std::size_t i = 0; i < n_out; ++i) ASSERT_NEAR(yf[i], y[i], 1e-4 * (1 + std::abs(y[i])));
  for (std::size_t k = 0; k < x.size(); ++k) {
    for (std::size_t i = 0; i < n_in; ++i) {
      ASSERT_NEAR(gxf[k][i], gx[k][i], 1e-4 * (1 + std::abs(gx[k][i])));
    }
  }
  for (std::size_t i = 0; i < l.param_elems; ++i) {
    ASSERT_NEAR(gpf[i], gp[i], 1e-4 * (1 + std::abs(gp[i])));
  }
}

TEST(reference_math, conv_gradients) {
  const model_spec m = net("[5, 6, 3]", R"(
      {"name": "s2", "kind": "conv", "out_channels": 4, "kernel": 3, "stride": 2, "pad": 1},
      {"name": "k2", "kind": "conv", "out_channels": 2, "kernel": 2, "bias": false},
      {"name": "k1", "kind": "conv", "out_channels": 3, "kernel": 1})");
  for (const auto& l : m.layers) check_gradients(l, 2);
}

TEST(reference_math, fc_gradients) {
  const model_spec flat = net("[2, 3, 2]", R"({"name": "fc", "kind": "fc", "outputs": 5})");
  check_gradients(flat.layers[0], 3);
  const model_spec rows = net("[4, 6]", R"(
      {"name": "pp", "kind": "fc", "outputs": 3, "per_position": true, "bias": false})");
  check_gradients(rows.layers[0], 2);
}

TEST(reference_math, elementwise_and_pooling_gradients) {
  const std::vector<std::string> singles{
      R"({"name": "relu", "kind": "relu"})",
      R"({"name": "max3", "kind": "maxpool", "kernel": 3, "stride": 2, "pad": 1})",
      R"({"name": "max2", "kind": "maxpool", "kernel": 2})",
      R"({"name": "avg3", "kind": "avgpool", "kernel": 3, "stride": 2, "pad": 1})",
      R"({"name": "avgg", "kind": "avgpool", "global": true})",
      R"({"name": "flat", "kind": "flatten"})",
  };
  for (const auto& layer : singles) check_gradients(net("[7, 7, 2]", layer).layers[0], 2);
  const model_spec adds = net("[3, 2, 2]", R"(
      {"name": "r", "kind": "relu"},
      {"name": "add2", "kind": "add", "inputs": ["r", "input"]},
      {"name": "add3", "kind": "add", "inputs": ["r", "input", "add2"]})");
  check_gradients(adds.layer("add2"), 2);
  check_gradients(adds.layer("add3"), 2);
}

TEST(reference_math, batchnorm_gradients_use_batch_statistics) {
  const model_spec image = net("[3, 3, 4]", R"({"name": "bn", "kind": "batchnorm"})");
  check_gradients(image.layers[0], 3);
  const model_spec vec = net("[5]", R"({"name": "bn", "kind": "batchnorm"})");
  check_gradients(vec.layers[0], 4);

  // Training mode: each channel of the output has mean beta and variance ~gamma^2.
  const layer_spec& bn = image.layers[0];
  std::mt19937_64 gen(3);
  const auto x = random_vector(3 * 36, gen, 2.0, 5.0);
  const std::vector<double> p{2, 2, 2, 2, 0.5, 0.5, 0.5, 0.5};
  std::vector<double> y(x.size());
  const double* in[] = {x.data()};
  layer_forward(bn, 3, in, p.data(), y.data());
  for (int c = 0; c < 4; ++c) {
    double mean = 0, var = 0;
    for (std::size_t i = static_cast<std::size_t>(c); i < y.size(); i += 4) mean += y[i] / 27;
    for (std::size_t i = static_cast<std::size_t>(c); i < y.size(); i += 4) {
      var += (y[i] - mean) * (y[i] - mean) / 27;
    }
    EXPECT_NEAR(mean, 0.5, 1e-9);
    EXPECT_NEAR(var, 4.0, 1e-3);
  }
}

TEST(reference_math, softmax_xent_loss_and_gradient) {
  for (const char* input : {"[6]", "[3, 5]"}) {
    SCOPED_TRACE(input);
    const model_spec m = net(input, R"({"name": "loss", "kind": "softmax_xent"})");
    const layer_spec& l = m.layers[0];
    const int batch = 3;
    std::mt19937_64 gen(5);
    auto x = random_vector(static_cast<std::size_t>(batch) * l.in_elems_per_sample, gen, -3, 3);
    std::vector<int> labels(static_cast<std::size_t>(batch) * l.rows);
    for (std::size_t i = 0; i < labels.size(); ++i) {
      labels[i] = static_cast<int>(i * 7 % static_cast<std::size_t>(l.in_channels));
    }
    std::vector<double> probs(x.size());
    const double loss = softmax_xent_forward(l, batch, x.data(), labels.data(), probs.data());
    // The mean of -log p[label].
    double want = 0;
    for (std::size_t row = 0; row < labels.size(); ++row) {
      want -= std::log(probs[row * static_cast<std::size_t>(l.in_channels) +
                             static_cast<std::size_t>(labels[row])]);
    }
    EXPECT_NEAR(loss, want / static_cast<double>(labels.size()), 1e-12);
    std::vector<double> g(x.size(), 0.0);
    softmax_xent_backward(l, batch, probs.data(), labels.data(), g.data());
    std::vector<double> scratch(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      const double keep = x[i];
      x[i] = keep + 1e-6;
      const double up = softmax_xent_forward(l, batch, x.data(), labels.data(), scratch.data());
      x[i] = keep - 1e-6;
      const double down = softmax_xent_forward(l, batch, x.data(), labels.data(), scratch.data());
      x[i] = keep;
      EXPECT_NEAR(g[i], (up - down) / 2e-6, 1e-7) << i;
    }
    // layer_forward writes the same probabilities.
    std::vector<double> p2(x.size());
    const double* in[] = {x.data()};
    layer_forward(l, batch, in, nullptr, p2.data());
    EXPECT_EQ(p2, probs);
  }
}

TEST(reference_math, backward_accumulates_and_skips_null_gradients) {
  const model_spec m = net("[4, 4, 2]", R"(
      {"name": "c", "kind": "conv", "out_channels": 3, "kernel": 3, "pad": 1})");
  const layer_spec& l = m.layers[0];
  std::mt19937_64 gen(9);
  const auto x = convert<float>(random_vector(2 * l.in_elems_per_sample, gen));
  const auto p = convert<float>(random_vector(l.param_elems, gen));
  const auto g = convert<float>(random_vector(2 * l.out_elems_per_sample, gen));
  std::vector<float> y(g.size());
  const float* in[] = {x.data()};
  layer_forward(l, 2, in, p.data(), y.data());

  std::vector<float> gx1(x.size(), 0.0F), gp1(p.size(), 0.0F);
  float* gin1[] = {gx1.data()};
  layer_backward(l, 2, in, y.data(), g.data(), p.data(), gin1, gp1.data());
  std::vector<float> gx2(x.size(), 0.0F), gp2(p.size(), 0.0F);
  float* gin2[] = {gx2.data()};
  layer_backward(l, 2, in, y.data(), g.data(), p.data(), gin2, gp2.data());
  layer_backward(l, 2, in, y.data(), g.data(), p.data(), gin2, gp2.data());
  for (std::size_t i = 0; i < gx1.size(); ++i) EXPECT_EQ(gx2[i], 2 * gx1[i]);
  for (std::size_t i = 0; i < gp1.size(); ++i) EXPECT_EQ(gp2[i], 2 * gp1[i]);

  std::vector<float> gp3(p.size(), 0.0F);
  float* none[] = {nullptr};
  layer_backward(l, 2, in, y.data(), g.data(), p.data(), none, gp3.data());
  EXPECT_EQ(gp3, gp1);
}

// The runner passes only what backward_needs_input / backward_needs_output name; the rest may
// be nullptr and the gradients must not change.
TEST(reference_math, backward_reads_only_what_it_declares) {
  const model_spec m = model_spec::load_named("tiny_resnet");
  const int batch = 2;
  const auto params = init_model_params(m, 4);
  std::mt19937_64 gen(8);
  for (const auto& l : m.layers) {
    if (l.op == layer_kind::softmax_xent) continue;
    SCOPED_TRACE(l.name);
    std::vector<std::vector<float>> x;
    for (std::size_t k = 0; k < l.inputs.size(); ++k) {
      x.push_back(convert<float>(random_vector(batch * l.in_elems_per_sample, gen)));
    }
    std::vector<float> y(batch * l.out_elems_per_sample);
    const auto* p = params[static_cast<std::size_t>(l.index)].data();
    layer_forward(l, batch, const_ptrs(x), p, y.data());
    const auto gy = convert<float>(random_vector(y.size(), gen));
    const auto run = [&](bool sparse) {
      std::vector<const float*> in = const_ptrs(x);
      if (sparse && !l.backward_needs_input) std::fill(in.begin(), in.end(), nullptr);
      const float* out = sparse && !l.backward_needs_output ? nullptr : y.data();
      std::vector<std::vector<float>> gx(x.size(), std::vector<float>(x[0].size(), 0.0F));
      std::vector<float> gp(l.param_elems, 0.0F);
      layer_backward(l, batch, in, out, gy.data(), p, mut_ptrs(gx), gp.data());
      gx.push_back(gp);
      return gx;
    };
    EXPECT_EQ(run(true), run(false));
  }
}

// A tensor read by two layers gets the same gradient bits whichever backward runs first (Note
// [Contribution then add]): in tiny_resnet, stem_relu feeds b1_conv1 and b1_sum.
TEST(reference_math, two_consumers_sum_in_either_order) {
  const model_spec m = model_spec::load_named("tiny_resnet");
  const auto params = init_model_params(m, 11);
  const int batch = 4;
  std::vector<float> x(batch * m.input_elems_per_sample());
  std::vector<int> labels(batch * m.labels_per_sample());
  make_batch(m, batch, 3, x.data(), labels.data());
  // Forward the network to get every layer's input.
  std::vector<std::vector<float>> outs;
  for (const auto& l : m.layers) {
    std::vector<const float*> in;
    for (int p : l.inputs) {
      in.push_back(p < 0 ? x.data() : outs[static_cast<std::size_t>(p)].data());
    }
    outs.emplace_back(batch * l.out_elems_per_sample);
    if (l.op == layer_kind::softmax_xent) continue;
    layer_forward(l, batch, in, params[static_cast<std::size_t>(l.index)].data(),
                  outs.back().data());
  }
  const int shared = m.find("stem_relu");
  const std::size_t n = outs[static_cast<std::size_t>(shared)].size();
  std::mt19937_64 gen(2);
  const std::vector<float> g1 = convert<float>(random_vector(n, gen));  // d/d b1_conv1 out
  const std::vector<float> g2 = convert<float>(random_vector(n, gen));  // d/d b1_sum out
  const auto run = [&](bool conv_first) {
    std::vector<float> grad(n, 0.0F);
    const layer_spec& conv = m.layer("b1_conv1");
    const layer_spec& sum = m.layer("b1_sum");
    const float* conv_in[] = {outs[static_cast<std::size_t>(shared)].data()};
    float* conv_gin[] = {grad.data()};
    std::vector<float> gp(conv.param_elems, 0.0F);
    const float* sum_in[] = {outs[static_cast<std::size_t>(shared)].data(),
                             outs[static_cast<std::size_t>(m.find("b1_conv2"))].data()};
    float* sum_gin[] = {grad.data(), nullptr};
    const auto do_conv = [&] {
      layer_backward(conv, batch, conv_in, outs[static_cast<std::size_t>(conv.index)].data(),
                     g1.data(), params[static_cast<std::size_t>(conv.index)].data(), conv_gin,
                     gp.data());
    };
    const auto do_sum = [&] {
      layer_backward(sum, batch, sum_in, nullptr, g2.data(), nullptr, sum_gin, nullptr);
    };
    if (conv_first) {
      do_conv();
      do_sum();
    } else {
      do_sum();
      do_conv();
    }
    return grad;
  };
  const auto a = run(true);
  const auto b = run(false);
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0);
}

struct step_result {
  float loss;
  std::vector<std::vector<float>> grads;
};

step_result one_step(const model_spec& m, int batch, std::uint64_t seed) {
  const auto params = init_model_params(m, seed);
  std::vector<float> x(static_cast<std::size_t>(batch) * m.input_elems_per_sample());
  std::vector<int> labels(static_cast<std::size_t>(batch) * m.labels_per_sample());
  make_batch(m, batch, seed + 1, x.data(), labels.data());
  step_result r;
  r.loss = reference_train_step(m, batch, params, x.data(), labels.data(), r.grads);
  return r;
}

TEST(reference_math, repeated_runs_are_bit_identical) {
  for (const char* name : {"tiny_cnn", "tiny_resnet"}) {
    SCOPED_TRACE(name);
    const model_spec m = model_spec::load_named(name);
    const step_result a = one_step(m, m.default_batch, 42);
    const step_result b = one_step(m, m.default_batch, 42);
    EXPECT_EQ(std::memcmp(&a.loss, &b.loss, sizeof(float)), 0);
    ASSERT_EQ(a.grads.size(), b.grads.size());
    bool any_nonzero = false;
    for (std::size_t i = 0; i < a.grads.size(); ++i) {
      ASSERT_EQ(a.grads[i].size(), b.grads[i].size());
      if (a.grads[i].empty()) continue;
      EXPECT_EQ(std::memcmp(a.grads[i].data(), b.grads[i].data(),
                            a.grads[i].size() * sizeof(float)),
                0)
          << m.layers[i].name;
      for (float g : a.grads[i]) any_nonzero |= g != 0.0F;
    }
    EXPECT_TRUE(any_nonzero);
    EXPECT_TRUE(std::isfinite(a.loss));
    // A different seed is a different run.
    EXPECT_NE(one_step(m, m.default_batch, 43).loss, a.loss);
  }
}

TEST(reference_math, sgd_steps_reduce_the_loss) {
  for (const char* name : {"tiny_cnn", "tiny_resnet"}) {
    SCOPED_TRACE(name);
    const model_spec m = model_spec::load_named(name);
    const int batch = m.default_batch;
    auto params = init_model_params(m, 1);
    std::vector<float> x(static_cast<std::size_t>(batch) * m.input_elems_per_sample());
    std::vector<int> labels(static_cast<std::size_t>(batch) * m.labels_per_sample());
    make_batch(m, batch, 7, x.data(), labels.data());
    std::vector<std::vector<float>> grads;
    const float first = reference_train_step(m, batch, params, x.data(), labels.data(), grads);
    float last = first;
    for (int step = 0; step < 8; ++step) {
      for (std::size_t i = 0; i < params.size(); ++i) {
        sgd_update(params[i].data(), grads[i].data(), params[i].size(), 0.05F);
      }
      last = reference_train_step(m, batch, params, x.data(), labels.data(), grads);
    }
    EXPECT_LT(last, 0.7F * first) << "first " << first << ", last " << last;
  }
}

TEST(reference_math, momentum_update) {
  std::vector<float> p{1.0F, 2.0F}, g{0.5F, -1.0F}, v{0.0F, 0.0F};
  sgd_momentum_update(p.data(), g.data(), v.data(), 2, 0.1F, 0.9F);
  sgd_momentum_update(p.data(), g.data(), v.data(), 2, 0.1F, 0.9F);
  EXPECT_FLOAT_EQ(v[0], 0.5F * 1.9F);
  EXPECT_FLOAT_EQ(p[0], 1.0F - 0.1F * 0.5F - 0.1F * 0.95F);
  EXPECT_FLOAT_EQ(p[1], 2.0F + 0.1F + 0.19F);
}

TEST(reference_math, data_and_parameters_are_deterministic) {
  const model_spec m = model_spec::load_named("tiny_cnn");
  const int batch = 8;
  std::vector<float> x1(batch * m.input_elems_per_sample()), x2(x1.size()), x3(x1.size());
  std::vector<int> l1(batch), l2(batch), l3(batch);
  make_batch(m, batch, 5, x1.data(), l1.data());
  make_batch(m, batch, 5, x2.data(), l2.data());
  make_batch(m, batch, 6, x3.data(), l3.data());
  EXPECT_EQ(x1, x2);
  EXPECT_EQ(l1, l2);
  EXPECT_NE(x1, x3);
  for (int label : l1) EXPECT_THAT(label, ::testing::AllOf(::testing::Ge(0), ::testing::Lt(10)));
  const auto p1 = init_model_params(m, 1);
  const auto p2 = init_model_params(m, 1);
  const auto p3 = init_model_params(m, 2);
  EXPECT_EQ(p1, p2);
  EXPECT_NE(p1, p3);
  // Layers with the same shape still differ (the layer index is part of the seed).
  const model_spec twin =
      net("[4]", R"({"kind": "fc", "outputs": 4}, {"kind": "fc", "outputs": 4})");
  const auto tp = init_model_params(twin, 1);
  EXPECT_NE(tp[0], tp[1]);
}

TEST(reference_math, cost_model_kinds_and_the_loss_refuse_plain_calls) {
  const model_spec g = net("[8, 16]", R"({"name": "blk", "kind": "transformer", "heads": 2})");
  std::vector<float> x(16 * 8), y(16 * 8), p(g.layers[0].param_elems);
  const float* in[] = {x.data()};
  EXPECT_THROW(layer_forward(g.layers[0], 1, in, p.data(), y.data()), config_error);
  const model_spec s = net("[4]", R"({"name": "loss", "kind": "softmax_xent"})");
  float* gin[] = {y.data()};
  try {
    layer_backward(s.layers[0], 1, in, y.data(), y.data(), nullptr, gin, nullptr);
    FAIL() << "no error";
  } catch (const config_error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("softmax_xent_backward"));
  }
  std::vector<int> bad_label{7};
  EXPECT_THROW(softmax_xent_forward(s.layers[0], 1, x.data(), bad_label.data(), y.data()),
               config_error);
}

}  // namespace
}  // namespace gpuswap
