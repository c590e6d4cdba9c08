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
//
// The same run measures what profiling costs the hot path: the gpuswap allocator replays the
// same sequence in three modes, switched between replays (Note [Tracing overhead],
// bench_alloc.cpp):
//   no hooks     set_trace_hooks(false): the recorder and NVTX hooks do nothing at all
//   trace off    the default ("gpuswap" above): hooks present, recorder disabled
//   trace on     hooks present, recorder enabled (a private recorder whose rings hold a whole
//                replay, cleared between repetitions, so no event is dropped; drops are counted),
//                timestamps from the simulator's modelled clock (free to read)
//   on, wall     the same with timestamps from the host clock (core/fast_clock), as on a GPU
//                (sim_device::set_wall_clock_timestamps): what tracing costs there
// Overheads are the median over repetitions of each repetition's ratio to the no-hooks run of
// the same repetition (the three run back to back, in rotating order), minus one, in percent.
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
  int repetitions = 12;
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

  // Tracing overhead (see above). gpuswap_ns / gpuswap_cpu_ns are the "trace off" figures.
  double no_hooks_ns = 0;
  double traced_ns = 0;
  double no_hooks_cpu_ns = 0;
  double traced_cpu_ns = 0;
  double traced_wall_clock_ns = 0;  // trace on, wall-clock timestamps
  double traced_wall_clock_cpu_ns = 0;
  double trace_off_overhead_pct = 0;  // wall-clock
  double trace_on_overhead_pct = 0;
  double trace_off_overhead_cpu_pct = 0;  // thread CPU time: the figure to trust on a busy host
  double trace_on_overhead_cpu_pct = 0;
  double trace_on_wall_clock_overhead_pct = 0;
  double trace_on_wall_clock_overhead_cpu_pct = 0;
  std::uint64_t traced_events = 0;  // recorded per timed repetition (last one)
  std::uint64_t trace_dropped = 0;  // summed over all repetitions; 0 unless rings overflowed
};

// The bounds the tracing overhead is held to (issue 5): printed next to the figures.
inline constexpr double trace_off_overhead_target_pct = 1.0;
inline constexpr double trace_on_overhead_target_pct = 10.0;

std::vector<alloc_bench_result> run_alloc_bench(const alloc_bench_options& options);

// What one read of a host clock costs the thread, in ns (Note [Clock reads], bench_alloc.cpp):
// alone (reads back to back), and after a load that misses the core's caches (each read follows
// an independent load from a random line of a 64 MiB array, as the allocator's traced calls
// follow its misses). The second is why "on, wall" costs more than the clock's own latency.
struct clock_read_cost {
  std::string clock;
  double alone_ns = 0;
  double after_miss_ns = 0;
};

// steady_clock; fast_clock (core/fast_clock: what every traced call reads on a GPU); and on
// x86-64 the instructions it could be built on: lfence+rdtsc (its choice), rdtsc alone
// (unordered: may run before earlier loads), rdtscp (waits for earlier loads only).
std::vector<clock_read_cost> measure_clock_reads();

// {"pattern", "min_size", "max_size", "repetitions", "seed", "unit", ...,
//  "results": [{"live", "gpuswap_ns", "malloc_ns", "passthrough_ns", "gpuswap_cpu_ns", ...,
//               "no_hooks_ns", "traced_ns", "trace_off_overhead_pct", "trace_on_overhead_pct",
//               "trace_off_overhead_cpu_pct", "trace_on_overhead_cpu_pct",
//               "traced_wall_clock_ns", "trace_on_wall_clock_overhead_pct", ..., "trace_dropped"}],
//  "clock_reads": [{"clock", "alone_ns", "after_miss_ns"}]} (the last only when `clocks` has
// rows).
nlohmann::json to_json(const alloc_bench_options& options,
                       const std::vector<alloc_bench_result>& results,
                       const std::vector<clock_read_cost>& clocks = {});

// Plain-text tables, one row per live count each: ns per pair (wall-clock, then CPU time), the
// tracing overhead, then (when `clocks` has rows) one row per clock.
std::string format_alloc_bench_table(const std::vector<alloc_bench_result>& results,
                                     const std::vector<clock_read_cost>& clocks = {});

}  // namespace gpuswap
