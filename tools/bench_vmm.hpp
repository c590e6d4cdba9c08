#pragma once
// bench_vmm: the logic of `gpuswap bench vmm`. What the device's virtual memory calls cost the
// host (device.hpp: map_pages, unmap_pages), which expandable segments pay whenever the budget
// is short (Note [Expandable segments], allocator/caching_allocator_expandable.cpp):
//   - one call mapping `pages` pages, and one unmapping them;
//   - `pages` calls mapping one page each, and as many unmapping them.
// Times are the device's host clock (device::host_time_ns): wall time on a GPU, the modelled
// clock on the simulator, whose figures are then its sim_options::vm_* estimates, printed so
// that a GPU run's figures can replace them. Medians of `repetitions`.
#include <cstddef>
#include <nlohmann/json.hpp>
#include <string>

#include "device/device.hpp"

namespace gpuswap {

struct vmm_bench_options {
  std::size_t pages = 256;  // 512 MiB at 2 MiB pages; fewer if the device holds less
  int repetitions = 10;

  // Throws config_error naming the field.
  void validate() const;
};

struct vmm_bench_result {
  std::string device;
  bool modelled = false;  // the simulator's clock: its estimates, not a measurement
  std::size_t page_bytes = 0;
  std::size_t pages = 0;
  double map_all_ns = 0;    // one map_pages call of `pages` pages
  double unmap_all_ns = 0;  // one unmap_pages call of them
  double map_one_ns = 0;    // a map_pages call of one page
  double unmap_one_ns = 0;  // an unmap_pages call of one page
};

// Throws gpuswap::error when the device has no virtual memory management or cannot map the
// pages.
vmm_bench_result run_vmm_bench(device& dev, const vmm_bench_options& options);
nlohmann::json to_json(const vmm_bench_result& result);
std::string format_vmm_bench(const vmm_bench_result& result);

}  // namespace gpuswap
