#pragma once
// trace_event: one thing that happened, as the profiler records it. A compact POD (56 bytes, no
// pointers, no strings) so that recording is a copy into a ring buffer and nothing else.
//
// Glossary
//   time_ns   the caller's timeline in nanoseconds: device::host_time_ns() (wall time on a GPU,
//             the modelled clock on the simulator). The recorder never reads a clock itself, so
//             simulated runs give identical traces run to run.
//   track     the timeline row the event belongs on in a viewer: the compute stream, the D2H and
//             H2D copy streams, or the host (allocation calls, markers).
//   paired    *_begin / *_end kinds are matched into slices by chrome_trace's make_timeline:
//             swaps by (kind, buffer), layer phases by (layer, phase). A stall is a slice in one
//             event: time_ns is when the wait began and value is how long it lasted.
//   counter   a sample of memory figures. detail says which pair: device_memory (value =
//             bytes allocated, value2 = bytes reserved) or host_memory (value = pinned bytes
//             reserved, value2 = host bytes used).
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>

namespace gpuswap {

enum class event_kind : std::uint8_t {
  alloc,
  free,
  segment_map,
  segment_release,
  swap_out_begin,
  swap_out_end,
  swap_in_begin,
  swap_in_end,
  prefetch_issued,
  stall,
  evict,
  layer_begin,
  layer_end,
  iteration,
  oom,
  counter,
};

enum class trace_track : std::uint8_t { compute, d2h, h2d, host };

// What kind of an event this is within its kind: the phase of a layer, why a buffer was evicted,
// why a swap-in happened, which figures a counter carries.
enum class event_detail : std::uint8_t {
  none,
  forward,        // layer_begin / layer_end
  backward,       // layer_begin / layer_end
  belady,         // evict: furthest next use (schedule known)
  lru,            // evict: least recently used (schedule unknown)
  pressure,       // evict: forced by an allocation that did not fit
  prefetch,       // swap_in_*: ahead of use
  demand,         // swap_in_*: on acquire, because it was not prefetched in time
  device_memory,  // counter: value = allocated, value2 = reserved
  host_memory,    // counter: value = pinned reserved, value2 = host used
};

struct trace_event {
  double time_ns = 0;
  std::uint64_t bytes = 0;
  std::uint64_t buffer = 0;   // a virtual buffer's id, or an address for alloc/free
  std::uintptr_t stream = 0;  // the stream_t handle value, 0 when none
  double value = 0;           // stall: wait in ns; counter: first figure; iteration: index
  double value2 = 0;          // counter: second figure
  std::int32_t layer = -1;    // -1: no layer
  event_kind kind = event_kind::counter;
  trace_track track = trace_track::host;
  event_detail detail = event_detail::none;

  // Builders for the common shapes, so call sites name what they mean and get the track right.
  static constexpr trace_event swap(event_kind k, double t, std::uint64_t buffer_ref,
                                    std::uint64_t n_bytes, std::int32_t layer_index,
                                    std::uintptr_t stream_handle = 0,
                                    event_detail why = event_detail::none) noexcept {
    trace_event e;
    e.kind = k;
    e.time_ns = t;
    e.buffer = buffer_ref;
    e.bytes = n_bytes;
    e.layer = layer_index;
    e.stream = stream_handle;
    e.detail = why;
    e.track = (k == event_kind::swap_out_begin || k == event_kind::swap_out_end) ? trace_track::d2h
                                                                                 : trace_track::h2d;
    return e;
  }
  static constexpr trace_event layer_phase(event_kind k, double t, std::int32_t layer_index,
                                           event_detail phase,
                                           std::uintptr_t stream_handle = 0) noexcept {
    trace_event e;
    e.kind = k;
    e.time_ns = t;
    e.layer = layer_index;
    e.detail = phase;
    e.stream = stream_handle;
    e.track = trace_track::compute;
    return e;
  }
  static constexpr trace_event stall_for(double begin_ns, double wait_ns, std::uint64_t buffer_ref,
                                         std::int32_t layer_index,
                                         std::uintptr_t stream_handle = 0) noexcept {
    trace_event e;
    e.kind = event_kind::stall;
    e.time_ns = begin_ns;
    e.value = wait_ns;
    e.buffer = buffer_ref;
    e.layer = layer_index;
    e.stream = stream_handle;
    e.track = trace_track::compute;
    return e;
  }
  static constexpr trace_event device_counter(double t, double allocated,
                                              double reserved) noexcept {
    trace_event e;
    e.kind = event_kind::counter;
    e.time_ns = t;
    e.value = allocated;
    e.value2 = reserved;
    e.detail = event_detail::device_memory;
    return e;
  }
  static constexpr trace_event host_counter(double t, double pinned_reserved,
                                            double host_used) noexcept {
    trace_event e;
    e.kind = event_kind::counter;
    e.time_ns = t;
    e.value = pinned_reserved;
    e.value2 = host_used;
    e.detail = event_detail::host_memory;
    return e;
  }
  // alloc, free, segment_map, segment_release, prefetch_issued, evict, iteration, oom.
  static constexpr trace_event marker(event_kind k, double t, trace_track on,
                                      std::uint64_t buffer_ref = 0, std::uint64_t n_bytes = 0,
                                      std::int32_t layer_index = -1,
                                      event_detail why = event_detail::none) noexcept {
    trace_event e;
    e.kind = k;
    e.time_ns = t;
    e.track = on;
    e.buffer = buffer_ref;
    e.bytes = n_bytes;
    e.layer = layer_index;
    e.detail = why;
    return e;
  }
};

static_assert(std::is_trivially_copyable_v<trace_event>);
static_assert(std::is_standard_layout_v<trace_event>);
static_assert(sizeof(trace_event) <= 64, "a trace_event must stay within one cache line");

constexpr std::string_view to_string(event_kind k) noexcept {
  switch (k) {
    case event_kind::alloc:
      return "alloc";
    case event_kind::free:
      return "free";
    case event_kind::segment_map:
      return "segment_map";
    case event_kind::segment_release:
      return "segment_release";
    case event_kind::swap_out_begin:
      return "swap_out_begin";
    case event_kind::swap_out_end:
      return "swap_out_end";
    case event_kind::swap_in_begin:
      return "swap_in_begin";
    case event_kind::swap_in_end:
      return "swap_in_end";
    case event_kind::prefetch_issued:
      return "prefetch_issued";
    case event_kind::stall:
      return "stall";
    case event_kind::evict:
      return "evict";
    case event_kind::layer_begin:
      return "layer_begin";
    case event_kind::layer_end:
      return "layer_end";
    case event_kind::iteration:
      return "iteration";
    case event_kind::oom:
      return "oom";
    case event_kind::counter:
      return "counter";
  }
  return "unknown";
}

constexpr std::string_view to_string(trace_track t) noexcept {
  switch (t) {
    case trace_track::compute:
      return "compute";
    case trace_track::d2h:
      return "d2h";
    case trace_track::h2d:
      return "h2d";
    case trace_track::host:
      return "host";
  }
  return "unknown";
}

constexpr std::string_view to_string(event_detail d) noexcept {
  switch (d) {
    case event_detail::none:
      return "none";
    case event_detail::forward:
      return "forward";
    case event_detail::backward:
      return "backward";
    case event_detail::belady:
      return "belady";
    case event_detail::lru:
      return "lru";
    case event_detail::pressure:
      return "pressure";
    case event_detail::prefetch:
      return "prefetch";
    case event_detail::demand:
      return "demand";
    case event_detail::device_memory:
      return "device_memory";
    case event_detail::host_memory:
      return "host_memory";
  }
  return "unknown";
}

// Inverses of to_string, for reading traces back; false when the name is not one of ours.
constexpr bool parse_event_kind(std::string_view name, event_kind& out) noexcept {
  for (int i = 0; i <= static_cast<int>(event_kind::counter); ++i) {
    if (to_string(static_cast<event_kind>(i)) == name) {
      out = static_cast<event_kind>(i);
      return true;
    }
  }
  return false;
}
constexpr bool parse_event_detail(std::string_view name, event_detail& out) noexcept {
  for (int i = 0; i <= static_cast<int>(event_detail::host_memory); ++i) {
    if (to_string(static_cast<event_detail>(i)) == name) {
      out = static_cast<event_detail>(i);
      return true;
    }
  }
  return false;
}
constexpr bool parse_trace_track(std::string_view name, trace_track& out) noexcept {
  for (int i = 0; i <= static_cast<int>(trace_track::host); ++i) {
    if (to_string(static_cast<trace_track>(i)) == name) {
      out = static_cast<trace_track>(i);
      return true;
    }
  }
  return false;
}

}  // namespace gpuswap
