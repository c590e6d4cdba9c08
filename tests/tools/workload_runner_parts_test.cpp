// A transformer block's saved state as the pieces its operators keep (Note [A block's saved
// pieces] in tools/workload_graph.cpp), and the runner carrying a block out part by part (Note
// [Parts of a step] in tools/workload_runner.cpp), so that its copies overlap the block's own
// compute where the budget holds one block's state and not two.
#include <gtest/gtest.h>

#include <cstddef>
#include <string>
#include <vector>

#include "device/sim_device.hpp"
#include "tools/model_spec.hpp"
#include "tools/workload_graph.hpp"
#include "tools/workload_runner.hpp"

namespace gpuswap {
namespace {

model_spec small_gpt(bool flash) {
  return model_spec::parse_text(
      std::string(R"({"name": "parts_gpt", "input": [64], "classes": 50, "dtype_bytes": 2, "default_batch": 2,
          "layers": [
            {"name": "embed", "kind": "embedding", "vocab": 50, "hidden": 32},
            {"name": "block", "kind": "transformer", "heads": 4, "flash_attention": )") +
          (flash ? "true" : "false") + R"(, "repeat": 3},
            {"name": "lm_head", "kind": "fc", "outputs": "$classes", "per_position": true, "bias": false},
            {"name": "loss", "kind": "softmax_xent"}]})",
      "parts_gpt");
}

TEST(block_pieces, the_pieces_add_up_to_the_saved_state_and_come_back_in_the_order_backward_reads_them) {
  for (const bool flash : {false, true}) {
    SCOPED_TRACE(flash ? "flash attention" : "standard attention");
    const model_spec model = small_gpt(flash);
    const int batch = 2;
    const workload_graph g = build_workload_graph(model, batch);
    const std::size_t s = 64, h = 32, a = 4;
    int blocks = 0;
    for (const layer_spec& layer : model.layers) {
      const auto& parts = g.parts[static_cast<std::size_t>(layer.index)];
      if (layer.op != layer_kind::transformer) {
        EXPECT_TRUE(parts.empty()) << layer.name;
        continue;
      }
      ++blocks;
      ASSERT_EQ(parts.size(), 6U) << layer.name;
      double shares = 0;
      std::size_t bytes = 0, pieces = 0;
      for (const layer_part& part : parts) {
        shares += part.share;
        for (int t : part.saved) {
          const tensor_info& info = g.profile.tensors[static_cast<std::size_t>(t)];
          bytes += info.bytes;
          ++pieces;
          EXPECT_EQ(info.producer_step, g.forward_step(layer.index));
          EXPECT_EQ(info.use_steps, std::vector<int>({g.backward_step(layer.index)}));
          EXPECT_EQ(g.profile.last_forward_use(t), g.forward_step(layer.index));
        }
      }
      EXPECT_NEAR(shares, 1.0, 1e-12);
      EXPECT_EQ(bytes, layer.saved_bytes_per_sample_override * batch);
      EXPECT_EQ(bytes, (34 * s * h + (flash ? 0 : 5 * a * s * s)) * batch);
      EXPECT_EQ(pieces, flash ? 11U : 14U);
      // Backward runs the parts last first: their pieces have the lower ids, which is the order
      // the prefetcher brings back tensors first needed by the same step.
      EXPECT_LT(parts.back().saved.front(), parts.front().saved.back());
      // The attention scores' pieces go with their part, or vanish under flash attention.
      EXPECT_EQ(parts[1].saved.size(), flash ? 0U : 3U);
    }
    EXPECT_EQ(blocks, 3);
  }
}

// GPT-7B under a quarter of its peak on a Titan X: the parameters and gradients take 25 of the
// 30.7 GiB, which leaves room for one block's 3 GiB state and not two. As one tensor, each block
// waited for the previous one's whole D2H in forward and for its own whole H2D in backward
// (1.28x); as the pieces its operators save, the copies run under the block's compute.
TEST(block_pieces, gpt_7b_hides_its_copies_where_one_block_state_fits_and_two_do_not) {
  const model_spec model = model_spec::load_named("gpt_7b");
  sim_options so = sim_preset("titan-x-pcie3");
  so.backing = sim_backing::phantom;
  so.device_capacity = std::size_t{1} << 40;
  so.host_capacity = std::size_t{1} << 42;
  runner_options o;
  o.batch = 1;
  o.steps = 3;
  o.real_math = false;
  run_report unlimited;
  {
    sim_device dev(so);
    unlimited = run_workload(dev, model, o);
  }
  const std::size_t budget = unlimited.peak_reserved_bytes / 4;
  o.device_limit = budget;
  o.policy = offload_policy::all;
  sim_device dev(so);
  const run_report r = run_workload(dev, model, o);
  EXPECT_LE(r.peak_reserved_bytes, budget);
  EXPECT_GT(r.swaps.bytes_out, 0U);
  EXPECT_LT(r.steady_step_ns(), 1.05 * unlimited.steady_step_ns())
      << "the blocks' copies did not hide under their compute (modelled clock)";
}

}  // namespace
}  // namespace gpuswap
