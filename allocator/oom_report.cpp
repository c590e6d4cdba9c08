#include "allocator/oom_report.hpp"

#include <fmt/format.h>

#include <cstdint>

#include "core/human_bytes.hpp"

namespace gpuswap {

namespace {

std::string human_exact(std::size_t bytes) {
  return fmt::format("{} ({} bytes)", human_bytes(bytes), bytes);
}

// Note [OOM hints]
// The hint names the one remedy the figures point at, and always the knobs that exist:
//  - a request above the budget cannot be served by any amount of caching or offload;
//  - memory reserved but unallocated after the ladder released every unused segment is held by
//    split segments, i.e. fragmentation, which expandable_segments removes and max_split_size
//    bounds;
//  - otherwise the live data does not fit: a bigger budget, or offloading idle buffers unless
//    buffers are already on the host (an offload policy is on and did what it could).
std::string hint(const oom_report& r) {
  if (r.rounded == 0 || r.rounded > r.budget || r.requested > r.budget) {
    return fmt::format(
        "the request alone exceeds the budget of {}; raise device_limit (GPUSWAP_CONF="
        "\"device_limit:...\") if the device has room, or split the allocation",
        human_bytes(r.budget));
  }
  std::string text;
  if (r.cached() >= r.rounded) {
    text = fmt::format(
        "{} is reserved but unallocated (largest free block {}): the cache is fragmented; set "
        "expandable_segments (GPUSWAP_CONF=\"expandable_segments:true\") so that free memory "
        "is mapped again where it is needed, or max_split_size (GPUSWAP_CONF="
        "\"max_split_size:...\") to keep large blocks whole; ",
        human_bytes(r.cached()), human_bytes(r.largest_free_block));
  }
  if (r.external && r.external->swapped_out > 0) {
    text += fmt::format(
        "offload is on and {} is already on the host, yet what must stay on the device does not "
        "fit: raise device_limit if the device has room (segments are at least 2 MiB, so a "
        "budget of a few MiB holds only a few)",
        human_bytes(r.external->swapped_out));
    return text;
  }
  text +=
      "raise device_limit if the device has room, or enable an offload policy "
      "(GPUSWAP_CONF=\"policy:auto\") to move idle buffers to host memory";
  return text;
}

}  // namespace

std::string format_oom_message(const oom_report& r) {
  std::string out = fmt::format("gpuswap: out of device memory: tried to allocate {} on {}\n",
                                human_bytes(r.requested), r.device_name);
  out += fmt::format("  requested: {}", human_exact(r.requested));
  if (r.rounded != 0 && r.rounded != r.requested) {
    out += fmt::format(", rounded to {} bytes", r.rounded);
  }
  out += '\n';
  out += fmt::format("  device: {} (ordinal {})\n", r.device_name, r.device_ordinal);
  out += fmt::format(
      "  budget: {}, {}\n", human_exact(r.budget),
      r.budget_is_device_limit ? "device_limit" : "physical capacity (device_limit not set)");
  out += fmt::format("  physical: {} total, {} free\n", human_exact(r.physical.total_bytes),
                     human_exact(r.physical.free_bytes));
  out += fmt::format("  allocated: {}\n", human_exact(r.allocated));
  out += fmt::format("  cached: {} reserved but unallocated (reserved in all {})\n",
                     human_exact(r.cached()), human_exact(r.reserved));
  if (r.external) {
    out += fmt::format("  swapped out: {}\n", human_exact(r.external->swapped_out));
    out += fmt::format("  pinned host: {} used of {} limit\n", human_exact(r.external->pinned_used),
                       human_exact(r.external->pinned_limit));
  } else {
    out += "  swapped out: n/a\n";
    out += "  pinned host: n/a used of n/a limit\n";
  }
  if (r.max_split_size != SIZE_MAX) {
    out += fmt::format("  max_split_size: {}\n", human_exact(r.max_split_size));
  }
  out += fmt::format("  hint: {}", hint(r));
  return out;
}

}  // namespace gpuswap
