#include "profiler/trace_plot.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <iterator>
#include <vector>

#include "profiler/trace_summary.hpp"

namespace gpuswap {

namespace {

struct point {
  double x;
  double y;
};

// Bar classes, in drawing order (stalls last, on top of the compute phases).
enum bar_class : int { forward_bar, backward_bar, d2h_bar, h2d_bar, stall_bar, bar_class_count };

constexpr std::array<const char*, bar_class_count> bar_colour = {"#59a14f", "#b07aa1", "#4e9f9a",
                                                                 "#e6a817", "#e15759"};
constexpr const char* allocated_colour = "#4e79a7";
constexpr const char* reserved_colour = "#f28e2b";

struct bar {
  double x0;
  double x1;
  std::string tip;  // empty: no tooltip (merged, or too many bars)
};

std::string escape(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&apos;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

// 1, 2 or 5 times a power of ten, giving about `target` steps over `range`.
double nice_step(double range, int target) {
  if (!(range > 0)) return 1;
  const double raw = range / target;
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  const double norm = raw / magnitude;
  const double step = norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 5 ? 5 : 10;
  return step * magnitude;
}

struct memory_unit {
  double bytes;
  const char* name;
};

memory_unit unit_for(double max_bytes) {
  constexpr double kib = 1024.0;
  if (max_bytes >= kib * kib * kib) return {kib * kib * kib, "GiB"};
  if (max_bytes >= kib * kib) return {kib * kib, "MiB"};
  if (max_bytes >= kib) return {kib, "KiB"};
  return {1, "B"};
}

// Samples that land in one pixel column become that column's first, extreme and last points: the
// line still reaches every peak, with at most four points per column.
std::vector<point> reduce_columns(const std::vector<point>& in) {
  std::vector<point> out;
  std::size_t i = 0;
  while (i < in.size()) {
    const double column = std::floor(in[i].x);
    std::size_t j = i;
    double lo = in[i].y;
    double hi = in[i].y;
    while (j < in.size() && std::floor(in[j].x) == column) {
      lo = std::min(lo, in[j].y);
      hi = std::max(hi, in[j].y);
      ++j;
    }
    out.push_back(in[i]);
    if (j - i > 2) {
      out.push_back({in[i].x, lo});
      out.push_back({in[i].x, hi});
    }
    if (j - i > 1) out.push_back(in[j - 1]);
    i = j;
  }
  return out;
}

std::string points_attr(const std::vector<point>& pts) {
  std::string out;
  for (const point& p : pts) {
    if (!out.empty()) out += ' ';
    fmt::format_to(std::back_inserter(out), "{:.1f},{:.1f}", p.x, p.y);
  }
  return out;
}

std::string tip_for(const trace_slice& s) {
  const double ms = static_cast<double>(s.duration_ns()) / 1e6;
  switch (s.kind) {
    case slice_kind::swap_out:
    case slice_kind::swap_in:
      return fmt::format("{} buffer {} (layer {}): {}, {:.3f} ms",
                         s.kind == slice_kind::swap_out ? "swap out" : "swap in", s.buffer, s.layer,
                         human_bytes(s.bytes), ms);
    case slice_kind::forward:
    case slice_kind::backward:
      return fmt::format("{} {}: {:.3f} ms", to_string(s.kind), s.layer, ms);
    case slice_kind::stall:
      return fmt::format("stall on buffer {} (layer {}): {:.3f} ms", s.buffer, s.layer, ms);
  }
  return {};
}

bar_class class_of(const trace_slice& s) {
  switch (s.kind) {
    case slice_kind::forward:
      return forward_bar;
    case slice_kind::backward:
      return backward_bar;
    case slice_kind::swap_out:
      return d2h_bar;
    case slice_kind::swap_in:
      return h2d_bar;
    case slice_kind::stall:
      return stall_bar;
  }
  return stall_bar;
}

// Bars of one class that overlap, or that are under two pixels wide and come within half a
// pixel of each other, become one bar: a million tiny copies draw as a few runs, while
// back-to-back layer phases stay separate bars.
std::vector<bar> merge_bars(std::vector<bar> bars) {
  std::stable_sort(bars.begin(), bars.end(),
                   [](const bar& a, const bar& b) { return a.x0 < b.x0; });
  constexpr double narrow = 2.0;
  std::vector<bar> out;
  for (bar& b : bars) {
    if (!out.empty()) {
      bar& cur = out.back();
      const bool overlaps = b.x0 < cur.x1 - 1e-6;
      const bool close_and_narrow =
          b.x0 <= cur.x1 + 0.5 && (b.x1 - b.x0 < narrow || cur.x1 - cur.x0 < narrow);
      if (overlaps || close_and_narrow) {
        cur.x1 = std::max(cur.x1, b.x1);
        cur.tip.clear();
        continue;
      }
    }
    out.push_back(std::move(b));
  }
  return out;
}

}  // namespace

std::string plot_svg(const trace_timeline& timeline, const plot_options& options) {
  const int width = std::max(options.width, 480);
  const int height = std::max(options.height, 400);
  const trace_summary summary = summarize(timeline);

  // Layout, top to bottom: title, memory panel, three lanes, time axis, legend.
  const double left = 90;
  const double right = width - 30.0;
  const double mem_top = 70;
  const double mem_bottom = height - 200.0;
  constexpr double lane_h = 22;
  constexpr double lane_pitch = 30;
  const double lanes_top = mem_bottom + 22;
  const double axis_y = lanes_top + 3 * lane_pitch - 2;
  const double legend_y = std::min(height - 14.0, axis_y + 66);

  const std::int64_t t0 = timeline.begin_ns;
  const std::int64_t t1 = std::max(timeline.end_ns, t0 + 1);
  const double span_ms = static_cast<double>(t1 - t0) / 1e6;
  auto x_of = [&](double t_ns) {
    return left + (t_ns - static_cast<double>(t0)) / static_cast<double>(t1 - t0) * (right - left);
  };

  double max_bytes = 0;
  for (const trace_event& c : timeline.counters) {
    if (c.detail == event_detail::host_memory) continue;
    max_bytes = std::max({max_bytes, c.value, c.value2});
  }
  const memory_unit unit = unit_for(max_bytes > 0 ? max_bytes : 1024.0 * 1024.0);
  const double max_units = max_bytes > 0 ? max_bytes / unit.bytes : 1.0;
  const double mem_step = nice_step(max_units, 5);
  const double mem_top_units = std::max(mem_step, std::ceil(max_units / mem_step) * mem_step);
  auto y_of = [&](double bytes) {
    return mem_bottom - bytes / unit.bytes / mem_top_units * (mem_bottom - mem_top);
  };

  std::string svg;
  auto out = std::back_inserter(svg);
  fmt::format_to(
      out,
      "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" "
      "viewBox=\"0 0 {0} {1}\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\" "
      "font-size=\"12\">\n",
      width, height);
  fmt::format_to(out, "<rect x=\"0\" y=\"0\" width=\"{}\" height=\"{}\" fill=\"white\"/>\n", width,
                 height);

  // Title and the figures that matter most.
  const std::string device = timeline.device_name.empty() ? "unknown device" : timeline.device_name;
  const std::string title =
      options.title.empty() ? fmt::format("gpuswap trace ({})", device) : options.title;
  fmt::format_to(out, "<text x=\"{}\" y=\"26\" font-size=\"17\" font-weight=\"bold\">{}</text>\n",
                 left, escape(title));
  std::string overlap =
      summary.copy_busy_ns > 0 ? fmt::format("{:.1f}%", summary.overlap_pct) : std::string("n/a");
  fmt::format_to(out,
                 "<text x=\"{}\" y=\"46\" fill=\"#444\">out {} in {} swaps, in {} in {} swaps; "
                 "copy overlap {}; {} stalls ({:.3f} ms); peak allocated {}, reserved {}</text>\n",
                 left, human_bytes(summary.bytes_swapped_out), summary.swaps_out,
                 human_bytes(summary.bytes_swapped_in), summary.swaps_in, escape(overlap),
                 summary.stalls, static_cast<double>(summary.stall_ns) / 1e6,
                 human_bytes(summary.peak_device_allocated),
                 human_bytes(summary.peak_device_reserved));

  // Memory panel: horizontal grid with labelled ticks.
  svg += "<g id=\"memory-axis\" stroke=\"#ddd\">\n";
  for (int k = 0; k * mem_step <= mem_top_units * (1 + 1e-9); ++k) {
    const double v = k * mem_step;
    const double y = mem_bottom - v / mem_top_units * (mem_bottom - mem_top);
    fmt::format_to(out, "<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\"/>\n", left,
                   y, right, y);
    fmt::format_to(out,
                   "<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"end\" stroke=\"none\" "
                   "fill=\"#333\">{:g}</text>\n",
                   left - 6, y + 4, v);
  }
  svg += "</g>\n";
  fmt::format_to(out,
                 "<text x=\"22\" y=\"{0:.1f}\" text-anchor=\"middle\" "
                 "transform=\"rotate(-90 22 {0:.1f})\">device memory ({1})</text>\n",
                 (mem_top + mem_bottom) / 2, unit.name);

  // Time grid (vertical lines through panel and lanes) and the time axis.
  const double time_step = nice_step(span_ms, 10);
  svg += "<g id=\"time-axis\" stroke=\"#ddd\">\n";
  for (int k = 0; k * time_step <= span_ms * (1 + 1e-9); ++k) {
    const double v = k * time_step;
    const double x = x_of(static_cast<double>(t0) + v * 1e6);
    fmt::format_to(out, "<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{0:.1f}\" y2=\"{2:.1f}\"/>\n", x,
                   mem_top, axis_y + 4);
    fmt::format_to(out,
                   "<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\" stroke=\"none\" "
                   "fill=\"#333\">{:g}</text>\n",
                   x, axis_y + 18, v);
  }
  svg += "</g>\n";
  fmt::format_to(out,
                 "<line x1=\"{0}\" y1=\"{1:.1f}\" x2=\"{2}\" y2=\"{1:.1f}\" stroke=\"#333\"/>\n",
                 left, axis_y, right);
  fmt::format_to(out,
                 "<line x1=\"{0}\" y1=\"{1:.1f}\" x2=\"{0}\" y2=\"{2:.1f}\" stroke=\"#333\"/>\n",
                 left, mem_top, mem_bottom);
  fmt::format_to(out,
                 "<line x1=\"{0}\" y1=\"{1:.1f}\" x2=\"{2}\" y2=\"{1:.1f}\" stroke=\"#333\"/>\n",
                 left, mem_bottom, right);
  fmt::format_to(out, "<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">time (ms)</text>\n",
                 (left + right) / 2, axis_y + 36);

  // Device memory: allocated as a filled step area, reserved as a step line.
  std::vector<point> allocated;
  std::vector<point> reserved;
  for (const trace_event& c : timeline.counters) {
    if (c.detail == event_detail::host_memory) continue;
    const double x = x_of(c.time_ns);
    if (!allocated.empty()) {
      allocated.push_back({x, allocated.back().y});
      reserved.push_back({x, reserved.back().y});
    }
    allocated.push_back({x, y_of(c.value)});
    reserved.push_back({x, y_of(c.value2)});
  }
  svg += "<g id=\"memory\">\n";
  if (!allocated.empty()) {
    allocated.push_back({right, allocated.back().y});
    reserved.push_back({right, reserved.back().y});
    allocated = reduce_columns(allocated);
    reserved = reduce_columns(reserved);
    std::vector<point> area = allocated;
    area.push_back({allocated.back().x, mem_bottom});
    area.push_back({allocated.front().x, mem_bottom});
    fmt::format_to(out,
                   "<polygon id=\"allocated-area\" points=\"{}\" fill=\"{}\" fill-opacity=\"0.3\" "
                   "stroke=\"none\"/>\n",
                   points_attr(area), allocated_colour);
    fmt::format_to(out,
                   "<polyline id=\"allocated\" points=\"{}\" fill=\"none\" stroke=\"{}\" "
                   "stroke-width=\"1.5\"/>\n",
                   points_attr(allocated), allocated_colour);
    fmt::format_to(out,
                   "<polyline id=\"reserved\" points=\"{}\" fill=\"none\" stroke=\"{}\" "
                   "stroke-width=\"1.5\" stroke-dasharray=\"6 3\"/>\n",
                   points_attr(reserved), reserved_colour);
  } else {
    fmt::format_to(out,
                   "<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\" fill=\"#888\">"
                   "no memory counters in this trace</text>\n",
                   (left + right) / 2, (mem_top + mem_bottom) / 2);
  }
  svg += "</g>\n";

  // Iteration boundaries and OOMs, across the memory panel.
  svg += "<g id=\"markers\">\n";
  for (const trace_event& m : timeline.markers) {
    const double x = x_of(m.time_ns);
    if (m.kind == event_kind::iteration) {
      fmt::format_to(out,
                     "<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{0:.1f}\" y2=\"{2:.1f}\" "
                     "stroke=\"#999\" stroke-dasharray=\"2 3\"/>\n"
                     "<text x=\"{3:.1f}\" y=\"{4:.1f}\" font-size=\"10\" fill=\"#666\">"
                     "it {5:g}</text>\n",
                     x, mem_top, axis_y, x + 3, mem_top + 10, m.value);
    } else if (m.kind == event_kind::oom) {
      fmt::format_to(out,
                     "<path d=\"M {0:.1f} {1:.1f} l -5 -9 h 10 z\" fill=\"#e15759\">"
                     "<title>OOM</title></path>\n",
                     x, mem_top);
    }
  }
  svg += "</g>\n";

  // Lanes: compute (layer phases, stalls), D2H and H2D swap slices.
  std::array<std::vector<bar>, bar_class_count> bars;
  const bool tips = timeline.slices.size() <= options.max_tooltips;
  for (const trace_slice& s : timeline.slices) {
    const double x0 = x_of(static_cast<double>(s.begin_ns));
    const double x1 = std::max(x_of(static_cast<double>(s.end_ns)), x0 + 0.6);
    bars[class_of(s)].push_back({x0, x1, tips ? tip_for(s) : std::string()});
  }
  constexpr std::array<const char*, 3> lane_names = {"compute", "D2H", "H2D"};
  constexpr std::array<const char*, 3> lane_ids = {"lane-compute", "lane-d2h", "lane-h2d"};
  for (int lane = 0; lane < 3; ++lane) {
    const double y = lanes_top + lane * lane_pitch;
    fmt::format_to(out, "<g id=\"{}\">\n", lane_ids[static_cast<std::size_t>(lane)]);
    fmt::format_to(
        out, "<rect x=\"{}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{}\" fill=\"#f4f4f4\"/>\n",
        left, y, right - left, lane_h);
    fmt::format_to(out, "<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"end\">{}</text>\n", left - 6,
                   y + lane_h / 2 + 4, lane_names[static_cast<std::size_t>(lane)]);
    std::vector<int> classes;
    if (lane == 0) classes = {forward_bar, backward_bar, stall_bar};
    if (lane == 1) classes = {d2h_bar};
    if (lane == 2) classes = {h2d_bar};
    for (int cls : classes) {
      for (const bar& b : merge_bars(std::move(bars[static_cast<std::size_t>(cls)]))) {
        fmt::format_to(
            out, "<rect x=\"{:.2f}\" y=\"{:.1f}\" width=\"{:.2f}\" height=\"{}\" fill=\"{}\"", b.x0,
            y + 2, b.x1 - b.x0, lane_h - 4, bar_colour[static_cast<std::size_t>(cls)]);
        // A hairline keeps back-to-back bars (consecutive layers) apart.
        if (b.x1 - b.x0 >= 4) svg += " stroke=\"white\" stroke-width=\"0.6\"";
        if (b.tip.empty()) {
          svg += "/>\n";
        } else {
          fmt::format_to(out, "><title>{}</title></rect>\n", escape(b.tip));
        }
      }
    }
    svg += "</g>\n";
  }

  // Legend.
  struct legend_item {
    const char* colour;
    const char* label;
    bool line;
  };
  const std::array<legend_item, 7> legend = {{{allocated_colour, "allocated", false},
                                              {reserved_colour, "reserved", true},
                                              {bar_colour[forward_bar], "forward", false},
                                              {bar_colour[backward_bar], "backward", false},
                                              {bar_colour[stall_bar], "stall", false},
                                              {bar_colour[d2h_bar], "swap out (D2H)", false},
                                              {bar_colour[h2d_bar], "swap in (H2D)", false}}};
  svg += "<g id=\"legend\">\n";
  double lx = left;
  for (const legend_item& item : legend) {
    if (item.line) {
      fmt::format_to(
          out,
          "<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{2:.1f}\" y2=\"{1:.1f}\" stroke=\"{3}\" "
          "stroke-width=\"2\" stroke-dasharray=\"6 3\"/>\n",
          lx, legend_y - 4, lx + 14, item.colour);
    } else {
      fmt::format_to(out,
                     "<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"14\" height=\"12\" fill=\"{}\"/>\n",
                     lx, legend_y - 10, item.colour);
    }
    fmt::format_to(out, "<text x=\"{:.1f}\" y=\"{:.1f}\">{}</text>\n", lx + 19, legend_y,
                   item.label);
    lx += 19 + 7.2 * static_cast<double>(std::string_view(item.label).size()) + 18;
  }
  svg += "</g>\n</svg>\n";
  return svg;
}

std::string plot_svg(std::span<const trace_event> events, const plot_options& options) {
  return plot_svg(make_timeline(events), options);
}

void plot_svg_file(const std::string& trace_path, const std::string& svg_path,
                   const plot_options& options) {
  write_file_atomically(svg_path, plot_svg(read_chrome_trace(trace_path), options));
}

}  // namespace gpuswap
