// `gpuswap top`: the processes using gpuswap on this machine (from their live-stats segments),
// refreshed; `--once --json` for scripts.
#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "profiler/live_stats_reader.hpp"
#include "tools/commands.hpp"
#include "tools/top_view.hpp"

namespace gpuswap::cli {

namespace {
struct top_options {
  bool once = false;
  bool json = false;
  double interval_s = 1.0;
  int iterations = 0;  // 0: until interrupted
};
}  // namespace

void add_top_command(CLI::App& app) {
  auto opts = std::make_shared<top_options>();
  CLI::App* cmd = app.add_subcommand("top", "Live memory and swap figures of gpuswap processes");
  cmd->add_flag("--once", opts->once, "Print once and exit");
  cmd->add_flag("--json", opts->json, "Print one JSON object (implies --once)");
  cmd->add_option("--interval", opts->interval_s, "Seconds between refreshes")->check(CLI::Range(0.05, 3600.0));
  cmd->add_option("--iterations", opts->iterations, "Refreshes before exiting (0: forever)")
      ->check(CLI::NonNegativeNumber);
  cmd->callback([opts] {
    if (opts->json) {
      std::cout << top_json(read_all_live_stats()).dump(2) << '\n';
      return;
    }
    for (int i = 0;; ++i) {
      if (!opts->once) std::cout << "\x1b[H\x1b[2J";  // home and clear, as top does
      std::cout << format_top_table(read_all_live_stats()) << std::flush;
      if (opts->once || (opts->iterations > 0 && i + 1 >= opts->iterations)) return;
      std::this_thread::sleep_for(std::chrono::duration<double>(opts->interval_s));
    }
  });
}

}  // namespace gpuswap::cli
