#pragma once
// trace_summary: the figures a trace adds up to (bytes moved, copy time hidden under compute,
// stalls, peak memory, per-layer breakdown), from recorded events or from a Chrome trace file
// written by write_chrome_trace. Both give the same summary for the same run: they go through
// the same trace_timeline, and times are whole nanoseconds (Note [Whole nanoseconds]).
#include <cstdint>
#include <nlohmann/json.hpp>
#include <span>
#include <string>

#include "core/human_bytes.hpp"
#include <vector>

#include "profiler/chrome_trace.hpp"
#include "profiler/trace_event.hpp"

namespace gpuswap {

struct layer_summary {
  std::int32_t layer = -1;
  std::int64_t forward_ns = 0;  // summed over every forward phase of the layer
  std::int64_t backward_ns = 0;
  std::uint64_t bytes_out = 0;  // swap-outs that name this layer
  std::uint64_t bytes_in = 0;
  std::uint64_t swaps_out = 0;
  std::uint64_t swaps_in = 0;
  std::int64_t stall_ns = 0;
  std::uint64_t stalls = 0;

  bool operator==(const layer_summary&) const = default;
};

struct trace_summary {
  std::string device_name;
  std::int64_t begin_ns = 0;
  std::int64_t end_ns = 0;

  std::uint64_t bytes_swapped_out = 0;
  std::uint64_t bytes_swapped_in = 0;
  std::uint64_t swaps_out = 0;
  std::uint64_t swaps_in = 0;
  std::uint64_t swaps_in_prefetched = 0;  // swap-ins whose reason is prefetch
  std::uint64_t swaps_in_on_demand = 0;   // swap-ins whose reason is demand

  std::int64_t d2h_ns = 0;          // summed swap-out slice durations
  std::int64_t h2d_ns = 0;          // summed swap-in slice durations
  std::int64_t copy_busy_ns = 0;    // length of the union of all copy slices
  std::int64_t compute_ns = 0;      // length of the union of layer-phase slices less stalls
  std::int64_t copy_hidden_ns = 0;  // |union(copies) ∩ (union(layer phases) − union(stalls))|
  double overlap_pct = 0;           // copy_hidden_ns / copy_busy_ns * 100; 0 with no copies

  std::int64_t stall_ns = 0;
  std::uint64_t stalls = 0;

  // Highest value any counter sample reported.
  std::uint64_t peak_device_allocated = 0;
  std::uint64_t peak_device_reserved = 0;
  std::uint64_t peak_host_pinned = 0;
  std::uint64_t peak_host_used = 0;

  std::uint64_t allocs = 0;
  std::uint64_t frees = 0;
  std::uint64_t segment_maps = 0;
  std::uint64_t segment_releases = 0;
  std::uint64_t prefetches_issued = 0;
  std::uint64_t evictions = 0;
  std::uint64_t evictions_belady = 0;
  std::uint64_t evictions_lru = 0;
  std::uint64_t evictions_pressure = 0;
  std::uint64_t ooms = 0;
  std::uint64_t iterations = 0;
  std::uint64_t unmatched_events = 0;
  std::uint64_t dropped_events = 0;

  std::vector<layer_summary> layers;  // by layer index; only layers some event named

  std::int64_t duration_ns() const noexcept { return end_ns - begin_ns; }
  std::int64_t copy_ns() const noexcept { return d2h_ns + h2d_ns; }
  bool operator==(const trace_summary&) const = default;
};

trace_summary summarize(const trace_timeline& timeline);
trace_summary summarize(std::span<const trace_event> events);
// Reads a trace written by write_chrome_trace. Throws gpuswap::error naming the path.
trace_summary summarize_file(const std::string& path);

// Every field; times in ns, sizes in bytes, plus "layers": [...].
nlohmann::json to_json(const trace_summary& summary);
// A human-readable report (times in ms, sizes in KiB/MiB/GiB), ending with a newline.
std::string format_summary(const trace_summary& summary);

}  // namespace gpuswap
