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
#include "profiler/event_recorder.hpp"
#include "profiler/trace_output.hpp"
#include "prefetcher/memory_timeline.hpp"
#include "tools/commands.hpp"
#include "tools/workload_graph.hpp"
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

// Note [Ordered-copies floor]
// The bound, max(compute, must-leave bytes / link), lets the copies out and back run at
// the same time. They cannot: the bytes over the budget at step p must all have left before p
// starts, and come back after it. With F(p) the compute before p, B(p) the compute from p on and
// M(p) step p's bytes over the budget, no schedule beats
//   max(F(p), M(p) / d2h) + max(B(p), M(p) / h2d)
// (plus the time outside the steps: the update, the host's own). The floor is the largest of
// these over the steps. Step p's bytes are what it holds with nothing offloaded: resident
// bytes, its error signals, and every tensor alive across it; the conv workspace is left out
// because the runner does not allocate it, so the floor stays a true lower bound. The least
// any step must hold with everything else offloaded (resident, error signals, the tensors it
// reads and writes) is the working set: over the budget, no plan can run (OOM is genuine).
struct floor_figures {
  double floor_ns = 0;            // without the time outside the steps
  std::size_t working_set_bytes = 0;  // the largest step's
};

floor_figures ordered_copies_floor(const model_spec& model, int batch, const sim_options& so,
                                   std::size_t budget) {
  sim_device dev(so);
  workload_graph g = build_workload_graph(model, batch > 0 ? batch : model.default_batch,
                                          [&dev](const kernel_cost& c) { return dev.kernel_ns(c); });
  workload_profile& p = g.profile;
  const std::size_t dt = static_cast<std::size_t>(model.dtype_bytes);
  for (const layer_spec& layer : model.layers) {
    const std::size_t ws = layer.workspace_elems_per_sample * dt;
    for (int step : {g.forward_step(layer.index), g.backward_step(layer.index)}) {
      std::size_t& s = p.step_scratch_bytes[static_cast<std::size_t>(step)];
      s -= std::min(s, ws);
    }
  }
  planner_options po;
  po.policy = offload_policy::none;
  po.d2h_bandwidth = so.d2h_bandwidth;
  po.h2d_bandwidth = so.h2d_bandwidth;
  memory_timeline timeline(p, po);
  const timeline_result& r = timeline.simulate({});
  const std::size_t n = p.steps.size();
  std::vector<std::size_t> working(n, 0);
  for (std::size_t s = 0; s < n; ++s) working[s] = p.resident_bytes + p.step_scratch_bytes[s];
  for (const tensor_info& t : p.tensors) {
    working[static_cast<std::size_t>(t.producer_step)] += t.bytes;
    for (int u : t.use_steps) {
      if (u != t.producer_step) working[static_cast<std::size_t>(u)] += t.bytes;
    }
  }
  floor_figures f;
  const double total = p.total_compute_ns();
  double before = 0;
  for (std::size_t s = 0; s < n; ++s) {
    f.working_set_bytes = std::max(f.working_set_bytes, working[s]);
    const double m = r.step_bytes[s] > budget ? static_cast<double>(r.step_bytes[s] - budget) : 0.0;
    const double out = m * 1e9 / so.d2h_bandwidth, in = m * 1e9 / so.h2d_bandwidth;
    f.floor_ns = std::max(f.floor_ns, std::max(before, out) + std::max(total - before, in));
    before += p.steps[s].compute_ns;
  }
  return f;
}

// Note [Simulate's baseline]
// The unlimited run is the GPU with enough memory that every budget is a fraction of, so it
// runs with plain segments whatever expandable_segments says: with expandable segments its
// peak is lower (VGG-16 at batch 256: 16.1 GiB reserved against 21.5 GiB, since nothing is
// stranded), and 50% of a smaller peak is a different, harder budget. Budgeted runs use the
// configured segments, so that the two can be compared at the same bytes.

// Note [Simulate's trace]
// GPUSWAP_CONF's trace:FILE traces one run: the last budgeted one (the last --gpu, --budget and
// --policy). Each run has a simulated device of its own whose clock starts at zero, so the runs
// cannot share one timeline, and the last is the one a user picks by naming a single
// configuration. Only that run is recorded: the others would fill the recorder for nothing.

void run_simulate(const simulate_options& o) {
  const model_spec model = model_spec::load_named(o.model);
  nlohmann::json rows = nlohmann::json::array();
  std::vector<variant> variants;
  for (const std::string& p : o.policies) variants.push_back(parse_variant(p));
  const config conf = config_from_env();
  trace_output trace(conf);
  auto& recorder = global_recorder();
  recorder.enable(false);  // Note [Simulate's trace]
  std::string traced;      // the configuration the trace shows

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
      const floor_figures ff = ordered_copies_floor(model, o.batch, so, budget);
      // The floor's compute is modelled; the time outside the steps is the unlimited run's.
      const double floor = ff.floor_ns + std::max(0.0, t_unlimited - compute);
      nlohmann::json row = {{"model", model.name},
                            {"batch", unlimited.batch},
                            {"gpu", gpu},
                            {"no_offload_peak_bytes", unlimited.peak_reserved_bytes},
                            {"budget", budget_text},
                            {"budget_bytes", budget},
                            {"unlimited_step_ns", t_unlimited},
                            {"compute_ns", compute},
                            {"lower_bound_ns", bound},
                            {"lower_bound_ratio", bound / t_unlimited},
                            {"floor_ns", floor},
                            {"floor_ratio", floor / t_unlimited},
                            {"min_working_set_bytes", ff.working_set_bytes},
                            {"infeasible", ff.working_set_bytes > budget}};
      for (const variant& v : variants) {
        runner_options ro = base;
        ro.device_limit = budget;
        // Only the budgeted runs: the unlimited run defines the budgets, the same bytes
        // whichever segments serve them (Note [Simulate's baseline]).
        ro.expandable_segments = conf.expandable_segments;
        ro.policy = v.policy;
        ro.prefetch = v.prefetch;
        nlohmann::json cell;
        const bool last_run = trace.active() && &gpu == &o.gpus.back() && &budget_text == &o.budgets.back() &&
                              &v == &variants.back();
        try {
          sim_device dev(so);
          if (last_run) {
            trace.clear();
            trace.options().device_name = dev.name();
            trace.options().other_data = {{"model", model.name}, {"batch", unlimited.batch}, {"gpu", gpu},
                                          {"budget", budget_text}, {"budget_bytes", budget},
                                          {"policy", v.name}};
            traced = fmt::format("{} on {} under {} with {}", model.name, gpu, budget_text, v.name);
            recorder.enable(true);
          }
          const run_report r = run_workload(dev, model, ro);
          cell = {{"step_ns", r.steady_step_ns()},
                  {"ratio", r.steady_step_ns() / t_unlimited},
                  {"vs_bound", r.steady_step_ns() / bound},
                  {"peak_reserved_bytes", r.peak_reserved_bytes},
                  {"bytes_out", r.swaps.bytes_out / static_cast<std::uint64_t>(std::max(r.steps, 1))},
                  {"stall_ns", r.swaps.stall_ns},
                  {"evictions", r.swaps.evictions},
                  {"demand_fetches", r.swaps.demand_fetches},
                  {"prefetches", r.swaps.prefetches},
                  {"plan", r.plan.explain},
                  {"predicted_exposed_ns", r.plan.predicted_exposed_ns},
                  {"fits", r.peak_reserved_bytes <= budget}};
        } catch (const std::bad_alloc& e) {
          cell = {{"error", "out of memory"}, {"detail", e.what()}};
        }
        recorder.enable(false);
        row[v.name] = cell;
      }
      rows.push_back(row);
    }
  }
  if (trace.active()) {
    trace.write_to(trace.path());  // now, so that a path that cannot be written fails the command
    std::cerr << fmt::format("simulate: wrote the trace of {} to {}\n", traced, trace.path());
  }
  if (o.json) {
    std::cout << nlohmann::json{{"rows", rows}}.dump(2) << '\n';
    return;
  }
  std::string header = fmt::format("{:<10} {:>5} {:<14} {:>10} {:>6} {:>10} {:>7} {:>7}", "model",
                                   "batch", "gpu", "no-offload", "budget", "unlimited", "bound", "floor");
  for (const variant& v : variants) header += fmt::format(" {:>7}", v.name);
  std::cout << header << '\n';
  for (const auto& row : rows) {
    std::string line = fmt::format(
        "{:<10} {:>5} {:<14} {:>10} {:>6} {:>8.1f}ms {:>6.2f}x {:>6.2f}x", row["model"].get<std::string>(),
        row["batch"].get<int>(), row["gpu"].get<std::string>(),
        human_bytes(row["no_offload_peak_bytes"].get<std::size_t>()), row["budget"].get<std::string>(),
        row["unlimited_step_ns"].get<double>() / 1e6, row["lower_bound_ratio"].get<double>(),
        row["floor_ratio"].get<double>());
    for (const variant& v : variants) {
      const auto& cell = row[v.name];
      line += cell.contains("ratio") ? fmt::format(" {:>6.2f}x", cell["ratio"].get<double>())
              : row["infeasible"].get<bool>() ? fmt::format(" {:>7}", "OOM*")
                                              : fmt::format(" {:>7}", "OOM");
    }
    std::cout << line << '\n';
  }
  std::cout << "step time / unlimited step time; bound = max(compute, bytes that must leave / link bandwidth)\n"
               "floor = bytes over the budget leave before the peak step and return after it "
               "(Note [Ordered-copies floor])\n"
               "OOM*: one step's working set alone exceeds the budget (infeasible for any plan); "
               "OOM: the run failed though a plan could fit\n";
}

}  // namespace

void add_simulate_command(CLI::App& app) {
  auto opts = std::make_shared<simulate_options>();
  CLI::App* cmd = app.add_subcommand(
      "simulate",
      "Run a model's schedule on a simulated GPU under a budget, for each offload policy.\n"
      "GPUSWAP_CONF=trace:FILE writes a Chrome/Perfetto trace of the last run only (the last --gpu,\n"
      "--budget and --policy given): name one of each to trace the configuration you want.");
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
