// `gpuswap demo`: the main job. Trains a real small network twice on the same device: once
// with all the memory it wants, once under a device_limit below half of that with offload on,
// and reports memory, swap traffic, overlap, stalls, the step-time ratio and whether losses and
// gradients came out bit-identical. On a CUDA device the network is computed by gpu_math's
// kernels; without one (or without kernels in this build), on the simulator by reference_math.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cstring>
#include <iostream>
#include <nlohmann/json.hpp>

#include "core/config.hpp"
#include "core/logging.hpp"
#include "device/device_factory.hpp"
#include "profiler/chrome_trace.hpp"
#include "profiler/event_recorder.hpp"
#include "profiler/live_stats_writer.hpp"
#include "profiler/trace_output.hpp"
#include "profiler/trace_summary.hpp"
#include "tools/commands.hpp"
#include "core/human_bytes.hpp"
#include "tools/gpu_math.hpp"
#include "tools/training_math.hpp"
#include "tools/workload_runner.hpp"

namespace gpuswap::cli {

namespace {

struct demo_options {
  std::string model = "demo_cnn";
  int batch = 0;
  int steps = 3;
  double budget_fraction = 0.45;
  std::string policy = "auto";
  std::string prefetch = "lookahead";
  std::string trace;
  // The simulated GPU when there is no real one. vDNN's machine by default: a small network
  // has a few hundred FLOPs per byte it would move, enough to hide copies on a Titan X over
  // PCIe 3 and far too few on an H100 over PCIe 5 (try --gpu h100-pcie5 to see that).
  std::string gpu = "titan-x-pcie3";
  bool json = false;
};

bool bit_identical(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].size() != b[i].size()) return false;
    if (!a[i].empty() && std::memcmp(a[i].data(), b[i].data(), a[i].size() * sizeof(float)) != 0) return false;
  }
  return true;
}

bool same_losses(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

void run_demo(const demo_options& o) {
  const config conf = config_from_env();
  device_request req;
  req.backend = backend_choice_of(conf.backend);
  req.sim = sim_preset(o.gpu);
  req.sim.backing = sim_backing::real;
  std::unique_ptr<device> dev = make_device(req);
  if (std::string why; dynamic_cast<sim_device*>(dev.get()) == nullptr && !gpu_math_available(&why)) {
    // A GPU's memory is not host memory: the network needs gpu_math's kernels there.
    log().warn("demo: {} cannot run the training math ({}); using the simulated device", dev->name(), why);
    req.backend = backend_choice::sim;
    dev = make_device(req);
  }
  const model_spec model = model_spec::load_named(o.model);
  // `gpuswap top` sees the demo while it runs (stats:false turns that off).
  live_stats_writer* live = conf.stats ? live_stats_writer::install_global({"", dev->name(), 0}) : nullptr;

  runner_options base;
  base.steps = o.steps;
  base.batch = o.batch;
  base.keep_tensors = true;
  base.live_stats = live;
  base.expandable_segments = conf.expandable_segments;
  std::cerr << fmt::format("demo: training {} on {}, unlimited memory...\n", model.name, dev->name());
  const run_report unlimited = run_workload(*dev, model, base);
  if (!unlimited.real_math) {
    // A model without reference math: there are no numbers to compare (the "math" key says so).
    log().warn("demo: {} has no real math on {}: {}", model.name, dev->name(), describe(unlimited.math));
  }

  runner_options limited = base;
  // What the network needs is what it had allocated at its peak; what the unlimited run
  // reserved on top of that is the cache's rounding and slack, which a budget squeezes out.
  const std::size_t needed = unlimited.peak_allocated_bytes;
  limited.device_limit = static_cast<std::size_t>(static_cast<double>(needed) * o.budget_fraction);
  limited.policy = parse_config("policy:" + o.policy).policy;
  limited.prefetch = parse_config("prefetch:" + o.prefetch).prefetch;
  std::cerr << fmt::format("demo: again under a device_limit of {} with policy {}...\n",
                           human_bytes(limited.device_limit), o.policy);
  // The limited run is recorded for the summary, and traced when asked: --trace wins over
  // GPUSWAP_CONF's trace:FILE. Only that run: the unlimited one has no swaps to show.
  trace_output trace(!o.trace.empty() ? o.trace : conf.trace, chrome_trace_options{dev->name()});
  auto& recorder = global_recorder();
  trace.clear();
  recorder.enable(true);
  const run_report r = run_workload(*dev, model, limited);
  recorder.enable(false);
  const trace_summary summary = summarize(trace.events());
  if (trace.active()) {
    trace.write_to(trace.path());  // now, so that a path that cannot be written fails the demo
    std::cerr << "demo: wrote the trace of the limited run to " << trace.path() << '\n';
  }

  const bool identical = same_losses(unlimited.losses, r.losses) &&
                         bit_identical(unlimited.last_gradients, r.last_gradients) &&
                         bit_identical(unlimited.final_params, r.final_params);
  const double ratio = r.steady_step_ns() / unlimited.steady_step_ns();
  nlohmann::json j = {
      {"model", model.name},
      {"device", dev->name()},
      {"math", to_string(r.math)},
      {"batch", r.batch},
      {"steps", r.steps},
      {"policy", o.policy},
      {"prefetch", o.prefetch},
      {"memory_needed_without_offload_bytes", needed},
      {"reserved_without_offload_bytes", unlimited.peak_reserved_bytes},
      {"device_limit_bytes", r.budget_bytes},
      {"peak_device_reserved_bytes", r.peak_reserved_bytes},
      {"peak_device_allocated_bytes", r.peak_allocated_bytes},
      {"within_budget", r.peak_reserved_bytes <= r.budget_bytes},
      {"bytes_swapped_out", r.swaps.bytes_out},
      {"bytes_swapped_in", r.swaps.bytes_in},
      {"copy_ns", summary.copy_ns()},
      {"copy_hidden_ns", summary.copy_hidden_ns},
      {"overlap_pct", summary.overlap_pct},
      {"stall_ns", r.swaps.stall_ns},
      {"stalls", r.swaps.stalls},
      {"demand_fetches", r.swaps.demand_fetches},
      {"step_ns_unlimited", unlimited.steady_step_ns()},
      {"step_ns_limited", r.steady_step_ns()},
      {"step_time_ratio", ratio},
      {"losses_unlimited", unlimited.losses},
      {"losses_limited", r.losses},
      {"bit_identical", identical},
      {"new_pinned_allocations_after_first_step", r.pinned_allocations_after_first_step},
  };
  if (o.json) {
    std::cout << j.dump(2) << '\n';
    return;
  }
  std::cout << fmt::format(
      "gpuswap demo: {} (batch {}) on {}, {} steps\n"
      "  computed with                  {}\n"
      "  memory needed without offload  {}  (peak allocated; {} reserved)\n"
      "  device_limit                   {}  ({:.0f}% of that)\n"
      "  peak device memory             {}  ({})\n"
      "  swapped out / in               {} / {}\n"
      "  copy time hidden under compute {:.1f}% of {:.3f} ms\n"
      "  stall time                     {:.3f} ms in {} stalls\n"
      "  step time                      {:.3f} ms vs {:.3f} ms unlimited ({:.2f}x)\n"
      "  losses                         {}\n"
      "  losses and gradients           {}\n",
      model.name, r.batch, dev->name(), r.steps, describe(r.math), human_bytes(needed), human_bytes(unlimited.peak_reserved_bytes),
      human_bytes(r.budget_bytes), 100.0 * static_cast<double>(r.budget_bytes) / static_cast<double>(needed),
      human_bytes(r.peak_reserved_bytes), r.peak_reserved_bytes <= r.budget_bytes ? "within budget" : "OVER BUDGET",
      human_bytes(r.swaps.bytes_out), human_bytes(r.swaps.bytes_in), summary.overlap_pct,
      static_cast<double>(summary.copy_ns()) / 1e6, r.swaps.stall_ns / 1e6, r.swaps.stalls,
      r.steady_step_ns() / 1e6, unlimited.steady_step_ns() / 1e6, ratio, fmt::join(r.losses, ", "),
      !r.real_math ? "not computed (modelled costs only)"
      : identical  ? "bit-identical to the unlimited run"
                   : "DIFFERENT from the unlimited run");
}

}  // namespace

void add_demo_command(CLI::App& app) {
  auto opts = std::make_shared<demo_options>();
  CLI::App* cmd = app.add_subcommand(
      "demo", "Train a real small network under a device budget below half of what it needs");
  cmd->add_option("--model", opts->model, "Model spec (tools/models/NAME.json)");
  cmd->add_option("--batch", opts->batch, "Batch size (default: the model's)")->check(CLI::PositiveNumber);
  cmd->add_option("--steps", opts->steps, "Training steps")->check(CLI::Range(2, 1000));
  cmd->add_option("--budget-fraction", opts->budget_fraction,
                  "device_limit as a fraction of the unlimited run's peak")
      ->check(CLI::Range(0.05, 1.0));
  cmd->add_option("--policy", opts->policy, "Offload policy")
      ->check(CLI::IsMember({"none", "all", "conv", "auto"}));
  cmd->add_option("--prefetch", opts->prefetch, "Prefetch policy")
      ->check(CLI::IsMember({"lookahead", "one_layer", "none"}));
  cmd->add_option("--gpu", opts->gpu, "Simulated GPU preset used when no CUDA device is present")
      ->check(CLI::IsMember(sim_preset_names()));
  cmd->add_option("--trace", opts->trace, "Write a Chrome/Perfetto trace of the limited run (default: GPUSWAP_CONF's trace:FILE)");
  cmd->add_flag("--json", opts->json, "Print one JSON object");
  cmd->callback([opts] { run_demo(*opts); });
}

}  // namespace gpuswap::cli
