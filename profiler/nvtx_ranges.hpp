#pragma once
// NVTX ranges and marks in the `gpuswap` domain, for Nsight Systems.
//
//   {
//     nvtx_swap_range r(nvtx_category::swap_out, bytes, buffer_ref, layer);
//     ... enqueue / wait for the D2H copy ...
//   }
//   nvtx_layer_range l(nvtx_phase::backward, 12);
//   nvtx_mark(nvtx_category::evict, bytes, buffer_ref, layer);
//
// Ranges push on construction and pop on destruction on the calling thread (NVTX push/pop
// ranges are per thread), so a range must end on the thread that began it. The swap engine has
// no threads of its own: its ranges wrap the enqueueing of each copy on the calling thread
// (Note [NVTX in the engine]); nvtx_name_thread() labels a thread's row.
//
// Every event carries its category (and the category's colour), a registered name and the byte
// count as payload. With GPUSWAP_WITH_NVTX undefined, or nvtx_enabled() false, all of it is an
// inline no-op.
#include <cstdint>

#include "profiler/nvtx_domain.hpp"

namespace gpuswap {

#if defined(GPUSWAP_WITH_NVTX) && GPUSWAP_WITH_NVTX

namespace detail {
// A range calls nvtx_pop() iff it called a push, whatever the push returned: a tool that does
// not track depth returns NVTX_NO_PUSH_POP_TRACKING yet still expects the pop.
void nvtx_push(nvtx_category category, nvtx_name name, std::uint64_t bytes,
               std::uint64_t buffer_ref, std::int32_t layer) noexcept;
void nvtx_push_layer(nvtx_phase phase, std::int32_t layer) noexcept;
void nvtx_push_iteration(std::uint64_t iteration) noexcept;
void nvtx_pop() noexcept;
void nvtx_mark(nvtx_category category, nvtx_name name, std::uint64_t bytes,
               std::uint64_t buffer_ref, std::int32_t layer) noexcept;
void nvtx_mark_message(nvtx_category category, const char* message,
                       std::uint64_t bytes) noexcept;
void nvtx_name_thread(const char* name) noexcept;
}  // namespace detail

// A push/pop range of one category, named after it ("swap_out", "prefetch", ...) or with
// another registered name (nvtx_category::alloc with nvtx_name::free).
class nvtx_range {
 public:
  nvtx_range(nvtx_category category, std::uint64_t bytes,
             std::uint64_t buffer_ref = nvtx_no_buffer,
             std::int32_t layer = nvtx_no_layer) noexcept
      : nvtx_range(category, default_name(category), bytes, buffer_ref, layer) {}
  nvtx_range(nvtx_category category, nvtx_name name, std::uint64_t bytes,
             std::uint64_t buffer_ref = nvtx_no_buffer,
             std::int32_t layer = nvtx_no_layer) noexcept
      : pushed_(nvtx_enabled()) {
    if (pushed_) detail::nvtx_push(category, name, bytes, buffer_ref, layer);
  }
  ~nvtx_range() {
    if (pushed_) detail::nvtx_pop();
  }
  nvtx_range(const nvtx_range&) = delete;
  nvtx_range& operator=(const nvtx_range&) = delete;

 private:
  bool pushed_;
};

// The swap engine's spelling of the same thing.
using nvtx_swap_range = nvtx_range;

// One layer's forward or backward phase: category layer, name "forward"/"backward", payload
// the layer index (int32), so Nsight's NVTX summary groups all layers of a phase together.
class nvtx_layer_range {
 public:
  nvtx_layer_range(nvtx_phase phase, std::int32_t layer) noexcept
      : pushed_(nvtx_enabled()) {
    if (pushed_) detail::nvtx_push_layer(phase, layer);
  }
  ~nvtx_layer_range() {
    if (pushed_) detail::nvtx_pop();
  }
  nvtx_layer_range(const nvtx_layer_range&) = delete;
  nvtx_layer_range& operator=(const nvtx_layer_range&) = delete;

 private:
  bool pushed_;
};

// One training step: category iteration, name "iteration", payload the step number.
class nvtx_iteration_range {
 public:
  explicit nvtx_iteration_range(std::uint64_t iteration) noexcept
      : pushed_(nvtx_enabled()) {
    if (pushed_) detail::nvtx_push_iteration(iteration);
  }
  ~nvtx_iteration_range() {
    if (pushed_) detail::nvtx_pop();
  }
  nvtx_iteration_range(const nvtx_iteration_range&) = delete;
  nvtx_iteration_range& operator=(const nvtx_iteration_range&) = delete;

 private:
  bool pushed_;
};

// An instant event named after its category (or with another registered name).
inline void nvtx_mark(nvtx_category category, std::uint64_t bytes,
                      std::uint64_t buffer_ref = nvtx_no_buffer,
                      std::int32_t layer = nvtx_no_layer) noexcept {
  if (nvtx_enabled()) {
    detail::nvtx_mark(category, default_name(category), bytes, buffer_ref, layer);
  }
}
inline void nvtx_mark(nvtx_category category, nvtx_name name, std::uint64_t bytes,
                      std::uint64_t buffer_ref = nvtx_no_buffer,
                      std::int32_t layer = nvtx_no_layer) noexcept {
  if (nvtx_enabled()) detail::nvtx_mark(category, name, bytes, buffer_ref, layer);
}
// An instant event with a free-form message (copied by the tool on every call: cold paths only,
// e.g. an OOM report).
inline void nvtx_mark_message(nvtx_category category, const char* message,
                              std::uint64_t bytes = 0) noexcept {
  if (nvtx_enabled()) detail::nvtx_mark_message(category, message, bytes);
}
// Names the calling OS thread's row in Nsight ("gpuswap D2H").
inline void nvtx_name_thread(const char* name) noexcept {
  if (nvtx_enabled()) detail::nvtx_name_thread(name);
}

#else  // NVTX compiled out: the same API, empty.

class nvtx_range {
 public:
  constexpr nvtx_range(nvtx_category, std::uint64_t, std::uint64_t = nvtx_no_buffer,
                       std::int32_t = nvtx_no_layer) noexcept {}
  constexpr nvtx_range(nvtx_category, nvtx_name, std::uint64_t, std::uint64_t = nvtx_no_buffer,
                       std::int32_t = nvtx_no_layer) noexcept {}
  nvtx_range(const nvtx_range&) = delete;
  nvtx_range& operator=(const nvtx_range&) = delete;
};
using nvtx_swap_range = nvtx_range;

class nvtx_layer_range {
 public:
  constexpr nvtx_layer_range(nvtx_phase, std::int32_t) noexcept {}
  nvtx_layer_range(const nvtx_layer_range&) = delete;
  nvtx_layer_range& operator=(const nvtx_layer_range&) = delete;
};

class nvtx_iteration_range {
 public:
  constexpr explicit nvtx_iteration_range(std::uint64_t) noexcept {}
  nvtx_iteration_range(const nvtx_iteration_range&) = delete;
  nvtx_iteration_range& operator=(const nvtx_iteration_range&) = delete;
};

inline void nvtx_mark(nvtx_category, std::uint64_t, std::uint64_t = nvtx_no_buffer,
                      std::int32_t = nvtx_no_layer) noexcept {}
inline void nvtx_mark(nvtx_category, nvtx_name, std::uint64_t, std::uint64_t = nvtx_no_buffer,
                      std::int32_t = nvtx_no_layer) noexcept {}
inline void nvtx_mark_message(nvtx_category, const char*, std::uint64_t = 0) noexcept {}
inline void nvtx_name_thread(const char*) noexcept {}

#endif

}  // namespace gpuswap
