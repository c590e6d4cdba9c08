#pragma once
// The Device: every call gpuswap makes to a GPU goes through this interface, so that each layer
// above runs unchanged on a real GPU (cuda_device) and on the model of one (sim_device).
//
// Glossary
//   stream    an in-order queue of device work. Ours are created with a priority; a caller's
//             native stream (cudaStream_t) can be wrapped without taking ownership.
//   event     a marker recorded on a stream; other streams and the host can wait for it.
//             Waits and queries refer to the most recent record at the time of the call
//             (CUDA's semantics). An event never recorded counts as complete.
//   pinned    page-locked host memory: the only host memory async copies overlap compute with.
//   managed   memory addressable from host and device, migrated on demand or by prefetch.
//
// Contracts every backend keeps (checked by tests/device/device_conformance_test.cpp):
//   - allocate_device / allocate_pinned / allocate_managed return nullptr when memory is
//     exhausted and never throw for it; bytes == 0 returns nullptr. Other failures throw
//     device_error.
//   - free_* of nullptr is a no-op; free_* is noexcept. Freeing memory that enqueued work still
//     uses is the caller's bug (cudaFree happens to synchronise; the simulator does not), so
//     callers free only after the last use's event completed.
//   - copy_async and launch enqueue and return; they never wait for the device.
//   - Every method is thread-safe.
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>

namespace gpuswap {

// Opaque handles. Their values mean something only to the device that made them.
enum class stream_t : std::uintptr_t {};
enum class event_t : std::uintptr_t {};

enum class stream_priority { low, normal, high };

enum class copy_kind { host_to_device, device_to_host, device_to_device, host_to_host };

std::string_view to_string(copy_kind kind) noexcept;

// The modelled cost of a kernel. A real GPU ignores it (the kernel takes what it takes); the
// simulated device turns it into modelled time: flops / (throughput * efficiency) plus
// memory_bytes / memory bandwidth, whichever is larger, plus fixed_ns.
struct kernel_cost {
  double flops = 0;
  double memory_bytes = 0;
  double fixed_ns = 0;
};

// A buffer a kernel reads or writes; managed buffers that are not resident on the device fault
// in (sim: modelled migration time and a counted fault).
struct touched_buffer {
  const void* ptr = nullptr;
  std::size_t bytes = 0;
};

struct memory_info {
  std::size_t free_bytes = 0;
  std::size_t total_bytes = 0;
};

enum class managed_advice { prefer_device, prefer_host, accessed_by_device };

class device {
 public:
  virtual ~device() = default;
  device(const device&) = delete;
  device& operator=(const device&) = delete;

  // A human-readable name, e.g. "NVIDIA H100 80GB HBM3 (cuda:0)" or "sim:h100-pcie5/phantom".
  virtual std::string name() const = 0;
  // The device ordinal used in every API that takes one.
  virtual int ordinal() const noexcept = 0;

  // --- memory -----------------------------------------------------------------------------
  virtual void* allocate_device(std::size_t bytes) = 0;
  virtual void free_device(void* ptr) noexcept = 0;
  virtual void* allocate_pinned(std::size_t bytes) = 0;
  virtual void free_pinned(void* ptr) noexcept = 0;
  virtual void* allocate_managed(std::size_t bytes) = 0;
  virtual void free_managed(void* ptr) noexcept = 0;
  // Migrates [ptr, ptr+bytes) of managed memory to the device (to_device) or the host, in
  // stream order on `stream`.
  virtual void prefetch_managed(const void* ptr, std::size_t bytes, bool to_device,
                                stream_t stream) = 0;
  virtual void advise_managed(const void* ptr, std::size_t bytes, managed_advice advice) = 0;
  virtual memory_info memory() const = 0;

  // --- virtual memory (Note [Device virtual memory], device.cpp) ---------------------------
  // Address space reserved without memory behind it, and physical memory mapped into it and
  // unmapped again a page at a time: CUDA's cuMemAddressReserve, cuMemCreate + cuMemMap +
  // cuMemSetAccess, cuMemUnmap + cuMemRelease. The caching allocator grows and shrinks its
  // expandable segments with them, so that free memory in the middle of a segment can be
  // given back and mapped again where a large block needs it. A device without these calls
  // returns 0 from vm_page_size(); the others then throw device_error (release and unmap do
  // nothing).
  //
  // The page size: every size and address passed below is a multiple of it.
  virtual std::size_t vm_page_size() const noexcept;
  // Reserves `bytes` of device address space; nothing is mapped. nullptr when the address
  // space is exhausted; throws device_error for other failures.
  virtual void* reserve_address_range(std::size_t bytes);
  // Gives a reservation back. Every page in it must have been unmapped.
  virtual void release_address_range(void* base, std::size_t bytes) noexcept;
  // Maps new device memory at [ptr, ptr + bytes), inside one reservation and not mapped now,
  // readable and writable by the device; its contents are undefined. The pages count as used
  // device memory (memory()) until unmapped. Returns false and maps nothing when device
  // memory is exhausted; throws device_error (nothing mapped) for other failures. Each page
  // can be unmapped on its own later.
  virtual bool map_pages(void* ptr, std::size_t bytes);
  // Unmaps [ptr, ptr + bytes) (pages mapped by map_pages, possibly several calls' worth, or
  // part of one) and frees their memory. It does not wait for enqueued work (unlike cudaFree
  // behind cuda_device's free_device; cuMemUnmap is not documented to): the caller makes sure
  // none still uses the pages.
  virtual void unmap_pages(void* ptr, std::size_t bytes) noexcept;

  // --- streams ----------------------------------------------------------------------------
  virtual stream_t create_stream(stream_priority priority) = 0;
  // Wraps a caller's native stream (a cudaStream_t on CUDA; 0 is the legacy default stream).
  // The device does not own it: destroy_stream on a wrapped stream only forgets it.
  virtual stream_t wrap_native_stream(void* native) = 0;
  virtual void* native_stream(stream_t stream) const = 0;
  virtual void destroy_stream(stream_t stream) noexcept = 0;
  // Labels the stream's row in profilers: on CUDA, NVTX's name for the stream (Nsight Systems
  // shows it on the stream's row, with the NVTX ranges around its work projected there); on the
  // simulator, the stream and its worker thread. Best effort: never throws, no-op by default.
  virtual void name_stream(stream_t stream, const char* name) noexcept;
  // The stream used when a caller names none (CUDA's legacy default stream).
  virtual stream_t default_stream() = 0;
  virtual void synchronize_stream(stream_t stream) = 0;
  // Waits for all work on all streams.
  virtual void synchronize() = 0;

  // --- events -----------------------------------------------------------------------------
  // Events are created with timing enabled so that elapsed_ms works.
  virtual event_t create_event() = 0;
  virtual void destroy_event(event_t event) noexcept = 0;
  virtual void record_event(event_t event, stream_t stream) = 0;
  // Work enqueued on `stream` after this call starts only after the event's last record.
  virtual void wait_event(stream_t stream, event_t event) = 0;
  // True when the event's last record has completed. Never blocks.
  virtual bool query_event(event_t event) = 0;
  virtual void synchronize_event(event_t event) = 0;
  // Milliseconds between two completed events.
  virtual double elapsed_ms(event_t start, event_t end) = 0;

  // --- work -------------------------------------------------------------------------------
  virtual void copy_async(void* dst, const void* src, std::size_t bytes, copy_kind kind,
                          stream_t stream) = 0;
  // A kernel: `fn` runs in stream order on memory the host can address (the simulator's own
  // memory; on CUDA, managed or host memory, run through cudaLaunchHostFunc, so `fn` must not
  // call CUDA). `cost` is the simulator's modelled duration.
  virtual void launch(stream_t stream, const kernel_cost& cost, std::function<void()> fn,
                      std::span<const touched_buffer> touched) = 0;

  // --- time -------------------------------------------------------------------------------
  // The host's clock in nanoseconds since the device was made: wall time on a real GPU
  // (core/fast_clock: steady_clock's rate, cheaper to read), the modelled host clock on the
  // simulator. Profiler timestamps use it, and device-side times are placed on it through
  // elapsed_ms from an event recorded at a known host time.
  virtual double host_time_ns() const;
  // host_time_ns() for hot paths (the caching allocator's timestamp on every traced call): one
  // load where the backend keeps its clock in memory (Note [Published host clock]), else the
  // virtual call.
  double host_time_ns_fast() const {
    const std::atomic<double>* clock = published_clock_.load(std::memory_order_acquire);
    return clock != nullptr ? clock->load(std::memory_order_relaxed) : host_time_ns();
  }

 protected:
  device();
  // For a backend whose host_time_ns() returns a value it keeps current in `clock`:
  // host_time_ns_fast() reads it directly from then on; nullptr goes back to the call. `clock`
  // must stay valid until the device is destroyed or this is called again.
  void publish_host_clock(const std::atomic<double>* clock) noexcept {
    published_clock_.store(clock, std::memory_order_release);
  }

 private:
  std::int64_t created_ns_;
  std::atomic<const std::atomic<double>*> published_clock_{nullptr};
};

}  // namespace gpuswap
