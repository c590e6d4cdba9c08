#include "profiler/chrome_trace.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <unordered_map>
#include <utility>

#include "core/errors.hpp"

namespace gpuswap {

// Note [Whole nanoseconds]
// Chrome's "ts" and "dur" are microseconds, so a trace holds time_ns / 1000 as a double. Reading
// that back and multiplying by 1000 does not in general give the same double, and a summary of
// the file would then differ from the summary of the events in the last bits. So every time is
// rounded to a whole nanosecond before it is used: the exporter writes whole_ns(t) / 1000, a
// slice's duration as (end - begin) / 1000 of whole nanoseconds, and the reader rounds
// ts * 1000 and dur * 1000 back to whole nanoseconds. For any time below 2^52 ns (52 days) the
// product is within a few ulps of an integer, far from the half-way point, so the round trip is
// exact; and the summary works on the rounded integers on both paths. Sub-nanosecond detail of
// the simulator's modelled clock is lost, which no figure we report needs.

std::string_view to_string(slice_kind kind) noexcept {
  switch (kind) {
    case slice_kind::swap_out:
      return "swap_out";
    case slice_kind::swap_in:
      return "swap_in";
    case slice_kind::forward:
      return "forward";
    case slice_kind::backward:
      return "backward";
    case slice_kind::stall:
      return "stall";
  }
  return "unknown";
}

namespace {


std::int64_t whole_ns(double t) noexcept {
  if (!std::isfinite(t)) return 0;
  constexpr double limit = 9.0e18;  // llround is undefined beyond int64
  return std::llround(std::clamp(t, -limit, limit));
}

trace_event rounded(trace_event e) noexcept {
  e.time_ns = static_cast<double>(whole_ns(e.time_ns));
  return e;
}

// Thread ids: lane 0 of the four tracks is tid 1..4, in the order viewers show them; overflow
// lanes (Note [Overflow lanes]) continue with tid 5..8, 9..12 and so on.
constexpr int track_count = static_cast<int>(trace_track::host) + 1;

int tid_of(trace_track track, int lane = 0) noexcept {
  return static_cast<int>(track) + 1 + lane * track_count;
}

bool track_of_tid(std::int64_t tid, trace_track& out) noexcept {
  if (tid < 1) return false;
  out = static_cast<trace_track>((tid - 1) % track_count);
  return true;
}

std::string_view track_title(trace_track track) noexcept {
  switch (track) {
    case trace_track::compute:
      return "compute";
    case trace_track::d2h:
      return "D2H copy";
    case trace_track::h2d:
      return "H2D copy";
    case trace_track::host:
      return "host";
  }
  return "unknown";
}

double us(std::int64_t ns) noexcept { return static_cast<double>(ns) / 1000.0; }

void compute_span(trace_timeline& t) {
  bool any = false;
  std::int64_t lo = 0;
  std::int64_t hi = 0;
  auto see = [&](std::int64_t a, std::int64_t b) {
    if (!any) {
      lo = a;
      hi = b;
      any = true;
    } else {
      lo = std::min(lo, a);
      hi = std::max(hi, b);
    }
  };
  for (const auto& s : t.slices) see(s.begin_ns, s.end_ns);
  for (const auto* list : {&t.markers, &t.counters, &t.unmatched}) {
    for (const auto& e : *list) {
      const auto ns = static_cast<std::int64_t>(e.time_ns);
      see(ns, ns);
    }
  }
  t.begin_ns = lo;
  t.end_ns = hi;
}

void sort_timeline(trace_timeline& t) {
  std::stable_sort(
      t.slices.begin(), t.slices.end(),
      [](const trace_slice& a, const trace_slice& b) { return a.begin_ns < b.begin_ns; });
  auto by_time = [](const trace_event& a, const trace_event& b) { return a.time_ns < b.time_ns; };
  std::stable_sort(t.markers.begin(), t.markers.end(), by_time);
  std::stable_sort(t.counters.begin(), t.counters.end(), by_time);
  std::stable_sort(t.unmatched.begin(), t.unmatched.end(), by_time);
}

trace_slice make_slice(slice_kind kind, const trace_event& b, const trace_event& e) {
  trace_slice s;
  s.kind = kind;
  s.begin_ns = whole_ns(b.time_ns);
  s.end_ns = std::max(s.begin_ns, whole_ns(e.time_ns));
  s.bytes = b.bytes != 0 ? b.bytes : e.bytes;
  s.buffer = b.buffer;
  s.stream = b.stream != 0 ? b.stream : e.stream;
  s.layer = b.layer >= 0 ? b.layer : e.layer;
  s.track = b.track;
  s.detail = b.detail != event_detail::none ? b.detail : e.detail;
  return s;
}

// Note [Overflow lanes]
// Slices on one thread track must nest: Perfetto and chrome://tracing draw a slice that starts
// inside another and ends after it wrongly (Perfetto reports an import error). Copies whose
// recorded begin and end overlap partly (two D2H streams, or times taken at enqueue on a real
// GPU) would do that, so each track is split into as many lanes (extra threads named
// "D2H copy (2)", ...) as it needs for every lane to nest properly; the first lane keeps the
// track's name. The reader folds lanes back into their track.
std::vector<int> pack_lanes(const std::vector<trace_slice>& slices) {
  std::vector<std::size_t> order(slices.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    const trace_slice& x = slices[a];
    const trace_slice& y = slices[b];
    if (x.track != y.track) return x.track < y.track;
    if (x.begin_ns != y.begin_ns) return x.begin_ns < y.begin_ns;
    return x.end_ns > y.end_ns;  // the enclosing slice first
  });
  std::vector<int> lane(slices.size(), 0);
  // Per lane of the current track: the ends of the slices open at the current time, innermost
  // last.
  std::vector<std::vector<std::int64_t>> open;
  trace_track current = trace_track::compute;
  for (std::size_t i : order) {
    const trace_slice& s = slices[i];
    if (open.empty() || s.track != current) {
      open.assign(1, {});
      current = s.track;
    }
    std::size_t k = 0;
    for (;; ++k) {
      if (k == open.size()) open.emplace_back();
      auto& stack = open[k];
      while (!stack.empty() && stack.back() <= s.begin_ns) stack.pop_back();
      if (stack.empty() || stack.back() >= s.end_ns) break;
    }
    open[k].push_back(s.end_ns);
    lane[i] = static_cast<int>(k);
  }
  return lane;
}

std::string layer_slice_name(const trace_slice& s) {
  const std::string_view phase = s.kind == slice_kind::backward ? "backward" : "forward";
  return s.layer >= 0 ? fmt::format("{} {}", phase, s.layer) : std::string(phase);
}

std::string marker_name(const trace_event& e) {
  switch (e.kind) {
    case event_kind::segment_map:
      return "segment map";
    case event_kind::segment_release:
      return "segment release";
    case event_kind::prefetch_issued:
      return "prefetch";
    case event_kind::evict:
      return e.detail == event_detail::none ? std::string("evict")
                                            : fmt::format("evict ({})", to_string(e.detail));
    case event_kind::iteration:
      return fmt::format("iteration {}", e.value);
    case event_kind::oom:
      return "OOM";
    default:
      return std::string(to_string(e.kind));
  }
}

// Numbers that are whole print as integers (readable in viewers); others keep every bit.
nlohmann::json number(double v) {
  if (v >= 0 && v < 9.0e15 && std::floor(v) == v) return static_cast<std::uint64_t>(v);
  return v;
}

// Only fields that differ from their defaults, to keep traces small; the reader restores them.
nlohmann::json event_args(const trace_event& e) {
  nlohmann::json a = nlohmann::json::object();
  a["kind"] = to_string(e.kind);
  if (e.bytes != 0) a["bytes"] = e.bytes;
  if (e.buffer != 0) a["buffer"] = e.buffer;
  if (e.layer != -1) a["layer"] = e.layer;
  if (e.detail != event_detail::none) a["detail"] = to_string(e.detail);
  if (e.value != 0) a["value"] = number(e.value);
  if (e.value2 != 0) a["value2"] = number(e.value2);
  if (e.stream != 0) a["stream"] = static_cast<std::uint64_t>(e.stream);
  return a;
}

// False when the args do not name one of our kinds (an instant from another producer).
bool event_from_args(const nlohmann::json& args, std::int64_t time_ns, trace_track track,
                     trace_event& e) {
  e = trace_event{};
  e.time_ns = static_cast<double>(time_ns);
  e.track = track;
  if (!parse_event_kind(args.value("kind", std::string()), e.kind)) return false;
  e.bytes = args.value("bytes", std::uint64_t{0});
  e.buffer = args.value("buffer", std::uint64_t{0});
  e.layer = args.value("layer", std::int32_t{-1});
  if (!parse_event_detail(args.value("detail", std::string("none")), e.detail)) {
    e.detail = event_detail::none;
  }
  e.value = args.value("value", 0.0);
  e.value2 = args.value("value2", 0.0);
  e.stream = static_cast<std::uintptr_t>(args.value("stream", std::uint64_t{0}));
  return true;
}

}  // namespace

trace_timeline make_timeline(std::span<const trace_event> events, std::string device_name,
                             std::uint64_t dropped_events) {
  trace_timeline t;
  t.device_name = std::move(device_name);
  t.dropped_events = dropped_events;

  std::vector<std::size_t> order(events.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return events[a].time_ns < events[b].time_ns;
  });

  // A buffer is swapped out at most once at a time, so first-in-first-out pairs the right ones
  // even when a later cycle of the same buffer is in the trace; layer phases nest, so last in,
  // first out.
  std::unordered_map<std::uint64_t, std::deque<const trace_event*>> open_out;
  std::unordered_map<std::uint64_t, std::deque<const trace_event*>> open_in;
  std::map<std::pair<std::int32_t, bool>, std::vector<const trace_event*>> open_layers;

  auto pair_swap = [&](auto& open, const trace_event& e, bool is_begin, slice_kind kind) {
    if (is_begin) {
      open[e.buffer].push_back(&e);
      return;
    }
    auto it = open.find(e.buffer);
    if (it == open.end() || it->second.empty()) {
      t.unmatched.push_back(rounded(e));
      return;
    }
    t.slices.push_back(make_slice(kind, *it->second.front(), e));
    it->second.pop_front();
  };

  for (std::size_t i : order) {
    const trace_event& e = events[i];
    switch (e.kind) {
      case event_kind::swap_out_begin:
        pair_swap(open_out, e, true, slice_kind::swap_out);
        break;
      case event_kind::swap_out_end:
        pair_swap(open_out, e, false, slice_kind::swap_out);
        break;
      case event_kind::swap_in_begin:
        pair_swap(open_in, e, true, slice_kind::swap_in);
        break;
      case event_kind::swap_in_end:
        pair_swap(open_in, e, false, slice_kind::swap_in);
        break;
      case event_kind::layer_begin:
        open_layers[{e.layer, e.detail == event_detail::backward}].push_back(&e);
        break;
      case event_kind::layer_end: {
        const bool backward = e.detail == event_detail::backward;
        auto it = open_layers.find({e.layer, backward});
        if (it == open_layers.end() || it->second.empty()) {
          t.unmatched.push_back(rounded(e));
          break;
        }
        trace_slice s = make_slice(backward ? slice_kind::backward : slice_kind::forward,
                                   *it->second.back(), e);
        s.detail = backward ? event_detail::backward : event_detail::forward;
        t.slices.push_back(s);
        it->second.pop_back();
        break;
      }
      case event_kind::stall: {
        trace_slice s = make_slice(slice_kind::stall, e, e);
        s.end_ns = s.begin_ns + std::max<std::int64_t>(0, whole_ns(e.value));
        t.slices.push_back(s);
        break;
      }
      case event_kind::counter:
        t.counters.push_back(rounded(e));
        break;
      default:
        t.markers.push_back(rounded(e));
        break;
    }
  }
  for (auto* open : {&open_out, &open_in}) {
    for (auto& [buffer, list] : *open) {
      for (const trace_event* e : list) t.unmatched.push_back(rounded(*e));
    }
  }
  for (auto& [key, list] : open_layers) {
    for (const trace_event* e : list) t.unmatched.push_back(rounded(*e));
  }
  sort_timeline(t);
  compute_span(t);
  return t;
}

nlohmann::json to_chrome_trace(const trace_timeline& timeline,
                               const chrome_trace_options& options) {
  using nlohmann::json;
  const int pid = options.pid;
  const std::string device =
      timeline.device_name.empty() ? options.device_name : timeline.device_name;

  json events = json::array();
  events.push_back({{"name", "process_name"},
                    {"ph", "M"},
                    {"pid", pid},
                    {"tid", 0},
                    {"args", {{"name", fmt::format("gpuswap ({})", device)}}}});
  const std::vector<int> lane = pack_lanes(timeline.slices);
  std::vector<int> lanes_used(track_count, 1);
  for (std::size_t i = 0; i < lane.size(); ++i) {
    int& used = lanes_used[static_cast<std::size_t>(timeline.slices[i].track)];
    used = std::max(used, lane[i] + 1);
  }
  for (int i = 0; i < track_count; ++i) {
    const auto track = static_cast<trace_track>(i);
    for (int k = 0; k < lanes_used[static_cast<std::size_t>(i)]; ++k) {
      const std::string name = k == 0 ? std::string(track_title(track))
                                      : fmt::format("{} ({})", track_title(track), k + 1);
      events.push_back({{"name", "thread_name"},
                        {"ph", "M"},
                        {"pid", pid},
                        {"tid", tid_of(track, k)},
                        {"args", {{"name", name}}}});
      events.push_back({{"name", "thread_sort_index"},
                        {"ph", "M"},
                        {"pid", pid},
                        {"tid", tid_of(track, k)},
                        {"args", {{"sort_index", i * 1000 + k}}}});
    }
  }

  for (std::size_t i = 0; i < timeline.slices.size(); ++i) {
    const trace_slice& s = timeline.slices[i];
    json e = {{"ph", "X"},
              {"pid", pid},
              {"tid", tid_of(s.track, lane[i])},
              {"ts", us(s.begin_ns)},
              {"dur", us(s.end_ns - s.begin_ns)}};
    json args = json::object();
    switch (s.kind) {
      case slice_kind::swap_out:
      case slice_kind::swap_in:
        e["name"] = s.kind == slice_kind::swap_out ? "swap out" : "swap in";
        e["cat"] = "swap";
        args["bytes"] = s.bytes;
        args["buffer"] = s.buffer;
        args["layer"] = s.layer;
        if (s.detail != event_detail::none) args["reason"] = to_string(s.detail);
        break;
      case slice_kind::forward:
      case slice_kind::backward:
        e["name"] = layer_slice_name(s);
        e["cat"] = "layer";
        args["layer"] = s.layer;
        args["phase"] = s.kind == slice_kind::backward ? "backward" : "forward";
        break;
      case slice_kind::stall:
        e["name"] = "stall";
        e["cat"] = "stall";
        args["wait_ns"] = s.end_ns - s.begin_ns;
        args["buffer"] = s.buffer;
        args["layer"] = s.layer;
        if (s.bytes != 0) args["bytes"] = s.bytes;
        break;
    }
    if (s.stream != 0) args["stream"] = static_cast<std::uint64_t>(s.stream);
    e["args"] = std::move(args);
    events.push_back(std::move(e));
  }

  for (const trace_event& m : timeline.markers) {
    const auto ns = static_cast<std::int64_t>(m.time_ns);
    events.push_back({{"name", marker_name(m)},
                      {"cat", "marker"},
                      {"ph", "i"},
                      {"s", "t"},
                      {"pid", pid},
                      {"tid", tid_of(m.track)},
                      {"ts", us(ns)},
                      {"args", event_args(m)}});
  }
  for (const trace_event& u : timeline.unmatched) {
    const auto ns = static_cast<std::int64_t>(u.time_ns);
    events.push_back({{"name", fmt::format("unmatched {}", to_string(u.kind))},
                      {"cat", "unmatched"},
                      {"ph", "i"},
                      {"s", "t"},
                      {"pid", pid},
                      {"tid", tid_of(u.track)},
                      {"ts", us(ns)},
                      {"args", event_args(u)}});
  }
  for (const trace_event& c : timeline.counters) {
    const auto ns = static_cast<std::int64_t>(c.time_ns);
    const bool host = c.detail == event_detail::host_memory;
    json args = host ? json{{"pinned", number(c.value)}, {"used", number(c.value2)}}
                     : json{{"allocated", number(c.value)}, {"reserved", number(c.value2)}};
    events.push_back({{"name", host ? "host memory" : "device memory"},
                      {"cat", "memory"},
                      {"ph", "C"},
                      {"pid", pid},
                      {"tid", tid_of(trace_track::host)},
                      {"ts", us(ns)},
                      {"args", std::move(args)}});
  }

  if (options.flows) {
    // Each swap-out points at the next swap-in of the same buffer. Both ends sit at the middle
    // of their slice, so that "bind to the enclosing slice" picks that slice even when another
    // one starts where it ends.
    std::unordered_map<std::uint64_t, std::size_t> last_out;
    std::uint64_t next_id = 1;
    auto mid_us = [](const trace_slice& s) {
      return (static_cast<double>(s.begin_ns) + static_cast<double>(s.end_ns)) / 2000.0;
    };
    for (std::size_t i = 0; i < timeline.slices.size(); ++i) {
      const trace_slice& s = timeline.slices[i];
      if (s.kind == slice_kind::swap_out) {
        last_out[s.buffer] = i;
      } else if (s.kind == slice_kind::swap_in) {
        auto it = last_out.find(s.buffer);
        if (it == last_out.end()) continue;
        const trace_slice& out = timeline.slices[it->second];
        const std::uint64_t id = next_id++;
        events.push_back({{"name", "swap"},
                          {"cat", "swap flow"},
                          {"ph", "s"},
                          {"id", id},
                          {"pid", pid},
                          {"tid", tid_of(out.track, lane[it->second])},
                          {"ts", mid_us(out)}});
        events.push_back({{"name", "swap"},
                          {"cat", "swap flow"},
                          {"ph", "f"},
                          {"bp", "e"},
                          {"id", id},
                          {"pid", pid},
                          {"tid", tid_of(s.track, lane[i])},
                          {"ts", mid_us(s)}});
        last_out.erase(it);
      }
    }
  }

  json other = {{"generator", "gpuswap"},
                {"device", device},
                {"dropped_events", timeline.dropped_events},
                {"unmatched_events", timeline.unmatched.size()}};
  if (options.other_data.is_object()) {
    for (const auto& [key, value] : options.other_data.items()) other[key] = value;
  }
  return json{{"traceEvents", std::move(events)},
              {"displayTimeUnit", "ns"},
              {"otherData", std::move(other)}};
}

nlohmann::json to_chrome_trace(std::span<const trace_event> events,
                               const chrome_trace_options& options) {
  return to_chrome_trace(make_timeline(events, options.device_name, options.dropped_events),
                         options);
}

void write_chrome_trace(const std::string& path, std::span<const trace_event> events,
                        const chrome_trace_options& options) {
  // Device names come from drivers and users; a stray byte must not lose the trace.
  const std::string text = to_chrome_trace(events, options)
                               .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  write_file_atomically(path, text);
}

trace_timeline timeline_from_chrome_trace(const nlohmann::json& trace, std::string_view source) {
  using nlohmann::json;
  const json* list = nullptr;
  if (trace.is_array()) {
    list = &trace;
  } else if (trace.is_object() && trace.contains("traceEvents") &&
             trace["traceEvents"].is_array()) {
    list = &trace["traceEvents"];
  } else {
    throw_error(
        fmt::format("gpuswap: '{}' is not a Chrome trace (no traceEvents array)", source));
  }

  trace_timeline t;
  try {
    if (trace.is_object() && trace.contains("otherData") && trace["otherData"].is_object()) {
      const json& other = trace["otherData"];
      t.device_name = other.value("device", std::string());
      t.dropped_events = other.value("dropped_events", std::uint64_t{0});
    }
    for (const json& e : *list) {
      if (!e.is_object()) continue;
      const std::string ph = e.value("ph", std::string());
      const std::string cat = e.value("cat", std::string());
      const std::string name = e.value("name", std::string());
      const json args = e.value("args", json::object());
      if (ph == "M") {
        constexpr std::string_view prefix = "gpuswap (";
        if (name == "process_name" && t.device_name.empty()) {
          const std::string pname = args.value("name", std::string());
          if (pname.starts_with(prefix) && pname.ends_with(')')) {
            t.device_name = pname.substr(prefix.size(), pname.size() - prefix.size() - 1);
          }
        }
        continue;
      }
      if (!e.contains("ts")) continue;
      const std::int64_t ts = whole_ns(e["ts"].get<double>() * 1000.0);
      trace_track track = trace_track::host;
      const bool known_tid = track_of_tid(e.value("tid", std::int64_t{0}), track);

      if (ph == "X" && (cat == "swap" || cat == "layer" || cat == "stall")) {
        trace_slice s;
        s.begin_ns = ts;
        s.end_ns = ts + std::max<std::int64_t>(0, whole_ns(e.value("dur", 0.0) * 1000.0));
        s.bytes = args.value("bytes", std::uint64_t{0});
        s.buffer = args.value("buffer", std::uint64_t{0});
        s.layer = args.value("layer", std::int32_t{-1});
        s.stream = static_cast<std::uintptr_t>(args.value("stream", std::uint64_t{0}));
        if (cat == "swap") {
          s.kind = name == "swap in" ? slice_kind::swap_in : slice_kind::swap_out;
          if (!parse_event_detail(args.value("reason", std::string("none")), s.detail)) {
            s.detail = event_detail::none;
          }
          s.track = known_tid
                        ? track
                        : (s.kind == slice_kind::swap_in ? trace_track::h2d : trace_track::d2h);
        } else if (cat == "layer") {
          const bool backward = args.value("phase", std::string()) == "backward";
          s.kind = backward ? slice_kind::backward : slice_kind::forward;
          s.detail = backward ? event_detail::backward : event_detail::forward;
          s.track = known_tid ? track : trace_track::compute;
        } else {
          s.kind = slice_kind::stall;
          s.track = known_tid ? track : trace_track::compute;
        }
        t.slices.push_back(s);
      } else if ((ph == "i" || ph == "I") && (cat == "marker" || cat == "unmatched")) {
        trace_event m;
        if (event_from_args(args, ts, track, m)) {
          (cat == "marker" ? t.markers : t.unmatched).push_back(m);
        }
      } else if (ph == "C" && (name == "device memory" || name == "host memory")) {
        const bool host = name == "host memory";
        trace_event c =
            host
                ? trace_event::host_counter(static_cast<double>(ts), args.value("pinned", 0.0),
                                            args.value("used", 0.0))
                : trace_event::device_counter(static_cast<double>(ts), args.value("allocated", 0.0),
                                              args.value("reserved", 0.0));
        t.counters.push_back(c);
      }
    }
  } catch (const json::exception& ex) {
    throw_error(fmt::format("gpuswap: '{}' is not a gpuswap trace: {}", source, ex.what()));
  }
  sort_timeline(t);
  compute_span(t);
  return t;
}

trace_timeline read_chrome_trace(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw_error(
        fmt::format("gpuswap: cannot open trace '{}': {}", path, std::strerror(errno)));
  }
  nlohmann::json trace;
  try {
    trace = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& ex) {
    throw_error(fmt::format("gpuswap: '{}' is not JSON: {}", path, ex.what()));
  }
  return timeline_from_chrome_trace(trace, path);
}

void write_file_atomically(const std::string& path, std::string_view contents) {
  static std::atomic<unsigned> counter{0};
  const std::string tmp = fmt::format("{}.tmp.{}.{}", path, ::getpid(),
                                      counter.fetch_add(1, std::memory_order_relaxed));
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) {
      throw_error(fmt::format("gpuswap: cannot write '{}': cannot create '{}': {}", path, tmp,
                                    std::strerror(errno)));
    }
    out.write(contents.data(), static_cast<std::streamsize>(contents.size()));
    out.close();
    if (!out) {
      const int saved = errno;
      std::error_code ignored;
      std::filesystem::remove(tmp, ignored);
      throw_error(fmt::format("gpuswap: cannot write '{}': {}", path, std::strerror(saved)));
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    throw_error(fmt::format("gpuswap: cannot write '{}': {}", path, ec.message()));
  }
}

}  // namespace gpuswap
