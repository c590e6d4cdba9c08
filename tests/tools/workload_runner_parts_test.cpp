// A transformer block's saved state as the pieces its operators keep (Note [A block's saved
// pieces] in tools/workload_graph.cpp), and the runner carrying a block out part by part (Note
// [Parts of a step] in tools/workload_runner.cpp), so that its copies overlap the block's own
// compute where the budget holds one block's state and not two.
#include <gtest/gtest.h>

#include <cstddef>
#include <string>
#include <vector>

#include "allocator/caching_allocator.hpp"
#include "device/sim_device.hpp"
#include "prefetcher/offload_planner.hpp"
#include "support/small_sim.hpp"
#include "tools/model_spec.hpp"
#include "tools/workload_graph.hpp"
#include "tools/workload_runner.hpp"

namespace gpuswap {
namespace {

using testing_support::phantom_gpu;

// Batch 1, modelled math (phantom bytes have no values), `steps` steps.
runner_options modelled_run(int steps) {
  runner_options o;
  o.batch = 1;
  o.steps = steps;
  o.real_math = false;
  return o;
}

run_report run_on(const sim_options& so, const model_spec& model, const runner_options& o) {
  sim_device dev(so);
  return run_workload(dev, model, o);
}

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

// Note [Inside a step] (prefetcher/memory_timeline.cpp): where each piece lives inside the
// block's steps, for the planner to model what the runner does.
TEST(block_pieces, each_piece_lives_inside_its_steps_where_its_part_runs) {
  const model_spec model = small_gpt(false);
  const workload_graph g = build_workload_graph(model, 2);
  for (const layer_spec& layer : model.layers) {
    const auto& parts = g.parts[static_cast<std::size_t>(layer.index)];
    const tensor_info& out =
        g.profile.tensors[static_cast<std::size_t>(g.output_tensor[static_cast<std::size_t>(layer.index)])];
    EXPECT_EQ(out.made_at, 0) << layer.name;  // made and freed with the whole step
    EXPECT_EQ(out.freed_at, 1) << layer.name;
    double before = 0;
    for (std::size_t k = 0; k < parts.size(); ++k) {
      const double after = k + 1 == parts.size() ? 1.0 : before + parts[k].share;
      for (int t : parts[k].saved) {
        const tensor_info& piece = g.profile.tensors[static_cast<std::size_t>(t)];
        EXPECT_NEAR(piece.made_at, before, 1e-12) << piece.name;
        EXPECT_NEAR(piece.sent_at, after, 1e-12) << piece.name;
        // Backward runs the parts in reverse.
        EXPECT_NEAR(piece.needed_at, 1 - after, 1e-12) << piece.name;
        EXPECT_NEAR(piece.freed_at, 1 - before, 1e-12) << piece.name;
      }
      before = after;
    }
    if (!parts.empty()) {
      EXPECT_EQ(g.profile.tensors[static_cast<std::size_t>(parts.front().saved.front())].made_at, 0);
      EXPECT_EQ(g.profile.tensors[static_cast<std::size_t>(parts.back().saved.front())].sent_at, 1);
    }
  }
}

// The planner's model of a run (memory_timeline, from the graph's modelled step times) against
// the run itself on the simulator's modelled clock. Modelled as one allocation per step, sent
// out at its end, each block's whole state waited for the previous one's D2H: on an H100 under
// a quarter of GPT-7B's peak the model said 3.75 s of copies showed where the run showed 3.39 s,
// and on a Titan X 17.0 s where the run hid nearly all of them (0.26-0.40 s). With the pieces
// made, sent and freed where their parts run, the model is within a few percent on the H100.
// On the Titan X it still says 1.9 s: the plan aims a tenth below the allocator's budget (Note
// [Plannable budget] in tools/workload_runner.cpp), and at that aim one block's attention
// pieces wait for the previous block's last swap-outs, which under the whole budget the run
// does not.
TEST(block_pieces, the_planner_predicts_the_copy_time_the_run_exposes) {
  const model_spec model = model_spec::load_named("gpt_7b");
  struct row {
    const char* gpu;
    double fraction;
    double of_measured, of_step;  // tolerance: of the exposed time measured, of the step time
  };
  for (const row& c : {row{"h100-pcie5", 0.25, 0.05, 0}, row{"h100-pcie5", 0.5, 0.05, 0},
                       row{"titan-x-pcie3", 0.25, 0, 0.04}}) {
    SCOPED_TRACE(std::string(c.gpu) + " at " + std::to_string(c.fraction));
    const sim_options so = phantom_gpu(c.gpu);
    runner_options o = modelled_run(2);
    const run_report unlimited = run_on(so, model, o);
    o.device_limit = static_cast<std::size_t>(static_cast<double>(unlimited.peak_reserved_bytes) * c.fraction);
    o.policy = offload_policy::auto_;
    sim_device dev(so);
    const run_report r = run_workload(dev, model, o);
    const double measured = r.steady_step_ns() - unlimited.steady_step_ns();

    sim_device estimate(so);
    const workload_graph g = build_workload_graph(
        model, 1, [&estimate](const kernel_cost& k) { return estimate.kernel_ns(k); });
    planner_options po;
    po.policy = offload_policy::auto_;
    // What the runner plans against (Note [Plannable budget] in tools/workload_runner.cpp).
    const std::size_t whole = r.budget_bytes / caching_allocator::round_large * caching_allocator::round_large;
    po.budget_bytes = whole - whole / 10;
    po.d2h_bandwidth = so.d2h_bandwidth;
    po.h2d_bandwidth = so.h2d_bandwidth;
    po.d2h_latency_ns = so.d2h_latency_ns;
    po.h2d_latency_ns = so.h2d_latency_ns;
    const offload_plan plan = plan_offload(g.profile, po);
    // At a quarter a block's pieces all come back when its backward step starts (the
    // prefetcher returns what the step reads whatever the budget): over the plan's aim, within
    // the allocator's budget, as in the run.
    EXPECT_LE(plan.predicted_peak_bytes, r.budget_bytes) << plan.explain;
    EXPECT_NEAR(plan.predicted_exposed_ns, measured,
                c.of_measured * measured + c.of_step * unlimited.steady_step_ns())
        << plan.explain << "; measured " << measured / 1e6 << " ms";
  }
}

// GPT-7B under a quarter of its peak on a Titan X: the parameters and gradients take 25 of the
// 30.7 GiB, which leaves room for one block's 3 GiB state and not two. As one tensor, each block
// waited for the previous one's whole D2H in forward and for its own whole H2D in backward
// (1.28x); as the pieces its operators save, the copies run under the block's compute.
TEST(block_pieces, gpt_7b_hides_its_copies_where_one_block_state_fits_and_two_do_not) {
  const model_spec model = model_spec::load_named("gpt_7b");
  const sim_options so = phantom_gpu("titan-x-pcie3");
  runner_options o = modelled_run(3);
  const run_report unlimited = run_on(so, model, o);
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
