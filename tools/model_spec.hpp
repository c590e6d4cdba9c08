#pragma once
// model_spec: a network described by a small JSON file (tools/models/*.json). The file gives
// shapes; every size and FLOP count is derived here by the formulas of REFERENCE.md, never typed
// in, so that plan, simulate, the demo and the end-to-end tests all see the same network.
//
// File format (tools/models/README.md has the long version)
//
//   {
//     "name": "vgg16",                  required, the model's name
//     "description": "...",             optional
//     "input": [224, 224, 3],           per-sample shape: [H, W, C] (images, NHWC), [features],
//                                       [seq] (token ids, read by an embedding) or [seq, hidden]
//     "classes": 1000,                  the loss's class count; "$classes" refers to it
//     "dtype_bytes": 4,                 bytes per element (4 fp32, 2 bf16/fp16); default 4
//     "default_batch": 256,             default 1
//     "blocks": { "name": {"defaults": {"var": 1}, "layers": [...]}, ... },   optional
//     "layers": [ element, ... ]
//   }
//
// An element is a layer {"kind": ..., fields...}, a block use {"block": "bottleneck", "name":
// "res2a", "args": {"mid": 64}} that splices the block's layers in (named "res2a.<local>"),
// either of which may carry "repeat": n to chain n copies (named "<name>.0" .. "<name>.<n-1>").
// Every element may have "name" (unique; default "<kind>_<index>"), "inputs" (names of earlier
// layers, or "input" for the network's input, or inside a block for the block's input; default:
// the previous layer) and "comment". An integer or boolean field may be written "$var": a block
// argument, a block default, or "classes".
//
// Kinds and their fields (defaults in brackets):
//   conv        out_channels, kernel, stride [1], pad [0], bias [true]       input [H, W, C]
//   fc          outputs, bias [true], per_position [false]: apply to the last dimension only
//               (a [seq, hidden] input stays [seq, outputs]); otherwise the input is flattened
//   relu, flatten, batchnorm (params gamma and beta per channel = last dimension)
//   maxpool / avgpool   kernel, stride [kernel], pad [0], or global [false]  input [H, W, C]
//   add         inputs (two or more, same shape)
//   softmax_xent  the loss over the last dimension (one label per row); must be the last layer
//   transformer heads, hidden [input's], flash_attention [false]             input [seq, hidden]
//   embedding   vocab, hidden                                                input [seq] ids
//   layernorm   (params gamma and beta over the last dimension)
// transformer, embedding and layernorm are cost-model only (no reference math).
//
// A bad file is a config_error whose key names the file, the layer and the field.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace gpuswap {

enum class layer_kind : std::uint8_t {
  conv, fc, relu, maxpool, avgpool, add, batchnorm, flatten, softmax_xent,
  transformer, embedding, layernorm,
};

std::string_view to_string(layer_kind kind) noexcept;

struct layer_spec {
  std::string name, kind;
  layer_kind op = layer_kind::relu;
  int index = 0;
  std::vector<int> inputs;            // producing layer indices; -1 = the network input
  std::vector<int> in_shape;          // per sample, of inputs[0] (every input of add has it)
  std::vector<int> out_shape;         // per sample, e.g. {H, W, C} or {features} or {seq, hidden}
  std::size_t in_elems_per_sample = 0, out_elems_per_sample = 0, param_elems = 0;
  // Lowering to GEMM (im2col): the k*k-times-larger copy of one sample's input a conv needs
  // while it runs (H_out*W_out*k*k*C_in); 0 for a 1x1 stride-1 unpadded conv (its input already
  // is the matrix) and other kinds. Implementations lower an image at a time, so the plan does
  // not multiply it by the batch.
  std::size_t workspace_elems_per_sample = 0;
  double fwd_flops_per_sample = 0, bwd_flops_per_sample = 0;  // FLOPs = 2*MACs
  // What backward reads besides grad_out and the parameters: relu its output, conv/fc/
  // batchnorm/maxpool their input, softmax_xent its output (the probabilities), add/flatten/
  // avgpool nothing. A transformer block reports neither: everything it keeps (its input
  // included) is saved_bytes_per_sample_override, one buffer that forward writes and backward
  // reads.
  bool backward_needs_input = false, backward_needs_output = false;
  // transformer: Korthikanti's activation bytes for the whole block (see model_spec.cpp).
  std::size_t saved_bytes_per_sample_override = 0;

  // Kernel parameters for the math. Images are NHWC: in_h x in_w x in_channels.
  int kernel_h = 0, kernel_w = 0, stride = 1, pad = 0;
  int in_channels = 0, out_channels = 0;  // conv/pools: C; fc: inputs/outputs per row;
                                          // batchnorm/layernorm/softmax_xent: last dimension
  int in_h = 0, in_w = 0, out_h = 0, out_w = 0;
  int rows = 1;  // rows per sample for the row-wise kinds (fc per_position, softmax_xent, norms)
  bool bias = true;
  bool global_pool = false;
  bool per_position = false;
  int heads = 0, hidden = 0, seq = 0, vocab = 0;
  bool flash_attention = false;

  // False for the cost-model-only kinds (transformer, embedding, layernorm).
  bool has_reference_math() const noexcept;
};

struct model_spec {
  std::string name, description;
  std::string source;  // the file it came from ("" when parsed from text)
  std::vector<int> input_shape;
  int classes = 0;
  int dtype_bytes = 4;
  int default_batch = 1;
  std::vector<layer_spec> layers;

  static model_spec load_file(const std::string& path);
  // `name` is looked up as <dir>/<name>.json in each of model_dirs() in turn; a name ending in
  // ".json" or containing '/' is loaded as a path.
  static model_spec load_named(const std::string& name);
  // `origin` names the text in error messages (a file name).
  static model_spec parse(const nlohmann::json& doc, const std::string& origin);
  static model_spec parse_text(std::string_view text, const std::string& origin);

  std::size_t input_elems_per_sample() const noexcept;
  std::size_t param_count() const noexcept;
  std::size_t param_bytes() const noexcept { return param_count() * dtype_bytes; }
  double fwd_flops(int batch) const noexcept;
  double bwd_flops(int batch) const noexcept;
  // Bytes kept from forward for backward (the activations): the network input if a layer's
  // backward reads it, every output some backward reads, and the transformer blocks' saved state.
  std::size_t activation_bytes(int batch) const noexcept;

  // Per sample elements of the tensor `layer` produces; -1 is the network input.
  std::size_t tensor_elems_per_sample(int layer) const noexcept;
  // Whether backward reads the tensor `layer` produces (-1: the network input). A consumer whose
  // saved state is an override does not count (its override holds what it needs).
  bool tensor_saved_for_backward(int layer) const noexcept;
  // Activation bytes per sample attributed to `layer`: its output if saved, plus its override.
  std::size_t saved_bytes_per_sample(int layer) const noexcept;
  // Layers that read the tensor `layer` produces (-1: the network input), ascending.
  std::vector<int> consumers(int layer) const;
  // The softmax_xent layer (always the last one), or -1.
  int loss_layer() const noexcept;
  // Labels per sample: the loss layer's rows (1 for a classifier), 0 without a loss.
  std::size_t labels_per_sample() const noexcept;
  // Index of the layer called `layer_name`, or -1.
  int find(std::string_view layer_name) const noexcept;
  const layer_spec& layer(std::string_view layer_name) const;
};

// Names (without ".json") of the model files in model_dirs(), sorted, without duplicates.
std::vector<std::string> list_models();
// Where load_named looks, in order: $GPUSWAP_MODELS_DIR when set and not empty, then the
// directory compiled in as GPUSWAP_MODELS_DIR (the source tree's tools/models).
std::vector<std::string> model_dirs();

}  // namespace gpuswap
