#include "device/device.hpp"

#include <chrono>

namespace gpuswap {

namespace {
std::int64_t steady_now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

device::device() : created_steady_ns_(steady_now_ns()) {}

void device::name_stream(stream_t, const char*) noexcept {}

double device::host_time_ns() const {
  return static_cast<double>(steady_now_ns() - created_steady_ns_);
}

std::string_view to_string(copy_kind kind) noexcept {
  switch (kind) {
    case copy_kind::host_to_device: return "H2D";
    case copy_kind::device_to_host: return "D2H";
    case copy_kind::device_to_device: return "D2D";
    case copy_kind::host_to_host: return "H2H";
  }
  return "?";
}

}  // namespace gpuswap
