#include "tools/model_spec.hpp"

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <unordered_map>
#include <utility>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/errors.hpp"

namespace gpuswap {

// Note [Derived, not typed]
// A model file gives the shapes of a network, as a paper's table does; parameter counts, output
// sizes, FLOPs, workspace and saved bytes are computed here from REFERENCE.md's formulas:
//   conv  params C_out*k*k*C_in + C_out, output H_out*W_out*C_out,
//         MACs H_out*W_out*C_in*C_out*k*k (FLOPs = 2*MACs), im2col workspace H_out*W_out*k*k*C_in;
//   fc    params outputs*inputs + outputs, MACs inputs*outputs (per row);
//   backward of conv and fc costs twice forward (data gradient and weight gradient), once when
//   the input is the network's (no data gradient is needed);
//   non-linearities, pooling and normalisation: a few FLOPs per element (negligible, as the
//   reference says, but not zero so that the simulator charges them something).
// Typing the figures in would let a file disagree with itself; deriving them makes the worked
// checks of REFERENCE.md (MNIST-style CNN, VGG-16, ResNet-50) tests of this code.
//
// Note [Transformer block]
// One GPT block (attention + 4h MLP, two layernorms) on a [seq, hidden] input. Parameters
// 12h^2 + 13h. Forward FLOPs 24*s*h^2*(1 + s/(6h)) per sample, backward twice that (Korthikanti
// et al. 2022). Saved activations, per sample, 16-bit: s*h*(34 + 5*a*s/h) bytes, or 34*s*h with
// flash attention (the a*s^2 score and softmax terms are recomputed, not kept). The 34 mixes
// 2-byte tensors and 1-byte dropout masks, so for other element sizes the figure is scaled by
// dtype_bytes/2 (an approximation; the reference gives only the 16-bit figure).

#ifndef GPUSWAP_MODELS_DIR
// tools/CMakeLists.txt is expected to define this for gpuswap_tools_lib; until it does, the
// source tree's models directory is found next to this file (CMake passes absolute paths).
#define GPUSWAP_MODELS_DIR_FROM_FILE 1
#endif

namespace {

using json = nlohmann::json;

constexpr int max_block_depth = 8;
constexpr std::size_t max_dim = std::size_t{1} << 24;
constexpr std::size_t max_elems = std::size_t{1} << 48;

std::string compiled_models_dir() {
#ifdef GPUSWAP_MODELS_DIR_FROM_FILE
  return (std::filesystem::path(__FILE__).parent_path() / "models").string();
#else
  return GPUSWAP_MODELS_DIR;
#endif
}

std::string short_dump(const json& value) {
  std::string text = value.is_string() ? value.get<std::string>() : value.dump();
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  return text;
}

std::size_t product(const std::vector<int>& shape) {
  std::size_t n = 1;
  for (int d : shape) n *= static_cast<std::size_t>(d);
  return n;
}

struct kind_info {
  layer_kind kind;
  std::string_view name;
  std::vector<std::string_view> fields;  // besides name, kind, inputs, repeat, comment
};

constexpr std::string_view kind_names[] = {
    "conv", "fc", "relu", "maxpool", "avgpool", "add", "batchnorm", "flatten", "softmax_xent",
    "transformer", "embedding", "layernorm"};

const std::vector<kind_info>& kinds() {
  static const std::vector<kind_info> table{
      {layer_kind::conv, "conv", {"out_channels", "kernel", "stride", "pad", "bias"}},
      {layer_kind::fc, "fc", {"outputs", "bias", "per_position"}},
      {layer_kind::relu, "relu", {}},
      {layer_kind::maxpool, "maxpool", {"kernel", "stride", "pad", "global"}},
      {layer_kind::avgpool, "avgpool", {"kernel", "stride", "pad", "global"}},
      {layer_kind::add, "add", {}},
      {layer_kind::batchnorm, "batchnorm", {}},
      {layer_kind::flatten, "flatten", {}},
      {layer_kind::softmax_xent, "softmax_xent", {}},
      {layer_kind::transformer, "transformer", {"heads", "hidden", "flash_attention"}},
      {layer_kind::embedding, "embedding", {"vocab", "hidden"}},
      {layer_kind::layernorm, "layernorm", {}},
  };
  return table;
}

std::string kind_list() {
  std::string out;
  for (const auto& k : kinds()) {
    if (!out.empty()) out += ", ";
    out += k.name;
  }
  return out;
}

// One block instance, or the top level: what "input" and "$var" mean in it.
struct scope {
  std::string prefix;  // "" at the top level, "res2a." inside block instance res2a
  int input = -1;      // the layer "input" refers to
  std::map<std::string, json, std::less<>> vars;
  int depth = 0;
};

// Reads one element's fields, resolving "$var", and reports errors naming the place.
class field_reader {
 public:
  field_reader(const json& element, const scope& sc, std::string where)
      : element_(element), scope_(sc), where_(std::move(where)) {}

  const std::string& where() const { return where_; }
  void set_where(std::string where) { where_ = std::move(where); }

  [[noreturn]] void fail(std::string_view field, std::string_view value,
                         std::string_view accepted, std::string_view problem) const {
    const std::string key = field.empty() ? where_ : fmt::format("{}, field {}", where_, field);
    throw_config_error(key, value, accepted, problem);
  }

  bool has(std::string_view field) const { return element_.contains(std::string(field)); }

  // The field's value with a "$var" reference replaced by the variable's value.
  std::optional<json> get(std::string_view field) const {
    auto it = element_.find(std::string(field));
    if (it == element_.end()) return std::nullopt;
    return resolve(field, *it);
  }

  json resolve(std::string_view field, const json& value) const {
    if (!value.is_string()) return value;
    const auto& text = value.get_ref<const std::string&>();
    if (text.empty() || text[0] != '$') return value;
    auto var = scope_.vars.find(std::string_view(text).substr(1));
    if (var == scope_.vars.end()) {
      std::string known;
      for (const auto& [k, v] : scope_.vars) known += (known.empty() ? "$" : ", $") + k;
      fail(field, text, known.empty() ? "no variables are defined here" : known,
           "unknown variable");
    }
    return var->second;
  }

  int get_int(std::string_view field, std::optional<int> fallback, int min_value) const {
    auto value = get(field);
    if (!value) {
      if (!fallback) fail(field, "(missing)", fmt::format("an integer >= {}", min_value),
                          "required field is missing");
      return *fallback;
    }
    if (!value->is_number_integer()) {
      fail(field, short_dump(*value), fmt::format("an integer >= {}", min_value),
           "not an integer");
    }
    const auto v = value->get<std::int64_t>();
    if (v < min_value || v > static_cast<std::int64_t>(max_dim)) {
      fail(field, short_dump(*value), fmt::format("an integer from {} to {}", min_value, max_dim),
           "out of range");
    }
    return static_cast<int>(v);
  }

  bool get_bool(std::string_view field, bool fallback) const {
    auto value = get(field);
    if (!value) return fallback;
    if (!value->is_boolean()) fail(field, short_dump(*value), "true or false", "not a boolean");
    return value->get<bool>();
  }

  void check_fields(const std::vector<std::string_view>& common,
                    const std::vector<std::string_view>& specific, std::string_view what) const {
    for (const auto& [key, value] : element_.items()) {
      const auto known = [&](const std::vector<std::string_view>& list) {
        return std::find(list.begin(), list.end(), key) != list.end();
      };
      if (known(common) || known(specific)) continue;
      std::string accepted;
      for (auto f : common) accepted += (accepted.empty() ? "" : ", ") + std::string(f);
      for (auto f : specific) accepted += ", " + std::string(f);
      fail(key, short_dump(value), accepted, fmt::format("unknown field for {}", what));
    }
  }

 private:
  const json& element_;
  const scope& scope_;
  std::string where_;
};

// True when "$name" occurs as a string anywhere in `value`.
bool mentions(const json& value, const std::string& ref) {
  if (value.is_string()) return value.get_ref<const std::string&>() == ref;
  if (value.is_structured()) {
    for (const auto& item : value) {
      if (mentions(item, ref)) return true;
    }
  }
  return false;
}

class builder {
 public:
  builder(model_spec& model, const json* blocks, std::string origin)
      : m_(model), blocks_(blocks), origin_(std::move(origin)) {}

  const std::string& origin() const { return origin_; }

  // Expands the array `list` in `sc`; `where` names it. Returns the last layer emitted, or
  // `prev` when the list emitted none.
  int expand(const json& list, const scope& sc, const std::string& where, int prev) {
    for (std::size_t i = 0; i < list.size(); ++i) {
      prev = expand_element(list[i], sc, fmt::format("{}[{}]", where, i), prev);
    }
    return prev;
  }

 private:
  [[noreturn]] void fail_at(const std::string& where, std::string_view value,
                            std::string_view accepted, std::string_view problem) const {
    throw_config_error(where, value, accepted, problem);
  }

  int expand_element(const json& element, const scope& sc, const std::string& where, int prev) {
    if (!element.is_object()) {
      fail_at(where, short_dump(element), "a layer object {\"kind\": ...} or a block use",
              "not an object");
    }
    field_reader r(element, sc, where);
    const int repeat = r.get_int("repeat", 1, 1);
    std::optional<std::string> base;
    if (auto name = element.find("name"); name != element.end()) {
      if (!name->is_string() || name->get_ref<const std::string&>().empty()) {
        r.fail("name", short_dump(*name), "a non-empty string", "bad layer name");
      }
      base = name->get<std::string>();
      if (*base == "input") {
        r.fail("name", *base, "any other name", "\"input\" names the network's (or block's) input");
      }
      if (base->find('.') != std::string::npos) {
        r.fail("name", *base, "a name without '.'", "'.' separates block and repeat names");
      }
    }
    const bool is_block = element.contains("block");
    if (is_block && element.contains("kind")) {
      r.fail("block", short_dump(element["block"]), "either \"kind\" or \"block\"",
             "an element is a layer or a block use, not both");
    }
    for (int i = 0; i < repeat; ++i) {
      std::optional<std::string> name = base;
      if (base && repeat > 1) name = fmt::format("{}.{}", *base, i);
      // Only the first copy reads the element's "inputs"; the others chain on.
      const bool explicit_inputs = i == 0;
      prev = is_block ? expand_block(element, sc, where, name, prev, explicit_inputs)
                      : emit_layer(element, sc, where, name, prev, explicit_inputs);
    }
    return prev;
  }

  std::vector<int> read_inputs(const json& element, const field_reader& r, const scope& sc,
                               int prev, bool use_explicit) {
    auto it = element.find("inputs");
    if (it == element.end() || !use_explicit) return {prev};
    if (!it->is_array() || it->empty()) {
      r.fail("inputs", short_dump(*it), "a non-empty array of earlier layer names or \"input\"",
             "bad inputs");
    }
    std::vector<int> out;
    for (const auto& ref : *it) {
      if (!ref.is_string()) {
        r.fail("inputs", short_dump(ref), "names of earlier layers or \"input\"", "not a name");
      }
      out.push_back(resolve_name(ref.get<std::string>(), r, sc));
    }
    return out;
  }

  int resolve_name(const std::string& ref, const field_reader& r, const scope& sc) const {
    if (ref == "input") return sc.input;
    // Innermost scope first: "res2a.x" inside res2a, then outer scopes, then the top level.
    std::string prefix = sc.prefix;
    while (true) {
      if (auto it = names_.find(prefix + ref); it != names_.end()) return it->second;
      if (prefix.empty()) break;
      prefix.pop_back();
      const auto dot = prefix.rfind('.');
      prefix = dot == std::string::npos ? std::string() : prefix.substr(0, dot + 1);
    }
    r.fail("inputs", ref, "the name of an earlier layer, or \"input\"", "no such earlier layer");
  }

  int expand_block(const json& element, const scope& sc, const std::string& where,
                   const std::optional<std::string>& name, int prev, bool explicit_inputs) {
    field_reader r(element, sc, name ? fmt::format("{} ({})", where, sc.prefix + *name) : where);
    r.check_fields({"block", "name", "args", "inputs", "repeat", "comment"}, {}, "a block use");
    const json& block_name = element["block"];
    if (!block_name.is_string()) r.fail("block", short_dump(block_name), "a block name", "");
    const auto& bname = block_name.get_ref<const std::string&>();
    if (!name) r.fail("name", "(missing)", "a name for this block instance", "required");
    if (sc.depth >= max_block_depth) {
      r.fail("block", bname, fmt::format("blocks nested at most {} deep", max_block_depth),
             "blocks nested too deep (a block using itself?)");
    }
    const json* def = nullptr;
    if (blocks_ != nullptr) {
      if (auto it = blocks_->find(bname); it != blocks_->end()) def = &*it;
    }
    if (def == nullptr) {
      std::string known;
      if (blocks_ != nullptr) {
        for (const auto& [k, v] : blocks_->items()) known += (known.empty() ? "" : ", ") + k;
      }
      r.fail("block", bname, known.empty() ? "no blocks are defined" : known, "unknown block");
    }
    const std::string def_where = fmt::format("{}: blocks.{}", origin_, bname);
    if (!def->is_object() || !def->contains("layers") || !(*def)["layers"].is_array()) {
      fail_at(def_where, "", "an object with \"layers\": [...] and optional \"defaults\"",
              "bad block definition");
    }
    field_reader def_reader(*def, sc, def_where);
    def_reader.check_fields({"layers", "defaults", "comment", "description"}, {},
                            "a block definition");

    const std::vector<int> in = read_inputs(element, r, sc, prev, explicit_inputs);
    if (in.size() != 1) {
      r.fail("inputs", short_dump(element["inputs"]), "exactly one input", "a block has one input");
    }
    scope inner;
    inner.prefix = sc.prefix + *name + ".";
    inner.input = in[0];
    inner.depth = sc.depth + 1;
    inner.vars = sc.vars;
    if (auto d = def->find("defaults"); d != def->end()) {
      if (!d->is_object()) fail_at(def_where, short_dump(*d), "an object", "bad defaults");
      for (const auto& [k, v] : d->items()) inner.vars[k] = def_reader.resolve("defaults", v);
    }
    if (auto a = element.find("args"); a != element.end()) {
      if (!a->is_object()) r.fail("args", short_dump(*a), "an object {\"var\": value}", "");
      for (const auto& [k, v] : a->items()) {
        const bool has_default = def->contains("defaults") && (*def)["defaults"].contains(k);
        if (!has_default && !mentions((*def)["layers"], "$" + k)) {
          r.fail("args", k, fmt::format("variables block {} uses", bname),
                 "argument not used by the block");
        }
        inner.vars[k] = r.resolve("args", v);
      }
    }
    const std::string inner_where = fmt::format("{} > blocks.{}.layers", r.where(), bname);
    const int last = expand((*def)["layers"], inner, inner_where, inner.input);
    if (last == inner.input) fail_at(def_where, "", "at least one layer", "empty block");
    return last;
  }

  int emit_layer(const json& element, const scope& sc, const std::string& where,
                 const std::optional<std::string>& name, int prev, bool explicit_inputs) {
    field_reader r(element, sc, name ? fmt::format("{} ({})", where, sc.prefix + *name) : where);
    const auto kind_it = element.find("kind");
    if (kind_it == element.end()) {
      r.fail("kind", "(missing)", kind_list(), "every layer needs a kind (or a \"block\")");
    }
    if (!kind_it->is_string()) r.fail("kind", short_dump(*kind_it), kind_list(), "not a string");
    const auto& kind_name = kind_it->get_ref<const std::string&>();
    const auto info = std::find_if(kinds().begin(), kinds().end(),
                                   [&](const kind_info& k) { return k.name == kind_name; });
    if (info == kinds().end()) r.fail("kind", kind_name, kind_list(), "unknown kind");

    layer_spec l;
    l.index = static_cast<int>(m_.layers.size());
    l.kind = kind_name;
    l.op = info->kind;
    l.name = sc.prefix + (name ? *name : fmt::format("{}_{}", kind_name, l.index));
    r.set_where(fmt::format("{} ({})", where, l.name));
    if (names_.contains(l.name)) r.fail("name", l.name, "a unique name", "duplicate layer name");
    r.check_fields({"name", "kind", "inputs", "repeat", "comment"}, info->fields,
                   fmt::format("kind {}", kind_name));

    l.inputs = read_inputs(element, r, sc, prev, explicit_inputs);
    if (l.op == layer_kind::add) {
      if (l.inputs.size() < 2) {
        r.fail("inputs", element.contains("inputs") ? short_dump(element["inputs"]) : "(missing)",
               "two or more earlier layer names", "add sums two or more inputs");
      }
    } else if (l.inputs.size() != 1) {
      r.fail("inputs", short_dump(element["inputs"]), "exactly one input",
             fmt::format("{} takes one input", kind_name));
    }
    l.in_shape = shape_of(l.inputs[0]);
    l.in_elems_per_sample = product(l.in_shape);
    derive(l, r);
    if (l.out_elems_per_sample == 0 || l.out_elems_per_sample > max_elems) {
      r.fail("", fmt::format("{}", l.out_elems_per_sample), "a non-empty output",
             "output size out of range");
    }
    names_.emplace(l.name, l.index);
    m_.layers.push_back(std::move(l));
    return m_.layers.back().index;
  }

  std::vector<int> shape_of(int layer) const {
    return layer < 0 ? m_.input_shape : m_.layers[static_cast<std::size_t>(layer)].out_shape;
  }

  static std::string shape_text(const std::vector<int>& shape) {
    return fmt::format("[{}]", fmt::join(shape, ", "));
  }

  void need_rank(const layer_spec& l, const field_reader& r, std::size_t rank,
                 std::string_view what) const {
    if (l.in_shape.size() != rank) {
      r.fail("inputs", shape_text(l.in_shape), what,
             fmt::format("{} needs a rank-{} input", l.kind, rank));
    }
  }

  void derive(layer_spec& l, const field_reader& r) const {
    const double in_elems = static_cast<double>(l.in_elems_per_sample);
    const bool input_is_data = l.inputs[0] < 0;
    switch (l.op) {
      case layer_kind::conv: {
        need_rank(l, r, 3, "an image [H, W, C]");
        l.in_h = l.in_shape[0];
        l.in_w = l.in_shape[1];
        l.in_channels = l.in_shape[2];
        l.out_channels = r.get_int("out_channels", std::nullopt, 1);
        l.kernel_h = l.kernel_w = r.get_int("kernel", std::nullopt, 1);
        l.stride = r.get_int("stride", 1, 1);
        l.pad = r.get_int("pad", 0, 0);
        l.bias = r.get_bool("bias", true);
        window_output(l, r);
        l.out_shape = {l.out_h, l.out_w, l.out_channels};
        const std::size_t k2 = static_cast<std::size_t>(l.kernel_h) * l.kernel_w;
        l.param_elems = static_cast<std::size_t>(l.out_channels) * k2 * l.in_channels +
                        (l.bias ? l.out_channels : 0);
        const double macs = static_cast<double>(l.out_h) * l.out_w * l.in_channels *
                            l.out_channels * static_cast<double>(k2);
        l.fwd_flops_per_sample = 2 * macs;
        l.bwd_flops_per_sample = (input_is_data ? 1 : 2) * 2 * macs;
        const bool plain_gemm = k2 == 1 && l.stride == 1 && l.pad == 0;
        l.workspace_elems_per_sample =
            plain_gemm ? 0 : static_cast<std::size_t>(l.out_h) * l.out_w * k2 * l.in_channels;
        l.backward_needs_input = true;
        break;
      }
      case layer_kind::fc: {
        if (l.in_shape.empty()) need_rank(l, r, 1, "a non-empty shape");
        l.out_channels = r.get_int("outputs", std::nullopt, 1);
        l.bias = r.get_bool("bias", true);
        l.per_position = r.get_bool("per_position", false);
        if (l.per_position) {
          if (l.in_shape.size() < 2) {
            r.fail("per_position", "true", "an input of rank 2 or more ([seq, hidden])",
                   "per_position applies to the last dimension of each position");
          }
          l.in_channels = l.in_shape.back();
          l.rows = static_cast<int>(l.in_elems_per_sample / l.in_channels);
          l.out_shape = l.in_shape;
          l.out_shape.back() = l.out_channels;
        } else {
          if (l.in_elems_per_sample > max_dim) {
            r.fail("inputs", shape_text(l.in_shape), fmt::format("at most {} inputs", max_dim),
                   "too many inputs for fc");
          }
          l.in_channels = static_cast<int>(l.in_elems_per_sample);
          l.rows = 1;
          l.out_shape = {l.out_channels};
        }
        l.param_elems = static_cast<std::size_t>(l.out_channels) * l.in_channels +
                        (l.bias ? l.out_channels : 0);
        const double macs = static_cast<double>(l.rows) * l.in_channels * l.out_channels;
        l.fwd_flops_per_sample = 2 * macs;
        l.bwd_flops_per_sample = (input_is_data ? 1 : 2) * 2 * macs;
        l.backward_needs_input = true;
        break;
      }
      case layer_kind::relu:
        l.out_shape = l.in_shape;
        l.fwd_flops_per_sample = in_elems;
        l.bwd_flops_per_sample = in_elems;
        l.backward_needs_output = true;
        break;
      case layer_kind::maxpool:
      case layer_kind::avgpool: {
        need_rank(l, r, 3, "an image [H, W, C]");
        l.in_h = l.in_shape[0];
        l.in_w = l.in_shape[1];
        l.in_channels = l.out_channels = l.in_shape[2];
        l.global_pool = r.get_bool("global", false);
        if (l.global_pool) {
          for (auto f : {"kernel", "stride", "pad"}) {
            if (r.has(f)) r.fail(f, "", "no kernel, stride or pad with global", "conflicting");
          }
          l.kernel_h = l.in_h;
          l.kernel_w = l.in_w;
          l.stride = 1;
          l.pad = 0;
        } else {
          l.kernel_h = l.kernel_w = r.get_int("kernel", std::nullopt, 1);
          l.stride = r.get_int("stride", l.kernel_h, 1);
          l.pad = r.get_int("pad", 0, 0);
          if (2 * l.pad > l.kernel_h) {
            r.fail("pad", fmt::format("{}", l.pad), "at most half the kernel",
                   "a window would lie wholly in the padding");
          }
        }
        window_output(l, r);
        l.out_shape = {l.out_h, l.out_w, l.out_channels};
        const double window_reads = static_cast<double>(l.out_h) * l.out_w * l.out_channels *
                                    l.kernel_h * l.kernel_w;
        l.fwd_flops_per_sample = window_reads;
        l.bwd_flops_per_sample = window_reads;
        // max: backward finds each window's maximum again in the input (ties: the first in scan
        // order); avg: backward needs only the shapes.
        l.backward_needs_input = l.op == layer_kind::maxpool;
        break;
      }
      case layer_kind::add:
        for (int in : l.inputs) {
          if (shape_of(in) != l.in_shape) {
            r.fail("inputs", shape_text(shape_of(in)),
                   fmt::format("every input shaped {}", shape_text(l.in_shape)),
                   "add's inputs differ in shape");
          }
        }
        l.out_shape = l.in_shape;
        l.fwd_flops_per_sample = in_elems * static_cast<double>(l.inputs.size() - 1);
        l.bwd_flops_per_sample = in_elems * static_cast<double>(l.inputs.size());
        break;
      case layer_kind::batchnorm:
      case layer_kind::layernorm:
        if (l.in_shape.empty()) need_rank(l, r, 1, "a non-empty shape");
        l.in_channels = l.out_channels = l.in_shape.back();
        l.rows = static_cast<int>(l.in_elems_per_sample / l.in_channels);
        l.out_shape = l.in_shape;
        l.param_elems = 2 * static_cast<std::size_t>(l.in_channels);
        l.fwd_flops_per_sample = 8 * in_elems;
        l.bwd_flops_per_sample = 12 * in_elems;
        l.backward_needs_input = true;
        break;
      case layer_kind::flatten:
        if (l.in_elems_per_sample > max_dim) {
          r.fail("inputs", shape_text(l.in_shape), fmt::format("at most {} elements", max_dim),
                 "too large to flatten");
        }
        l.out_shape = {static_cast<int>(l.in_elems_per_sample)};
        l.fwd_flops_per_sample = 0;  // a copy (or a view)
        break;
      case layer_kind::softmax_xent:
        if (l.in_shape.empty()) need_rank(l, r, 1, "a non-empty shape");
        l.in_channels = l.out_channels = l.in_shape.back();
        l.rows = static_cast<int>(l.in_elems_per_sample / l.in_channels);
        if (m_.classes > 0 && l.in_channels != m_.classes) {
          r.fail("inputs", shape_text(l.in_shape),
                 fmt::format("a last dimension equal to classes ({})", m_.classes),
                 "the loss's class count differs from the model's");
        }
        l.out_shape = l.in_shape;  // the probabilities
        l.fwd_flops_per_sample = 5 * in_elems;
        l.bwd_flops_per_sample = 2 * in_elems;
        l.backward_needs_output = true;
        break;
      case layer_kind::transformer: {
        need_rank(l, r, 2, "a sequence [seq, hidden]");
        l.seq = l.in_shape[0];
        l.hidden = l.in_shape[1];
        if (r.has("hidden") && r.get_int("hidden", std::nullopt, 1) != l.hidden) {
          r.fail("hidden", short_dump(*r.get("hidden")),
                 fmt::format("the input's hidden size {}", l.hidden), "mismatch");
        }
        l.heads = r.get_int("heads", std::nullopt, 1);
        if (l.hidden % l.heads != 0) {
          r.fail("heads", fmt::format("{}", l.heads),
                 fmt::format("a divisor of hidden ({})", l.hidden), "hidden % heads != 0");
        }
        l.flash_attention = r.get_bool("flash_attention", false);
        l.in_channels = l.out_channels = l.hidden;
        l.rows = l.seq;
        l.out_shape = l.in_shape;
        const auto s = static_cast<std::size_t>(l.seq);
        const auto h = static_cast<std::size_t>(l.hidden);
        const auto a = static_cast<std::size_t>(l.heads);
        l.param_elems = 12 * h * h + 13 * h;
        const double sd = static_cast<double>(s), hd = static_cast<double>(h);
        l.fwd_flops_per_sample = 24 * sd * hd * hd * (1 + sd / (6 * hd));
        l.bwd_flops_per_sample = 2 * l.fwd_flops_per_sample;
        const std::size_t bytes16 = 34 * s * h + (l.flash_attention ? 0 : 5 * a * s * s);
        l.saved_bytes_per_sample_override = bytes16 * static_cast<std::size_t>(m_.dtype_bytes) / 2;
        break;
      }
      case layer_kind::embedding:
        need_rank(l, r, 1, "token ids [seq]");
        l.vocab = r.get_int("vocab", std::nullopt, 1);
        l.hidden = r.get_int("hidden", std::nullopt, 1);
        l.seq = l.rows = l.in_shape[0];
        l.out_channels = l.hidden;
        l.out_shape = {l.seq, l.hidden};
        l.param_elems = static_cast<std::size_t>(l.vocab) * l.hidden;
        l.fwd_flops_per_sample = 0;  // a gather: memory traffic, no arithmetic
        l.bwd_flops_per_sample = static_cast<double>(l.seq) * l.hidden;
        l.backward_needs_input = true;
        break;
    }
    l.out_elems_per_sample = product(l.out_shape);
  }

  static void window_output(layer_spec& l, const field_reader& r) {
    const int h = l.in_h + 2 * l.pad - l.kernel_h;
    const int w = l.in_w + 2 * l.pad - l.kernel_w;
    if (h < 0 || w < 0) {
      r.fail(l.global_pool ? "global" : "kernel", fmt::format("{}", l.kernel_h),
             fmt::format("a window that fits the padded input {}x{}", l.in_h + 2 * l.pad,
                         l.in_w + 2 * l.pad),
             "kernel larger than the padded input");
    }
    l.out_h = h / l.stride + 1;
    l.out_w = w / l.stride + 1;
  }

  model_spec& m_;
  const json* blocks_;
  std::string origin_;
  std::unordered_map<std::string, int> names_;  // full layer name -> index
};

std::vector<int> read_shape(const json& doc, const std::string& origin) {
  const std::string key = fmt::format("{}: input", origin);
  const auto it = doc.find("input");
  const std::string accepted = "a per-sample shape: [H, W, C], [features], [seq] or [seq, hidden]";
  if (it == doc.end()) throw_config_error(key, "(missing)", accepted, "required");
  if (!it->is_array() || it->empty() || it->size() > 3) {
    throw_config_error(key, short_dump(*it), accepted, "not a shape of rank 1 to 3");
  }
  std::vector<int> shape;
  for (const auto& d : *it) {
    if (!d.is_number_integer() || d.get<std::int64_t>() < 1 ||
        d.get<std::int64_t>() > static_cast<std::int64_t>(max_dim)) {
      throw_config_error(key, short_dump(*it), accepted,
                         fmt::format("dimensions must be integers from 1 to {}", max_dim));
    }
    shape.push_back(d.get<int>());
  }
  return shape;
}

int read_top_int(const json& doc, const std::string& origin, const char* field, int fallback,
                 int min_value, int max_value) {
  const auto it = doc.find(field);
  if (it == doc.end()) return fallback;
  const std::string accepted = fmt::format("an integer from {} to {}", min_value, max_value);
  if (!it->is_number_integer() || it->get<std::int64_t>() < min_value ||
      it->get<std::int64_t>() > max_value) {
    throw_config_error(fmt::format("{}: {}", origin, field), short_dump(*it), accepted, "");
  }
  return it->get<int>();
}

}  // namespace

std::string_view to_string(layer_kind kind) noexcept {
  return kind_names[static_cast<std::size_t>(kind)];
}

bool layer_spec::has_reference_math() const noexcept {
  return op != layer_kind::transformer && op != layer_kind::embedding &&
         op != layer_kind::layernorm;
}

model_spec model_spec::parse(const nlohmann::json& doc, const std::string& origin) {
  if (!doc.is_object()) {
    throw_config_error(origin, short_dump(doc), "a JSON object {\"name\": ..., \"layers\": [...]}",
                       "not an object");
  }
  static constexpr std::string_view top_fields[] = {
      "name", "description", "input", "classes", "dtype_bytes", "default_batch", "blocks",
      "layers", "comment"};
  for (const auto& [key, value] : doc.items()) {
    if (std::find(std::begin(top_fields), std::end(top_fields), key) == std::end(top_fields)) {
      throw_config_error(fmt::format("{}: {}", origin, key), short_dump(value),
                         "name, description, input, classes, dtype_bytes, default_batch, blocks, "
                         "layers, comment",
                         "unknown top-level field");
    }
  }
  model_spec m;
  m.source = origin;
  const auto name = doc.find("name");
  if (name == doc.end() || !name->is_string() || name->get_ref<const std::string&>().empty()) {
    throw_config_error(fmt::format("{}: name", origin),
                       name == doc.end() ? "(missing)" : short_dump(*name), "a non-empty string",
                       "the model needs a name");
  }
  m.name = name->get<std::string>();
  if (auto d = doc.find("description"); d != doc.end()) {
    if (!d->is_string()) {
      throw_config_error(fmt::format("{}: description", origin), short_dump(*d), "a string", "");
    }
    m.description = d->get<std::string>();
  }
  m.input_shape = read_shape(doc, origin);
  m.classes = read_top_int(doc, origin, "classes", 0, 1, 1 << 24);
  m.dtype_bytes = read_top_int(doc, origin, "dtype_bytes", 4, 1, 8);
  if (m.dtype_bytes != 1 && m.dtype_bytes != 2 && m.dtype_bytes != 4 && m.dtype_bytes != 8) {
    throw_config_error(fmt::format("{}: dtype_bytes", origin), fmt::format("{}", m.dtype_bytes),
                       "1, 2, 4 or 8", "");
  }
  m.default_batch = read_top_int(doc, origin, "default_batch", 1, 1, 1 << 20);

  const json* blocks = nullptr;
  if (auto b = doc.find("blocks"); b != doc.end()) {
    if (!b->is_object()) {
      throw_config_error(fmt::format("{}: blocks", origin), short_dump(*b),
                         "an object {\"block name\": {\"layers\": [...]}}", "");
    }
    blocks = &*b;
  }
  const auto layers = doc.find("layers");
  if (layers == doc.end() || !layers->is_array() || layers->empty()) {
    throw_config_error(fmt::format("{}: layers", origin),
                       layers == doc.end() ? "(missing)" : short_dump(*layers),
                       "a non-empty array of layers", "");
  }
  scope top;
  top.input = -1;
  if (m.classes > 0) top.vars["classes"] = m.classes;
  builder b(m, blocks, origin);
  b.expand(*layers, top, fmt::format("{}: layers", origin), -1);

  // Whole-network checks: one loss at the end, nothing computed for nobody.
  std::vector<int> uses(m.layers.size(), 0);
  for (const auto& l : m.layers) {
    for (int in : l.inputs) {
      if (in >= 0) ++uses[static_cast<std::size_t>(in)];
    }
  }
  for (const auto& l : m.layers) {
    const std::string where = fmt::format("{}: layer {} ({})", origin, l.index, l.name);
    if (l.op == layer_kind::softmax_xent && l.index + 1 != static_cast<int>(m.layers.size())) {
      throw_config_error(where, l.kind, "softmax_xent as the last layer only",
                         "the loss must be the last layer");
    }
    if (uses[static_cast<std::size_t>(l.index)] == 0 &&
        l.index + 1 != static_cast<int>(m.layers.size())) {
      throw_config_error(where, l.name, "every layer but the last read by a later layer",
                         "output never used (a missing \"inputs\" entry?)");
    }
  }
  if (const int loss = m.loss_layer(); loss >= 0 && m.classes == 0) {
    m.classes = m.layers[static_cast<std::size_t>(loss)].in_channels;
  }
  return m;
}

model_spec model_spec::parse_text(std::string_view text, const std::string& origin) {
  json doc;
  try {
    doc = json::parse(text, nullptr, /*allow_exceptions=*/true, /*ignore_comments=*/true);
  } catch (const json::parse_error& e) {
    throw_config_error(origin, fmt::format("byte {}", e.byte), "a JSON model spec", e.what());
  }
  return parse(doc, origin);
}

model_spec model_spec::load_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw_config_error("model", path, "a readable model spec file (.json)", "cannot open");
  }
  std::ostringstream text;
  text << in.rdbuf();
  return parse_text(text.str(), path);
}

model_spec model_spec::load_named(const std::string& name) {
  const bool is_path = name.find('/') != std::string::npos ||
                       (name.size() > 5 && name.ends_with(".json"));
  if (is_path) return load_file(name);
  for (const auto& dir : model_dirs()) {
    const auto path = std::filesystem::path(dir) / (name + ".json");
    std::error_code ec;
    if (std::filesystem::is_regular_file(path, ec)) return load_file(path.string());
  }
  const auto known = list_models();
  throw_config_error("model", name,
                     known.empty() ? std::string("a model file path (no models directory found)")
                                   : fmt::format("{}, or a path to a .json file",
                                                 fmt::join(known, ", ")),
                     fmt::format("no {}.json in {}", name, fmt::join(model_dirs(), " or ")));
}

std::size_t model_spec::input_elems_per_sample() const noexcept { return product(input_shape); }

std::size_t model_spec::param_count() const noexcept {
  std::size_t n = 0;
  for (const auto& l : layers) n += l.param_elems;
  return n;
}

double model_spec::fwd_flops(int batch) const noexcept {
  double f = 0;
  for (const auto& l : layers) f += l.fwd_flops_per_sample;
  return f * batch;
}

double model_spec::bwd_flops(int batch) const noexcept {
  double f = 0;
  for (const auto& l : layers) f += l.bwd_flops_per_sample;
  return f * batch;
}

std::size_t model_spec::tensor_elems_per_sample(int layer) const noexcept {
  return layer < 0 ? input_elems_per_sample()
                   : layers[static_cast<std::size_t>(layer)].out_elems_per_sample;
}

bool model_spec::tensor_saved_for_backward(int layer) const noexcept {
  if (layer >= 0) {
    const auto& producer = layers[static_cast<std::size_t>(layer)];
    if (producer.backward_needs_output) return true;
  }
  for (const auto& l : layers) {
    if (!l.backward_needs_input || l.saved_bytes_per_sample_override != 0) continue;
    if (std::find(l.inputs.begin(), l.inputs.end(), layer) != l.inputs.end()) return true;
  }
  return false;
}

std::size_t model_spec::saved_bytes_per_sample(int layer) const noexcept {
  std::size_t bytes = tensor_saved_for_backward(layer)
                          ? tensor_elems_per_sample(layer) * static_cast<std::size_t>(dtype_bytes)
                          : 0;
  if (layer >= 0) bytes += layers[static_cast<std::size_t>(layer)].saved_bytes_per_sample_override;
  return bytes;
}

std::size_t model_spec::activation_bytes(int batch) const noexcept {
  std::size_t per_sample = saved_bytes_per_sample(-1);
  for (const auto& l : layers) per_sample += saved_bytes_per_sample(l.index);
  return per_sample * static_cast<std::size_t>(batch);
}

std::vector<int> model_spec::consumers(int layer) const {
  std::vector<int> out;
  for (const auto& l : layers) {
    if (std::find(l.inputs.begin(), l.inputs.end(), layer) != l.inputs.end()) {
      out.push_back(l.index);
    }
  }
  return out;
}

int model_spec::loss_layer() const noexcept {
  if (!layers.empty() && layers.back().op == layer_kind::softmax_xent) {
    return layers.back().index;
  }
  return -1;
}

std::size_t model_spec::labels_per_sample() const noexcept {
  const int loss = loss_layer();
  return loss < 0 ? 0 : static_cast<std::size_t>(layers[static_cast<std::size_t>(loss)].rows);
}

int model_spec::find(std::string_view layer_name) const noexcept {
  for (const auto& l : layers) {
    if (l.name == layer_name) return l.index;
  }
  return -1;
}

const layer_spec& model_spec::layer(std::string_view layer_name) const {
  const int i = find(layer_name);
  if (i < 0) {
    throw_config_error("layer", layer_name, fmt::format("a layer of model {}", name),
                       "no such layer");
  }
  return layers[static_cast<std::size_t>(i)];
}

std::vector<std::string> model_dirs() {
  std::vector<std::string> dirs;
  if (const char* env = std::getenv("GPUSWAP_MODELS_DIR"); env != nullptr && *env != '\0') {
    dirs.emplace_back(env);
  }
  dirs.push_back(compiled_models_dir());
  return dirs;
}

std::vector<std::string> list_models() {
  std::vector<std::string> names;
  for (const auto& dir : model_dirs()) {
    std::error_code ec;
    for (std::filesystem::directory_iterator it(dir, ec), end; !ec && it != end;
         it.increment(ec)) {
      if (it->path().extension() == ".json" && it->is_regular_file(ec)) {
        names.push_back(it->path().stem().string());
      }
    }
  }
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  return names;
}

}  // namespace gpuswap
