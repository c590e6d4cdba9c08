#include "core/logging.hpp"

#include <spdlog/sinks/stdout_sinks.h>

#include <memory>

namespace gpuswap {

namespace {

spdlog::level::level_enum to_spdlog(log_level level) noexcept {
  switch (level) {
    case log_level::debug:
      return spdlog::level::debug;
    case log_level::info:
      return spdlog::level::info;
    case log_level::warn:
      return spdlog::level::warn;
    case log_level::error:
      return spdlog::level::err;
    case log_level::off:
      return spdlog::level::off;
  }
  return spdlog::level::warn;
}

}  // namespace

// Note [Logger lifetime]
// The logger is created by a function-local static (thread-safe initialisation) and never
// destroyed: the preload shim and allocator destructors may log while the process exits, after
// a destructible static would already be gone. It is not registered in spdlog's registry, so a
// host program that uses spdlog itself, even with a logger named "gpuswap", is not disturbed
// and cannot disturb ours.
spdlog::logger& log() {
  static spdlog::logger* const logger = [] {
    auto sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
    auto* created = new spdlog::logger("gpuswap", std::move(sink));
    created->set_pattern("[gpuswap] [%l] %v");
    created->set_level(to_spdlog(log_level::warn));
    return created;
  }();
  return *logger;
}

void set_log_level(log_level level) { log().set_level(to_spdlog(level)); }

log_level get_log_level() {
  switch (log().level()) {
    case spdlog::level::trace:
    case spdlog::level::debug:
      return log_level::debug;
    case spdlog::level::info:
      return log_level::info;
    case spdlog::level::warn:
      return log_level::warn;
    case spdlog::level::err:
    case spdlog::level::critical:
      return log_level::error;
    default:
      return log_level::off;
  }
}

}  // namespace gpuswap
