#pragma once
// bench_alloc: the logic of `gpuswap bench alloc`. It replays RMM's random-allocations pattern
// (N allocations of random sizes, then frees in random order) with N live blocks at the peak,
// through three allocators side by side in one run:
//   gpuswap      caching_allocator on a phantom sim_device (addresses without bytes)
//   malloc       the C library's malloc/free
//   passthrough  the same phantom device's allocate_device/free_device, no caching
// and reports nanoseconds per alloc+free pair, the median of `repetitions` timed runs after one
// untimed warm-up (which fills the caches, so gpuswap's figure is its steady state: what a
// training loop sees from its second iteration on).
#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace gpuswap {

struct alloc_bench_options {
  // Peak live blocks, one result row each.
  std::vector<std::size_t> live_counts = {1'000, 10'000, 100'000};
  // Sizes are uniform in [min_size, max_size]. The 1 MiB default is the small pool's ceiling:
  // typical activation and gradient tensors of small layers, 100,000 of them fit a phantom
  // device's address space, and malloc stays in its heap (off mmap) after the warm-up.
  std::size_t min_size = 1;
  std::size_t max_size = std::size_t{1} << 20;
  int repetitions = 5;
  std::uint64_t seed = 42;

  // Throws config_error naming the field.
  void validate() const;
};

// Nanoseconds per alloc+free pair, median of the repetitions: wall-clock time, and the
// benchmark thread's CPU time (which other processes on a shared machine do not inflate).
struct alloc_bench_result {
  std::size_t live = 0;
  double gpuswap_ns = 0;
  double malloc_ns = 0;
  double passthrough_ns = 0;
  double gpuswap_cpu_ns = 0;
  double malloc_cpu_ns = 0;
  double passthrough_cpu_ns = 0;
};

std::vector<alloc_bench_result> run_alloc_bench(const alloc_bench_options& options);

// {"pattern", "min_size", "max_size", "repetitions", "seed", "unit", ...,
//  "results": [{"live", "gpuswap_ns", "malloc_ns", "passthrough_ns", "gpuswap_cpu_ns", ...}]}
nlohmann::json to_json(const alloc_bench_options& options,
                       const std::vector<alloc_bench_result>& results);

// A plain-text table, one row per live count (wall-clock, then CPU time), with a header line.
std::string format_alloc_bench_table(const std::vector<alloc_bench_result>& results);

}  // namespace gpuswap
