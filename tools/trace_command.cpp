// `gpuswap trace summary FILE [--json]` and `gpuswap trace plot FILE -o timeline.svg`: read a
// Chrome trace written by gpuswap back into figures, or into a picture.
#include <iostream>
#include <nlohmann/json.hpp>

#include "profiler/trace_plot.hpp"
#include "profiler/trace_summary.hpp"
#include "tools/commands.hpp"

namespace gpuswap::cli {

void add_trace_command(CLI::App& app) {
  CLI::App* trace = app.add_subcommand("trace", "Summarise or plot a gpuswap trace");
  trace->require_subcommand(1);

  auto file = std::make_shared<std::string>();
  auto json = std::make_shared<bool>(false);
  CLI::App* summary = trace->add_subcommand(
      "summary", "Bytes each way, overlap, stalls, peak memory, per-layer breakdown");
  summary->add_option("file", *file, "Trace JSON written by gpuswap")->required()->check(CLI::ExistingFile);
  summary->add_flag("--json", *json, "Print one JSON object");
  summary->callback([file, json] {
    const trace_summary s = summarize_file(*file);
    if (*json) {
      std::cout << to_json(s).dump(2) << '\n';
    } else {
      std::cout << format_summary(s);
    }
  });

  auto in = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>("timeline.svg");
  CLI::App* plot = trace->add_subcommand("plot", "Device memory over time with swap traffic beneath");
  plot->add_option("file", *in, "Trace JSON written by gpuswap")->required()->check(CLI::ExistingFile);
  plot->add_option("-o,--output", *out, "SVG file to write");
  plot->callback([in, out] {
    plot_svg_file(*in, *out);
    std::cerr << "wrote " << *out << '\n';
  });
}

}  // namespace gpuswap::cli
