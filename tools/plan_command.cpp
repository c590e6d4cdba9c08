// `gpuswap plan --model M --batch B [--json]`: memory and FLOPs per layer of a model spec.
#include <iostream>
#include <nlohmann/json.hpp>

#include "tools/commands.hpp"
#include "tools/model_spec.hpp"
#include "tools/plan_report.hpp"

namespace gpuswap::cli {

void add_plan_command(CLI::App& app) {
  auto model = std::make_shared<std::string>();
  auto batch = std::make_shared<int>(0);
  auto json = std::make_shared<bool>(false);
  CLI::App* cmd = app.add_subcommand(
      "plan", "Parameters, gradients, optimizer state, activations, workspace and FLOPs per layer");
  cmd->add_option("--model", *model, "Model spec (tools/models/NAME.json)")->required();
  cmd->add_option("--batch", *batch, "Batch size (default: the model's)")->check(CLI::PositiveNumber);
  cmd->add_flag("--json", *json, "Print one JSON object");
  cmd->callback([model, batch, json] {
    const model_spec m = model_spec::load_named(*model);
    const int b = *batch > 0 ? *batch : m.default_batch;
    if (*json) {
      std::cout << plan_json(m, b).dump(2) << '\n';
    } else {
      std::cout << plan_text(m, b);
    }
  });
}

}  // namespace gpuswap::cli
