#include "profiler/trace_summary.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <utility>

namespace gpuswap {

namespace {

using interval = std::pair<std::int64_t, std::int64_t>;

// Sorted, disjoint, non-empty intervals covering the same time as the input.
std::vector<interval> merge(std::vector<interval> in) {
  std::sort(in.begin(), in.end());
  std::vector<interval> out;
  for (const auto& [b, e] : in) {
    if (e <= b) continue;
    if (!out.empty() && b <= out.back().second) {
      out.back().second = std::max(out.back().second, e);
    } else {
      out.emplace_back(b, e);
    }
  }
  return out;
}

std::int64_t length(const std::vector<interval>& merged) {
  std::int64_t total = 0;
  for (const auto& [b, e] : merged) total += e - b;
  return total;
}

// Both inputs merged (sorted, disjoint).
std::int64_t intersection_length(const std::vector<interval>& a, const std::vector<interval>& b) {
  std::int64_t total = 0;
  std::size_t i = 0;
  std::size_t j = 0;
  while (i < a.size() && j < b.size()) {
    const std::int64_t lo = std::max(a[i].first, b[j].first);
    const std::int64_t hi = std::min(a[i].second, b[j].second);
    if (hi > lo) total += hi - lo;
    if (a[i].second < b[j].second) {
      ++i;
    } else {
      ++j;
    }
  }
  return total;
}

// a minus b; both merged (sorted, disjoint).
std::vector<interval> subtract(const std::vector<interval>& a, const std::vector<interval>& b) {
  std::vector<interval> out;
  std::size_t j = 0;
  for (auto [lo, hi] : a) {
    while (j < b.size() && b[j].second <= lo) ++j;
    for (std::size_t k = j; k < b.size() && b[k].first < hi; ++k) {
      if (b[k].first > lo) out.emplace_back(lo, b[k].first);
      lo = std::max(lo, b[k].second);
    }
    if (hi > lo) out.emplace_back(lo, hi);
  }
  return out;
}

std::uint64_t as_bytes(double v) noexcept {
  if (!(v > 0)) return 0;  // also NaN
  constexpr double two_to_64 = 18446744073709551616.0;
  if (v + 0.5 >= two_to_64) return std::numeric_limits<std::uint64_t>::max();
  return static_cast<std::uint64_t>(v + 0.5);
}

double ms(std::int64_t ns) noexcept { return static_cast<double>(ns) / 1e6; }

}  // namespace

trace_summary summarize(const trace_timeline& timeline) {
  trace_summary s;
  s.device_name = timeline.device_name;
  s.begin_ns = timeline.begin_ns;
  s.end_ns = timeline.end_ns;
  s.unmatched_events = timeline.unmatched.size();
  s.dropped_events = timeline.dropped_events;

  std::map<std::int32_t, layer_summary> layers;
  auto layer = [&](std::int32_t index) -> layer_summary* {
    if (index < 0) return nullptr;
    layer_summary& l = layers[index];
    l.layer = index;
    return &l;
  };

  std::vector<interval> copies;
  std::vector<interval> compute;
  std::vector<interval> stalls;
  for (const trace_slice& sl : timeline.slices) {
    const std::int64_t d = sl.duration_ns();
    layer_summary* l = layer(sl.layer);
    switch (sl.kind) {
      case slice_kind::swap_out:
        s.bytes_swapped_out += sl.bytes;
        ++s.swaps_out;
        s.d2h_ns += d;
        copies.emplace_back(sl.begin_ns, sl.end_ns);
        if (l != nullptr) {
          l->bytes_out += sl.bytes;
          ++l->swaps_out;
        }
        break;
      case slice_kind::swap_in:
        s.bytes_swapped_in += sl.bytes;
        ++s.swaps_in;
        s.h2d_ns += d;
        if (sl.detail == event_detail::prefetch) ++s.swaps_in_prefetched;
        if (sl.detail == event_detail::demand) ++s.swaps_in_on_demand;
        copies.emplace_back(sl.begin_ns, sl.end_ns);
        if (l != nullptr) {
          l->bytes_in += sl.bytes;
          ++l->swaps_in;
        }
        break;
      case slice_kind::forward:
      case slice_kind::backward:
        compute.emplace_back(sl.begin_ns, sl.end_ns);
        if (l != nullptr) (sl.kind == slice_kind::forward ? l->forward_ns : l->backward_ns) += d;
        break;
      case slice_kind::stall:
        stalls.emplace_back(sl.begin_ns, sl.end_ns);
        s.stall_ns += d;
        ++s.stalls;
        if (l != nullptr) {
          l->stall_ns += d;
          ++l->stalls;
        }
        break;
    }
  }
  // Note [Hidden copy time]: a layer phase that waits for a swap-in (a stall) is not computing
  // while it waits, so stalls are cut out of the compute time a copy can hide under; otherwise
  // a demand fetch would count as hidden under the very phase it holds up.
  const auto copy_union = merge(std::move(copies));
  const auto compute_union = subtract(merge(std::move(compute)), merge(std::move(stalls)));
  s.copy_busy_ns = length(copy_union);
  s.compute_ns = length(compute_union);
  s.copy_hidden_ns = intersection_length(copy_union, compute_union);
  s.overlap_pct = s.copy_busy_ns > 0 ? 100.0 * static_cast<double>(s.copy_hidden_ns) /
                                           static_cast<double>(s.copy_busy_ns)
                                     : 0.0;

  for (const trace_event& c : timeline.counters) {
    if (c.detail == event_detail::host_memory) {
      s.peak_host_pinned = std::max(s.peak_host_pinned, as_bytes(c.value));
      s.peak_host_used = std::max(s.peak_host_used, as_bytes(c.value2));
    } else {
      s.peak_device_allocated = std::max(s.peak_device_allocated, as_bytes(c.value));
      s.peak_device_reserved = std::max(s.peak_device_reserved, as_bytes(c.value2));
    }
  }

  for (const trace_event& m : timeline.markers) {
    switch (m.kind) {
      case event_kind::alloc:
        ++s.allocs;
        break;
      case event_kind::free:
        ++s.frees;
        break;
      case event_kind::segment_map:
        ++s.segment_maps;
        break;
      case event_kind::segment_release:
        ++s.segment_releases;
        break;
      case event_kind::prefetch_issued:
        ++s.prefetches_issued;
        break;
      case event_kind::evict:
        ++s.evictions;
        if (m.detail == event_detail::belady) ++s.evictions_belady;
        if (m.detail == event_detail::lru) ++s.evictions_lru;
        if (m.detail == event_detail::pressure) ++s.evictions_pressure;
        break;
      case event_kind::oom:
        ++s.ooms;
        break;
      case event_kind::iteration:
        ++s.iterations;
        break;
      default:
        break;
    }
  }

  s.layers.reserve(layers.size());
  for (auto& [index, l] : layers) s.layers.push_back(l);
  return s;
}

trace_summary summarize(std::span<const trace_event> events) {
  return summarize(make_timeline(events));
}

trace_summary summarize_file(const std::string& path) { return summarize(read_chrome_trace(path)); }

nlohmann::json to_json(const trace_summary& s) {
  nlohmann::json layers = nlohmann::json::array();
  for (const layer_summary& l : s.layers) {
    layers.push_back({{"layer", l.layer},
                      {"forward_ns", l.forward_ns},
                      {"backward_ns", l.backward_ns},
                      {"bytes_out", l.bytes_out},
                      {"bytes_in", l.bytes_in},
                      {"swaps_out", l.swaps_out},
                      {"swaps_in", l.swaps_in},
                      {"stall_ns", l.stall_ns},
                      {"stalls", l.stalls}});
  }
  return {{"device", s.device_name},
          {"begin_ns", s.begin_ns},
          {"end_ns", s.end_ns},
          {"duration_ns", s.duration_ns()},
          {"bytes_swapped_out", s.bytes_swapped_out},
          {"bytes_swapped_in", s.bytes_swapped_in},
          {"swaps_out", s.swaps_out},
          {"swaps_in", s.swaps_in},
          {"swaps_in_prefetched", s.swaps_in_prefetched},
          {"swaps_in_on_demand", s.swaps_in_on_demand},
          {"d2h_ns", s.d2h_ns},
          {"h2d_ns", s.h2d_ns},
          {"copy_ns", s.copy_ns()},
          {"copy_busy_ns", s.copy_busy_ns},
          {"compute_ns", s.compute_ns},
          {"copy_hidden_ns", s.copy_hidden_ns},
          {"overlap_pct", s.overlap_pct},
          {"stall_ns", s.stall_ns},
          {"stalls", s.stalls},
          {"peak_device_allocated", s.peak_device_allocated},
          {"peak_device_reserved", s.peak_device_reserved},
          {"peak_host_pinned", s.peak_host_pinned},
          {"peak_host_used", s.peak_host_used},
          {"allocs", s.allocs},
          {"frees", s.frees},
          {"segment_maps", s.segment_maps},
          {"segment_releases", s.segment_releases},
          {"prefetches_issued", s.prefetches_issued},
          {"evictions", s.evictions},
          {"evictions_belady", s.evictions_belady},
          {"evictions_lru", s.evictions_lru},
          {"evictions_pressure", s.evictions_pressure},
          {"ooms", s.ooms},
          {"iterations", s.iterations},
          {"unmatched_events", s.unmatched_events},
          {"dropped_events", s.dropped_events},
          {"layers", std::move(layers)}};
}

std::string format_summary(const trace_summary& s) {
  std::string out;
  auto line = [&out](std::string_view label, const std::string& text) {
    out += fmt::format("  {:<14}{}\n", label, text);
  };
  out += fmt::format("gpuswap trace summary ({})\n",
                     s.device_name.empty() ? "unknown device" : s.device_name);
  line("span", fmt::format("{:.3f} ms, {} iteration(s)", ms(s.duration_ns()), s.iterations));
  line("swapped out", fmt::format("{} in {} swap(s), D2H {:.3f} ms",
                                  human_bytes(s.bytes_swapped_out), s.swaps_out, ms(s.d2h_ns)));
  line("swapped in", fmt::format("{} in {} swap(s), H2D {:.3f} ms ({} prefetched, {} on demand)",
                                 human_bytes(s.bytes_swapped_in), s.swaps_in, ms(s.h2d_ns),
                                 s.swaps_in_prefetched, s.swaps_in_on_demand));
  if (s.copy_busy_ns > 0) {
    line("copy overlap",
         fmt::format("{:.1f}% ({:.3f} of {:.3f} ms of copying hidden under compute)", s.overlap_pct,
                     ms(s.copy_hidden_ns), ms(s.copy_busy_ns)));
  } else {
    line("copy overlap", "n/a (no copies)");
  }
  line("compute", fmt::format("{:.3f} ms in layer phases", ms(s.compute_ns)));
  line("stalls", fmt::format("{}, {:.3f} ms", s.stalls, ms(s.stall_ns)));
  line("peak device", fmt::format("{} allocated, {} reserved", human_bytes(s.peak_device_allocated),
                                  human_bytes(s.peak_device_reserved)));
  line("peak host", fmt::format("{} pinned, {} used", human_bytes(s.peak_host_pinned),
                                human_bytes(s.peak_host_used)));
  line("evictions",
       fmt::format("{} (belady {}, lru {}, pressure {}); {} prefetch(es) issued", s.evictions,
                   s.evictions_belady, s.evictions_lru, s.evictions_pressure, s.prefetches_issued));
  line("allocator",
       fmt::format("{} alloc(s), {} free(s), {} segment map(s), {} release(s), {} OOM(s)", s.allocs,
                   s.frees, s.segment_maps, s.segment_releases, s.ooms));
  if (s.unmatched_events != 0 || s.dropped_events != 0) {
    line("warnings", fmt::format("{} unmatched begin/end event(s), {} event(s) dropped",
                                 s.unmatched_events, s.dropped_events));
  }
  if (!s.layers.empty()) {
    out += fmt::format("\n  {:>5}  {:>11}  {:>11}  {:>10}  {:>10}  {:>6}  {:>9}\n", "layer",
                       "forward ms", "backward ms", "out", "in", "stalls", "stall ms");
    for (const layer_summary& l : s.layers) {
      out += fmt::format("  {:>5}  {:>11.3f}  {:>11.3f}  {:>10}  {:>10}  {:>6}  {:>9.3f}\n",
                         l.layer, ms(l.forward_ns), ms(l.backward_ns), human_bytes(l.bytes_out),
                         human_bytes(l.bytes_in), l.stalls, ms(l.stall_ns));
    }
  }
  return out;
}

}  // namespace gpuswap
