// `gpuswap simulate`: will this model fit on that GPU, and how much slower will it be? Runs a
// model's schedule on the simulated device (phantom backing: costs only) with all the memory it
// wants, then under each budget with each offload policy, all in one run, and prints the step
// time of each divided by the unlimited one, next to the lower bound
//   max(total compute, bytes that must leave the device / link bandwidth).
#include <fmt/format.h>

#include <algorithm>
#include <iostream>
#include <nlohmann/json.hpp>

#include "core/human_bytes.hpp"
#include "core/config.hpp"
#include "core/errors.hpp"
#include "core/size_spec.hpp"
#include "device/sim_device.hpp"
#include "tools/commands.hpp"
#include "tools/workload_runner.hpp"

namespace gpuswap::cli {

namespace {

struct simulate_options {
  std::string model;
  int batch = 0;
  std::vector<std::string> budgets{"50%", "25%"};
  std::vector<std::string> policies{"all", "conv", "auto", "sync"};
  std::vector<std::string> gpus{"h100-pcie5"};
  int steps = 3;
  bool json = false;
};

// One configuration the command compares: an offload policy and how tensors come back.
struct variant {
  std::string name;
  offload_policy policy;
  prefetch_policy prefetch;
};

variant parse_variant(const std::string& name) {
  // "sync" is the baseline without prefetch: every saved tensor goes to the host and comes
  // back synchronously when backward asks, like PyTorch's save_on_cpu.
  if (name == "sync") return {name, offload_policy::all, prefetch_policy::none};
  if (name == "vdnn") return {name, offload_policy::all, prefetch_policy::one_layer};
  const config c = parse_config("policy:" + name);
  return {name, c.policy, prefetch_policy::lookahead};
}

sim_options device_for(const std::string& gpu) {
  sim_options o = sim_preset(gpu);
  o.backing = sim_backing::phantom;
  // The unlimited run models a GPU with enough memory (as vDNN's baseline does); budgets are
  // device_limit below it.
  o.device_capacity = std::size_t{1} << 40;
  o.host_capacity = std::size_t{1} << 42;
  return o;
}

void run_simulate(const simulate_options& o) {
  const model_spec model = model_spec::load_named(o.model);
  nlohmann::json rows = nlohmann::json::array();
  std::vector<variant> variants;
  for (const std::string& p : o.policies) variants.push_back(parse_variant(p));

  for (const std::string& gpu : o.gpus) {
    const sim_options so = device_for(gpu);
    runner_options base;
    base.batch = o.batch;
    base.steps = o.steps;
    base.real_math = false;
    run_report unlimited;
    {
      sim_device dev(so);
      unlimited = run_workload(dev, model, base);
    }
    const double t_unlimited = unlimited.steady_step_ns();
    const double compute = unlimited.steady_compute_ns();
    for (const std::string& budget_text : o.budgets) {
      const size_spec spec = parse_size("budget", budget_text, /*allow_percent=*/true, /*allow_zero=*/false);
      const std::size_t budget = spec.resolve(unlimited.peak_reserved_bytes);
      const std::size_t must_leave =
          unlimited.peak_reserved_bytes > budget ? unlimited.peak_reserved_bytes - budget : 0;
      const double link = std::min(so.d2h_bandwidth, so.h2d_bandwidth);
      const double bound = std::max(compute, static_cast<double>(must_leave) * 1e9 / link);
      nlohmann::json row = {{"model", model.name},
                            {"batch", unlimited.batch},
                            {"gpu", gpu},
                            {"no_offload_peak_bytes", unlimited.peak_reserved_bytes},
                            {"budget", budget_text},
                            {"budget_bytes", budget},
                            {"unlimited_step_ns", t_unlimited},
                            {"compute_ns", compute},
                            {"lower_bound_ns", bound},
                            {"lower_bound_ratio", bound / t_unlimited}};
      for (const variant& v : variants) {
        runner_options ro = base;
        ro.device_limit = budget;
        ro.policy = v.policy;
        ro.prefetch = v.prefetch;
        nlohmann::json cell;
        try {
          sim_device dev(so);
          const run_report r = run_workload(dev, model, ro);
          cell = {{"step_ns", r.steady_step_ns()},
                  {"ratio", r.steady_step_ns() / t_unlimited},
                  {"vs_bound", r.steady_step_ns() / bound},
                  {"peak_reserved_bytes", r.peak_reserved_bytes},
                  {"bytes_out", r.swaps.bytes_out / static_cast<std::uint64_t>(std::max(r.steps, 1))},
                  {"stall_ns", r.swaps.stall_ns},
                  {"fits", r.peak_reserved_bytes <= budget}};
        } catch (const std::bad_alloc& e) {
          cell = {{"error", "out of memory"}, {"detail", e.what()}};
        }
        row[v.name] = cell;
      }
      rows.push_back(row);
    }
  }
  if (o.json) {
    std::cout << nlohmann::json{{"rows", rows}}.dump(2) << '\n';
    return;
  }
  std::string header = fmt::format("{:<10} {:>5} {:<14} {:>10} {:>6} {:>10} {:>7}", "model", "batch",
                                   "gpu", "no-offload", "budget", "unlimited", "bound");
  for (const variant& v : variants) header += fmt::format(" {:>7}", v.name);
  std::cout << header << '\n';
  for (const auto& row : rows) {
    std::string line = fmt::format(
        "{:<10} {:>5} {:<14} {:>10} {:>6} {:>8.1f}ms {:>6.2f}x", row["model"].get<std::string>(),
        row["batch"].get<int>(), row["gpu"].get<std::string>(),
        human_bytes(row["no_offload_peak_bytes"].get<std::size_t>()), row["budget"].get<std::string>(),
        row["unlimited_step_ns"].get<double>() / 1e6, row["lower_bound_ratio"].get<double>());
    for (const variant& v : variants) {
      const auto& cell = row[v.name];
      line += cell.contains("ratio") ? fmt::format(" {:>6.2f}x", cell["ratio"].get<double>()) : fmt::format(" {:>7}", "OOM");
    }
    std::cout << line << '\n';
  }
  std::cout << "step time / unlimited step time; bound = max(compute, bytes that must leave / link bandwidth)\n";
}

}  // namespace

void add_simulate_command(CLI::App& app) {
  auto opts = std::make_shared<simulate_options>();
  CLI::App* cmd = app.add_subcommand(
      "simulate", "Run a model's schedule on a simulated GPU under a budget, for each offload policy");
  cmd->add_option("--model", opts->model, "Model spec (tools/models/NAME.json)")->required();
  cmd->add_option("--batch", opts->batch, "Batch size (default: the model's)")->check(CLI::PositiveNumber);
  cmd->add_option("--budget", opts->budgets, "device_limit: a size (8GiB) or % of the no-offload peak")
      ->delimiter(',');
  cmd->add_option("--policy", opts->policies, "Policies to compare: none, all, conv, auto, vdnn, sync")
      ->delimiter(',')
      ->check(CLI::IsMember({"none", "all", "conv", "auto", "vdnn", "sync"}));
  cmd->add_option("--gpu", opts->gpus, "Simulated GPU preset(s)")->delimiter(',');
  cmd->add_option("--steps", opts->steps, "Training steps per run")->check(CLI::Range(2, 100));
  cmd->add_flag("--json", opts->json, "Print one JSON object");
  cmd->callback([opts] { run_simulate(*opts); });
}

}  // namespace gpuswap::cli
