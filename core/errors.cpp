#include "core/errors.hpp"

#include <fmt/format.h>

namespace gpuswap {

config_error::config_error(std::string key, std::string value, std::string message)
    : error(std::move(message)), key_(std::move(key)), value_(std::move(value)) {}

device_error::device_error(std::string call, std::string error_name, std::string message)
    : error(std::move(message)), call_(std::move(call)), error_name_(std::move(error_name)) {}

void throw_error(std::string message) { throw error(std::move(message)); }

void throw_config_error(std::string_view key, std::string_view value, std::string_view accepted,
                        std::string_view problem) {
  std::string message = fmt::format("gpuswap config: key '{}' has value '{}'", key, value);
  if (!problem.empty()) message += fmt::format(" ({})", problem);
  message += fmt::format("; accepted: {}", accepted);
  throw config_error(std::string(key), std::string(value), std::move(message));
}

void throw_device_error(std::string_view call, std::string_view error_name,
                        std::string_view detail) {
  throw device_error(std::string(call), std::string(error_name),
                     fmt::format("gpuswap device error: {} failed with {}: {}", call, error_name,
                                 detail));
}

void throw_no_cuda_device(std::string_view call, std::string_view error_name,
                          std::string_view detail) {
  throw no_cuda_device(std::string(call), std::string(error_name),
                       fmt::format("no CUDA device: {} returned {} ({})", call, error_name,
                                   detail));
}

void throw_out_of_memory(std::string message) { throw out_of_memory(std::move(message)); }

}  // namespace gpuswap
