// The simulator's hardware presets and option validation. Figures are REFERENCE.md's anchors:
// dense peak compute, achieved pinned host-link bandwidth per direction, and the measured
// slowdown when both directions run at once.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>

#include "core/errors.hpp"
#include "device/sim_device.hpp"

namespace gpuswap {

namespace {
constexpr std::size_t gib = std::size_t{1} << 30;
constexpr double gb = 1e9;

sim_options make(std::string name, std::size_t device_gib, double flops, double link_gbps,
                 double h2d_both, double d2h_both, double hbm_gbps, double latency_ns) {
  sim_options o;
  o.preset = std::move(name);
  o.device_capacity = device_gib * gib;
  o.host_capacity = 4 * device_gib * gib;
  o.compute_flops = flops;
  o.compute_efficiency = 0.5;
  o.h2d_bandwidth = link_gbps * gb;
  o.d2h_bandwidth = link_gbps * gb;
  o.h2d_factor_when_both = h2d_both;
  o.d2h_factor_when_both = d2h_both;
  o.device_memory_bandwidth = hbm_gbps * gb;
  o.h2d_latency_ns = latency_ns;
  o.d2h_latency_ns = latency_ns;
  return o;
}
}  // namespace

sim_options sim_preset(std::string_view name) {
  // vDNN's machine: Titan X (Maxwell), PCIe Gen3 x16, ~12 GB/s achieved each way.
  if (name == "titan-x-pcie3") return make("titan-x-pcie3", 12, 6.1e12, 12, 0.9, 0.9, 336, 10'000);
  // A100 over PCIe Gen4: ~25 GB/s, H2D measured dropping to ~11 GB/s while D2H runs.
  if (name == "a100-pcie4") return make("a100-pcie4", 80, 312e12, 25, 11.0 / 25.0, 1.0, 1935, 8'000);
  // H100 over PCIe Gen5: ~55 GB/s one way, ~50 GB/s each way when both run.
  if (name == "h100-pcie5") return make("h100-pcie5", 80, 990e12, 55, 50.0 / 55.0, 50.0 / 55.0, 2000, 8'000);
  // GH200: NVLink-C2C, ~300 GB/s achieved each way, both directions at full speed.
  if (name == "gh200-c2c") return make("gh200-c2c", 96, 990e12, 300, 1.0, 1.0, 4000, 3'000);
  throw_config_error("sim_preset", name, fmt::format("{}", fmt::join(sim_preset_names(), "|")),
                     "unknown preset");
}

void sim_options::validate() const {
  auto positive = [](std::string_view field, double v) {
    if (!(v > 0) || !std::isfinite(v)) {
      throw_config_error(field, fmt::format("{}", v), "a finite number > 0");
    }
  };
  auto non_negative = [](std::string_view field, double v) {
    if (!(v >= 0) || !std::isfinite(v)) {
      throw_config_error(field, fmt::format("{}", v), "a finite number >= 0");
    }
  };
  auto fraction = [](std::string_view field, double v) {
    if (!(v > 0 && v <= 1)) throw_config_error(field, fmt::format("{}", v), "a number in (0, 1]");
  };
  if (device_capacity == 0) throw_config_error("device_capacity", "0", "a size > 0");
  if (host_capacity == 0) throw_config_error("host_capacity", "0", "a size > 0");
  positive("h2d_bandwidth", h2d_bandwidth);
  positive("d2h_bandwidth", d2h_bandwidth);
  non_negative("h2d_latency_ns", h2d_latency_ns);
  non_negative("d2h_latency_ns", d2h_latency_ns);
  fraction("h2d_factor_when_both", h2d_factor_when_both);
  fraction("d2h_factor_when_both", d2h_factor_when_both);
  positive("compute_flops", compute_flops);
  fraction("compute_efficiency", compute_efficiency);
  positive("device_memory_bandwidth", device_memory_bandwidth);
  positive("host_memory_bandwidth", host_memory_bandwidth);
  non_negative("managed_fault_latency_ns", managed_fault_latency_ns);
  if (managed_page_bytes == 0 || (managed_page_bytes & (managed_page_bytes - 1)) != 0) {
    throw_config_error("managed_page_bytes", fmt::format("{}", managed_page_bytes),
                       "a power of two > 0");
  }
  if (vm_page_size != 0 && (vm_page_size < 4096 || (vm_page_size & (vm_page_size - 1)) != 0)) {
    throw_config_error("vm_page_size", fmt::format("{}", vm_page_size),
                       "0 (no virtual memory management) or a power of two >= 4096");
  }
  non_negative("vm_call_ns", vm_call_ns);
  non_negative("vm_map_ns_per_page", vm_map_ns_per_page);
  non_negative("vm_unmap_ns_per_page", vm_unmap_ns_per_page);
}

}  // namespace gpuswap
