#pragma once
// The gpuswap CLI's subcommands, one file each (tools/<name>_command.cpp). Each adds itself to
// the app with its options and a callback; figures go to stdout (one JSON object with --json),
// progress and logs to stderr.
#include <CLI/CLI.hpp>

namespace gpuswap::cli {

void add_demo_command(CLI::App& app);
void add_simulate_command(CLI::App& app);
void add_plan_command(CLI::App& app);
void add_bench_command(CLI::App& app);
void add_trace_command(CLI::App& app);
void add_top_command(CLI::App& app);

}  // namespace gpuswap::cli
