#include "allocator/allocator_stats.hpp"

#include <nlohmann/json.hpp>

namespace gpuswap {
namespace {

nlohmann::json stat_json(const stat& s) {
  return {{"current", s.current}, {"peak", s.peak}, {"allocated", s.allocated}, {"freed", s.freed}};
}

nlohmann::json array_json(const stat_array& a) {
  return {{"all", stat_json(a[stat_pool::all])},
          {"small_pool", stat_json(a[stat_pool::small])},
          {"large_pool", stat_json(a[stat_pool::large])}};
}

template <typename F>
void for_each_array(allocator_stats& s, F&& f) {
  for (stat_array* a :
       {&s.allocation, &s.segment, &s.active, &s.inactive_split, &s.allocated_bytes,
        &s.reserved_bytes, &s.active_bytes, &s.inactive_split_bytes, &s.requested_bytes}) {
    f(*a);
  }
}

}  // namespace

void allocator_stats::reset_peak() noexcept {
  for_each_array(*this, [](stat_array& a) {
    for (stat& s : a.by_pool) s.reset_peak();
  });
}

nlohmann::json allocator_stats::to_json() const {
  const auto reserved = reserved_bytes.all().current;
  const double fragmentation =
      reserved > 0
          ? static_cast<double>(inactive_split_bytes.all().current) / static_cast<double>(reserved)
          : 0.0;
  return {{"allocation", array_json(allocation)},
          {"segment", array_json(segment)},
          {"active", array_json(active)},
          {"inactive_split", array_json(inactive_split)},
          {"allocated_bytes", array_json(allocated_bytes)},
          {"reserved_bytes", array_json(reserved_bytes)},
          {"active_bytes", array_json(active_bytes)},
          {"inactive_split_bytes", array_json(inactive_split_bytes)},
          {"requested_bytes", array_json(requested_bytes)},
          {"num_alloc_retries", num_alloc_retries},
          {"num_ooms", num_ooms},
          {"num_cache_flushes", num_cache_flushes},
          {"num_device_allocs", num_device_allocs},
          {"num_device_frees", num_device_frees},
          {"num_invalid_frees", num_invalid_frees},
          {"fragmentation", fragmentation}};
}

}  // namespace gpuswap
