#pragma once
// nvtx_registry: the NVTX objects of the `gpuswap` domain that are made once per process: the
// domain handle, the category names, the registered hot-path strings and the payload schema.
// Internal to profiler/ (it includes the NVTX headers, which nothing above should need); only
// compiled with GPUSWAP_WITH_NVTX.
#include "profiler/nvtx_domain.hpp"

#if defined(GPUSWAP_WITH_NVTX) && GPUSWAP_WITH_NVTX
#include <array>
#include <cstdint>

#include <nvtx3/nvToolsExt.h>

namespace gpuswap {

// The binary layout of the extended payload (Note [Extended payload] in nvtx_ranges.cpp).
struct nvtx_buffer_payload {
  std::uint64_t bytes;
  std::uint64_t buffer_id;  // nvtx_no_buffer when none
  std::int32_t layer;       // nvtx_no_layer when none
};

struct nvtx_registry {
  nvtxDomainHandle_t domain = nullptr;
  std::array<nvtxStringHandle_t, nvtx_name_count> names{};
  // The tool's id for the nvtx_buffer_payload schema; 0 when no tool is attached or the tool
  // does not implement NVTX's payload extension (then events carry the plain byte count).
  std::uint64_t buffer_schema_id = 0;

  nvtxStringHandle_t name(nvtx_name n) const noexcept {
    return names[static_cast<std::size_t>(n)];
  }
};

// The first call creates the domain, names the categories, registers the strings and the
// schema (thread-safe, once per process); later calls return the same object.
const nvtx_registry& get_nvtx_registry() noexcept;

}  // namespace gpuswap
#endif
