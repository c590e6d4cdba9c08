#include "device/device.hpp"

#include "core/errors.hpp"
#include "core/fast_clock.hpp"

namespace gpuswap {

// Note [Fast clock] (core/fast_clock.cpp): every traced allocation on a GPU reads this clock.
device::device() : created_ns_(fast_clock_ns()) {}

void device::name_stream(stream_t, const char*) noexcept {}

double device::host_time_ns() const {
  return static_cast<double>(fast_clock_ns() - created_ns_);
}

// Note [Published host clock]
// A traced allocation reads the host clock twice (alloc and free), and the caching allocator's
// hot path is ~70 ns a pair, so the read has to be nearly free where it can be. On the
// simulator the clock is a value in memory, but reaching it took a virtual call, a check of the
// wall-clock switch and an out-of-line call through the pimpl: about 4 of the 11 points that
// tracing cost at 1,000 live blocks (`gpuswap bench alloc`, "on"). A backend that keeps its
// clock in memory publishes its address, and host_time_ns_fast() loads it inline. The wall
// clock (cuda_device, or the simulator switched to it) keeps the call: there the clock read
// itself (~20 ns) is what costs.

// Note [Device virtual memory]
// Why a second way to get device memory: a segment from allocate_device is one piece of
// physical memory at one address, so its free blocks can only serve requests that fit inside
// them. Near the budget, a large request then fails while the free bytes would cover it
// several times over, scattered between live blocks (fragmentation). With reserved address
// space and pages mapped on demand, the allocator unmaps the free pages of such holes and maps
// the same amount of memory again wherever address space is free: the budget counts mapped
// pages, and address space is plentiful (CUDA gives 2^48 bytes). The defaults below are for a
// device without the calls; sim_device and cuda_device implement them.
std::size_t device::vm_page_size() const noexcept { return 0; }

void* device::reserve_address_range(std::size_t) {
  throw_device_error("reserve_address_range", "not_supported",
                     "this device has no virtual memory management");
}

void device::release_address_range(void*, std::size_t) noexcept {}

bool device::map_pages(void*, std::size_t) {
  throw_device_error("map_pages", "not_supported", "this device has no virtual memory management");
}

void device::unmap_pages(void*, std::size_t) noexcept {}

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
