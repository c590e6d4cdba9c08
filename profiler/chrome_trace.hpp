#pragma once
// Chrome trace export (Trace Event Format: loads in Perfetto and chrome://tracing) and the
// timeline that both the export and its reading back are made of.
//
// The layout of a trace:
//   one process "gpuswap (<device name>)" with four threads (tracks), in this order:
//     compute   layer phases ("forward 3", "backward 3") and stalls, as complete slices
//     D2H copy  swap-outs, as complete slices (args: bytes, buffer, layer, stream)
//     H2D copy  swap-ins, as complete slices (args also say prefetch or demand)
//     host      alloc/free/segment markers and iterations, as instant events
//   prefetch/evict/oom as instant events on their event's track; unpaired begin/end events as
//   instants named "unmatched <kind>" (counted in otherData.unmatched_events);
//   counters "device memory" {allocated, reserved} and "host memory" {pinned, used} in bytes;
//   a flow arrow from each swap-out to the next swap-in of the same buffer;
//   slices of one track that overlap without nesting go on extra lanes of it ("D2H copy (2)"),
//   since viewers require the slices of a thread to nest (Note [Overflow lanes]).
// Times are microseconds with a fractional part; every time is first rounded to a whole
// nanosecond, so that reading a trace back gives exactly the timeline it was written from
// (Note [Whole nanoseconds] in chrome_trace.cpp).
#include <cstdint>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "profiler/trace_event.hpp"

namespace gpuswap {

enum class slice_kind : std::uint8_t { swap_out, swap_in, forward, backward, stall };

std::string_view to_string(slice_kind kind) noexcept;

// A begin/end pair (or a stall) as one interval on a track.
struct trace_slice {
  std::int64_t begin_ns = 0;
  std::int64_t end_ns = 0;
  std::uint64_t bytes = 0;
  std::uint64_t buffer = 0;
  std::uintptr_t stream = 0;
  std::int32_t layer = -1;
  slice_kind kind = slice_kind::stall;
  trace_track track = trace_track::compute;
  event_detail detail = event_detail::none;  // swap-in: prefetch or demand

  std::int64_t duration_ns() const noexcept { return end_ns - begin_ns; }
  bool operator==(const trace_slice&) const = default;
};

// Events with begin/end pairs matched into slices. Instants, counters and unmatched events are
// kept as trace_events whose time_ns is rounded to a whole nanosecond.
struct trace_timeline {
  std::string device_name;
  std::vector<trace_slice> slices;     // by begin_ns (stable)
  std::vector<trace_event> markers;    // alloc, free, segment_*, prefetch_issued, evict, ...
  std::vector<trace_event> counters;   // kind == counter
  std::vector<trace_event> unmatched;  // a begin with no end, or an end with no begin
  std::uint64_t dropped_events = 0;    // events the recorder lost (ring full)
  std::int64_t begin_ns = 0;           // first and last instant of anything in the trace
  std::int64_t end_ns = 0;
};

// Pairs swaps by (direction, buffer) first in first out, layer phases by (layer, phase) last in
// first out. Does not need sorted input (it sorts a copy, stably, by time).
trace_timeline make_timeline(std::span<const trace_event> events, std::string device_name = {},
                             std::uint64_t dropped_events = 0);

struct chrome_trace_options {
  std::string device_name = "unknown device";
  std::uint64_t dropped_events = 0;  // event_recorder::dropped(), kept in otherData
  bool flows = true;                 // swap-out -> swap-in arrows
  int pid = 1;
  nlohmann::json other_data = nlohmann::json::object();  // merged into otherData
};

nlohmann::json to_chrome_trace(const trace_timeline& timeline, const chrome_trace_options& options);
nlohmann::json to_chrome_trace(std::span<const trace_event> events,
                               const chrome_trace_options& options = {});
// Writes the JSON through a temporary file and a rename. Throws gpuswap::error naming the path.
void write_chrome_trace(const std::string& path, std::span<const trace_event> events,
                        const chrome_trace_options& options = {});

// Reads back a trace written by to_chrome_trace (events of other producers are ignored).
// Throws gpuswap::error naming the path (or "<json>") when it is not such a trace.
trace_timeline timeline_from_chrome_trace(const nlohmann::json& trace,
                                          std::string_view source = "<json>");
trace_timeline read_chrome_trace(const std::string& path);

// Writes `contents` to `path` through a temporary file in the same directory and a rename, so
// that a reader never sees half a file. Throws gpuswap::error naming the path.
void write_file_atomically(const std::string& path, std::string_view contents);

}  // namespace gpuswap
