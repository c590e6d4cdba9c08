#include "profiler/trace_plot.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace gpuswap {
namespace {

namespace fs = std::filesystem;

// A small XML checker: tags balance, attributes are quoted, text has no stray '<' or '&'.
// Returns an empty string when the document is well formed, else what is wrong.
std::string xml_problem(const std::string& doc) {
  std::vector<std::string> open;
  std::size_t i = 0;
  while (i < doc.size()) {
    if (doc[i] == '&') {
      const std::size_t semi = doc.find(';', i);
      if (semi == std::string::npos || semi - i > 6) return "bare & at " + std::to_string(i);
      i = semi + 1;
      continue;
    }
    if (doc[i] != '<') {
      ++i;
      continue;
    }
    const std::size_t close = doc.find('>', i);
    if (close == std::string::npos) return "unterminated tag";
    std::string tag = doc.substr(i + 1, close - i - 1);
    i = close + 1;
    if (tag.starts_with("?")) continue;
    if (tag.find('<') != std::string::npos) return "'<' inside a tag: " + tag;
    if (std::count(tag.begin(), tag.end(), '"') % 2 != 0) return "unbalanced quotes: " + tag;
    if (tag.starts_with("/")) {
      const std::string name = tag.substr(1);
      if (open.empty() || open.back() != name) return "mismatched </" + name + ">";
      open.pop_back();
      continue;
    }
    const bool self_closing = tag.ends_with("/");
    const std::string name = tag.substr(0, tag.find_first_of(" /"));
    if (!self_closing) open.push_back(name);
  }
  if (!open.empty()) return "unclosed <" + open.back() + ">";
  return {};
}

std::size_t count(const std::string& haystack, const std::string& needle) {
  std::size_t n = 0;
  for (std::size_t at = haystack.find(needle); at != std::string::npos;
       at = haystack.find(needle, at + 1)) {
    ++n;
  }
  return n;
}

// The text of element `id`, from its opening tag to its closing one (or to "/>" for an
// element without content, like a polyline).
std::string element(const std::string& svg, const std::string& tag, const std::string& id) {
  const std::size_t at = svg.find("<" + tag + " id=\"" + id + "\"");
  if (at == std::string::npos) return {};
  const std::string closing = tag == "g" ? "</g>" : "/>";
  const std::size_t end = svg.find(closing, at);
  if (end == std::string::npos) return {};
  return svg.substr(at, end + closing.size() - at);
}

std::vector<std::pair<double, double>> points_of(const std::string& svg, const std::string& id) {
  const std::string el = element(svg, "polyline", id);
  const std::size_t at = el.find("points=\"");
  std::vector<std::pair<double, double>> pts;
  if (at == std::string::npos) return pts;
  std::istringstream in(el.substr(at + 8, el.find('"', at + 8) - at - 8));
  std::string pair;
  while (in >> pair) {
    const std::size_t comma = pair.find(',');
    pts.emplace_back(std::stod(pair.substr(0, comma)), std::stod(pair.substr(comma + 1)));
  }
  return pts;
}

std::vector<trace_event> sample_run() {
  std::vector<trace_event> ev;
  constexpr double gib = 1024.0 * 1024 * 1024;
  double t = 0;
  double allocated = 0.5 * gib;
  ev.push_back(trace_event::marker(event_kind::iteration, 0, trace_track::host));
  ev.push_back(trace_event::device_counter(0, allocated, 2 * gib));
  for (int layer = 0; layer < 8; ++layer) {
    ev.push_back(
        trace_event::layer_phase(event_kind::layer_begin, t, layer, event_detail::forward));
    t += 2e6;
    ev.push_back(trace_event::layer_phase(event_kind::layer_end, t, layer, event_detail::forward));
    allocated += 0.35 * gib;
    ev.push_back(trace_event::device_counter(t, allocated, 4 * gib));
    ev.push_back(trace_event::swap(event_kind::swap_out_begin, t, static_cast<std::uint64_t>(layer),
                                   256 << 20, layer));
    ev.push_back(trace_event::swap(event_kind::swap_out_end, t + 1.5e6,
                                   static_cast<std::uint64_t>(layer), 256 << 20, layer));
    allocated -= 0.25 * gib;
    ev.push_back(trace_event::device_counter(t + 1.5e6, allocated, 4 * gib));
  }
  for (int layer = 7; layer >= 0; --layer) {
    ev.push_back(trace_event::swap(event_kind::swap_in_begin, t - 1e6,
                                   static_cast<std::uint64_t>(layer), 256 << 20, layer, 0,
                                   event_detail::prefetch));
    ev.push_back(trace_event::swap(event_kind::swap_in_end, t + 0.5e6,
                                   static_cast<std::uint64_t>(layer), 256 << 20, layer));
    if (layer == 3) {
      ev.push_back(trace_event::stall_for(t, 0.5e6, static_cast<std::uint64_t>(layer), layer));
      t += 0.5e6;
    }
    ev.push_back(
        trace_event::layer_phase(event_kind::layer_begin, t, layer, event_detail::backward));
    t += 3e6;
    ev.push_back(trace_event::layer_phase(event_kind::layer_end, t, layer, event_detail::backward));
    allocated -= 0.1 * gib;
    ev.push_back(trace_event::device_counter(t, allocated, 4 * gib));
  }
  return ev;
}

TEST(TracePlot, IsWellFormedSvgWithPanelLanesAxesAndLegend) {
  const std::string svg = plot_svg(make_timeline(sample_run(), "sim:h100-pcie5"));
  EXPECT_TRUE(svg.starts_with("<?xml"));
  EXPECT_EQ(xml_problem(svg), "");
  EXPECT_NE(svg.find("<svg xmlns=\"http://www.w3.org/2000/svg\""), std::string::npos);
  EXPECT_NE(svg.find("gpuswap trace (sim:h100-pcie5)"), std::string::npos);
  EXPECT_EQ(points_of(svg, "allocated").size() > 10, true);
  EXPECT_EQ(points_of(svg, "reserved").size() > 2, true);
  EXPECT_NE(svg.find("id=\"allocated-area\""), std::string::npos);
  EXPECT_NE(svg.find("device memory (GiB)"), std::string::npos);
  EXPECT_NE(svg.find("time (ms)"), std::string::npos);
  EXPECT_NE(svg.find("id=\"legend\""), std::string::npos);
  EXPECT_NE(svg.find(">swap out (D2H)<"), std::string::npos);

  // One bar per swap on each copy lane; the compute lane has the 16 phases and the stall.
  EXPECT_EQ(count(element(svg, "g", "lane-d2h"), "<rect"), 1u + 8u);  // background + bars
  EXPECT_EQ(count(element(svg, "g", "lane-h2d"), "<rect"), 1u + 8u);
  EXPECT_EQ(count(element(svg, "g", "lane-compute"), "<rect"), 1u + 16u + 1u);
  EXPECT_NE(element(svg, "g", "lane-compute").find("stall on buffer 3"), std::string::npos);
}

TEST(TracePlot, TimeTicksAreInMillisecondsAndMemoryTicksInTheRightUnit) {
  std::vector<trace_event> ev;
  ev.push_back(trace_event::device_counter(0, 10 << 20, 20 << 20));
  ev.push_back(trace_event::device_counter(10e6, 30 << 20, 40 << 20));  // 10 ms, 40 MiB
  const std::string svg = plot_svg(ev);
  EXPECT_NE(svg.find("device memory (MiB)"), std::string::npos);
  EXPECT_NE(svg.find(">40</text>"), std::string::npos);  // top memory tick
  EXPECT_NE(svg.find(">10</text>"), std::string::npos);  // last time tick, in ms
  EXPECT_EQ(xml_problem(svg), "");
}

TEST(TracePlot, TextIsEscaped) {
  plot_options options;
  options.title = "a<b & \"c\"";
  const std::string svg = plot_svg(make_timeline(sample_run(), "dev<&>"), options);
  EXPECT_EQ(xml_problem(svg), "");
  EXPECT_NE(svg.find("a&lt;b &amp; &quot;c&quot;"), std::string::npos);
}

TEST(TracePlot, EmptyTraceStillDraws) {
  const std::string svg = plot_svg(std::span<const trace_event>());
  EXPECT_EQ(xml_problem(svg), "");
  EXPECT_NE(svg.find("no memory counters"), std::string::npos);
}

TEST(TracePlot, HugeTracesStaySmallAndKeepTheirPeaks) {
  constexpr double mib = 1024.0 * 1024;
  std::vector<trace_event> big;
  std::vector<trace_event> small;
  constexpr int n = 200'000;
  for (int i = 0; i < n; ++i) {
    const double t = i * 100.0;
    const double v = (i == n / 2 ? 900 : 100 + (i % 7)) * mib;
    big.push_back(trace_event::device_counter(t, v, 1000 * mib));
    // Tiny adjacent copies: 200k slices that merge into few bars.
    big.push_back(trace_event::swap(event_kind::swap_out_begin, t, 1, 64, 0));
    big.push_back(trace_event::swap(event_kind::swap_out_end, t + 90, 1, 64, 0));
  }
  // The same extent and peak with three samples.
  small.push_back(trace_event::device_counter(0, 100 * mib, 1000 * mib));
  small.push_back(trace_event::device_counter((n / 2) * 100.0, 900 * mib, 1000 * mib));
  small.push_back(trace_event::device_counter((n - 1) * 100.0 + 90, 100 * mib, 1000 * mib));

  const std::string svg = plot_svg(big);
  EXPECT_EQ(xml_problem(svg), "");
  EXPECT_LT(svg.size(), 250'000u) << "decimation and bar merging keep the file small";
  EXPECT_LT(count(element(svg, "g", "lane-d2h"), "<rect"), 50u);

  auto top = [](const std::vector<std::pair<double, double>>& pts) {
    double y = 1e9;
    for (const auto& p : pts) y = std::min(y, p.second);
    return y;
  };
  const auto big_pts = points_of(svg, "allocated");
  ASSERT_FALSE(big_pts.empty());
  EXPECT_LT(big_pts.size(), 4u * 2u * 1100u);
  EXPECT_DOUBLE_EQ(top(big_pts), top(points_of(plot_svg(small), "allocated")))
      << "the single-sample peak must survive decimation";
}

TEST(TracePlot, PlotsATraceFile) {
  const fs::path dir = fs::temp_directory_path() / "gpuswap_trace_plot_test";
  fs::create_directories(dir);
  const std::string trace = (dir / "run.json").string();
  const std::string svg_path = (dir / "run.svg").string();
  chrome_trace_options options;
  options.device_name = "sim:test";
  write_chrome_trace(trace, sample_run(), options);
  plot_svg_file(trace, svg_path);
  std::ifstream in(svg_path);
  std::stringstream text;
  text << in.rdbuf();
  EXPECT_EQ(text.str(), plot_svg(read_chrome_trace(trace)));
  EXPECT_NE(text.str().find("gpuswap trace (sim:test)"), std::string::npos);

  // A sample to look at: GPUSWAP_PLOT_SAMPLE=/path/out.svg keeps a copy.
  if (const char* keep = std::getenv("GPUSWAP_PLOT_SAMPLE"))
    fs::copy_file(svg_path, keep, fs::copy_options::overwrite_existing);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace gpuswap
