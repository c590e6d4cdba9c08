#pragma once
// sim_device: a model of a GPU that every layer above device/ is tested on.
//
// Note [The modelled clock]
// Each operation's modelled start and end are computed when it is *enqueued*, from what is known
// then: the end of the previous operation on its stream, the modelled times of the events it
// waits for, the occupancy of the engine it needs (one copy engine per direction, one compute
// engine) and its modelled cost. Enqueue order is program order, so the same program gets the
// same modelled times on every run whatever the worker threads do. The worker threads (one per
// stream) really execute the operations in order and really block on events, so races between
// streams are real and ThreadSanitizer sees them; they never decide a modelled time.
//
// The host has a modelled clock too (now_ns). It advances when the host waits
// (synchronize_*), by advance_host_ns for modelled host work, and by the modelled cost of
// map_pages and unmap_pages (sim_options::vm_*). query_event answers by the modelled clock: an
// event is complete when its modelled time is not after the host's; when the answer is
// "complete" the call also waits until the worker has really finished, so a caller can never
// observe an unfinished copy through query_event.
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "device/device.hpp"

namespace gpuswap {

enum class sim_backing {
  real,     // bytes exist; copies copy; kernels may touch memory
  phantom,  // addresses without bytes (PROT_NONE); copies and kernels are modelled only
};

struct sim_options {
  std::string preset = "custom";
  sim_backing backing = sim_backing::real;
  int ordinal = 0;
  std::size_t device_capacity = std::size_t{1} << 30;
  std::size_t host_capacity = std::size_t{4} << 30;  // pinned host memory the model will hand out
  double h2d_bandwidth = 12e9;  // bytes per second, one engine
  double d2h_bandwidth = 12e9;
  double h2d_latency_ns = 10'000;
  double d2h_latency_ns = 10'000;
  // Bandwidth factor of each direction while the other direction's engine is busy (1 = no
  // slowdown). A100 over PCIe 4 was measured at ~11 of ~25 GB/s H2D while D2H ran.
  double h2d_factor_when_both = 1.0;
  double d2h_factor_when_both = 1.0;
  double compute_flops = 6.1e12;  // dense peak, FLOP/s
  double compute_efficiency = 0.5;
  double device_memory_bandwidth = 336e9;  // bytes/s: D2D copies and memory-bound kernels
  double host_memory_bandwidth = 20e9;     // bytes/s: H2H copies
  double managed_fault_latency_ns = 20'000;  // per faulted page, on top of the copy time
  std::size_t managed_page_bytes = std::size_t{2} << 20;
  // Fill fresh device and pinned allocations with a non-zero pattern (real backing), as a GPU
  // returns whatever was there: code that reads memory it never wrote shows up as wrong
  // numbers on the simulator too, instead of reading the zeros of fresh host pages.
  bool poison_fresh_memory = true;
  // Virtual memory management (device.hpp: reserve_address_range, map_pages, unmap_pages). The
  // page size every size and address of those calls is a multiple of: CUDA's granularity on
  // current GPUs. 0 models a device without the calls (vm_page_size() reports 0, and the
  // others behave as on such a device).
  std::size_t vm_page_size = std::size_t{2} << 20;
  // Host time of those calls, which are synchronous host calls on CUDA (cuMemCreate + cuMemMap
  // per page and one cuMemSetAccess; cuMemUnmap + cuMemRelease per page): vm_call_ns per
  // map_pages / unmap_pages call plus a cost per page. Estimates, not measurements (REFERENCE.md
  // has no figures): to be replaced by what a GPU session measures.
  double vm_call_ns = 2'000;
  double vm_map_ns_per_page = 1'000;
  double vm_unmap_ns_per_page = 500;
  // Test hook: each worker sleeps a random 0..worker_jitter_us before each operation, to show
  // that modelled times do not depend on thread timing.
  unsigned worker_jitter_us = 0;
  std::uint64_t jitter_seed = 1;

  // Throws config_error naming the field and the value when an option is out of range.
  void validate() const;
};

// The presets of REFERENCE.md: titan-x-pcie3, a100-pcie4, h100-pcie5, gh200-c2c.
// Throws config_error for an unknown name, listing the accepted ones.
sim_options sim_preset(std::string_view name);
// Defined in core/config.cpp, which validates the `sim_preset` key against the same list.
std::vector<std::string> sim_preset_names();

// The kinds of call fault injection can fail.
enum class sim_call : int {
  device_alloc,
  pinned_alloc,
  managed_alloc,
  copy,
  launch,
  event_record,
  event_wait,
  vm_map,  // map_pages: a failed one returns false and maps nothing, as on an exhausted device
  count_   // number of kinds
};
std::string_view to_string(sim_call call) noexcept;

// One operation on the modelled timeline (recorded when set_timeline_recording(true)).
struct sim_op {
  enum class kind { copy_h2d, copy_d2h, copy_d2d, copy_h2h, kernel, migrate, event_record, wait };
  kind what;
  std::uintptr_t stream;
  double start_ns;
  double end_ns;
  std::size_t bytes;
};

struct sim_counters {
  std::uint64_t bytes_h2d = 0;
  std::uint64_t bytes_d2h = 0;
  std::uint64_t copies = 0;
  std::uint64_t kernels = 0;
  std::uint64_t managed_faults = 0;        // pages faulted in by kernels
  std::uint64_t managed_bytes_migrated = 0;
  std::size_t device_used = 0;             // device bytes allocated (incl. resident managed)
  std::size_t pinned_used = 0;
  std::size_t vm_mapped = 0;    // device bytes mapped by map_pages (included in device_used)
  std::size_t vm_reserved = 0;  // address space held by reserve_address_range
};

class sim_device final : public device {
 public:
  explicit sim_device(sim_options options = {});
  ~sim_device() override;

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
  // Virtual memory: Note [Simulated virtual memory] in sim_device.cpp. Address space comes from
  // a PROT_NONE region of the host's, made on first use; with real backing a mapped page is
  // readable and writable and an unmapped one faults (SIGSEGV) if anything touches it.
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
  // What name_stream last called it; "" if never named or not a stream of this device.
  std::string stream_name(stream_t stream) const;
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
  void launch(stream_t stream, const kernel_cost& cost, std::function<void()> fn,
              std::span<const touched_buffer> touched) override;

  // --- the model's own surface ------------------------------------------------------------
  const sim_options& options() const noexcept;
  // The host's modelled clock, in nanoseconds since construction.
  double now_ns() const;
  // The modelled clock, or the host's wall clock after set_wall_clock_timestamps(true).
  double host_time_ns() const override {
    return wall_clock_timestamps_.load(std::memory_order_relaxed) ? device::host_time_ns()
                                                                   : now_ns();
  }
  // Makes host_time_ns() read the wall clock as cuda_device's does (core/fast_clock), while the
  // model keeps its own time. For `gpuswap bench alloc`, which measures what a profiler
  // timestamp costs the allocator on a GPU, where each traced call reads that clock.
  void set_wall_clock_timestamps(bool on) noexcept;
  // Modelled host work: the host clock moves on by `ns`.
  void advance_host_ns(double ns);
  // Modelled completion time of the event's last record (0 if never recorded).
  double event_time_ns(event_t event) const;
  // Modelled time at which all work enqueued so far on `stream` ends.
  double stream_tail_ns(stream_t stream) const;
  // The modelled cost of a kernel on this device, in nanoseconds.
  double kernel_ns(const kernel_cost& cost) const;

  void set_timeline_recording(bool on);
  std::vector<sim_op> timeline() const;
  sim_counters counters() const;

  // Fault injection: the n-th call of `kind` from now (1 = the next one) fails: allocations
  // return nullptr, map_pages returns false, the others throw device_error
  // ("sim_fault_injected") and enqueue nothing.
  void fail_nth(sim_call kind, std::uint64_t n);
  // Every call of `kind` fails until clear_faults().
  void fail_always(sim_call kind);
  void clear_faults();
  // Calls of `kind` made so far (failed ones included).
  std::uint64_t calls(sim_call kind) const;

  // True if ptr lies in memory this device handed out (device, pinned or managed), live, or in
  // a page mapped by map_pages.
  bool owns(const void* ptr) const;

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
  std::atomic<bool> wall_clock_timestamps_{false};
};

}  // namespace gpuswap
