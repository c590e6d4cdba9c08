#include "tools/workload_graph.hpp"

#include <fmt/format.h>

#include <algorithm>

namespace gpuswap {

// Note [A block's saved pieces]
// A transformer block's saved activations (saved_bytes_per_sample_override: Korthikanti et al.'s
// 34sh + 5as^2 bytes at 16 bits) are not one buffer in a framework: they are a dozen tensors,
// each saved by one operator as forward reaches it, and read and freed by that operator's
// backward. Modelled as one 3 GiB tensor made at the start of the block's step and freed at the
// end of its backward step, GPT-7B under a quarter of its peak on a Titan X (parameters and
// gradients take 25 of its 30.7 GiB) had room for one block's state and not two: each forward
// step waited for the previous block's whole D2H (271 ms) before it could allocate, and each
// backward step for its own whole H2D, so every policy exposed every copy (1.28x against a
// 1.00x floor), and the planner predicted exactly that. So the graph splits the state into the
// pieces the operators save, in six groups that run as six kernels (layer_part), each with its
// share of the block's FLOPs: a piece can leave as soon as its operator has run, while the
// block goes on, and the next block's pieces can come back as this block's backward frees its
// own. The pieces and the FLOPs (s sequence, h hidden, a heads; 2 FLOPs per MAC):
//   qkv       6sh^2   LN1 input 2sh, QKV input 2sh, Q and K 4sh, V 2sh
//   scores    2s^2h   softmax output 2as^2, its dropout mask as^2, dropout output 2as^2
//   context   2s^2h   output projection input 2sh
//   proj      2sh^2   dropout mask sh, LN2 input 2sh, FC1 input 2sh
//   fc1       8sh^2   GeLU input 8sh, FC2 input 8sh
//   fc2       8sh^2   dropout mask sh
// (34sh + 5as^2 in all; with flash attention the as^2 pieces are not kept). Piece ids are given
// in the order backward needs them (last operator first), which is the order the prefetcher
// brings back tensors needed by the same step. A layer with saved state that is not a
// transformer keeps one piece made by one kernel.

namespace {

void add_use(tensor_info& t, int step) {
  auto it = std::lower_bound(t.use_steps.begin(), t.use_steps.end(), step);
  if (it == t.use_steps.end() || *it != step) t.use_steps.insert(it, step);
}

struct piece_spec {
  const char* name;
  std::size_t sh, as2;  // 16-bit bytes: sh * s * h + as2 * a * s * s
};
struct part_spec {
  double sh2, s2h;  // FLOPs: sh2 * s*h*h + s2h * s*s*h
  std::vector<piece_spec> pieces;
};

std::size_t piece_bytes(const piece_spec& piece, std::size_t s, std::size_t h, std::size_t a,
                        std::size_t dtype_bytes, std::size_t batch) {
  return (piece.sh * s * h + piece.as2 * a * s * s) * dtype_bytes / 2 * batch;
}

// Note [A block's saved pieces].
const std::vector<part_spec>& transformer_parts() {
  static const std::vector<part_spec> parts = {
      {6, 0, {{"ln1_in", 2, 0}, {"qkv_in", 2, 0}, {"q_k", 4, 0}, {"v", 2, 0}}},
      {0, 2, {{"softmax", 0, 2}, {"attn_dropout_mask", 0, 1}, {"attn_dropout_out", 0, 2}}},
      {0, 2, {{"proj_in", 2, 0}}},
      {2, 0, {{"proj_dropout_mask", 1, 0}, {"ln2_in", 2, 0}, {"fc1_in", 2, 0}}},
      {8, 0, {{"gelu_in", 8, 0}, {"fc2_in", 8, 0}}},
      {8, 0, {{"mlp_dropout_mask", 1, 0}}},
  };
  return parts;
}

// Where each part's pieces live inside the block's steps (Note [Parts of a step] in
// tools/workload_runner.cpp): in forward part k runs over [before_k, before_k + share_k) of the
// step, where before_k is the shares of the parts ahead of it, its pieces made at its start and
// sent out at its end; backward runs the parts in reverse, so part k runs over
// [1 - before_k - share_k, 1 - before_k), its pieces needed at its start and freed at its end.
void place_pieces(workload_profile& p, const std::vector<layer_part>& parts) {
  double before = 0;
  for (std::size_t k = 0; k < parts.size(); ++k) {
    const double after = k + 1 == parts.size() ? 1.0 : std::min(1.0, before + parts[k].share);
    for (int id : parts[k].saved) {
      tensor_info& t = p.tensors[static_cast<std::size_t>(id)];
      t.made_at = before;
      t.sent_at = after;
      t.needed_at = std::max(0.0, 1.0 - after);
      t.freed_at = std::max(0.0, 1.0 - before);
    }
    before = after;
  }
}

}  // namespace

workload_graph build_workload_graph(const model_spec& model, int batch) {
  workload_graph g;
  g.batch = batch;
  g.layers = static_cast<int>(model.layers.size());
  const auto b = static_cast<std::size_t>(batch);
  const auto dt = static_cast<std::size_t>(model.dtype_bytes);
  workload_profile& p = g.profile;

  for (int l = 0; l < g.layers; ++l) p.steps.push_back(step_info{phase::forward, l, 0});
  for (int l = g.layers - 1; l >= 0; --l) p.steps.push_back(step_info{phase::backward, l, 0});
  p.step_scratch_bytes.assign(p.steps.size(), 0);

  auto new_tensor = [&](std::size_t bytes, int producer_step, std::string name) {
    tensor_info t;
    t.id = static_cast<int>(p.tensors.size());
    t.bytes = bytes;
    t.producer_step = producer_step;
    t.name = std::move(name);
    p.tensors.push_back(std::move(t));
    return p.tensors.back().id;
  };

  // The network input exists before the first step; it is "produced" by step 0.
  g.input_tensor = new_tensor(model.input_elems_per_sample() * b * dt, 0, "input");
  g.output_tensor.assign(model.layers.size(), workload_graph::no_tensor);
  g.parts.assign(model.layers.size(), {});
  for (const layer_spec& layer : model.layers) {
    const int l = layer.index;
    g.output_tensor[static_cast<std::size_t>(l)] =
        new_tensor(layer.out_elems_per_sample * b * dt, g.forward_step(l), layer.name + ".out");
    if (layer.saved_bytes_per_sample_override == 0) continue;
    const std::size_t total = layer.saved_bytes_per_sample_override * b;
    std::vector<layer_part>& parts = g.parts[static_cast<std::size_t>(l)];
    if (layer.op == layer_kind::transformer && layer.seq > 0 && layer.hidden > 0 && layer.heads > 0) {
      // Note [A block's saved pieces]
      const auto sq = static_cast<std::size_t>(layer.seq), h = static_cast<std::size_t>(layer.hidden);
      const auto a = static_cast<std::size_t>(layer.heads);
      const double sd = static_cast<double>(sq), hd = static_cast<double>(h);
      const std::vector<part_spec>& spec = transformer_parts();
      double flops = 0;
      std::size_t made = 0;
      for (const part_spec& ps : spec) {
        flops += ps.sh2 * sd * hd * hd + ps.s2h * sd * sd * hd;
        for (const piece_spec& piece : ps.pieces) {
          if (piece.as2 == 0 || !layer.flash_attention) made += piece_bytes(piece, sq, h, a, dt, b);
        }
      }
      // The 16-bit formula rounds for other widths; what it rounds away stays in the last
      // piece made, so that the pieces add up to the layer's saved bytes.
      if (made <= total) {
        parts.resize(spec.size());
        int last = workload_graph::no_tensor;
        for (std::size_t k = spec.size(); k-- > 0;) {  // ids in the order backward needs them
          parts[k].share = (spec[k].sh2 * sd * hd * hd + spec[k].s2h * sd * sd * hd) / flops;
          for (std::size_t i = spec[k].pieces.size(); i-- > 0;) {
            const piece_spec& piece = spec[k].pieces[i];
            if (piece.as2 != 0 && layer.flash_attention) continue;
            last = new_tensor(piece_bytes(piece, sq, h, a, dt, b), g.forward_step(l),
                              fmt::format("{}.saved.{}", layer.name, piece.name));
            parts[k].saved.push_back(last);
          }
        }
        p.tensors[static_cast<std::size_t>(last)].bytes += total - made;
        place_pieces(p, parts);
        continue;
      }
    }
    parts.push_back(layer_part{1.0, {new_tensor(total, g.forward_step(l), layer.name + ".saved")}});
  }

  for (const layer_spec& layer : model.layers) {
    const int l = layer.index;
    for (int in : layer.inputs) {
      tensor_info& t = p.tensors[static_cast<std::size_t>(g.tensor_of(in))];
      add_use(t, g.forward_step(l));
      if (layer.backward_needs_input) add_use(t, g.backward_step(l));
      if (layer.op == layer_kind::conv) t.conv_input = true;
    }
    tensor_info& out = p.tensors[static_cast<std::size_t>(g.output_tensor[static_cast<std::size_t>(l)])];
    if (layer.backward_needs_output) add_use(out, g.backward_step(l));
    for (const layer_part& part : g.parts[static_cast<std::size_t>(l)]) {
      for (int s : part.saved) add_use(p.tensors[static_cast<std::size_t>(s)], g.backward_step(l));
    }

    // Costs: FLOPs from the spec; memory traffic reads the inputs and parameters and writes
    // the output (backward: about twice that), which is what bounds the elementwise kinds.
    const double in_bytes = static_cast<double>(layer.in_elems_per_sample * layer.inputs.size() * b * dt);
    const double out_bytes = static_cast<double>(layer.out_elems_per_sample * b * dt);
    const double param_bytes = static_cast<double>(layer.param_elems * dt);
    g.forward_cost.push_back(
        kernel_cost{layer.fwd_flops_per_sample * batch, in_bytes + out_bytes + param_bytes, 0});
    g.backward_cost.push_back(kernel_cost{layer.bwd_flops_per_sample * batch,
                                          2 * (in_bytes + out_bytes + param_bytes), 0});
    g.param_bytes += layer.param_elems * dt;

    // Scratch while the step runs: the conv lowering workspace; in backward also the error
    // signals of the output and of each input.
    // One image at a time is lowered (Note [Workspace per image] in tools/plan_report.cpp).
    const std::size_t workspace = layer.workspace_elems_per_sample * dt;
    p.step_scratch_bytes[static_cast<std::size_t>(g.forward_step(l))] = workspace;
    p.step_scratch_bytes[static_cast<std::size_t>(g.backward_step(l))] =
        workspace + layer.out_elems_per_sample * b * dt +
        layer.in_elems_per_sample * layer.inputs.size() * b * dt;
  }
  // Parameters, their gradients, and the labels stay on the device all along.
  p.resident_bytes = 2 * g.param_bytes + model.labels_per_sample() * b * sizeof(int);

  // The loss's input and output never leave (the loss reads its probabilities right back);
  // tensors nobody reads after they are made are never worth moving either.
  for (tensor_info& t : p.tensors) {
    if (t.use_steps.empty()) t.use_steps.push_back(t.producer_step);
  }
  if (const int loss = model.loss_layer(); loss >= 0) {
    p.tensors[static_cast<std::size_t>(g.output_tensor[static_cast<std::size_t>(loss)])].offloadable = false;
  }
  return g;
}

}  // namespace gpuswap
