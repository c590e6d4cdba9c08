#include "device/sim_device.hpp"

#include <pthread.h>
#include <sys/mman.h>

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <iterator>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <unordered_map>
#include <utility>

#include "core/errors.hpp"
#include "core/logging.hpp"
#include "device/address_range.hpp"

namespace gpuswap {

// Note [The modelled clock] is in sim_device.hpp. The pieces here:
//
// Note [Engines]
// Three engines: H2D copy, D2H copy and compute. Each serves its operations first come, first
// served in enqueue order, so an operation starts at the latest of: its stream's tail, the
// host's clock when it was enqueued, the events it waits for, and its engine's free time.
// D2D and H2H copies use no host-link engine (they run at device / host memory bandwidth).
//
// Note [Both directions at once]
// While one copy engine is busy, the other moves bytes at bandwidth * factor_when_both. A copy
// being scheduled sees the other engine's intervals already scheduled (they were enqueued
// first) and integrates its rate piecewise over them. An interval scheduled later does not
// reach back and slow a copy already scheduled: the model charges the overlap to the later
// copy only. This keeps every time final at enqueue, which is what makes it deterministic.

namespace {

constexpr std::size_t device_alignment = 512;  // cudaMalloc aligns to at least 256 bytes

// The virtual-memory region: this many device capacities of address space, at most
// vm_region_cap bytes (Note [Simulated virtual memory]).
constexpr std::size_t vm_region_factor = 256;
constexpr std::size_t vm_region_cap = std::size_t{16} << 40;

// Logs a misuse that a noexcept call can only report.
void log_error_noexcept(std::string_view what) noexcept {
  try {
    log().error("sim: {}", what);
  } catch (...) {
  }
}

struct record_token {
  explicit record_token(double t) : time_ns(t) {}
  const double time_ns;  // modelled completion
  std::mutex mutex;      // guards done
  std::condition_variable cv;
  bool done = false;

  void signal() {
    {
      std::lock_guard lock(mutex);
      done = true;
    }
    cv.notify_all();
  }
  void wait() {
    std::unique_lock lock(mutex);
    cv.wait(lock, [&] { return done; });
  }
};

struct interval {
  double start;
  double end;
};

struct sim_stream {
  std::uintptr_t id = 0;
  double tail_ns = 0;  // guarded by impl::sched_mutex_
  std::string name;    // guarded by impl::sched_mutex_ (name_stream)

  std::mutex mutex;  // guards queue, stop, enqueued, completed; never held while running an op
  std::condition_variable cv;
  std::deque<std::function<void()>> queue;
  bool stop = false;
  std::uint64_t enqueued = 0;
  std::uint64_t completed = 0;
  std::thread worker;
};

struct managed_allocation {
  std::size_t bytes = 0;
  std::vector<bool> resident;  // per page, on the device
  std::uint64_t last_touch = 0;
};

// The mapped pages of one reservation, as runs of page indices, adjacent runs merged: a span
// mapped by several map_pages calls is one run, so "is all of it mapped" is one lookup, and the
// cost does not grow with the size of a reservation (a bitmap of a 4 KiB-page model's
// terabytes would).
class page_runs {
 public:
  using run = std::pair<std::size_t, std::size_t>;  // first page, page count

  // True if any page of [first, first + count) is mapped.
  bool any(std::size_t first, std::size_t count) const {
    auto it = runs_.lower_bound(first);
    if (it != runs_.end() && it->first < first + count) return true;
    if (it == runs_.begin()) return false;
    --it;
    return it->first + it->second > first;
  }
  // True if every page of [first, first + count) is mapped.
  bool all(std::size_t first, std::size_t count) const {
    auto it = runs_.upper_bound(first);
    if (it == runs_.begin()) return false;
    --it;
    return it->first + it->second >= first + count;
  }
  // Marks [first, first + count) mapped; none of it may be mapped now.
  void insert(std::size_t first, std::size_t count) {
    auto next = runs_.lower_bound(first);
    if (next != runs_.end() && next->first == first + count) {
      count += next->second;
      next = runs_.erase(next);
    }
    if (next != runs_.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second == first) {
        prev->second += count;
        return;
      }
    }
    runs_.emplace_hint(next, first, count);
  }
  // Marks the mapped pages of [first, first + count) unmapped; returns the runs that were.
  std::vector<run> erase(std::size_t first, std::size_t count) {
    std::vector<run> erased;
    const std::size_t end = first + count;
    auto it = runs_.upper_bound(first);
    if (it != runs_.begin() && std::prev(it)->first + std::prev(it)->second > first) --it;
    while (it != runs_.end() && it->first < end) {
      const std::size_t run_first = it->first;
      const std::size_t run_end = it->first + it->second;
      const std::size_t lo = std::max(run_first, first);
      const std::size_t hi = std::min(run_end, end);
      erased.emplace_back(lo, hi - lo);
      it = runs_.erase(it);
      if (run_first < lo) runs_.emplace(run_first, lo - run_first);
      if (hi < run_end) it = runs_.emplace(hi, run_end - hi).first;  // starts at `end`: loop ends
    }
    return erased;
  }
 private:
  std::map<std::size_t, std::size_t> runs_;  // first page -> page count
};

}  // namespace

struct sim_device::impl {
  explicit impl(sim_options o)
      : opt(std::move(o)),
        device_mem(2 * opt.device_capacity, opt.backing == sim_backing::real, device_alignment),
        pinned_mem(2 * opt.host_capacity, opt.backing == sim_backing::real, device_alignment),
        managed_mem(2 * opt.host_capacity, opt.backing == sim_backing::real, opt.managed_page_bytes) {}

  sim_options opt;

  // --- memory: guarded by mem_mutex_ (never held while waiting on a stream) ---
  mutable std::mutex mem_mutex;
  address_range device_mem;
  address_range pinned_mem;
  address_range managed_mem;
  std::size_t device_used = 0;
  std::size_t pinned_used = 0;
  std::size_t managed_resident = 0;
  std::uint64_t touch_clock = 0;
  std::unordered_map<const void*, managed_allocation> managed;
  // Virtual memory (Note [Simulated virtual memory]): the region reservations are carved from,
  // made on first use, and each reservation's mapped pages by its base.
  std::unique_ptr<address_range> vm_mem;
  std::unordered_map<const void*, page_runs> vm_reservations;
  std::size_t vm_mapped = 0;  // included in device_used
  std::size_t vm_reserved = 0;

  // --- scheduling: guarded by sched_mutex (lock order: sched_mutex, then a stream's mutex) ---
  mutable std::mutex sched_mutex;
  double host_now = 0;
  // host_now, published for readers that take no lock (now_ns, called on every allocation
  // when tracing is on). Written only under sched_mutex, through advance_host_to.
  std::atomic<double> host_now_published{0};
  void advance_host_to(double t) {
    if (t > host_now) {
      host_now = t;
      host_now_published.store(t, std::memory_order_relaxed);
    }
  }
  double h2d_free = 0, d2h_free = 0, compute_free = 0;
  std::vector<interval> h2d_busy, d2h_busy;
  std::unordered_map<std::uintptr_t, std::unique_ptr<sim_stream>> streams;
  std::unordered_map<std::uintptr_t, std::shared_ptr<record_token>> events;  // null: never recorded
  std::uintptr_t next_stream = 1;
  std::uintptr_t next_event = 1;
  std::uintptr_t default_stream = 0;
  bool recording = false;
  std::vector<sim_op> ops;
  sim_counters counts;
  std::string first_async_error;  // a kernel that threw: reported at the next synchronisation

  // --- fault injection (atomics: checked on every call without a lock) ---
  std::array<std::atomic<std::uint64_t>, static_cast<int>(sim_call::count_)> calls{};
  std::array<std::atomic<std::uint64_t>, static_cast<int>(sim_call::count_)> fail_at{};
  std::array<std::atomic<bool>, static_cast<int>(sim_call::count_)> fail_all{};

  // True when this call of `kind` must fail.
  bool fault(sim_call kind) {
    const auto k = static_cast<int>(kind);
    const std::uint64_t n = calls[k].fetch_add(1) + 1;
    return fail_all[k].load() || fail_at[k].load() == n;
  }
  void fault_or_throw(sim_call kind, std::string_view call) {
    if (fault(kind)) throw_device_error(call, "sim_fault_injected", "fault injected by the test");
  }

  sim_stream& stream_locked(stream_t s, std::string_view call) {
    auto it = streams.find(static_cast<std::uintptr_t>(s));
    if (it == streams.end()) {
      throw_device_error(call, "sim_invalid_stream",
                         fmt::format("stream {} does not exist", static_cast<std::uintptr_t>(s)));
    }
    return *it->second;
  }

  // Appends an operation to a stream's queue; its modelled time was already charged.
  static void push(sim_stream& s, std::function<void()> op) {
    {
      std::lock_guard lock(s.mutex);
      s.queue.push_back(std::move(op));
      ++s.enqueued;
    }
    s.cv.notify_one();
  }

  void note(sim_op::kind what, const sim_stream& s, double start, double end, std::size_t bytes) {
    if (recording) ops.push_back(sim_op{what, s.id, start, end, bytes});
  }

  // The modelled end of a transfer of `bytes` starting at `start` on an engine of bandwidth `bw`
  // whose rate drops to bw*factor while the other engine is busy (Note [Both directions at once]).
  static double transfer_end(double start, double latency, std::size_t bytes, double bw,
                             double factor, const std::vector<interval>& other) {
    double t = start + latency;
    double remaining = static_cast<double>(bytes);
    if (factor < 1.0) {
      auto it = std::lower_bound(other.begin(), other.end(), t,
                                 [](const interval& iv, double v) { return iv.end <= v; });
      for (; it != other.end() && remaining > 0; ++it) {
        if (it->start > t) {  // full speed until the other engine becomes busy
          const double full = (it->start - t) * bw / 1e9;
          if (full >= remaining) break;
          remaining -= full;
          t = it->start;
        }
        const double slow = (it->end - t) * bw * factor / 1e9;
        if (slow >= remaining) return t + remaining * 1e9 / (bw * factor);
        remaining -= slow;
        t = it->end;
      }
    }
    return t + remaining * 1e9 / bw;
  }

  // Drops intervals that end before the host clock: nothing enqueued from now on starts earlier.
  void prune(std::vector<interval>& v) const {
    auto keep = std::lower_bound(v.begin(), v.end(), host_now,
                                 [](const interval& iv, double t) { return iv.end < t; });
    if (keep - v.begin() > 1024) v.erase(v.begin(), keep);
  }

  // Schedules a host-link transfer on its engine; returns {start, end}.
  interval schedule_link(sim_stream& s, bool to_device, std::size_t bytes) {
    double& engine_free = to_device ? h2d_free : d2h_free;
    std::vector<interval>& mine = to_device ? h2d_busy : d2h_busy;
    std::vector<interval>& other = to_device ? d2h_busy : h2d_busy;
    const double start = std::max({s.tail_ns, host_now, engine_free});
    const double end =
        transfer_end(start, to_device ? opt.h2d_latency_ns : opt.d2h_latency_ns, bytes,
                     to_device ? opt.h2d_bandwidth : opt.d2h_bandwidth,
                     to_device ? opt.h2d_factor_when_both : opt.d2h_factor_when_both, other);
    engine_free = end;
    mine.push_back({start, end});
    prune(mine);
    s.tail_ns = end;
    return {start, end};
  }

  // Modelled migration cost of making [ptr, ptr+bytes) of managed memory resident on the device;
  // marks the pages resident and counts faults. Caller holds sched_mutex; takes mem_mutex.
  double fault_in_managed(const void* ptr, std::size_t bytes, bool count_faults) {
    std::lock_guard lock(mem_mutex);
    auto span = managed_mem.find(ptr);
    if (!span) return 0;
    auto& m = managed.at(span->base);
    m.last_touch = ++touch_clock;
    const std::size_t page = opt.managed_page_bytes;
    const std::size_t off = static_cast<std::size_t>(static_cast<const char*>(ptr) - span->base);
    const std::size_t first = off / page;
    const std::size_t last = std::min(m.resident.size(), (off + std::max<std::size_t>(bytes, 1) + page - 1) / page);
    std::size_t pages = 0;
    for (std::size_t p = first; p < last; ++p) {
      if (m.resident[p]) continue;
      make_room_locked(page, span->base);
      m.resident[p] = true;
      managed_resident += page;
      ++pages;
    }
    if (pages == 0) return 0;
    counts.managed_bytes_migrated += pages * page;
    if (count_faults) counts.managed_faults += pages;
    const double per_page = count_faults ? opt.managed_fault_latency_ns : 0;
    return static_cast<double>(pages) * per_page +
           static_cast<double>(pages * page) * 1e9 / opt.h2d_bandwidth;
  }

  // Evicts managed pages (least recently touched allocation first, never `keep`) until `bytes`
  // more fit on the device. Caller holds mem_mutex.
  void make_room_locked(std::size_t bytes, const void* keep) {
    while (device_used + managed_resident + bytes > opt.device_capacity && managed_resident > 0) {
      managed_allocation* victim = nullptr;
      for (auto& [base, m] : managed) {
        if (base == keep) continue;
        if (std::none_of(m.resident.begin(), m.resident.end(), [](bool r) { return r; })) continue;
        if (victim == nullptr || m.last_touch < victim->last_touch) victim = &m;
      }
      if (victim == nullptr) return;
      for (std::size_t p = 0; p < victim->resident.size(); ++p) {
        if (victim->resident[p]) {
          victim->resident[p] = false;
          managed_resident -= opt.managed_page_bytes;
          if (device_used + managed_resident + bytes <= opt.device_capacity) return;
        }
      }
    }
  }

  // --- virtual memory: the helpers below but charge_host are called with mem_mutex held ---

  // The modelled host cost of a map or unmap call (Note [Simulated virtual memory]). Takes
  // sched_mutex, so never called with mem_mutex held (fault_in_managed takes them the other
  // way round).
  void charge_host(double ns) {
    std::lock_guard lock(sched_mutex);
    if (ns > 0) advance_host_to(host_now + ns);
  }


  // The region reservations come from, made on first use.
  address_range& vm_region_locked() {
    if (vm_mem) return *vm_mem;
    std::size_t bytes = std::min(opt.device_capacity, vm_region_cap / vm_region_factor) *
                        vm_region_factor;
    for (;;) {
      try {
        vm_mem = std::make_unique<address_range>(bytes, /*accessible=*/false, opt.vm_page_size);
        return *vm_mem;
      } catch (const device_error&) {
        // A host with less address space to give (ThreadSanitizer keeps a few TiB for the
        // program): half as much, down to one device's worth.
        if (bytes / 2 < opt.device_capacity) throw;
        bytes /= 2;
      }
    }
  }

  bool in_vm_region_locked(const void* p) const { return vm_mem && vm_mem->contains_address(p); }

  // Pages [first, first + count) of the reservation at `base`.
  struct vm_span {
    char* base;
    page_runs* pages;
    std::size_t first;
    std::size_t count;
  };

  // The pages of [p, p + bytes), which must be whole pages inside one live reservation; throws
  // device_error naming `call` otherwise.
  vm_span vm_pages_locked(const void* p, std::size_t bytes, std::string_view call) {
    const std::size_t page = opt.vm_page_size;
    if (bytes == 0 || bytes % page != 0 || reinterpret_cast<std::uintptr_t>(p) % page != 0) {
      throw_device_error(call, "sim_invalid_value",
                         fmt::format("[{}, +{}) is not a nonzero number of whole {}-byte pages",
                                     p, bytes, page));
    }
    std::optional<address_range::span_info> span;
    if (vm_mem) span = vm_mem->find(p);
    const std::size_t offset =
        span ? static_cast<std::size_t>(static_cast<const char*>(p) - span->base) : 0;
    if (!span || bytes > span->bytes - offset) {
      throw_device_error(call, "sim_invalid_value",
                         fmt::format("[{}, +{}) is not inside one reserved address range of {}",
                                     p, bytes, opt.preset));
    }
    return vm_span{span->base, &vm_reservations.at(span->base), offset / page, bytes / page};
  }

  // True when [p, p + bytes) lies in mapped pages of one reservation.
  bool vm_mapped_locked(const void* p, std::size_t bytes) const {
    if (!vm_mem) return false;
    auto span = vm_mem->find(p);
    if (!span) return false;
    const auto offset = static_cast<std::size_t>(static_cast<const char*>(p) - span->base);
    bytes = std::max<std::size_t>(bytes, 1);
    if (bytes > span->bytes - offset) return false;
    const std::size_t page = opt.vm_page_size;
    const std::size_t first = offset / page;
    const std::size_t last = (offset + bytes + page - 1) / page;
    return vm_reservations.at(span->base).all(first, last - first);
  }

  // Unmaps the mapped pages of `span` (skipping the others); returns how many there were.
  std::size_t unmap_locked(const vm_span& span) {
    const std::size_t page = opt.vm_page_size;
    std::size_t pages = 0;
    for (const auto& [first, count] : span.pages->erase(span.first, span.count)) {
      if (opt.backing == sim_backing::real) {
        // The bytes go back to the host, and a later touch faults at once, as an access to an
        // unmapped device address does, instead of reading what was there.
        char* at = span.base + first * page;
        madvise(at, count * page, MADV_DONTNEED);
        if (mprotect(at, count * page, PROT_NONE) != 0) {
          log_error_noexcept(fmt::format("mprotect(PROT_NONE) of unmapped pages failed: {}",
                                         std::strerror(errno)));
        }
      }
      pages += count;
    }
    device_used -= pages * page;
    vm_mapped -= pages * page;
    return pages;
  }

  void check_device_span(const void* p, std::size_t bytes, std::string_view call) {
    std::lock_guard lock(mem_mutex);
    if (in_vm_region_locked(p)) {
      if (!vm_mapped_locked(p, bytes)) {
        throw_device_error(call, "sim_illegal_address",
                           fmt::format("[{}, +{}) is not inside mapped pages of one reservation",
                                       p, bytes));
      }
      return;
    }
    const address_range* r = device_mem.contains_address(p) ? &device_mem
                             : managed_mem.contains_address(p) ? &managed_mem
                                                               : nullptr;
    if (r == nullptr) {
      throw_device_error(call, "sim_invalid_value",
                         fmt::format("{} is not device or managed memory of {}", p, opt.preset));
    }
    auto span = r->find(p);
    const auto* c = static_cast<const char*>(p);
    if (!span || c + bytes > span->base + span->bytes) {
      throw_device_error(call, "sim_illegal_address",
                         fmt::format("[{}, +{}) is not inside a live allocation", p, bytes));
    }
  }

  void check_host_span(const void* p, std::size_t bytes, std::string_view call) {
    std::lock_guard lock(mem_mutex);
    if (device_mem.contains_address(p) || in_vm_region_locked(p)) {
      throw_device_error(call, "sim_invalid_value", fmt::format("{} is device memory", p));
    }
    if (!pinned_mem.contains_address(p)) return;  // pageable host memory: allowed, as in CUDA
    auto span = pinned_mem.find(p);
    const auto* c = static_cast<const char*>(p);
    if (!span || c + bytes > span->base + span->bytes) {
      throw_device_error(call, "sim_illegal_address",
                         fmt::format("[{}, +{}) is not inside live pinned memory", p, bytes));
    }
  }

  // Memory a kernel touches must be live if it is ours: touching freed device memory is the
  // use-after-free bug an allocator must never cause, so the model reports it at launch.
  void check_touched(const touched_buffer& t) {
    std::lock_guard lock(mem_mutex);
    if (in_vm_region_locked(t.ptr) && !vm_mapped_locked(t.ptr, t.bytes)) {
      throw_device_error("launch", "sim_illegal_address",
                         fmt::format("kernel touches [{}, +{}) outside mapped pages", t.ptr,
                                     t.bytes));
    }
    for (const address_range* r : {&device_mem, &pinned_mem, &managed_mem}) {
      if (!r->contains_address(t.ptr)) continue;
      auto span = r->find(t.ptr);
      const auto* c = static_cast<const char*>(t.ptr);
      if (!span || c + t.bytes > span->base + span->bytes) {
        throw_device_error("launch", "sim_illegal_address",
                           fmt::format("kernel touches [{}, +{}) outside any live allocation",
                                       t.ptr, t.bytes));
      }
    }
  }

  void worker_loop(sim_stream& s) {
    std::minstd_rand rng(static_cast<std::uint32_t>(opt.jitter_seed * 7919 + s.id));
    std::uniform_int_distribution<unsigned> jitter(0, opt.worker_jitter_us);
    for (;;) {
      std::function<void()> op;
      {
        std::unique_lock lock(s.mutex);
        s.cv.wait(lock, [&] { return s.stop || !s.queue.empty(); });
        if (s.queue.empty()) return;  // stop requested and drained
        op = std::move(s.queue.front());
        s.queue.pop_front();
      }
      if (opt.worker_jitter_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(jitter(rng)));
      op();
      {
        std::lock_guard lock(s.mutex);
        ++s.completed;
      }
      s.cv.notify_all();
    }
  }

  std::uintptr_t add_stream() {
    auto s = std::make_unique<sim_stream>();
    s->id = next_stream++;
    s->tail_ns = host_now;
    sim_stream* raw = s.get();
    s->worker = std::thread([this, raw] { worker_loop(*raw); });
    streams.emplace(raw->id, std::move(s));
    return raw->id;
  }

  // Waits until every operation enqueued on `s` before this call has run.
  static void drain(sim_stream& s) {
    std::unique_lock lock(s.mutex);
    const std::uint64_t target = s.enqueued;
    s.cv.wait(lock, [&] { return s.completed >= target; });
  }

  static void stop(sim_stream& s) {
    {
      std::lock_guard lock(s.mutex);
      s.stop = true;
    }
    s.cv.notify_all();
    if (s.worker.joinable()) s.worker.join();
  }

  void poison(void* p, std::size_t bytes) const {
    if (opt.backing == sim_backing::real && opt.poison_fresh_memory) std::memset(p, 0xCD, bytes);
  }

  void raise_async_error_locked() {
    if (first_async_error.empty()) return;
    std::string message = std::move(first_async_error);
    first_async_error.clear();
    throw_device_error("synchronize", "sim_kernel_failed", message);
  }
};

// ---------------------------------------------------------------------------------------------

sim_device::sim_device(sim_options options) {
  options.validate();
  impl_ = std::make_unique<impl>(std::move(options));
  publish_host_clock(&impl_->host_now_published);  // Note [Published host clock]
  std::lock_guard lock(impl_->sched_mutex);
  impl_->default_stream = impl_->add_stream();
}

void sim_device::set_wall_clock_timestamps(bool on) noexcept {
  wall_clock_timestamps_.store(on, std::memory_order_relaxed);
  publish_host_clock(on ? nullptr : &impl_->host_now_published);
}

sim_device::~sim_device() {
  std::unordered_map<std::uintptr_t, std::unique_ptr<sim_stream>> streams;
  {
    std::lock_guard lock(impl_->sched_mutex);
    streams.swap(impl_->streams);
  }
  for (auto& [id, s] : streams) impl::stop(*s);
}

std::string sim_device::name() const {
  return fmt::format("sim:{}/{}", impl_->opt.preset,
                     impl_->opt.backing == sim_backing::real ? "real" : "phantom");
}

int sim_device::ordinal() const noexcept { return impl_->opt.ordinal; }

const sim_options& sim_device::options() const noexcept { return impl_->opt; }

// --- memory ------------------------------------------------------------------------------------

void* sim_device::allocate_device(std::size_t bytes) {
  if (impl_->fault(sim_call::device_alloc) || bytes == 0) return nullptr;
  std::lock_guard lock(impl_->mem_mutex);
  const std::size_t rounded = (bytes + device_alignment - 1) / device_alignment * device_alignment;
  if (rounded < bytes) return nullptr;
  impl_->make_room_locked(rounded, nullptr);
  if (impl_->device_used + impl_->managed_resident + rounded > impl_->opt.device_capacity) {
    return nullptr;
  }
  void* p = impl_->device_mem.allocate(rounded);
  if (p == nullptr) return nullptr;
  impl_->device_used += rounded;
  impl_->poison(p, rounded);
  return p;
}

void sim_device::free_device(void* ptr) noexcept {
  std::lock_guard lock(impl_->mem_mutex);
  impl_->device_used -= impl_->device_mem.free(ptr);
}

void* sim_device::allocate_pinned(std::size_t bytes) {
  if (impl_->fault(sim_call::pinned_alloc) || bytes == 0) return nullptr;
  std::lock_guard lock(impl_->mem_mutex);
  const std::size_t rounded = (bytes + device_alignment - 1) / device_alignment * device_alignment;
  if (rounded < bytes || rounded > impl_->opt.host_capacity - impl_->pinned_used) return nullptr;
  void* p = impl_->pinned_mem.allocate(bytes);
  if (p == nullptr) return nullptr;
  impl_->pinned_used += impl_->pinned_mem.find(p)->bytes;
  impl_->poison(p, bytes);
  return p;
}

void sim_device::free_pinned(void* ptr) noexcept {
  std::lock_guard lock(impl_->mem_mutex);
  impl_->pinned_used -= impl_->pinned_mem.free(ptr);
}

void* sim_device::allocate_managed(std::size_t bytes) {
  if (impl_->fault(sim_call::managed_alloc) || bytes == 0) return nullptr;
  std::lock_guard lock(impl_->mem_mutex);
  void* p = impl_->managed_mem.allocate(bytes);
  if (p == nullptr) return nullptr;
  const std::size_t pages = (bytes + impl_->opt.managed_page_bytes - 1) / impl_->opt.managed_page_bytes;
  impl_->managed.emplace(p, managed_allocation{bytes, std::vector<bool>(pages, false), 0});
  return p;
}

void sim_device::free_managed(void* ptr) noexcept {
  std::lock_guard lock(impl_->mem_mutex);
  auto it = impl_->managed.find(ptr);
  if (it == impl_->managed.end()) return;
  for (bool r : it->second.resident) {
    if (r) impl_->managed_resident -= impl_->opt.managed_page_bytes;
  }
  impl_->managed.erase(it);
  impl_->managed_mem.free(ptr);
}

void sim_device::prefetch_managed(const void* ptr, std::size_t bytes, bool to_device,
                                  stream_t stream) {
  impl_->fault_or_throw(sim_call::copy, "prefetch_managed");
  std::lock_guard lock(impl_->sched_mutex);
  sim_stream& s = impl_->stream_locked(stream, "prefetch_managed");
  double start = std::max(s.tail_ns, impl_->host_now);
  double cost = 0;
  if (to_device) {
    cost = impl_->fault_in_managed(ptr, bytes, /*count_faults=*/false);
  } else {
    std::lock_guard mem(impl_->mem_mutex);
    if (auto span = impl_->managed_mem.find(ptr)) {
      auto& m = impl_->managed.at(span->base);
      std::size_t pages = 0;
      for (std::size_t p = 0; p < m.resident.size(); ++p) {
        if (m.resident[p]) {
          m.resident[p] = false;
          impl_->managed_resident -= impl_->opt.managed_page_bytes;
          ++pages;
        }
      }
      cost = static_cast<double>(pages * impl_->opt.managed_page_bytes) * 1e9 /
             impl_->opt.d2h_bandwidth;
    }
  }
  if (cost > 0) {
    double& engine = to_device ? impl_->h2d_free : impl_->d2h_free;
    start = std::max(start, engine);
    engine = start + cost;
  }
  s.tail_ns = start + cost;
  impl_->note(sim_op::kind::migrate, s, start, start + cost, bytes);
  impl::push(s, [] {});
}

void sim_device::advise_managed(const void* ptr, std::size_t, managed_advice) {
  // Advice changes placement heuristics on a real GPU; the model has one placement rule, so
  // advice is accepted (and checked) but changes nothing.
  std::lock_guard lock(impl_->mem_mutex);
  if (!impl_->managed_mem.find(ptr)) {
    throw_device_error("advise_managed", "sim_invalid_value",
                       fmt::format("{} is not managed memory", ptr));
  }
}

memory_info sim_device::memory() const {
  std::lock_guard lock(impl_->mem_mutex);
  const std::size_t used = impl_->device_used + impl_->managed_resident;
  return memory_info{impl_->opt.device_capacity - std::min(used, impl_->opt.device_capacity),
                     impl_->opt.device_capacity};
}

bool sim_device::owns(const void* ptr) const {
  std::lock_guard lock(impl_->mem_mutex);
  return impl_->device_mem.find(ptr) || impl_->pinned_mem.find(ptr) ||
         impl_->managed_mem.find(ptr) || impl_->vm_mapped_locked(ptr, 1);
}

// --- virtual memory ----------------------------------------------------------------------------

// Note [Simulated virtual memory]
// Reservations are carved from one PROT_NONE region of the host's address space, made on the
// first reserve_address_range: 256 device capacities, room for an allocator that reserves a few
// capacities per stream (a GPU has thousands: 2^48 bytes), but at most 16 TiB, so that a few
// of the 1 TiB phantom devices the tests and `gpuswap simulate` use fit in the host's 128 TiB. On a host with less address
// space to give it halves, down to one capacity. The region is an address_range aligned to the
// page size, so reservations are page-aligned, as CUDA's are. Mapping draws on the budget
// allocate_device draws on (device_used, after evicting managed pages as allocate_device does)
// and, with real backing, makes the pages readable and writable and poisons them; unmapping
// gives the bytes back (MADV_DONTNEED) and makes the pages PROT_NONE again, so that a use after
// unmap faults at once, as an access to an unmapped device address does, instead of reading
// stale bytes. Copies and kernels check their spans against the mapped pages, as they check
// live allocations, and report an unmapped one as an illegal address. The calls are
// synchronous host calls on CUDA, so each moves the host clock by its modelled cost
// (sim_options::vm_*): a map_pages that fails for want of memory costs its fixed part only.

std::size_t sim_device::vm_page_size() const noexcept { return impl_->opt.vm_page_size; }

void* sim_device::reserve_address_range(std::size_t bytes) {
  const std::size_t page = impl_->opt.vm_page_size;
  if (page == 0) return device::reserve_address_range(bytes);
  if (bytes == 0 || bytes % page != 0) {
    throw_device_error("reserve_address_range", "sim_invalid_value",
                       fmt::format("{} bytes is not a nonzero multiple of the {}-byte page",
                                   bytes, page));
  }
  std::lock_guard lock(impl_->mem_mutex);
  address_range& region = impl_->vm_region_locked();
  void* base = region.allocate(bytes);
  if (base == nullptr) return nullptr;
  try {
    impl_->vm_reservations.emplace(base, page_runs{});
  } catch (...) {
    region.free(base);
    throw;
  }
  impl_->vm_reserved += bytes;
  return base;
}

void sim_device::release_address_range(void* base, std::size_t bytes) noexcept {
  if (impl_->opt.vm_page_size == 0 || base == nullptr) return;
  try {
    std::size_t pages = 0;
    {
      std::lock_guard lock(impl_->mem_mutex);
      std::optional<address_range::span_info> span;
      if (impl_->vm_mem) span = impl_->vm_mem->find(base);
      if (!span || span->base != base || span->bytes != bytes) {
        throw_device_error("release_address_range", "sim_invalid_value",
                           fmt::format("[{}, +{}) is not a reservation of this device", base,
                                       bytes));
      }
      pages = impl_->unmap_locked(impl_->vm_pages_locked(base, bytes, "release_address_range"));
      impl_->vm_reservations.erase(base);
      impl_->vm_mem->free(base);
      impl_->vm_reserved -= bytes;
    }
    if (pages > 0) {
      log().debug("sim: release_address_range [{}, +{}) unmapped {} page(s) still mapped (the "
                  "caller's bug: device.hpp asks for every page to be unmapped first)",
                  base, bytes, pages);
      impl_->charge_host(impl_->opt.vm_call_ns +
                         static_cast<double>(pages) * impl_->opt.vm_unmap_ns_per_page);
    }
  } catch (const std::exception& e) {
    log_error_noexcept(fmt::format("release_address_range ignored: {}", e.what()));
  }
}

bool sim_device::map_pages(void* ptr, std::size_t bytes) {
  const std::size_t page = impl_->opt.vm_page_size;
  if (page == 0) return device::map_pages(ptr, bytes);
  // Counted first, so that fail_nth counts every call; a caller's bug is reported even by a
  // call chosen to fail.
  const bool faulted = impl_->fault(sim_call::vm_map);
  bool mapped = false;
  {
    std::lock_guard lock(impl_->mem_mutex);
    const impl::vm_span span = impl_->vm_pages_locked(ptr, bytes, "map_pages");
    if (span.pages->any(span.first, span.count)) {
      throw_device_error("map_pages", "sim_invalid_value",
                         fmt::format("[{}, +{}) has pages mapped already", ptr, bytes));
    }
    if (!faulted) {
      impl_->make_room_locked(bytes, nullptr);
      if (impl_->device_used + impl_->managed_resident + bytes <= impl_->opt.device_capacity) {
        if (impl_->opt.backing == sim_backing::real &&
            mprotect(ptr, bytes, PROT_READ | PROT_WRITE) != 0) {
          throw_device_error("map_pages", "sim_host_mprotect_failed", std::strerror(errno));
        }
        span.pages->insert(span.first, span.count);
        impl_->device_used += bytes;
        impl_->vm_mapped += bytes;
        impl_->poison(ptr, bytes);
        mapped = true;
      }
    }
  }
  impl_->charge_host(impl_->opt.vm_call_ns +
                     (mapped ? static_cast<double>(bytes / page) * impl_->opt.vm_map_ns_per_page
                             : 0.0));
  return mapped;
}

void sim_device::unmap_pages(void* ptr, std::size_t bytes) noexcept {
  const std::size_t page = impl_->opt.vm_page_size;
  if (page == 0 || bytes == 0) return;
  try {
    std::size_t pages = 0;
    {
      std::lock_guard lock(impl_->mem_mutex);
      pages = impl_->unmap_locked(impl_->vm_pages_locked(ptr, bytes, "unmap_pages"));
    }
    if (pages < bytes / page) {
      log().debug("sim: unmap_pages [{}, +{}) skipped {} of its {} pages: not mapped", ptr,
                  bytes, bytes / page - pages, bytes / page);
    }
    impl_->charge_host(impl_->opt.vm_call_ns +
                       static_cast<double>(pages) * impl_->opt.vm_unmap_ns_per_page);
  } catch (const std::exception& e) {
    log_error_noexcept(fmt::format("unmap_pages ignored: {}", e.what()));
  }
}

// --- streams -----------------------------------------------------------------------------------

stream_t sim_device::create_stream(stream_priority) {
  // Priorities order kernels from different streams on a real GPU; the model's engines are
  // first come, first served, so the priority is accepted and not modelled.
  std::lock_guard lock(impl_->sched_mutex);
  return stream_t{impl_->add_stream()};
}

stream_t sim_device::wrap_native_stream(void* native) {
  std::lock_guard lock(impl_->sched_mutex);
  if (native == nullptr) return stream_t{impl_->default_stream};
  const auto id = reinterpret_cast<std::uintptr_t>(native);
  if (impl_->streams.count(id) == 0) {
    throw_device_error("wrap_native_stream", "sim_invalid_stream",
                       fmt::format("{} is not a stream of this simulated device", native));
  }
  return stream_t{id};
}

void* sim_device::native_stream(stream_t stream) const {
  return reinterpret_cast<void*>(static_cast<std::uintptr_t>(stream));
}

void sim_device::name_stream(stream_t stream, const char* name) noexcept {
  if (name == nullptr) return;
  try {
    std::lock_guard lock(impl_->sched_mutex);
    auto it = impl_->streams.find(static_cast<std::uintptr_t>(stream));
    if (it == impl_->streams.end()) return;
    it->second->name = name;
    // Linux keeps 15 characters of a thread's name; debuggers and perf show it.
    const std::string thread_name = it->second->name.substr(0, 15);
    if (it->second->worker.joinable()) {
      pthread_setname_np(it->second->worker.native_handle(), thread_name.c_str());
    }
  } catch (...) {
    // A label is not worth failing for (allocation, or a lock error).
  }
}

std::string sim_device::stream_name(stream_t stream) const {
  std::lock_guard lock(impl_->sched_mutex);
  auto it = impl_->streams.find(static_cast<std::uintptr_t>(stream));
  return it == impl_->streams.end() ? std::string() : it->second->name;
}

void sim_device::destroy_stream(stream_t stream) noexcept {
  std::unique_ptr<sim_stream> s;
  {
    std::lock_guard lock(impl_->sched_mutex);
    const auto id = static_cast<std::uintptr_t>(stream);
    if (id == impl_->default_stream) return;  // the default stream lives as long as the device
    auto it = impl_->streams.find(id);
    if (it == impl_->streams.end()) return;
    s = std::move(it->second);
    impl_->streams.erase(it);
  }
  // As with cudaStreamDestroy, work already enqueued still completes.
  impl::stop(*s);
}

stream_t sim_device::default_stream() {
  std::lock_guard lock(impl_->sched_mutex);
  return stream_t{impl_->default_stream};
}

void sim_device::synchronize_stream(stream_t stream) {
  sim_stream* s = nullptr;
  double tail = 0;
  {
    std::lock_guard lock(impl_->sched_mutex);
    s = &impl_->stream_locked(stream, "synchronize_stream");
    tail = s->tail_ns;
  }
  // The stream cannot be destroyed while we wait: destroying a stream the caller is
  // synchronising is a caller bug, as in CUDA.
  impl::drain(*s);
  std::lock_guard lock(impl_->sched_mutex);
  impl_->advance_host_to(tail);
  impl_->raise_async_error_locked();
}

void sim_device::synchronize() {
  std::vector<sim_stream*> all;
  double tail = 0;
  {
    std::lock_guard lock(impl_->sched_mutex);
    for (auto& [id, s] : impl_->streams) {
      all.push_back(s.get());
      tail = std::max(tail, s->tail_ns);
    }
  }
  for (sim_stream* s : all) impl::drain(*s);
  std::lock_guard lock(impl_->sched_mutex);
  impl_->advance_host_to(tail);
  impl_->raise_async_error_locked();
}

// --- events ------------------------------------------------------------------------------------

event_t sim_device::create_event() {
  std::lock_guard lock(impl_->sched_mutex);
  const std::uintptr_t id = impl_->next_event++;
  impl_->events.emplace(id, nullptr);
  return event_t{id};
}

void sim_device::destroy_event(event_t event) noexcept {
  std::lock_guard lock(impl_->sched_mutex);
  impl_->events.erase(static_cast<std::uintptr_t>(event));
}

namespace {
std::shared_ptr<record_token>& event_slot(
    std::unordered_map<std::uintptr_t, std::shared_ptr<record_token>>& events, event_t e,
    std::string_view call) {
  auto it = events.find(static_cast<std::uintptr_t>(e));
  if (it == events.end()) {
    throw_device_error(call, "sim_invalid_event",
                       fmt::format("event {} does not exist", static_cast<std::uintptr_t>(e)));
  }
  return it->second;
}
}  // namespace

void sim_device::record_event(event_t event, stream_t stream) {
  impl_->fault_or_throw(sim_call::event_record, "record_event");
  std::lock_guard lock(impl_->sched_mutex);
  auto& slot = event_slot(impl_->events, event, "record_event");
  sim_stream& s = impl_->stream_locked(stream, "record_event");
  s.tail_ns = std::max(s.tail_ns, impl_->host_now);
  auto token = std::make_shared<record_token>(s.tail_ns);
  slot = token;
  impl_->note(sim_op::kind::event_record, s, s.tail_ns, s.tail_ns, 0);
  impl::push(s, [token] { token->signal(); });
}

void sim_device::wait_event(stream_t stream, event_t event) {
  impl_->fault_or_throw(sim_call::event_wait, "wait_event");
  std::lock_guard lock(impl_->sched_mutex);
  std::shared_ptr<record_token> token = event_slot(impl_->events, event, "wait_event");
  sim_stream& s = impl_->stream_locked(stream, "wait_event");
  if (!token) return;  // never recorded: nothing to wait for (CUDA's rule)
  const double before = s.tail_ns;
  s.tail_ns = std::max(s.tail_ns, token->time_ns);
  impl_->note(sim_op::kind::wait, s, before, s.tail_ns, 0);
  impl::push(s, [token] { token->wait(); });
}

bool sim_device::query_event(event_t event) {
  std::shared_ptr<record_token> token;
  {
    std::lock_guard lock(impl_->sched_mutex);
    token = event_slot(impl_->events, event, "query_event");
    if (!token) return true;
    if (token->time_ns > impl_->host_now) return false;
  }
  // Complete by the modelled clock: make it complete in fact before saying so.
  token->wait();
  return true;
}

void sim_device::synchronize_event(event_t event) {
  std::shared_ptr<record_token> token;
  {
    std::lock_guard lock(impl_->sched_mutex);
    token = event_slot(impl_->events, event, "synchronize_event");
  }
  if (!token) return;
  token->wait();
  std::lock_guard lock(impl_->sched_mutex);
  impl_->advance_host_to(token->time_ns);
  impl_->raise_async_error_locked();
}

double sim_device::elapsed_ms(event_t start, event_t end) {
  std::shared_ptr<record_token> a, b;
  {
    std::lock_guard lock(impl_->sched_mutex);
    a = event_slot(impl_->events, start, "elapsed_ms");
    b = event_slot(impl_->events, end, "elapsed_ms");
    if (!a || !b) {
      throw_device_error("elapsed_ms", "sim_invalid_resource_handle", "an event was never recorded");
    }
    if (std::max(a->time_ns, b->time_ns) > impl_->host_now) {
      throw_device_error("elapsed_ms", "sim_not_ready", "an event has not completed");
    }
  }
  a->wait();
  b->wait();
  return (b->time_ns - a->time_ns) / 1e6;
}

double sim_device::event_time_ns(event_t event) const {
  std::lock_guard lock(impl_->sched_mutex);
  auto it = impl_->events.find(static_cast<std::uintptr_t>(event));
  return it == impl_->events.end() || !it->second ? 0.0 : it->second->time_ns;
}

// --- work --------------------------------------------------------------------------------------

void sim_device::copy_async(void* dst, const void* src, std::size_t bytes, copy_kind kind,
                            stream_t stream) {
  impl_->fault_or_throw(sim_call::copy, "copy_async");
  if (bytes == 0) return;
  switch (kind) {
    case copy_kind::host_to_device:
      impl_->check_device_span(dst, bytes, "copy_async");
      impl_->check_host_span(src, bytes, "copy_async");
      break;
    case copy_kind::device_to_host:
      impl_->check_device_span(src, bytes, "copy_async");
      impl_->check_host_span(dst, bytes, "copy_async");
      break;
    case copy_kind::device_to_device:
      impl_->check_device_span(src, bytes, "copy_async");
      impl_->check_device_span(dst, bytes, "copy_async");
      break;
    case copy_kind::host_to_host:
      impl_->check_host_span(src, bytes, "copy_async");
      impl_->check_host_span(dst, bytes, "copy_async");
      break;
  }
  std::lock_guard lock(impl_->sched_mutex);
  sim_stream& s = impl_->stream_locked(stream, "copy_async");
  interval iv{};
  sim_op::kind what{};
  switch (kind) {
    case copy_kind::host_to_device:
      iv = impl_->schedule_link(s, true, bytes);
      what = sim_op::kind::copy_h2d;
      impl_->counts.bytes_h2d += bytes;
      break;
    case copy_kind::device_to_host:
      iv = impl_->schedule_link(s, false, bytes);
      what = sim_op::kind::copy_d2h;
      impl_->counts.bytes_d2h += bytes;
      break;
    case copy_kind::device_to_device:
    case copy_kind::host_to_host: {
      const double bw = kind == copy_kind::device_to_device ? impl_->opt.device_memory_bandwidth
                                                            : impl_->opt.host_memory_bandwidth;
      iv.start = std::max(s.tail_ns, impl_->host_now);
      iv.end = iv.start + static_cast<double>(bytes) * 1e9 / bw;
      s.tail_ns = iv.end;
      what = kind == copy_kind::device_to_device ? sim_op::kind::copy_d2d : sim_op::kind::copy_h2h;
      break;
    }
  }
  ++impl_->counts.copies;
  impl_->note(what, s, iv.start, iv.end, bytes);
  if (impl_->opt.backing == sim_backing::real) {
    impl::push(s, [dst, src, bytes] { std::memmove(dst, src, bytes); });
  } else {
    impl::push(s, [] {});
  }
}

double sim_device::kernel_ns(const kernel_cost& cost) const {
  const double compute = cost.flops * 1e9 / (impl_->opt.compute_flops * impl_->opt.compute_efficiency);
  const double memory = cost.memory_bytes * 1e9 / impl_->opt.device_memory_bandwidth;
  return std::max(compute, memory) + cost.fixed_ns;
}

void sim_device::launch(stream_t stream, const kernel_cost& cost, std::function<void()> fn,
                        std::span<const touched_buffer> touched) {
  impl_->fault_or_throw(sim_call::launch, "launch");
  for (const touched_buffer& t : touched) impl_->check_touched(t);
  std::lock_guard lock(impl_->sched_mutex);
  sim_stream& s = impl_->stream_locked(stream, "launch");
  double migrate = 0;
  for (const touched_buffer& t : touched) {
    migrate += impl_->fault_in_managed(t.ptr, t.bytes, /*count_faults=*/true);
  }
  const double start = std::max({s.tail_ns, impl_->host_now, impl_->compute_free});
  const double end = start + migrate + kernel_ns(cost);
  impl_->compute_free = end;
  s.tail_ns = end;
  ++impl_->counts.kernels;
  std::size_t bytes = 0;
  for (const touched_buffer& t : touched) bytes += t.bytes;
  impl_->note(sim_op::kind::kernel, s, start, end, bytes);
  if (impl_->opt.backing == sim_backing::real && fn) {
    impl::push(s, [this, fn = std::move(fn)] {
      try {
        fn();
      } catch (const std::exception& e) {
        std::lock_guard l(impl_->sched_mutex);
        if (impl_->first_async_error.empty()) impl_->first_async_error = e.what();
      }
    });
  } else {
    impl::push(s, [] {});
  }
}

// --- the model's own surface ---------------------------------------------------------------

double sim_device::now_ns() const {
  return impl_->host_now_published.load(std::memory_order_relaxed);
}

void sim_device::advance_host_ns(double ns) {
  std::lock_guard lock(impl_->sched_mutex);
  if (ns > 0) impl_->advance_host_to(impl_->host_now + ns);
}

double sim_device::stream_tail_ns(stream_t stream) const {
  std::lock_guard lock(impl_->sched_mutex);
  auto it = impl_->streams.find(static_cast<std::uintptr_t>(stream));
  return it == impl_->streams.end() ? 0.0 : it->second->tail_ns;
}

void sim_device::set_timeline_recording(bool on) {
  std::lock_guard lock(impl_->sched_mutex);
  impl_->recording = on;
}

std::vector<sim_op> sim_device::timeline() const {
  std::lock_guard lock(impl_->sched_mutex);
  return impl_->ops;
}

sim_counters sim_device::counters() const {
  sim_counters c;
  {
    std::lock_guard lock(impl_->sched_mutex);
    c = impl_->counts;
  }
  std::lock_guard lock(impl_->mem_mutex);
  c.device_used = impl_->device_used + impl_->managed_resident;
  c.pinned_used = impl_->pinned_used;
  c.vm_mapped = impl_->vm_mapped;
  c.vm_reserved = impl_->vm_reserved;
  return c;
}

void sim_device::fail_nth(sim_call kind, std::uint64_t n) {
  const auto k = static_cast<int>(kind);
  impl_->fail_at[k].store(impl_->calls[k].load() + n);
}

void sim_device::fail_always(sim_call kind) {
  impl_->fail_all[static_cast<int>(kind)].store(true);
}

void sim_device::clear_faults() {
  for (auto& f : impl_->fail_at) f.store(0);
  for (auto& f : impl_->fail_all) f.store(false);
}

std::uint64_t sim_device::calls(sim_call kind) const {
  return impl_->calls[static_cast<int>(kind)].load();
}

std::string_view to_string(sim_call call) noexcept {
  switch (call) {
    case sim_call::device_alloc: return "device_alloc";
    case sim_call::pinned_alloc: return "pinned_alloc";
    case sim_call::managed_alloc: return "managed_alloc";
    case sim_call::copy: return "copy";
    case sim_call::launch: return "launch";
    case sim_call::event_record: return "event_record";
    case sim_call::event_wait: return "event_wait";
    case sim_call::vm_map: return "vm_map";
    case sim_call::count_: break;
  }
  return "?";
}

}  // namespace gpuswap
