#include "profiler/nvtx_memory_pool.hpp"

#if defined(GPUSWAP_WITH_NVTX) && GPUSWAP_WITH_NVTX
#include <nvtx3/nvToolsExtMem.h>

#include "profiler/nvtx_registry.hpp"

namespace gpuswap {

namespace {

nvtxMemHeapHandle_t as_heap(void* h) noexcept { return static_cast<nvtxMemHeapHandle_t>(h); }

void heap_unregister(void* heap) noexcept {
  nvtxMemHeapUnregister(get_nvtx_registry().domain, as_heap(heap));
}

void regions_unregister(const void* ptr) noexcept {
  nvtxMemRegionRef_t ref{};
  ref.pointer = ptr;
  nvtxMemRegionsUnregisterBatch_t batch{};
  batch.extCompatID = NVTX_EXT_COMPATID_MEM;
  batch.structSize = sizeof batch;
  batch.refType = NVTX_MEM_REGION_REF_TYPE_POINTER;
  batch.refCount = 1;
  batch.refElementSize = sizeof ref;
  batch.refElements = &ref;
  nvtxMemRegionsUnregister(get_nvtx_registry().domain, &batch);
}

}  // namespace

nvtx_memory_pool::nvtx_memory_pool(std::string_view name) : name_(name) {}

nvtx_memory_pool::~nvtx_memory_pool() {
  std::lock_guard lock(mutex_);
  for (auto& [base, seg] : segments_) heap_unregister(seg.heap);
  segments_.clear();
}

void nvtx_memory_pool::register_segment(const void* ptr, std::size_t size) noexcept {
  if (!nvtx_enabled() || ptr == nullptr || size == 0) return;
  const nvtx_registry& r = get_nvtx_registry();

  nvtxMemVirtualRangeDesc_t range{};
  range.size = size;
  range.ptr = ptr;
  nvtxMemHeapDesc_t desc{};
  desc.extCompatID = NVTX_EXT_COMPATID_MEM;
  desc.structSize = sizeof desc;
  desc.usage = NVTX_MEM_HEAP_USAGE_TYPE_SUB_ALLOCATOR;
  desc.type = NVTX_MEM_TYPE_VIRTUAL_ADDRESS;
  desc.typeSpecificDescSize = sizeof range;
  desc.typeSpecificDesc = &range;
  desc.category = nvtx_category_id(nvtx_category::alloc);
  desc.messageType = NVTX_MESSAGE_TYPE_ASCII;
  desc.message.ascii = name_.c_str();

  std::lock_guard lock(mutex_);
  const auto base = reinterpret_cast<std::uintptr_t>(ptr);
  if (segments_.contains(base)) return;  // registered twice: keep the first
  nvtxMemHeapHandle_t heap = nvtxMemHeapRegister(r.domain, &desc);
  // Null is both "no tool" and the process-wide heap, which a registration never returns.
  if (heap == nullptr) return;
  try {
    segments_.emplace(base, segment{size, heap, {}});
  } catch (...) {  // bad_alloc: take the heap back rather than track it half
    heap_unregister(heap);
    return;
  }
  tracking_.store(true, std::memory_order_release);
}

void nvtx_memory_pool::unregister_segment(const void* ptr) noexcept {
  if (!tracking_.load(std::memory_order_acquire)) return;
  std::lock_guard lock(mutex_);
  auto it = segments_.find(reinterpret_cast<std::uintptr_t>(ptr));
  if (it == segments_.end()) return;
  heap_unregister(it->second.heap);
  segments_.erase(it);
}

std::map<std::uintptr_t, nvtx_memory_pool::segment>::iterator nvtx_memory_pool::find_segment(
    std::uintptr_t addr, std::size_t size) {
  auto it = segments_.upper_bound(addr);
  if (it == segments_.begin()) return segments_.end();
  --it;
  const std::uintptr_t base = it->first;
  const std::size_t seg_size = it->second.size;
  if (addr - base >= seg_size || size > seg_size - (addr - base)) return segments_.end();
  return it;
}

void nvtx_memory_pool::register_block_tracked(const void* ptr, std::size_t size) noexcept {
  if (ptr == nullptr || size == 0) return;
  std::lock_guard lock(mutex_);
  const auto addr = reinterpret_cast<std::uintptr_t>(ptr);
  auto it = find_segment(addr, size);
  if (it == segments_.end()) return;
  // std::set::insert may throw bad_alloc; dropping one annotation beats terminating.
  try {
    if (!it->second.blocks.insert(addr).second) return;  // already registered
  } catch (...) {
    return;
  }

  nvtxMemVirtualRangeDesc_t range{};
  range.size = size;
  range.ptr = ptr;
  nvtxMemRegionHandle_t handle = nullptr;
  nvtxMemRegionsRegisterBatch_t batch{};
  batch.extCompatID = NVTX_EXT_COMPATID_MEM;
  batch.structSize = sizeof batch;
  batch.regionType = NVTX_MEM_TYPE_VIRTUAL_ADDRESS;
  batch.heap = as_heap(it->second.heap);
  batch.regionCount = 1;
  batch.regionDescElementSize = sizeof range;
  batch.regionDescElements = &range;
  batch.regionHandleElementsOut = &handle;
  nvtxMemRegionsRegister(get_nvtx_registry().domain, &batch);
}

void nvtx_memory_pool::unregister_block_tracked(const void* ptr) noexcept {
  std::lock_guard lock(mutex_);
  const auto addr = reinterpret_cast<std::uintptr_t>(ptr);
  auto it = find_segment(addr, 1);
  if (it == segments_.end() || it->second.blocks.erase(addr) == 0) return;
  regions_unregister(ptr);
}

void nvtx_memory_pool::reset() noexcept {
  if (!tracking_.load(std::memory_order_acquire)) return;
  std::lock_guard lock(mutex_);
  for (auto& [base, seg] : segments_) {
    if (seg.blocks.empty()) continue;
    nvtxMemHeapReset(get_nvtx_registry().domain, as_heap(seg.heap));
    seg.blocks.clear();
  }
}

std::size_t nvtx_memory_pool::segment_count() const {
  std::lock_guard lock(mutex_);
  return segments_.size();
}

std::size_t nvtx_memory_pool::block_count() const {
  std::lock_guard lock(mutex_);
  std::size_t n = 0;
  for (const auto& [base, seg] : segments_) n += seg.blocks.size();
  return n;
}

}  // namespace gpuswap
#endif
