#pragma once
// The `gpuswap` NVTX domain: what Nsight Systems shows of gpuswap, named once here so that every
// range, mark and memory annotation agrees on it.
//
// Glossary
//   domain     NVTX's namespace for annotations; Nsight groups ours under "gpuswap". The tag type
//              nvtx_domain_tag is what nvtx3's templates (scoped_range_in<D>, ...) take.
//   category   a numbered, named class of events inside the domain (swap_out, stall, ...);
//              Nsight can filter and colour by it. Ids start at 1: 0 means "no category".
//   name       the message of a range or mark. The hot-path names (nvtx_name) are registered
//              once per process, so an event passes a handle instead of a string to copy.
//   payload    one number attached to an event: the byte count (or the layer index of a
//              layer range). See Note [Extended payload] in nvtx_ranges.cpp for buffer ids.
//
// Everything in this header exists in every build; what it names is emitted only when
// GPUSWAP_WITH_NVTX is defined (nvtx_compiled_in) and the runtime switch is on.
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace gpuswap {

// nvtx3's domain tag: nvtx3::domain::get<nvtx_domain_tag>() is our domain handle.
struct nvtx_domain_tag {
  static constexpr const char* name{"gpuswap"};
};

#if defined(GPUSWAP_WITH_NVTX) && GPUSWAP_WITH_NVTX
inline constexpr bool nvtx_compiled_in = true;
#else
inline constexpr bool nvtx_compiled_in = false;
#endif

enum class nvtx_category : std::uint32_t {
  alloc = 1,  // allocator calls: alloc, free, segment map/release, empty_cache
  swap_out,   // device -> host copies of a buffer
  swap_in,    // host -> device copies of a buffer
  prefetch,   // a swap-in issued ahead of use
  stall,      // compute waiting for a buffer that was not back in time
  evict,      // a buffer chosen to leave the device under pressure
  layer,      // forward / backward phase of one layer
  iteration,  // one training step
};
inline constexpr std::size_t nvtx_category_count = 8;

// The registered hot-path messages.
enum class nvtx_name : std::uint32_t {
  alloc,
  free,
  swap_out,
  swap_in,
  prefetch,
  stall,
  evict,
  forward,
  backward,
  iteration,
  empty_cache,
};
inline constexpr std::size_t nvtx_name_count = 11;

enum class nvtx_phase : std::uint8_t { forward, backward };

constexpr std::string_view to_string(nvtx_category c) noexcept {
  switch (c) {
    case nvtx_category::alloc: return "alloc";
    case nvtx_category::swap_out: return "swap_out";
    case nvtx_category::swap_in: return "swap_in";
    case nvtx_category::prefetch: return "prefetch";
    case nvtx_category::stall: return "stall";
    case nvtx_category::evict: return "evict";
    case nvtx_category::layer: return "layer";
    case nvtx_category::iteration: return "iteration";
  }
  return "unknown";
}

constexpr std::string_view to_string(nvtx_name n) noexcept {
  switch (n) {
    case nvtx_name::alloc: return "alloc";
    case nvtx_name::free: return "free";
    case nvtx_name::swap_out: return "swap_out";
    case nvtx_name::swap_in: return "swap_in";
    case nvtx_name::prefetch: return "prefetch";
    case nvtx_name::stall: return "stall";
    case nvtx_name::evict: return "evict";
    case nvtx_name::forward: return "forward";
    case nvtx_name::backward: return "backward";
    case nvtx_name::iteration: return "iteration";
    case nvtx_name::empty_cache: return "empty_cache";
  }
  return "unknown";
}

// The name a range or mark of a category carries unless the caller picks another.
constexpr nvtx_name default_name(nvtx_category c) noexcept {
  switch (c) {
    case nvtx_category::alloc: return nvtx_name::alloc;
    case nvtx_category::swap_out: return nvtx_name::swap_out;
    case nvtx_category::swap_in: return nvtx_name::swap_in;
    case nvtx_category::prefetch: return nvtx_name::prefetch;
    case nvtx_category::stall: return nvtx_name::stall;
    case nvtx_category::evict: return nvtx_name::evict;
    case nvtx_category::layer: return nvtx_name::forward;
    case nvtx_category::iteration: return nvtx_name::iteration;
  }
  return nvtx_name::alloc;
}

constexpr nvtx_name phase_name(nvtx_phase p) noexcept {
  return p == nvtx_phase::forward ? nvtx_name::forward : nvtx_name::backward;
}

// ARGB colours. Swaps read as traffic lights (out red, in green), a stall is the alarm colour,
// the background work (layers, iterations, allocator) stays muted so the swaps stand out.
constexpr std::uint32_t nvtx_color(nvtx_category c) noexcept {
  switch (c) {
    case nvtx_category::alloc: return 0xFF9E9E9Eu;      // grey
    case nvtx_category::swap_out: return 0xFFE53935u;   // red
    case nvtx_category::swap_in: return 0xFF43A047u;    // green
    case nvtx_category::prefetch: return 0xFF1E88E5u;   // blue
    case nvtx_category::stall: return 0xFFFF6F00u;      // amber
    case nvtx_category::evict: return 0xFF8E24AAu;      // purple
    case nvtx_category::layer: return 0xFF00897Bu;      // teal
    case nvtx_category::iteration: return 0xFF6D4C41u;  // brown
  }
  return 0xFF000000u;
}

constexpr std::uint32_t nvtx_category_id(nvtx_category c) noexcept {
  return static_cast<std::uint32_t>(c);
}

// No buffer / no layer in a range or mark (the same sentinels trace_event uses for layers).
inline constexpr std::uint64_t nvtx_no_buffer = ~std::uint64_t{0};
inline constexpr std::int32_t nvtx_no_layer = -1;

namespace detail {
// Relaxed: the switch is advisory; an event racing with a flip is emitted or not, both fine.
inline std::atomic<bool> nvtx_enabled_flag{true};
}  // namespace detail

// The runtime switch (config key `nvtx`). On by default: with NVTX compiled in but no tool
// attached, each annotation costs an indirect call that returns at once. Turning it off skips
// even that, and before the first annotation it keeps NVTX from looking for a tool at all.
// A range remembers whether it pushed, so flipping the switch inside a range is safe.
inline void set_nvtx_enabled(bool on) noexcept {
  detail::nvtx_enabled_flag.store(on, std::memory_order_relaxed);
}
inline bool nvtx_enabled() noexcept {
  return nvtx_compiled_in && detail::nvtx_enabled_flag.load(std::memory_order_relaxed);
}

}  // namespace gpuswap
