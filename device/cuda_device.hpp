#pragma once
// cuda_device: the Device interface over the CUDA runtime API, one object per GPU ordinal.
// Thin and honest: each method is one or two runtime calls, every call checked; a failure
// throws device_error naming the call and cudaGetErrorName. cuda_runtime.h stays in the .cpp so
// that including this header costs nothing on machines without the toolkit.
//
// Handles (see Note [Handle encoding] in cuda_device.cpp):
//   stream_t  (native cudaStream_t value << 1) | owned. Streams from create_stream have the owned
//             bit set; wrapped ones (wrap_native_stream, default_stream) do not, so wrapping one
//             of our own native streams gives a distinct handle whose destroy_stream is harmless.
//             default_stream() is stream_t{0}: the legacy default stream.
//   event_t   the cudaEvent_t value. Every event is owned (created by create_event).
//
// The current device (see Note [Current device]): every method that makes a device-dependent
// runtime call makes this ordinal current on the calling thread for the duration of the call and
// restores the caller's current device afterwards, so a host program's own cudaSetDevice is never
// disturbed (this matters under the preload shim).
//
// Construction fails with no_cuda_device ("no CUDA device: cudaGetDeviceCount returned
// cudaErrorInsufficientDriver ...") when there is no driver, no GPU, or no GPU at `ordinal`;
// callers such as make_device(auto) fall back to sim_device on it.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <span>
#include <string>
#include <unordered_set>

#include "device/device.hpp"

namespace gpuswap {

class cuda_device final : public device {
 public:
  // Throws no_cuda_device when the ordinal cannot be used (no driver, no device, out of range,
  // devices unavailable), device_error for other failures while opening it.
  explicit cuda_device(int ordinal = 0);
  // Destroys the streams and events still owned (after the work queued on them completes, as
  // cudaStreamDestroy does); never throws.
  ~cuda_device() override;

  // The number of CUDA devices this process can see; 0 when there is no driver or no device, in
  // which case `why` (if given) receives the failing call and its error. Never throws.
  static int device_count(std::string* why = nullptr) noexcept;

  // device
  std::string name() const override;
  int ordinal() const noexcept override;
  void* allocate_device(std::size_t bytes) override;
  void free_device(void* ptr) noexcept override;
  void* allocate_pinned(std::size_t bytes) override;
  void free_pinned(void* ptr) noexcept override;
  void* allocate_managed(std::size_t bytes) override;
  void free_managed(void* ptr) noexcept override;
  void prefetch_managed(const void* ptr, std::size_t bytes, bool to_device,
                        stream_t stream) override;
  void advise_managed(const void* ptr, std::size_t bytes, managed_advice advice) override;
  memory_info memory() const override;
  // Virtual memory through the driver's cuMem* calls, reached through the runtime's driver
  // entry points (no link against libcuda). vm_page_size() is the driver's minimum granularity
  // for device memory of this ordinal, 0 when the driver lacks a call or the device the
  // feature. See Note [CUDA virtual memory] in cuda_device.cpp.
  std::size_t vm_page_size() const noexcept override;
  void* reserve_address_range(std::size_t bytes) override;
  void release_address_range(void* base, std::size_t bytes) noexcept override;
  bool map_pages(void* ptr, std::size_t bytes) override;
  void unmap_pages(void* ptr, std::size_t bytes) noexcept override;
  stream_t create_stream(stream_priority priority) override;
  stream_t wrap_native_stream(void* native) override;
  void* native_stream(stream_t stream) const override;
  void destroy_stream(stream_t stream) noexcept override;
  void name_stream(stream_t stream, const char* name) noexcept override;
  stream_t default_stream() override;
  void synchronize_stream(stream_t stream) override;
  void synchronize() override;
  event_t create_event() override;
  void destroy_event(event_t event) noexcept override;
  void record_event(event_t event, stream_t stream) override;
  void wait_event(stream_t stream, event_t event) override;
  bool query_event(event_t event) override;
  void synchronize_event(event_t event) override;
  double elapsed_ms(event_t start, event_t end) override;
  void copy_async(void* dst, const void* src, std::size_t bytes, copy_kind kind,
                  stream_t stream) override;
  // `fn` runs on a CUDA callback thread through cudaLaunchHostFunc and must not call CUDA;
  // `cost` and `touched` are ignored (the hardware takes what it takes and faults in managed
  // memory itself). An exception thrown by `fn` is logged and swallowed: it cannot cross the
  // runtime's C callback.
  void launch(stream_t stream, const kernel_cost& cost, std::function<void()> fn,
              std::span<const touched_buffer> touched) override;

  // The stream priorities this device offers, as CUDA numbers them (greatest is numerically
  // smallest). create_stream maps low to least and high to greatest.
  int least_priority() const noexcept { return least_priority_; }
  int greatest_priority() const noexcept { return greatest_priority_; }

 private:
  int ordinal_;
  std::string name_;
  int least_priority_ = 0;
  int greatest_priority_ = 0;

  // guards owned_streams_ and owned_events_ (native handle values); held only to insert, erase
  // or swap the sets, never across a CUDA call.
  mutable std::mutex registry_mutex_;
  std::unordered_set<std::uintptr_t> owned_streams_;
  std::unordered_set<std::uintptr_t> owned_events_;

  std::size_t vm_page_size_ = 0;   // set at construction; 0: no virtual memory management
  std::size_t total_memory_ = 0;   // the device's, for map_pages' "can never fit" answer
  // guards vm_reservations_ (base -> bytes) and vm_pages_ (mapped page address -> the
  // CUmemGenericAllocationHandle behind it); held only to look up, insert or extract entries,
  // never across a driver call.
  mutable std::mutex vm_mutex_;
  std::map<std::uintptr_t, std::size_t> vm_reservations_;
  std::map<std::uintptr_t, std::uint64_t> vm_pages_;
};

}  // namespace gpuswap
