#include "tools/model_spec.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <unistd.h>

#include "core/errors.hpp"

namespace gpuswap {
namespace {

using ::testing::AllOf;
using ::testing::Contains;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// A spec with `layers` (a JSON array body) on an image input.
std::string spec(const std::string& layers, const std::string& input = "[6, 6, 2]") {
  return R"({"name": "t", "input": )" + input + R"(, "layers": [)" + layers + "]}";
}

std::string load_error(const std::string& text, const std::string& origin = "bad.json") {
  try {
    model_spec::parse_text(text, origin);
  } catch (const config_error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(model_spec, every_shipped_model_loads) {
  const auto names = list_models();
  for (const char* expected :
       {"vgg16", "resnet50", "gpt_7b", "mnist_cnn", "tiny_cnn", "tiny_resnet"}) {
    EXPECT_THAT(names, Contains(expected));
  }
  for (const auto& name : names) {
    SCOPED_TRACE(name);
    const model_spec m = model_spec::load_named(name);
    EXPECT_EQ(m.name, name);  // the file name is the model's name
    EXPECT_FALSE(m.layers.empty());
    EXPECT_GE(m.loss_layer(), 0);
    EXPECT_EQ(m.labels_per_sample() > 0, true);
    for (const auto& l : m.layers) {
      EXPECT_EQ(&m.layers[static_cast<std::size_t>(l.index)], &l);
      EXPECT_GT(l.out_elems_per_sample, 0U);
      for (int in : l.inputs) EXPECT_LT(in, l.index);
    }
  }
}

TEST(model_spec, mnist_cnn_matches_the_worked_check) {
  const model_spec m = model_spec::load_named("mnist_cnn");
  EXPECT_EQ(m.param_count(), 813802U);
  EXPECT_EQ(m.layer("conv1").param_elems, 288U + 32U);
  EXPECT_EQ(m.layer("conv2").param_elems, 9216U + 32U);
  EXPECT_EQ(m.layer("fc1").param_elems, 802816U + 128U);
  EXPECT_EQ(m.layer("fc2").param_elems, 1280U + 10U);
  EXPECT_EQ(m.layer("conv2").out_elems_per_sample, 25088U);  // 28x28x32
  EXPECT_EQ(m.layer("pool").out_elems_per_sample, 6272U);    // 14x14x32
  EXPECT_THAT(m.layer("pool").out_shape, ElementsAre(14, 14, 32));
}

TEST(model_spec, conv_and_fc_follow_the_formulas) {
  const model_spec m = model_spec::parse_text(
      spec(R"({"name": "c", "kind": "conv", "out_channels": 5, "kernel": 3, "stride": 2, "pad": 1},
              {"name": "f", "kind": "fc", "outputs": 7})",
           "[9, 7, 4]"),
      "t.json");
  const layer_spec& c = m.layer("c");
  EXPECT_THAT(c.out_shape, ElementsAre(5, 4, 5));  // (9+2-3)/2+1, (7+2-3)/2+1
  EXPECT_EQ(c.param_elems, 5U * 3 * 3 * 4 + 5);
  EXPECT_DOUBLE_EQ(c.fwd_flops_per_sample, 2.0 * 5 * 4 * 4 * 5 * 9);
  EXPECT_DOUBLE_EQ(c.bwd_flops_per_sample, c.fwd_flops_per_sample);  // no data gradient
  EXPECT_EQ(c.workspace_elems_per_sample, 5U * 4 * 9 * 4);
  EXPECT_TRUE(c.backward_needs_input);
  EXPECT_FALSE(c.backward_needs_output);
  const layer_spec& f = m.layer("f");
  EXPECT_EQ(f.in_channels, 100);
  EXPECT_EQ(f.param_elems, 7U * 100 + 7);
  EXPECT_DOUBLE_EQ(f.bwd_flops_per_sample, 2 * f.fwd_flops_per_sample);
  EXPECT_TRUE(m.tensor_saved_for_backward(-1));  // the conv reads the network input
  EXPECT_TRUE(m.tensor_saved_for_backward(0));   // fc reads the conv's output
  EXPECT_FALSE(m.tensor_saved_for_backward(1));  // nothing reads fc's backward-wise
  EXPECT_EQ(m.activation_bytes(3), 3U * 4 * (9 * 7 * 4 + 100));
}

TEST(model_spec, vgg16_shapes_and_parameters) {
  const model_spec m = model_spec::load_named("vgg16");
  EXPECT_EQ(m.default_batch, 256);
  EXPECT_THAT(m.layer("pool5").out_shape, ElementsAre(7, 7, 512));
  EXPECT_EQ(m.layer("fc6").in_channels, 25088);
  EXPECT_EQ(m.layer("fc8").out_channels, 1000);
  int convs = 0, fcs = 0;
  for (const auto& l : m.layers) {
    convs += l.op == layer_kind::conv;
    fcs += l.op == layer_kind::fc;
  }
  EXPECT_EQ(convs, 13);
  EXPECT_EQ(fcs, 3);
  EXPECT_EQ(m.param_count(), 138357544U);  // VGG-16's published count
}

TEST(model_spec, resnet50_expands_blocks_with_skip_connections) {
  const model_spec m = model_spec::load_named("resnet50");
  EXPECT_EQ(m.param_count(), 25557032U);  // torchvision's resnet50
  EXPECT_NEAR(static_cast<double>(m.param_count()), 25.6e6, 0.03 * 25.6e6);
  const layer_spec& sum = m.layer("res2a.sum");
  EXPECT_EQ(sum.op, layer_kind::add);
  ASSERT_EQ(sum.inputs.size(), 2U);
  EXPECT_EQ(m.layers[static_cast<std::size_t>(sum.inputs[0])].name, "res2a.proj_bn");
  EXPECT_EQ(m.layers[static_cast<std::size_t>(sum.inputs[1])].name, "res2a.bn_c");
  // An identity block's add reads the block's input: the previous block's output.
  const layer_spec& idsum = m.layer("res2b.sum");
  EXPECT_EQ(idsum.inputs[0], m.find("res2a.out"));
  EXPECT_THAT(m.consumers(m.find("res2a.out")),
              ElementsAre(m.find("res2b.conv_a"), m.find("res2b.sum")));
  EXPECT_THAT(m.layer("res3a.conv_b").out_shape, ElementsAre(28, 28, 128));  // $stride = 2
  EXPECT_THAT(m.layer("res5c.out").out_shape, ElementsAre(7, 7, 2048));
  EXPECT_THAT(m.layer("pool5").out_shape, ElementsAre(1, 1, 2048));
  EXPECT_EQ(m.layer("res4f.bn_c").param_elems, 2U * 1024);
}

TEST(model_spec, gpt_7b_uses_the_transformer_formulas) {
  const model_spec m = model_spec::load_named("gpt_7b");
  EXPECT_EQ(m.dtype_bytes, 2);
  EXPECT_EQ(m.default_batch, 1);
  int blocks = 0;
  for (const auto& l : m.layers) blocks += l.op == layer_kind::transformer;
  EXPECT_EQ(blocks, 32);
  const layer_spec& b = m.layer("block.17");
  const std::size_t s = 4096, h = 4096, a = 32;
  EXPECT_EQ(b.param_elems, 12 * h * h + 13 * h);
  EXPECT_EQ(b.saved_bytes_per_sample_override, s * h * 34 + 5 * a * s * s);
  EXPECT_DOUBLE_EQ(b.fwd_flops_per_sample, 24.0 * s * h * h * (1 + 4096.0 / (6 * 4096)));
  EXPECT_DOUBLE_EQ(b.bwd_flops_per_sample, 2 * b.fwd_flops_per_sample);
  EXPECT_NEAR(static_cast<double>(m.param_count()), 6.7e9, 0.05 * 6.7e9);
  EXPECT_EQ(m.labels_per_sample(), 4096U);  // one label per position
  // The block's override holds what its backward needs: its input is not counted again.
  EXPECT_FALSE(m.tensor_saved_for_backward(m.find("block.16")));
  EXPECT_EQ(m.saved_bytes_per_sample(m.find("block.17")), b.saved_bytes_per_sample_override);
}

TEST(model_spec, flash_attention_drops_the_quadratic_term) {
  const model_spec m = model_spec::parse_text(
      R"({"name": "g", "input": [128, 64], "dtype_bytes": 2, "layers": [
           {"name": "std", "kind": "transformer", "heads": 4},
           {"name": "flash", "kind": "transformer", "heads": 4, "flash_attention": true}]})",
      "g.json");
  EXPECT_EQ(m.layer("std").saved_bytes_per_sample_override, 128U * 64 * 34 + 5U * 4 * 128 * 128);
  EXPECT_EQ(m.layer("flash").saved_bytes_per_sample_override, 128U * 64 * 34);
  EXPECT_EQ(m.activation_bytes(2), 2 * (128U * 64 * 34 * 2 + 5U * 4 * 128 * 128));
}

TEST(model_spec, tiny_resnet_has_shared_outputs_and_adds) {
  const model_spec m = model_spec::load_named("tiny_resnet");
  EXPECT_EQ(m.consumers(m.find("stem_relu")).size(), 2U);
  EXPECT_EQ(m.consumers(m.find("b1_out")).size(), 2U);
  EXPECT_THAT(m.layer("b1_sum").inputs, ElementsAre(m.find("stem_relu"), m.find("b1_conv2")));
  for (const auto& l : m.layers) EXPECT_TRUE(l.has_reference_math()) << l.name;
}

TEST(model_spec, repeat_and_nested_blocks_name_their_layers) {
  const model_spec m = model_spec::parse_text(R"({
      "name": "n", "input": [4, 4, 2],
      "blocks": {
        "pair": {"defaults": {"c": 2}, "layers": [
          {"name": "a", "kind": "conv", "out_channels": "$c", "kernel": 1},
          {"name": "r", "kind": "relu"}]},
        "outer": {"layers": [
          {"block": "pair", "name": "p", "args": {"c": "$width"}},
          {"name": "s", "kind": "add", "inputs": ["input", "p.r"]}]}
      },
      "layers": [
        {"block": "outer", "name": "o", "args": {"width": 2}, "repeat": 2},
        {"kind": "relu", "repeat": 3},
        {"name": "x", "kind": "relu", "repeat": 2}
      ]})",
                                              "n.json");
  std::vector<std::string> names;
  for (const auto& l : m.layers) names.push_back(l.name);
  EXPECT_THAT(names, ElementsAre("o.0.p.a", "o.0.p.r", "o.0.s", "o.1.p.a", "o.1.p.r", "o.1.s",
                                 "relu_6", "relu_7", "relu_8", "x.0", "x.1"));
  EXPECT_THAT(m.layer("o.0.s").inputs, ElementsAre(-1, m.find("o.0.p.r")));
  EXPECT_THAT(m.layer("o.1.s").inputs, ElementsAre(m.find("o.0.s"), m.find("o.1.p.r")));
  EXPECT_THAT(m.layer("o.1.p.a").inputs, ElementsAre(m.find("o.0.s")));
}

struct bad_case {
  std::string what;
  std::string text;
  std::vector<std::string> mentions;  // each must appear in the message
};

TEST(model_spec, bad_files_name_the_file_the_layer_and_the_field) {
  const std::vector<bad_case> cases{
      {"unknown kind", spec(R"({"name": "l1", "kind": "convolution"})"),
       {"bad.json", "l1", "kind", "convolution", "conv"}},
      {"missing field", spec(R"({"name": "l1", "kind": "conv", "kernel": 3})"),
       {"bad.json", "l1", "out_channels", "missing"}},
      {"negative kernel",
       spec(R"({"kind": "relu"}, {"name": "c2", "kind": "conv", "out_channels": 2, "kernel": -3})"),
       {"bad.json", "layers[1]", "c2", "kernel", "-3"}},
      {"float kernel", spec(R"({"name": "c", "kind": "conv", "out_channels": 2, "kernel": 2.5})"),
       {"c", "kernel", "2.5", "not an integer"}},
      {"unknown field", spec(R"({"name": "c", "kind": "conv", "out_channel": 2, "kernel": 3})"),
       {"c", "out_channel", "unknown field", "out_channels"}},
      {"unknown input",
       spec(R"({"kind": "relu"},
               {"name": "s", "kind": "add", "inputs": ["nope", "input"]})"),
       {"s", "inputs", "nope", "no such earlier layer"}},
      {"forward reference",
       spec(R"({"name": "a", "kind": "relu", "inputs": ["b"]}, {"name": "b", "kind": "relu"})"),
       {"a", "inputs", "b"}},
      {"add shapes differ",
       spec(R"({"name": "p", "kind": "maxpool", "kernel": 2},
               {"name": "s", "kind": "add", "inputs": ["p", "input"]})"),
       {"s", "inputs", "differ"}},
      {"add with one input", spec(R"({"name": "s", "kind": "add"})"), {"s", "inputs", "two"}},
      {"kernel too big", spec(R"({"name": "c", "kind": "conv", "out_channels": 1, "kernel": 9})"),
       {"c", "kernel", "larger"}},
      {"conv on a vector",
       spec(R"({"name": "c", "kind": "conv", "out_channels": 1, "kernel": 1})", "[10]"),
       {"c", "rank-3"}},
      {"reserved name", spec(R"({"name": "input", "kind": "relu"})"), {"name", "input"}},
      {"duplicate name", spec(R"({"name": "r", "kind": "relu"}, {"name": "r", "kind": "relu"})"),
       {"layers[1]", "r", "duplicate"}},
      {"dangling layer",
       spec(R"({"name": "lost", "kind": "relu"},
               {"name": "r", "kind": "relu", "inputs": ["input"]})"),
       {"lost", "never used"}},
      {"loss not last",
       spec(R"({"kind": "flatten"}, {"name": "l", "kind": "softmax_xent"}, {"kind": "relu"})"),
       {"l", "last layer"}},
      {"classes mismatch",
       R"({"name": "t", "input": [5], "classes": 3,
           "layers": [{"name": "l", "kind": "softmax_xent"}]})",
       {"l", "classes"}},
      {"unknown variable",
       spec(R"({"name": "c", "kind": "conv", "out_channels": "$width", "kernel": 1})"),
       {"c", "out_channels", "$width", "unknown variable"}},
      {"unknown block", spec(R"({"block": "nope", "name": "b"})"), {"layers[0]", "block", "nope"}},
      {"unused block argument",
       R"({"name": "t", "input": [4], "blocks": {"b": {"layers": [{"kind": "relu"}]}},
           "layers": [{"block": "b", "name": "x", "args": {"typo": 1}}]})",
       {"x", "args", "typo", "not used"}},
      {"bad field inside a block",
       R"({"name": "t", "input": [4],
           "blocks": {"b": {"layers": [{"name": "f", "kind": "fc", "outputs": 0}]}},
           "layers": [{"block": "b", "name": "x"}]})",
       {"blocks.b", "x.f", "outputs", "0"}},
      {"self-recursive block",
       R"({"name": "t", "input": [4],
           "blocks": {"b": {"layers": [{"block": "b", "name": "again"}]}},
           "layers": [{"block": "b", "name": "x"}]})",
       {"nested too deep"}},
      {"missing input", R"({"name": "t", "layers": [{"kind": "relu"}]})", {"bad.json", "input"}},
      {"unknown top-level field", R"({"name": "t", "input": [3], "layer": []})",
       {"bad.json", "layer", "unknown"}},
      {"not JSON", R"({"name": "t", "input": [3], )", {"bad.json", "JSON"}},
      {"bad heads", spec(R"({"name": "x", "kind": "transformer", "heads": 3})", "[8, 16]"),
       {"x", "heads", "divisor"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    const std::string message = load_error(c.text);
    for (const auto& m : c.mentions) EXPECT_THAT(message, HasSubstr(m));
  }
}

TEST(model_spec, load_file_names_a_missing_file) {
  try {
    model_spec::load_file("/nonexistent/x.json");
    FAIL() << "no error";
  } catch (const config_error& e) {
    EXPECT_THAT(e.what(), HasSubstr("/nonexistent/x.json"));
  }
  try {
    model_spec::load_named("no_such_model");
    FAIL() << "no error";
  } catch (const config_error& e) {
    EXPECT_THAT(e.what(), AllOf(HasSubstr("no_such_model"), HasSubstr("vgg16")));
  }
}

TEST(model_spec, the_environment_directory_comes_first) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("gpuswap_models_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  {
    std::ofstream(dir / "tiny_cnn.json") << R"({"name": "shadow", "input": [3], "layers": [
                                                 {"kind": "relu"}]})";
    std::ofstream(dir / "extra_model.json") << spec(R"({"kind": "relu"})");
  }
  ::setenv("GPUSWAP_MODELS_DIR", dir.c_str(), 1);
  const model_spec shadowed = model_spec::load_named("tiny_cnn");
  const auto names = list_models();
  const model_spec fallback = model_spec::load_named("vgg16");  // not there: the source tree's
  ::unsetenv("GPUSWAP_MODELS_DIR");
  std::filesystem::remove_all(dir);
  EXPECT_EQ(shadowed.name, "shadow");
  EXPECT_THAT(names, Contains("extra_model"));
  EXPECT_THAT(names, Contains("vgg16"));
  EXPECT_EQ(fallback.name, "vgg16");
}

}  // namespace
}  // namespace gpuswap
