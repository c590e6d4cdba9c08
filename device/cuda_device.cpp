#include "device/cuda_device.hpp"

#include <cuda.h>  // the driver's types only: its calls come through driver_entry_point
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <fmt/format.h>
#if GPUSWAP_DEVICE_NVTX
#include <nvtx3/nvToolsExtCudaRt.h>
#endif

#include <algorithm>
#include <cstdint>
#include <exception>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <new>
#include <string>
#include <string_view>
#include <utility>

#include "core/errors.hpp"
#include "device/cuda_no_device.hpp"
#include "core/logging.hpp"

namespace gpuswap {

// Note [Handle encoding]
// stream_t carries the native cudaStream_t value shifted left by one, with the low bit set when
// this device created (owns) the stream. Decoding is a shift, so the hot paths (copy_async,
// record_event, launch) take no lock and consult no table. A separate owned bit, rather than
// "is it in the registry", is what lets a caller wrap one of our own native streams (say one it
// got back through the C API) and destroy the wrapper without destroying our stream. The shift
// needs the native value's top bit clear, which holds for user-space addresses and for the
// special values 0 (legacy default), cudaStreamLegacy and cudaStreamPerThread; it is checked.
// event_t is the cudaEvent_t value itself: every event is ours.
// The registries (owned_streams_, owned_events_) exist so that a double destroy is caught and
// logged instead of reaching the runtime, and so that the destructor can release what callers
// forgot.
//
// Note [Current device]
// The CUDA runtime's current device is per host thread. Every method that makes a call whose
// meaning depends on it (allocation, stream/event creation, copies and host functions on the
// legacy default stream, cudaDeviceSynchronize, cudaMemGetInfo) runs inside a device_scope,
// which makes ordinal_ current and afterwards restores the caller's device. It restores only if
// the caller's device already has an active primary context: cudaSetDevice initialises a
// context, and restoring "device 0" on a thread that never chose a device (cudaGetDevice reports
// 0 then) would create a stray context on GPU 0 of every multi-GPU node (PyTorch's
// MaybeExchangeDevice checks the same thing for the same reason). Calls tied to an object that already
// names its device (cudaEventQuery, cudaEventSynchronize, cudaEventElapsedTime, cudaFree*,
// cudaStreamDestroy, cudaEventDestroy) run without it, which also keeps the free paths free of
// calls that could fail. Stream calls keep it because the legacy default stream (stream_t{0}) is
// the current device's.

namespace {

// The one place a CUDA status becomes an exception. The runtime remembers the last error of
// each thread; clearing it here keeps a handled failure from resurfacing in an unrelated later
// cudaGetLastError (sticky errors, which corrupt the context, cannot be cleared and will
// resurface anyway, which is right).
void check(cudaError_t status, std::string_view call) {
  if (status == cudaSuccess) return;
  (void)cudaGetLastError();
  throw_device_error(call, cudaGetErrorName(status), cudaGetErrorString(status));
}

// The noexcept paths' counterpart of check: logs instead of throwing.
void log_failure(cudaError_t status, std::string_view call) noexcept {
  if (status == cudaSuccess) return;
  (void)cudaGetLastError();
  // At process exit the runtime may already be gone; there is nothing left to release then.
  if (status == cudaErrorCudartUnloading) return;
  try {
    log().error("cuda: {} failed with {}: {}", call, cudaGetErrorName(status),
                cudaGetErrorString(status));
  } catch (...) {
  }
}


// check() for the calls that open the device: "cannot use a GPU here" becomes no_cuda_device.
void check_open(cudaError_t status, std::string_view call) {
  if (status == cudaSuccess) return;
  if (cuda_means_no_device(status)) {
    (void)cudaGetLastError();
    throw_no_cuda_device(call, cudaGetErrorName(status), cudaGetErrorString(status));
  }
  check(status, call);
}

// A driver function through the runtime's driver entry points, so that we need no link against
// libcuda (absent on build machines), in its CUDA 12.0 ABI, which the PFN_ types used with it
// describe. Null when the driver does not provide it.
// Note [Driver entry points]
// cudaGetDriverEntryPointByVersion returns, for a base name ("cuMemCreate", never "_v2"), the
// newest variant of the symbol introduced at or before the version asked for. Every symbol we
// ask for has had one ABI since it appeared (the _v2000, _v6000, _v7000 and _v10020 typedefs of
// cudaTypedefs.h), so 12000 yields exactly the ABI our PFN_ types declare, whichever newer
// driver runs it; asking for CUDART_VERSION instead could hand back a _v2 one day that the
// typedef does not describe. A driver older than the version asked for answers
// cudaErrorInvalidValue, a symbol it lacks cudaDriverEntryPointSymbolNotFound (with a null
// pointer and cudaSuccess): both are "not available", never an exception. None of these symbols
// has a per-thread-stream variant, so cudaEnableDefault selects nothing unexpected.
template <typename Fn>
Fn driver_entry_point(const char* symbol) noexcept {
  void* entry = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
  const cudaError_t status =
      cudaGetDriverEntryPointByVersion(symbol, &entry, 12000, cudaEnableDefault, &found);
#else
  const cudaError_t status = cudaGetDriverEntryPoint(symbol, &entry, cudaEnableDefault, &found);
#endif
  if (status != cudaSuccess || found != cudaDriverEntryPointSuccess || entry == nullptr) {
    (void)cudaGetLastError();
    return Fn{nullptr};
  }
  return reinterpret_cast<Fn>(entry);
}

PFN_cuDevicePrimaryCtxGetState_v7000 primary_ctx_get_state() noexcept {
  static const auto fn =
      driver_entry_point<PFN_cuDevicePrimaryCtxGetState_v7000>("cuDevicePrimaryCtxGetState");
  return fn;
}

bool has_primary_context(int ordinal) noexcept {
  const auto get_state = primary_ctx_get_state();
  // Without the driver's answer, restore: leaving the caller on our device is the worse harm.
  if (get_state == nullptr) return true;
  unsigned int flags = 0;
  int active = 0;
  if (get_state(ordinal, &flags, &active) != CUDA_SUCCESS) return true;
  return active != 0;
}

// See Note [Current device].
class device_scope {
 public:
  explicit device_scope(int ordinal) {
    int current = 0;
    check(cudaGetDevice(&current), "cudaGetDevice");
    if (current == ordinal) return;
    check(cudaSetDevice(ordinal), "cudaSetDevice");
    if (has_primary_context(current)) previous_ = current;
  }
  ~device_scope() {
    if (previous_ >= 0) log_failure(cudaSetDevice(previous_), "cudaSetDevice");
  }
  device_scope(const device_scope&) = delete;
  device_scope& operator=(const device_scope&) = delete;

 private:
  int previous_ = -1;
};

cudaStream_t to_native(stream_t stream) noexcept {
  return reinterpret_cast<cudaStream_t>(static_cast<std::uintptr_t>(stream) >> 1);
}

bool is_owned(stream_t stream) noexcept { return (static_cast<std::uintptr_t>(stream) & 1U) != 0; }

stream_t encode_stream(cudaStream_t native, bool owned, std::string_view call) {
  const auto value = reinterpret_cast<std::uintptr_t>(native);
  if ((value >> (std::numeric_limits<std::uintptr_t>::digits - 1)) != 0) {
    throw_device_error(call, "gpuswap_unencodable_stream",
                       fmt::format("native stream {} has its top bit set and cannot be encoded "
                                   "in a stream_t (see Note [Handle encoding])",
                                   static_cast<const void*>(native)));
  }
  return stream_t{(value << 1) | (owned ? 1U : 0U)};
}

cudaEvent_t to_native(event_t event) noexcept {
  return reinterpret_cast<cudaEvent_t>(static_cast<std::uintptr_t>(event));
}

cudaMemcpyKind to_native(copy_kind kind) noexcept {
  switch (kind) {
    case copy_kind::host_to_device: return cudaMemcpyHostToDevice;
    case copy_kind::device_to_host: return cudaMemcpyDeviceToHost;
    case copy_kind::device_to_device: return cudaMemcpyDeviceToDevice;
    case copy_kind::host_to_host: return cudaMemcpyHostToHost;
  }
  return cudaMemcpyDefault;
}

// OOM is an answer, not an error (device.hpp): null, with the runtime's last error cleared.
void* checked_allocation(cudaError_t status, void* ptr, std::string_view call) {
  if (status == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    return nullptr;
  }
  check(status, call);
  return ptr;
}

// Owns a launched host function from the moment cudaLaunchHostFunc accepts it.
void CUDART_CB run_host_function(void* user_data) {
  std::unique_ptr<std::function<void()>> fn(static_cast<std::function<void()>*>(user_data));
  try {
    (*fn)();
  } catch (const std::exception& e) {
    try {
      log().error("cuda: a launched host function threw: {}", e.what());
    } catch (...) {
    }
  } catch (...) {
    try {
      log().error("cuda: a launched host function threw a non-std exception");
    } catch (...) {
    }
  }
}

// Note [CUDA virtual memory]
// The virtual-memory calls are the driver's (cuMem*), reached through driver_entry_point and
// resolved once, on first use (a function-local static: thread-safe). If any is missing, or
// the device lacks the feature, vm_page_size() is 0 and the calls behave as device.hpp says a
// device without them does. The page is the driver's minimum granularity for device memory (2
// MiB on current GPUs).
// map_pages creates one physical allocation (cuMemCreate) per page and maps each on its own,
// because cuMemUnmap can only unmap whole mappings: the allocator later unmaps single pages in
// the middle of what one call mapped. One cuMemSetAccess then covers the whole span. A
// failure part way undoes what the call had mapped, so a call maps all of its pages or none
// (PyTorch #188008 was a half-done multi-step map): CUDA_ERROR_OUT_OF_MEMORY is the answer
// false, anything else throws. A span larger than the device's memory is false at once rather
// than after creating pages until the driver runs out.
// Unmap and release run without device_scope, like the other free paths (Note [Current
// device]): the cuMem* calls name their memory by address, handle or explicit location, and
// their documented errors include no context error (PyTorch's expandable segments reach
// cuMemCreate on threads with no current context: HAMi-core#172). cuda_device_vm_test checks it
// on a GPU from a thread that never touched CUDA.
// Synchronisation. The driver reference marks cuMemUnmap and cuMemSetAccess "exhibits
// synchronous behavior for most use cases": they may block the calling thread while the GPU's
// page tables change (PyTorch: "at least some synchronous actions with the GPU", milliseconds).
// It does not say that they wait for kernels or copies still using the range, and cuMemRelease
// and cuMemCreate carry no such note; PyTorch found that "MemUnmap and MemRelease do not appear
// to synchronize in all cases" and synchronises the stream first. So unmap_pages does not wait,
// and pulling pages from under enqueued work is the caller's bug (the caching allocator waits
// for an event on each stream, without its lock, before unmapping). Calling these under the
// allocator's mutex costs other threads that much latency; it could deadlock only if the
// driver waited for device work that itself needs the mutex (a launched host function that
// allocates), which none of these calls is documented to do (cudaFree, which synchronises the
// device, would be the one to fear).
// Threads. The driver's calls are thread-safe; vm_mutex_ covers only the bookkeeping, so maps
// and unmaps of disjoint pages from several threads run their driver calls in parallel. A page
// enters vm_pages_ only after it is mapped and accessible and leaves it before it is unmapped,
// each entry moved under the lock by one thread, so no handle is released twice or forgotten;
// overlapping calls (a caller's bug) are refused by the checks or by cuMemMap itself, which maps
// only where nothing is mapped.

struct vmm_driver {
  PFN_cuMemAddressReserve_v10020 address_reserve = nullptr;
  PFN_cuMemAddressFree_v10020 address_free = nullptr;
  PFN_cuMemCreate_v10020 create = nullptr;
  PFN_cuMemRelease_v10020 release = nullptr;
  PFN_cuMemMap_v10020 map = nullptr;
  PFN_cuMemUnmap_v10020 unmap = nullptr;
  PFN_cuMemSetAccess_v10020 set_access = nullptr;
  PFN_cuMemGetAllocationGranularity_v10020 granularity = nullptr;
  PFN_cuDeviceGetAttribute_v2000 device_attribute = nullptr;
  PFN_cuGetErrorName_v6000 error_name = nullptr;  // optional: errors then carry the number

  bool complete() const noexcept {
    return address_reserve && address_free && create && release && map && unmap && set_access &&
           granularity && device_attribute;
  }
};

const vmm_driver& vmm() noexcept {
  static const vmm_driver driver = []() noexcept {
    vmm_driver d;
    d.address_reserve = driver_entry_point<PFN_cuMemAddressReserve_v10020>("cuMemAddressReserve");
    d.address_free = driver_entry_point<PFN_cuMemAddressFree_v10020>("cuMemAddressFree");
    d.create = driver_entry_point<PFN_cuMemCreate_v10020>("cuMemCreate");
    d.release = driver_entry_point<PFN_cuMemRelease_v10020>("cuMemRelease");
    d.map = driver_entry_point<PFN_cuMemMap_v10020>("cuMemMap");
    d.unmap = driver_entry_point<PFN_cuMemUnmap_v10020>("cuMemUnmap");
    d.set_access = driver_entry_point<PFN_cuMemSetAccess_v10020>("cuMemSetAccess");
    d.granularity = driver_entry_point<PFN_cuMemGetAllocationGranularity_v10020>(
        "cuMemGetAllocationGranularity");
    d.device_attribute = driver_entry_point<PFN_cuDeviceGetAttribute_v2000>("cuDeviceGetAttribute");
    d.error_name = driver_entry_point<PFN_cuGetErrorName_v6000>("cuGetErrorName");
    return d;
  }();
  return driver;
}

static_assert(sizeof(CUmemGenericAllocationHandle) == sizeof(std::uint64_t));
static_assert(sizeof(CUdeviceptr) == sizeof(std::uintptr_t));

using page_handles = std::map<std::uintptr_t, std::uint64_t>;  // page address -> its allocation

std::string driver_error_name(CUresult status) {
  const char* name = nullptr;
  if (vmm().error_name != nullptr && vmm().error_name(status, &name) == CUDA_SUCCESS &&
      name != nullptr) {
    return name;
  }
  return fmt::format("CUresult {}", static_cast<int>(status));
}

// The noexcept paths' report of a failed driver call.
void log_driver_failure(CUresult status, std::string_view call) noexcept {
  // At process exit the driver may already be gone; there is nothing left to release then.
  if (status == CUDA_SUCCESS || status == CUDA_ERROR_DEINITIALIZED) return;
  try {
    log().error("cuda: {} failed with {}", call, driver_error_name(status));
  } catch (...) {
  }
}

// Plain device memory of `ordinal`: value-initialised, so requestedHandleTypes is
// CU_MEM_HANDLE_TYPE_NONE (no export: nothing is shared across processes, and PyTorch's
// POSIX-fd handles are what need the IPC support), win32HandleMetaData is null and allocFlags
// ask for no compression. Location ids are device ordinals for CU_MEM_LOCATION_TYPE_DEVICE.
CUmemAllocationProp device_allocation(int ordinal) noexcept {
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = ordinal;
  return prop;
}

// Why this device has no virtual memory, once, at info level: expandable segments then fall
// back to whole segments, and "why" is the first thing a user asks.
void log_no_vm(int ordinal, std::string_view why) noexcept {
  try {
    log().info("cuda: no virtual memory management on cuda:{}: {}", ordinal, why);
  } catch (...) {
  }
}

std::size_t query_vm_page_size(int ordinal) noexcept {
  const vmm_driver& d = vmm();
  if (!d.complete()) {
    log_no_vm(ordinal, "the driver lacks a cuMem* call (CUDA 10.2+ driver entry points needed)");
    return 0;
  }
  // The runtime's and the driver's ordinals agree (both honour CUDA_VISIBLE_DEVICES), as
  // has_primary_context assumes too.
  int supported = 0;
  CUresult status = d.device_attribute(
      &supported, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, ordinal);
  if (status != CUDA_SUCCESS || supported == 0) {
    log_no_vm(ordinal, status != CUDA_SUCCESS
                           ? "cuDeviceGetAttribute failed"
                           : "CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED is 0");
    return 0;
  }
  // The minimum, not the recommended, granularity: cuMemCreate's size and cuMemMap's address
  // and size must be multiples of the minimum, and the page is the unit the allocator can give
  // back, so the smaller the better (both are 2 MiB on current GPUs).
  const CUmemAllocationProp prop = device_allocation(ordinal);
  std::size_t granularity = 0;
  status = d.granularity(&granularity, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM);
  if (status != CUDA_SUCCESS) {
    log_no_vm(ordinal, "cuMemGetAllocationGranularity failed");
    return 0;
  }
  // The page doubles as cuMemAddressReserve's alignment, which must be a power of two, and
  // device.hpp promises callers one.
  if (granularity == 0 || (granularity & (granularity - 1)) != 0) {
    log_no_vm(ordinal, "the driver's granularity is not a power of two");
    return 0;
  }
  return granularity;
}

// Note [Oversized reservations]
// device.hpp answers null when the address space is exhausted. The driver says so with
// CUDA_ERROR_OUT_OF_MEMORY when earlier reservations used it up, but its documentation does not
// say which error a single request larger than the whole space gets (2^52 bytes, say, against
// the 2^47 bytes of user space a UVA reservation must also fit in on x86-64), and
// CUDA_ERROR_INVALID_VALUE is the other candidate. Our arguments are always valid (a nonzero
// multiple of the page, a power-of-two alignment, no hint, no flags), so when the driver answers
// CUDA_ERROR_INVALID_VALUE yet reserves one page fine, the size was the problem: null, not an
// exception. If one page fails too, something else is wrong and the original error is thrown.
bool page_reservation_works(std::size_t page) noexcept {
  CUdeviceptr probe = 0;
  if (vmm().address_reserve(&probe, page, page, 0, 0) != CUDA_SUCCESS) return false;
  log_driver_failure(vmm().address_free(probe, page), "cuMemAddressFree");
  return true;
}

bool inside_one_reservation(const std::map<std::uintptr_t, std::size_t>& reservations,
                            std::uintptr_t base, std::size_t bytes) noexcept {
  auto it = reservations.upper_bound(base);
  if (it == reservations.begin()) return false;
  --it;
  const std::uintptr_t end = it->first + it->second;
  return base < end && bytes <= end - base;
}

// Moves the entries of [base, base + bytes) from `from` to `to` (node moves: no allocation).
void extract_pages(page_handles& from, std::uintptr_t base, std::size_t bytes,
                   page_handles& to) noexcept {
  auto it = from.lower_bound(base);
  while (it != from.end() && it->first - base < bytes) {
    auto next = std::next(it);
    to.insert(from.extract(it));
    it = next;
  }
}

// Unmaps each page and releases its allocation; the memory is free once both are done.
void release_pages(const page_handles& pages, std::size_t page) noexcept {
  const vmm_driver& d = vmm();
  for (const auto& [address, handle] : pages) {
    log_driver_failure(d.unmap(address, page), "cuMemUnmap");
    log_driver_failure(d.release(handle), "cuMemRelease");
  }
}

}  // namespace

int cuda_device::device_count(std::string* why) noexcept {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    if (why != nullptr) {
      try {
        *why = fmt::format("cudaGetDeviceCount returned {} ({})", cudaGetErrorName(status),
                           cudaGetErrorString(status));
      } catch (...) {
      }
    }
    return 0;
  }
  if (count == 0 && why != nullptr) {
    try {
      *why = "cudaGetDeviceCount found 0 devices";
    } catch (...) {
    }
  }
  return count;
}

cuda_device::cuda_device(int ordinal) : ordinal_(ordinal) {
  int count = 0;
  check_open(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (count == 0) {
    throw_no_cuda_device("cudaGetDeviceCount", cudaGetErrorName(cudaErrorNoDevice),
                         "the driver reports 0 devices");
  }
  if (ordinal < 0 || ordinal >= count) {
    throw_no_cuda_device("cudaGetDeviceCount", cudaGetErrorName(cudaErrorInvalidDevice),
                         fmt::format("ordinal {} requested, {} device(s) visible", ordinal, count));
  }
  // Opening the device initialises its primary context: failures that mean the device cannot
  // be used here (exclusive-process mode, driver mismatch) surface now, as no_cuda_device.
  int current = 0;
  check_open(cudaGetDevice(&current), "cudaGetDevice");
  check_open(cudaSetDevice(ordinal), "cudaSetDevice");
  // Like device_scope, but the device was just opened by hand above.
  struct restore_caller {
    int previous;
    ~restore_caller() {
      if (previous >= 0) log_failure(cudaSetDevice(previous), "cudaSetDevice");
    }
  } restore{current != ordinal && has_primary_context(current) ? current : -1};
  cudaDeviceProp props{};
  check(cudaGetDeviceProperties(&props, ordinal), "cudaGetDeviceProperties");
  name_ = fmt::format("{} (cuda:{})", props.name, ordinal);
  total_memory_ = props.totalGlobalMem;
  vm_page_size_ = query_vm_page_size(ordinal);
  check(cudaDeviceGetStreamPriorityRange(&least_priority_, &greatest_priority_),
        "cudaDeviceGetStreamPriorityRange");
}

cuda_device::~cuda_device() {
  std::unordered_set<std::uintptr_t> streams;
  std::unordered_set<std::uintptr_t> events;
  {
    std::lock_guard lock(registry_mutex_);
    streams.swap(owned_streams_);
    events.swap(owned_events_);
  }
  for (const auto native : events) {
    log_failure(cudaEventDestroy(reinterpret_cast<cudaEvent_t>(native)), "cudaEventDestroy");
  }
  for (const auto native : streams) {
    log_failure(cudaStreamDestroy(reinterpret_cast<cudaStream_t>(native)), "cudaStreamDestroy");
  }
  // What callers left mapped or reserved (their bug, but the memory is the GPU's).
  page_handles pages;
  std::map<std::uintptr_t, std::size_t> reservations;
  {
    std::lock_guard lock(vm_mutex_);
    pages.swap(vm_pages_);
    reservations.swap(vm_reservations_);
  }
  if (vm_page_size_ != 0) {
    release_pages(pages, vm_page_size_);
    for (const auto& [base, bytes] : reservations) {
      log_driver_failure(vmm().address_free(base, bytes), "cuMemAddressFree");
    }
  }
}

std::string cuda_device::name() const { return name_; }

int cuda_device::ordinal() const noexcept { return ordinal_; }

// --- memory ---------------------------------------------------------------------------------

void* cuda_device::allocate_device(std::size_t bytes) {
  if (bytes == 0) return nullptr;
  device_scope scope(ordinal_);
  void* ptr = nullptr;
  return checked_allocation(cudaMalloc(&ptr, bytes), ptr, "cudaMalloc");
}

void cuda_device::free_device(void* ptr) noexcept {
  if (ptr == nullptr) return;
  log_failure(cudaFree(ptr), "cudaFree");
}

void* cuda_device::allocate_pinned(std::size_t bytes) {
  if (bytes == 0) return nullptr;
  device_scope scope(ordinal_);
  void* ptr = nullptr;
  // Portable: pinned for every device's context, since a node-wide host pool may hand the
  // buffer to another device's copies.
  return checked_allocation(cudaHostAlloc(&ptr, bytes, cudaHostAllocPortable), ptr,
                            "cudaHostAlloc");
}

void cuda_device::free_pinned(void* ptr) noexcept {
  if (ptr == nullptr) return;
  log_failure(cudaFreeHost(ptr), "cudaFreeHost");
}

void* cuda_device::allocate_managed(std::size_t bytes) {
  if (bytes == 0) return nullptr;
  device_scope scope(ordinal_);
  void* ptr = nullptr;
  return checked_allocation(cudaMallocManaged(&ptr, bytes, cudaMemAttachGlobal), ptr,
                            "cudaMallocManaged");
}

void cuda_device::free_managed(void* ptr) noexcept {
  if (ptr == nullptr) return;
  log_failure(cudaFree(ptr), "cudaFree");
}

void cuda_device::prefetch_managed(const void* ptr, std::size_t bytes, bool to_device,
                                   stream_t stream) {
  if (ptr == nullptr || bytes == 0) return;
  device_scope scope(ordinal_);
#if CUDART_VERSION >= 13000
  // CUDA 13 takes a cudaMemLocation (the CUDA 12.2+ _v2 form became the only one).
  cudaMemLocation location{};
  location.type = to_device ? cudaMemLocationTypeDevice : cudaMemLocationTypeHost;
  location.id = to_device ? ordinal_ : 0;
  check(cudaMemPrefetchAsync(ptr, bytes, location, 0, to_native(stream)), "cudaMemPrefetchAsync");
#else
  check(cudaMemPrefetchAsync(ptr, bytes, to_device ? ordinal_ : cudaCpuDeviceId,
                             to_native(stream)),
        "cudaMemPrefetchAsync");
#endif
}

void cuda_device::advise_managed(const void* ptr, std::size_t bytes, managed_advice advice) {
  if (ptr == nullptr || bytes == 0) return;
  cudaMemoryAdvise native_advice = cudaMemAdviseSetPreferredLocation;
  bool on_device = true;
  switch (advice) {
    case managed_advice::prefer_device:
      break;
    case managed_advice::prefer_host:
      on_device = false;
      break;
    case managed_advice::accessed_by_device:
      native_advice = cudaMemAdviseSetAccessedBy;
      break;
  }
  device_scope scope(ordinal_);
#if CUDART_VERSION >= 13000
  cudaMemLocation location{};
  location.type = on_device ? cudaMemLocationTypeDevice : cudaMemLocationTypeHost;
  location.id = on_device ? ordinal_ : 0;
  check(cudaMemAdvise(ptr, bytes, native_advice, location), "cudaMemAdvise");
#else
  check(cudaMemAdvise(ptr, bytes, native_advice, on_device ? ordinal_ : cudaCpuDeviceId),
        "cudaMemAdvise");
#endif
}

memory_info cuda_device::memory() const {
  device_scope scope(ordinal_);
  std::size_t free_bytes = 0;
  std::size_t total_bytes = 0;
  check(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  return {free_bytes, total_bytes};
}

// --- virtual memory (Note [CUDA virtual memory]) --------------------------------------------

std::size_t cuda_device::vm_page_size() const noexcept { return vm_page_size_; }

void* cuda_device::reserve_address_range(std::size_t bytes) {
  const std::size_t page = vm_page_size_;
  if (page == 0) return device::reserve_address_range(bytes);
  if (bytes == 0 || bytes % page != 0) {
    throw_device_error("reserve_address_range", "gpuswap_invalid_value",
                       fmt::format("{} bytes is not a nonzero multiple of the {}-byte page",
                                   bytes, page));
  }
  device_scope scope(ordinal_);
  CUdeviceptr base = 0;
  const CUresult status = vmm().address_reserve(&base, bytes, page, 0, 0);
  if (status == CUDA_ERROR_OUT_OF_MEMORY) return nullptr;
  if (status == CUDA_ERROR_INVALID_VALUE && page_reservation_works(page)) {
    // See Note [Oversized reservations].
    try {
      log().debug("cuda: cuMemAddressReserve of {} bytes answered {} while one page reserves "
                  "fine: no room for it, returning null",
                  bytes, driver_error_name(status));
    } catch (...) {
    }
    return nullptr;
  }
  if (status != CUDA_SUCCESS) {
    throw_device_error("cuMemAddressReserve", driver_error_name(status),
                       fmt::format("reserving {} bytes of address space", bytes));
  }
  try {
    std::lock_guard lock(vm_mutex_);
    vm_reservations_.emplace(base, bytes);
  } catch (...) {
    log_driver_failure(vmm().address_free(base, bytes), "cuMemAddressFree");
    throw;
  }
  return reinterpret_cast<void*>(base);
}

void cuda_device::release_address_range(void* base, std::size_t bytes) noexcept {
  if (vm_page_size_ == 0 || base == nullptr) return;
  const auto address = reinterpret_cast<std::uintptr_t>(base);
  page_handles leftovers;
  bool known = false;
  {
    std::lock_guard lock(vm_mutex_);
    auto it = vm_reservations_.find(address);
    if (it != vm_reservations_.end() && it->second == bytes) {
      known = true;
      vm_reservations_.erase(it);
      extract_pages(vm_pages_, address, bytes, leftovers);
    }
  }
  if (!known) {
    try {
      log().error("cuda: release_address_range of [{}, +{}), not a reservation of this device",
                  base, bytes);
    } catch (...) {
    }
    return;
  }
  if (!leftovers.empty()) {
    try {
      log().debug("cuda: release_address_range [{}, +{}) unmaps {} page(s) still mapped (the "
                  "caller's bug: device.hpp asks for every page to be unmapped first)",
                  base, bytes, leftovers.size());
    } catch (...) {
    }
    release_pages(leftovers, vm_page_size_);
  }
  log_driver_failure(vmm().address_free(address, bytes), "cuMemAddressFree");
}

bool cuda_device::map_pages(void* ptr, std::size_t bytes) {
  const std::size_t page = vm_page_size_;
  if (page == 0) return device::map_pages(ptr, bytes);
  const auto base = reinterpret_cast<std::uintptr_t>(ptr);
  if (bytes == 0 || bytes % page != 0 || base % page != 0) {
    throw_device_error("map_pages", "gpuswap_invalid_value",
                       fmt::format("[{}, +{}) is not a nonzero number of whole {}-byte pages",
                                   ptr, bytes, page));
  }
  {
    std::lock_guard lock(vm_mutex_);
    if (!inside_one_reservation(vm_reservations_, base, bytes)) {
      throw_device_error("map_pages", "gpuswap_invalid_value",
                         fmt::format("[{}, +{}) is not inside one reserved address range", ptr,
                                     bytes));
    }
    auto mapped = vm_pages_.lower_bound(base);
    if (mapped != vm_pages_.end() && mapped->first - base < bytes) {
      throw_device_error("map_pages", "gpuswap_invalid_value",
                         fmt::format("[{}, +{}) has pages mapped already", ptr, bytes));
    }
  }
  if (bytes > total_memory_) return false;
  device_scope scope(ordinal_);
  const vmm_driver& d = vmm();
  const CUmemAllocationProp prop = device_allocation(ordinal_);
  page_handles fresh;
  CUresult status = CUDA_SUCCESS;
  std::string_view failed_call;
  for (std::uintptr_t address = base; address - base < bytes; address += page) {
    CUmemGenericAllocationHandle handle = 0;
    status = d.create(&handle, page, &prop, 0);
    if (status != CUDA_SUCCESS) {
      failed_call = "cuMemCreate";
      break;
    }
    status = d.map(address, page, 0, handle, 0);
    if (status != CUDA_SUCCESS) {
      log_driver_failure(d.release(handle), "cuMemRelease");
      failed_call = "cuMemMap";
      break;
    }
    try {
      fresh.emplace(address, handle);
    } catch (...) {
      log_driver_failure(d.unmap(address, page), "cuMemUnmap");
      log_driver_failure(d.release(handle), "cuMemRelease");
      release_pages(fresh, page);
      throw;
    }
  }
  if (status == CUDA_SUCCESS) {
    CUmemAccessDesc access{};
    access.location = prop.location;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    status = d.set_access(base, bytes, &access, 1);
    if (status != CUDA_SUCCESS) failed_call = "cuMemSetAccess";
  }
  if (status != CUDA_SUCCESS) {
    release_pages(fresh, page);
    if (status == CUDA_ERROR_OUT_OF_MEMORY) return false;
    throw_device_error(failed_call, driver_error_name(status),
                       fmt::format("mapping [{}, +{})", ptr, bytes));
  }
  std::lock_guard lock(vm_mutex_);
  vm_pages_.merge(fresh);
  return true;
}

void cuda_device::unmap_pages(void* ptr, std::size_t bytes) noexcept {
  const std::size_t page = vm_page_size_;
  if (page == 0 || ptr == nullptr || bytes == 0) return;
  const auto base = reinterpret_cast<std::uintptr_t>(ptr);
  if (bytes % page != 0 || base % page != 0) {
    try {
      log().error("cuda: unmap_pages of [{}, +{}) ignored: not whole {}-byte pages", ptr, bytes,
                  page);
    } catch (...) {
    }
    return;
  }
  page_handles gone;
  {
    std::lock_guard lock(vm_mutex_);
    extract_pages(vm_pages_, base, bytes, gone);
  }
  if (gone.size() < bytes / page) {
    try {
      log().debug("cuda: unmap_pages [{}, +{}) skipped {} of its {} pages: not mapped", ptr,
                  bytes, bytes / page - gone.size(), bytes / page);
    } catch (...) {
    }
  }
  release_pages(gone, page);
}

// --- streams --------------------------------------------------------------------------------

void cuda_device::name_stream(stream_t stream, const char* name) noexcept {
#if GPUSWAP_DEVICE_NVTX
  // Without a tool attached this is NVTX's empty stub: nothing to gate.
  if (name != nullptr) nvtxNameCudaStreamA(to_native(stream), name);
#else
  (void)stream;
  (void)name;
#endif
}

stream_t cuda_device::create_stream(stream_priority priority) {
  // CUDA numbers priorities downwards: greatest_priority_ <= least_priority_. "normal" is the
  // runtime's default priority (0, clamped into the range), the one framework streams get, so
  // that a normal stream competes with them as an equal; on current GPUs it equals "low".
  int native_priority = 0;
  switch (priority) {
    case stream_priority::low:
      native_priority = least_priority_;
      break;
    case stream_priority::normal:
      native_priority = std::clamp(0, greatest_priority_, least_priority_);
      break;
    case stream_priority::high:
      native_priority = greatest_priority_;
      break;
  }
  device_scope scope(ordinal_);
  cudaStream_t native = nullptr;
  check(cudaStreamCreateWithPriority(&native, cudaStreamNonBlocking, native_priority),
        "cudaStreamCreateWithPriority");
  stream_t handle{};
  try {
    handle = encode_stream(native, /*owned=*/true, "cudaStreamCreateWithPriority");
    std::lock_guard lock(registry_mutex_);
    owned_streams_.insert(reinterpret_cast<std::uintptr_t>(native));
  } catch (...) {
    log_failure(cudaStreamDestroy(native), "cudaStreamDestroy");
    throw;
  }
  return handle;
}

stream_t cuda_device::wrap_native_stream(void* native) {
  return encode_stream(static_cast<cudaStream_t>(native), /*owned=*/false, "wrap_native_stream");
}

void* cuda_device::native_stream(stream_t stream) const {
  return static_cast<void*>(to_native(stream));
}

void cuda_device::destroy_stream(stream_t stream) noexcept {
  if (!is_owned(stream)) return;  // wrapped: forgetting it is all there is to do
  cudaStream_t native = to_native(stream);
  bool known = false;
  {
    std::lock_guard lock(registry_mutex_);
    known = owned_streams_.erase(reinterpret_cast<std::uintptr_t>(native)) == 1;
  }
  if (!known) {
    try {
      log().warn("cuda: destroy_stream of a stream this device does not own ({})",
                    static_cast<const void*>(native));
    } catch (...) {
    }
    return;
  }
  log_failure(cudaStreamDestroy(native), "cudaStreamDestroy");
}

stream_t cuda_device::default_stream() { return stream_t{0}; }

void cuda_device::synchronize_stream(stream_t stream) {
  // The legacy default stream is the current device's.
  device_scope scope(ordinal_);
  check(cudaStreamSynchronize(to_native(stream)), "cudaStreamSynchronize");
}

void cuda_device::synchronize() {
  device_scope scope(ordinal_);
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

// --- events ---------------------------------------------------------------------------------

event_t cuda_device::create_event() {
  device_scope scope(ordinal_);
  cudaEvent_t native = nullptr;
  // cudaEventDefault keeps timing on, which elapsed_ms needs.
  check(cudaEventCreateWithFlags(&native, cudaEventDefault), "cudaEventCreateWithFlags");
  const auto value = reinterpret_cast<std::uintptr_t>(native);
  try {
    std::lock_guard lock(registry_mutex_);
    owned_events_.insert(value);
  } catch (...) {
    log_failure(cudaEventDestroy(native), "cudaEventDestroy");
    throw;
  }
  return event_t{value};
}

void cuda_device::destroy_event(event_t event) noexcept {
  const auto value = static_cast<std::uintptr_t>(event);
  bool known = false;
  {
    std::lock_guard lock(registry_mutex_);
    known = owned_events_.erase(value) == 1;
  }
  if (!known) {
    try {
      log().warn("cuda: destroy_event of an event this device does not own ({:#x})",
                    value);
    } catch (...) {
    }
    return;
  }
  log_failure(cudaEventDestroy(to_native(event)), "cudaEventDestroy");
}

void cuda_device::record_event(event_t event, stream_t stream) {
  device_scope scope(ordinal_);
  check(cudaEventRecord(to_native(event), to_native(stream)), "cudaEventRecord");
}

void cuda_device::wait_event(stream_t stream, event_t event) {
  device_scope scope(ordinal_);
  check(cudaStreamWaitEvent(to_native(stream), to_native(event), 0), "cudaStreamWaitEvent");
}

bool cuda_device::query_event(event_t event) {
  const cudaError_t status = cudaEventQuery(to_native(event));
  if (status == cudaSuccess) return true;
  if (status == cudaErrorNotReady) {
    // Not an error, but the runtime may keep it as the thread's last error; clear it so that a
    // later cudaGetLastError (ours or the host program's) does not report it.
    (void)cudaGetLastError();
    return false;
  }
  check(status, "cudaEventQuery");
  return false;
}

void cuda_device::synchronize_event(event_t event) {
  check(cudaEventSynchronize(to_native(event)), "cudaEventSynchronize");
}

double cuda_device::elapsed_ms(event_t start, event_t end) {
  float ms = 0;
  check(cudaEventElapsedTime(&ms, to_native(start), to_native(end)), "cudaEventElapsedTime");
  return static_cast<double>(ms);
}

// --- work -----------------------------------------------------------------------------------

void cuda_device::copy_async(void* dst, const void* src, std::size_t bytes, copy_kind kind,
                             stream_t stream) {
  if (bytes == 0) return;
  device_scope scope(ordinal_);
  check(cudaMemcpyAsync(dst, src, bytes, to_native(kind), to_native(stream)), "cudaMemcpyAsync");
}

void cuda_device::launch(stream_t stream, const kernel_cost& /*cost*/, std::function<void()> fn,
                         std::span<const touched_buffer> /*touched*/) {
  if (!fn) return;
  auto owned = std::make_unique<std::function<void()>>(std::move(fn));
  device_scope scope(ordinal_);
  check(cudaLaunchHostFunc(to_native(stream), &run_host_function, owned.get()),
        "cudaLaunchHostFunc");
  // The runtime accepted it: run_host_function owns it from now on and deletes it after running.
  static_cast<void>(owned.release());
}

}  // namespace gpuswap
