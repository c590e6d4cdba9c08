#pragma once
// gpuswap's one logger. It writes to stderr only: gpuswap runs inside other people's programs
// (the preload shim, the C ABI) whose stdout is theirs, and CLI subcommands print JSON there.
#include <spdlog/logger.h>

#include "core/config.hpp"

namespace gpuswap {

// The process-wide "gpuswap" logger: stderr, pattern "[gpuswap] [%l] %v", level warn until
// set_log_level. Created on first use; safe to call from any thread, and during static
// destruction.
spdlog::logger& log();

void set_log_level(log_level level);
log_level get_log_level();

}  // namespace gpuswap
