// `gpuswap bench alloc`: the allocator hot path against malloc/free and an uncached
// pass-through, on the same random sequence in one run (tools/bench_alloc.hpp).
#include <iostream>
#include <nlohmann/json.hpp>

#include "tools/bench_alloc.hpp"
#include "tools/commands.hpp"

namespace gpuswap::cli {

void add_bench_command(CLI::App& app) {
  CLI::App* bench = app.add_subcommand("bench", "Benchmarks that print measured figures");
  bench->require_subcommand(1);
  auto opts = std::make_shared<alloc_bench_options>();
  auto json = std::make_shared<bool>(false);
  CLI::App* alloc = bench->add_subcommand(
      "alloc", "ns per alloc+free pair: gpuswap vs malloc vs pass-through (RMM's random pattern)");
  alloc->add_option("--live", opts->live_counts, "Live block counts")->delimiter(',');
  alloc->add_option("--max-size", opts->max_size, "Largest request in bytes");
  alloc->add_option("--repetitions", opts->repetitions, "Repetitions (the median is reported)")
      ->check(CLI::Range(1, 1000));
  alloc->add_option("--seed", opts->seed, "Random seed");
  alloc->add_flag("--json", *json, "Print one JSON object");
  alloc->callback([opts, json] {
    opts->validate();
    const auto results = run_alloc_bench(*opts);
    if (*json) {
      std::cout << to_json(*opts, results).dump(2) << '\n';
    } else {
      std::cout << format_alloc_bench_table(results);
    }
  });
}

}  // namespace gpuswap::cli
