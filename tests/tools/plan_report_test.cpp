#include "tools/plan_report.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <sstream>
#include <string>

#include "core/errors.hpp"
#include "tools/model_spec.hpp"

namespace gpuswap {
namespace {

using ::testing::HasSubstr;

constexpr double mib = 1024.0 * 1024.0;

TEST(plan_report, mnist_cnn_parameters) {
  const model_spec m = model_spec::load_named("mnist_cnn");
  const auto j = plan_json(m, 1);
  EXPECT_EQ(j["totals"]["params"].get<std::size_t>(), 813802U);
  // "~3.1 MB in fp32": 3,255,208 bytes = 3.10 MiB.
  EXPECT_EQ(j["totals"]["param_bytes"].get<std::size_t>(), 813802U * 4);
  EXPECT_NEAR(j["totals"]["param_bytes"].get<double>() / mib, 3.1, 0.05);
  EXPECT_EQ(j["totals"]["grad_bytes"], j["totals"]["param_bytes"]);
  EXPECT_EQ(j["totals"]["optimizer_bytes"], j["totals"]["param_bytes"]);
  std::map<std::string, std::size_t> params;
  for (const auto& l : j["layers"]) params[l["name"]] = l["params"].get<std::size_t>();
  EXPECT_EQ(params["conv1"], 320U);
  EXPECT_EQ(params["conv2"], 9248U);
  EXPECT_EQ(params["fc1"], 802944U);
  EXPECT_EQ(params["fc2"], 1290U);
}

// REFERENCE.md's VGG-16 table (fc8 with 100 outputs there). Its fc6 figure, 4.11e8, is
// 14*14*512*4096: the table omits pool5, whose 7x7x512 output makes fc6 25088*4096 = 1.03e8.
// The convolution blocks, fc7 and fc8 match the table to three figures; the total differs from
// its 1.58e10 only by that fc6 term.
TEST(plan_report, vgg16_macs_per_image_match_the_reference_table) {
  model_spec m = model_spec::parse_text(
      [] {
        std::string text;
        std::ifstream in(model_spec::load_named("vgg16").source);
        std::stringstream ss;
        ss << in.rdbuf();
        text = ss.str();
        const auto at = text.find("\"classes\": 1000");
        text.replace(at, 15, "\"classes\": 100");
        return text;
      }(),
      "vgg16-100.json");
  const auto j = plan_json(m, 1);
  std::map<std::string, double> macs;
  for (const auto& l : j["layers"]) {
    const std::string name = l["name"];
    const std::string group = name.substr(0, name.find('_'));
    macs[group] += l["fwd_macs"].get<double>();
  }
  const std::map<std::string, double> table{
      {"conv1", 1.94e9}, {"conv2", 2.77e9}, {"conv3", 4.62e9}, {"conv4", 4.62e9},
      {"conv5", 1.39e9}, {"fc7", 1.68e7}, {"fc8", 4.10e5}};
  for (const auto& [group, want] : table) {
    EXPECT_NEAR(macs[group], want, 0.005 * want) << group;
  }
  EXPECT_DOUBLE_EQ(macs["fc6"], 7.0 * 7 * 512 * 4096);
  EXPECT_NEAR(14.0 * 14 * 512 * 4096, 4.11e8, 0.005 * 4.11e8);  // the table's fc6
  const double total = j["totals"]["fwd_macs"].get<double>();
  const double table_total_with_true_fc6 = 1.58e10 - 4.11e8 + 7.0 * 7 * 512 * 4096;
  EXPECT_NEAR(total, table_total_with_true_fc6, 0.01 * table_total_with_true_fc6);
  EXPECT_NEAR(total, 1.58e10, 0.025 * 1.58e10);
  // The shipped file (fc8 with 1000 classes) differs by fc8 alone.
  const model_spec shipped = model_spec::load_named("vgg16");
  EXPECT_DOUBLE_EQ(shipped.layer("fc8").fwd_flops_per_sample / 2, 4096.0 * 1000);
  EXPECT_DOUBLE_EQ(m.layer("fc8").fwd_flops_per_sample / 2, 4096.0 * 100);
}

TEST(plan_report, resnet50_parameters) {
  const auto j = plan_json(model_spec::load_named("resnet50"), 32);
  const double params = j["totals"]["params"].get<double>();
  EXPECT_NEAR(params, 25.6e6, 0.03 * 25.6e6);
  // Activations dominate: at batch 32 they exceed the parameters many times over.
  EXPECT_GT(j["totals"]["activation_bytes"].get<double>(), 10 * params * 4);
}

TEST(plan_report, gpt_layer_activation_bytes_follow_the_formula) {
  const model_spec m = model_spec::load_named("gpt_7b");
  const int batch = 2;
  const auto j = plan_json(m, batch);
  const double s = 4096, h = 4096, a = 32, b = batch;
  int blocks = 0;
  for (const auto& l : j["layers"]) {
    if (l["kind"] != "transformer") continue;
    ++blocks;
    // The last block's output is also read by final_norm's backward, and counted there once.
    const bool last = l["name"] == "block.31";
    EXPECT_EQ(l["output_saved"].get<bool>(), last) << l["name"];
    const double state = l["saved_bytes"].get<double>() -
                         (last ? l["output_bytes"].get<double>() : 0.0);
    EXPECT_EQ(state, s * b * h * (34 + 5 * a * s / h));
    EXPECT_DOUBLE_EQ(l["fwd_flops"].get<double>(), 24 * b * s * h * h * (1 + s / (6 * h)));
    EXPECT_DOUBLE_EQ(l["bwd_flops"].get<double>(), 2 * l["fwd_flops"].get<double>());
  }
  EXPECT_EQ(blocks, 32);
}

TEST(plan_report, totals_add_up) {
  const model_spec m = model_spec::load_named("tiny_resnet");
  const int batch = 4;
  const auto j = plan_json(m, batch);
  const auto& t = j["totals"];
  std::size_t saved = j["input_saved_bytes"].get<std::size_t>();
  std::size_t params = 0, workspace = 0;
  double fwd = 0;
  for (const auto& l : j["layers"]) {
    saved += l["saved_bytes"].get<std::size_t>();
    params += l["params"].get<std::size_t>();
    workspace = std::max(workspace, l["workspace_bytes"].get<std::size_t>());
    fwd += l["fwd_flops"].get<double>();
  }
  EXPECT_EQ(t["activation_bytes"].get<std::size_t>(), saved);
  EXPECT_EQ(t["activation_bytes"].get<std::size_t>(), m.activation_bytes(batch));
  EXPECT_EQ(t["params"].get<std::size_t>(), params);
  EXPECT_EQ(t["peak_workspace_bytes"].get<std::size_t>(), workspace);
  EXPECT_DOUBLE_EQ(t["fwd_flops"].get<double>(), fwd);
  EXPECT_EQ(t["training_bytes"].get<std::size_t>(),
            3 * t["param_bytes"].get<std::size_t>() + saved +
                t["peak_error_signal_bytes"].get<std::size_t>() + workspace);
  EXPECT_LT(t["inference_bytes"].get<std::size_t>(), t["training_bytes"].get<std::size_t>());
  EXPECT_EQ(j["layers"][6]["inputs"], nlohmann::json({"stem_relu", "b1_conv2"}));
  EXPECT_EQ(j["layers"][0]["inputs"], nlohmann::json({"input"}));
}

// A chain of three relus on 10 floats: forward keeps two tensors alive at a time; backward's
// error signals are the grads of relu 0 and relu 1 (the last layer's own is never made).
TEST(plan_report, liveness_peaks_on_a_chain) {
  const model_spec m = model_spec::parse_text(
      R"({"name": "c", "input": [10], "layers": [
          {"kind": "relu"}, {"kind": "relu"}, {"kind": "relu"}, {"kind": "softmax_xent"}]})",
      "c.json");
  const plan_totals t = compute_plan_totals(m, 1);
  EXPECT_EQ(t.inference_bytes, 2U * 40);
  EXPECT_EQ(t.peak_error_signal_bytes, 2U * 40);  // d relu_1 and d relu_2 during relu_2's backward
  EXPECT_EQ(t.activation_bytes, 4U * 40);         // every relu output and the probabilities
}

TEST(plan_report, text_lists_every_layer_and_the_totals) {
  const model_spec m = model_spec::load_named("mnist_cnn");
  const std::string text = plan_text(m, 64);
  for (const auto& l : m.layers) EXPECT_THAT(text, HasSubstr(l.name));
  EXPECT_THAT(text, HasSubstr("813802"));
  EXPECT_THAT(text, HasSubstr("batch 64"));
  EXPECT_THAT(text, HasSubstr("activations kept for backward"));
  EXPECT_THROW(plan_text(m, 0), config_error);
}

}  // namespace
}  // namespace gpuswap
