// `gpuswap bench alloc`: the allocator hot path against malloc/free and an uncached
// pass-through, on the same random sequence in one run (tools/bench_alloc.hpp).
// `gpuswap bench vmm`: what mapping and unmapping device pages costs (tools/bench_vmm.hpp).
#include <iostream>
#include <nlohmann/json.hpp>

#include "core/config.hpp"
#include "device/device_factory.hpp"
#include "tools/bench_alloc.hpp"
#include "tools/bench_vmm.hpp"
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
    const auto clocks = measure_clock_reads();
    if (*json) {
      std::cout << to_json(*opts, results, clocks).dump(2) << '\n';
    } else {
      std::cout << format_alloc_bench_table(results, clocks);
    }
  });

  auto vmm_opts = std::make_shared<vmm_bench_options>();
  auto vmm_json = std::make_shared<bool>(false);
  CLI::App* vmm = bench->add_subcommand(
      "vmm", "us per map/unmap of device pages (expandable segments' cost) on the GPU, or the "
             "simulator's estimates");
  vmm->add_option("--pages", vmm_opts->pages, "Pages per mapping (at most a quarter of the device)");
  vmm->add_option("--repetitions", vmm_opts->repetitions, "Repetitions (the median is reported)")
      ->check(CLI::Range(1, 1000));
  vmm->add_flag("--json", *vmm_json, "Print one JSON object");
  vmm->callback([vmm_opts, vmm_json] {
    // The backend config names (GPU if present); the simulator's device is its preset's.
    const config conf = config_from_env();
    device_request req;
    req.backend = backend_choice_of(conf.backend);
    req.sim = sim_preset(conf.sim_preset);
    req.sim.backing = sim_backing::phantom;
    const std::unique_ptr<device> dev = make_device(req);
    const vmm_bench_result r = run_vmm_bench(*dev, *vmm_opts);
    if (*vmm_json) {
      std::cout << to_json(r).dump(2) << '\n';
    } else {
      std::cout << format_vmm_bench(r);
    }
  });
}

}  // namespace gpuswap::cli
