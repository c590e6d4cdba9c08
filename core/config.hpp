#pragma once
// gpuswap's configuration: one string of key:value items, like PyTorch's allocator config,
//   GPUSWAP_CONF="device_limit:8GiB,host_limit:64GiB,policy:auto,trace:run.json,log:info"
// and the same keys through config::set in the C and C++ APIs. Every bad key or value is a
// config_error (core/errors.hpp) that names the key, the value and what is accepted.
#include <string>
#include <string_view>
#include <vector>

#include "core/size_spec.hpp"

namespace gpuswap {

// Which buffers the offload planner sends to the host: vDNN's static policies (none, all,
// conv) or the cost-model planner (auto).
enum class offload_policy { none, all, conv, auto_ };
// How far ahead backward-pass prefetches run: sized from bandwidth and layer times
// (lookahead), vDNN's one layer ahead (one_layer), or not at all: the copy back is
// synchronous when backward asks (none).
enum class prefetch_policy { lookahead, one_layer, none };
// The device backend: CUDA when a GPU is present, else the simulator (auto_).
enum class backend_kind { auto_, cuda, sim };
// Whether the simulated device's memory holds real bytes or only addresses (see
// device/sim_device.hpp).
enum class sim_backing_kind { real, phantom };
enum class log_level { debug, info, warn, error, off };

// The text forms used in GPUSWAP_CONF ("auto", "one_layer", ...); "?" for a value outside
// the enumeration.
std::string_view to_string(offload_policy value) noexcept;
std::string_view to_string(prefetch_policy value) noexcept;
std::string_view to_string(backend_kind value) noexcept;
std::string_view to_string(sim_backing_kind value) noexcept;
std::string_view to_string(log_level value) noexcept;

struct config {
  // Device memory gpuswap may hold, below the physical capacity: bytes or % of device memory.
  // 0: no limit below the physical memory.
  size_spec device_limit;
  // Pinned host memory gpuswap may hold: bytes or % of host RAM. 0: no limit.
  size_spec host_limit;
  offload_policy policy = offload_policy::auto_;
  prefetch_policy prefetch = prefetch_policy::lookahead;
  backend_kind backend = backend_kind::auto_;
  // One of sim_preset_names(): the hardware the simulator models (REFERENCE.md's presets).
  std::string sim_preset = "h100-pcie5";
  sim_backing_kind sim_backing = sim_backing_kind::real;
  // Chrome trace output path; empty: no trace.
  std::string trace;
  log_level log = log_level::warn;
  bool nvtx = true;
  // Shared-memory live statistics for `gpuswap top`.
  bool stats = true;
  // Cached blocks larger than this are never split; 0: no limit. Bytes only, at least 1MiB.
  size_spec max_split_size;
  // Large allocations come from address space with device pages mapped on demand, so that
  // free memory between live blocks is not stranded (caching_allocator's Note [Expandable
  // segments]); PyTorch's expandable_segments. Needs CUDA's virtual memory management (or the
  // simulator's model of it); without it, plain segments and a warning.
  bool expandable_segments = true;

  // Sets one key from its text form, with exactly the validation of parse_config.
  void set(std::string_view key, std::string_view value);
  // The text form of one key's value ("" for trace when it is off).
  std::string get(std::string_view key) const;
  // Checks fields assigned directly (the C++ API path) as parse_config would check them.
  void validate() const;
  // Every key with a value, in config_keys() order; parse_config reads it back to an equal
  // config.
  std::string to_string() const;

  bool operator==(const config&) const = default;
};

// Parses "key:value,key:value". An empty string gives the defaults. No whitespace is
// trimmed: it is reported, since a stray space usually means a mangled shell quote.
config parse_config(std::string_view text);
// Reads GPUSWAP_CONF; unset, empty or whitespace-only gives the defaults.
config config_from_env();
// Every key, in the order to_string writes them.
std::vector<std::string> config_keys();
// The sim_preset values accepted.
std::vector<std::string> sim_preset_names();

}  // namespace gpuswap
