#pragma once
// What `gpuswap top` shows: the live statistics of this user's gpuswap processes
// (profiler/live_stats_reader.hpp) as a table for a terminal, and as one JSON object for
// `gpuswap top --once --json`. Formatting only; the CLI reads the segments and prints.
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "profiler/live_stats_reader.hpp"

namespace gpuswap {

// One row a process: pid, device, budget, allocated, reserved, swapped out, in flight, stall
// time (and count), bandwidth each way, pinned host used/limit, time since its last update and
// its state, in binary units ("1.50 GiB", "11.2 GiB/s"). Segments without figures (torn,
// invalid) get a row of dashes and a note under the table saying why. `now_realtime_ns` is
// the CLOCK_REALTIME time the ages are counted to; 0: now.
std::string format_top_table(const std::vector<live_snapshot>& snapshots,
                             std::uint64_t now_realtime_ns = 0);

// {"time_ns": N, "count": N, "processes": [{"pid", "segment", "status", "problem"?, and, when
// the segment has figures, every figure with its unit in its name ("allocated_bytes",
// "stall_ns", "bandwidth_out_bytes_per_s", ...) plus "age_s"}]}. Byte counts are exact
// integers.
nlohmann::json top_json(const std::vector<live_snapshot>& snapshots,
                        std::uint64_t now_realtime_ns = 0);

}  // namespace gpuswap
