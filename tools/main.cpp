// gpuswap: the command-line tool. See tools/commands.hpp for the subcommands.
#include <CLI/CLI.hpp>

#include <exception>
#include <iostream>

#include "core/config.hpp"
#include "core/errors.hpp"
#include "core/logging.hpp"
#include "tools/commands.hpp"

int main(int argc, char** argv) {
  CLI::App app{"gpuswap: GPU memory virtualisation and CPU offloading for training"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "gpuswap 0.1.0");
  gpuswap::cli::add_demo_command(app);
  gpuswap::cli::add_simulate_command(app);
  gpuswap::cli::add_plan_command(app);
  gpuswap::cli::add_bench_command(app);
  gpuswap::cli::add_trace_command(app);
  gpuswap::cli::add_top_command(app);
  try {
    // GPUSWAP_CONF sets the log level for every subcommand; a bad value is reported here.
    gpuswap::set_log_level(gpuswap::config_from_env().log);
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const gpuswap::config_error& e) {
    std::cerr << e.what() << '\n';
    return 2;
  } catch (const gpuswap::error& e) {
    std::cerr << e.what() << '\n';  // gpuswap's messages name themselves ("gpuswap ...")
    return 1;
  } catch (const gpuswap::out_of_memory& e) {
    std::cerr << e.what() << '\n';  // names itself too ("gpuswap: out of device memory")
    return 1;
  } catch (const std::bad_alloc& e) {
    std::cerr << "gpuswap: " << e.what() << '\n';
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "gpuswap: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
