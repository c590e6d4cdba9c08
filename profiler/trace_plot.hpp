#pragma once
// trace_plot: one picture of a run as SVG text. Device memory over time (allocated as a filled
// step area, reserved as a step line) above three lanes on the same time axis: compute (layer
// phases and stalls), D2H and H2D (swap slices as bars). Axes with labelled ticks (time in ms,
// memory in KiB/MiB/GiB), a legend, a title and a one-line summary.
//
// Large traces stay small: bars closer than half a pixel merge, and a counter's samples that
// fall in one pixel column reduce to that column's first, lowest, highest and last value, so
// peaks survive.
#include <span>
#include <string>

#include "profiler/chrome_trace.hpp"
#include "profiler/trace_event.hpp"

namespace gpuswap {

struct plot_options {
  int width = 1100;  // pixels
  int height = 600;
  std::string title;                // empty: "gpuswap trace (<device>)"
  std::size_t max_tooltips = 4000;  // bars get a <title> tooltip while there are at most this many
};

std::string plot_svg(const trace_timeline& timeline, const plot_options& options = {});
std::string plot_svg(std::span<const trace_event> events, const plot_options& options = {});
// Reads a trace written by write_chrome_trace and writes its plot (through a temporary file
// and a rename). Throws gpuswap::error naming the path at fault.
void plot_svg_file(const std::string& trace_path, const std::string& svg_path,
                   const plot_options& options = {});

}  // namespace gpuswap
