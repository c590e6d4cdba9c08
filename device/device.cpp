#include "device/device.hpp"

#include "core/fast_clock.hpp"

namespace gpuswap {

// Note [Fast clock] (core/fast_clock.cpp): every traced allocation on a GPU reads this clock.
device::device() : created_ns_(fast_clock_ns()) {}

void device::name_stream(stream_t, const char*) noexcept {}

double device::host_time_ns() const {
  return static_cast<double>(fast_clock_ns() - created_ns_);
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
