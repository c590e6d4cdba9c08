#pragma once
// nvtx_memory_pool: describes one caching allocator's device memory to NVTX-aware tools with
// NVTX's memory extension (nvToolsExtMem.h), so that Nsight Systems and Compute Sanitizer see
// gpuswap's sub-allocations rather than a few large cudaMalloc segments.
//
//   segment  memory the allocator got from the device: an NVTX heap with usage
//            "sub-allocator" (nvtxMemHeapRegister). Unregistering it drops its blocks too.
//   block    what the allocator hands out inside a segment: a region of that heap
//            (nvtxMemRegionsRegister / nvtxMemRegionsUnregister, by pointer).
//
// The allocator calls register_segment when it maps a segment, register_block / unregister_block
// on alloc / free, unregister_segment when it releases a segment (empty_cache, or trimming
// before an OOM), and reset() when it drops every allocation at once.
//
// Cost: without a tool attached (or with NVTX compiled out, or nvtx_enabled() false) block calls
// are an inline flag test; nothing is tracked. With a tool, each call takes this pool's mutex
// and a map lookup, which only profiling runs pay.
//
// Blocks are found by address: a block outside every registered segment (its segment was mapped
// before the tool attached or while NVTX was switched off) is ignored, and so is unregistering a
// block that was never registered, so the tool only ever sees balanced calls.
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <string_view>

#include "profiler/nvtx_domain.hpp"

namespace gpuswap {

#if defined(GPUSWAP_WITH_NVTX) && GPUSWAP_WITH_NVTX

class nvtx_memory_pool {
 public:
  // `name` labels the heaps in the tool, e.g. "gpuswap cuda:0".
  explicit nvtx_memory_pool(std::string_view name);
  // Unregisters every segment still registered.
  ~nvtx_memory_pool();
  nvtx_memory_pool(const nvtx_memory_pool&) = delete;
  nvtx_memory_pool& operator=(const nvtx_memory_pool&) = delete;

  void register_segment(const void* ptr, std::size_t size) noexcept;
  void unregister_segment(const void* ptr) noexcept;

  void register_block(const void* ptr, std::size_t size) noexcept {
    if (tracking_.load(std::memory_order_acquire) && nvtx_enabled()) {
      register_block_tracked(ptr, size);
    }
  }
  // Not gated on nvtx_enabled(): what the tool was told is taken back even after the switch
  // went off, so its view never keeps a freed block.
  void unregister_block(const void* ptr) noexcept {
    if (tracking_.load(std::memory_order_acquire)) unregister_block_tracked(ptr);
  }

  // Forgets every block of every segment (nvtxMemHeapReset); the segments stay registered.
  void reset() noexcept;

  // What the tool currently knows of this pool; both 0 when no tool is attached.
  std::size_t segment_count() const;
  std::size_t block_count() const;
  const std::string& name() const noexcept { return name_; }

 private:
  struct segment {
    std::size_t size = 0;
    void* heap = nullptr;             // the tool's nvtxMemHeapHandle_t
    std::set<std::uintptr_t> blocks;  // start addresses of the registered blocks
  };

  void register_block_tracked(const void* ptr, std::size_t size) noexcept;
  void unregister_block_tracked(const void* ptr) noexcept;
  // The segment containing [addr, addr + size), or segments_.end().
  std::map<std::uintptr_t, segment>::iterator find_segment(std::uintptr_t addr,
                                                           std::size_t size);

  std::string name_;
  // Set once a tool accepted a heap; until then there is nothing to track.
  std::atomic<bool> tracking_{false};
  // Guards segments_. Held across the NVTX calls (never a device call) so that the tool sees
  // registrations in the same order as segments_ records them.
  mutable std::mutex mutex_;
  std::map<std::uintptr_t, segment> segments_;  // by base address
};

#else  // NVTX compiled out: the same API, empty.

class nvtx_memory_pool {
 public:
  explicit nvtx_memory_pool(std::string_view name) : name_(name) {}
  nvtx_memory_pool(const nvtx_memory_pool&) = delete;
  nvtx_memory_pool& operator=(const nvtx_memory_pool&) = delete;

  void register_segment(const void*, std::size_t) noexcept {}
  void unregister_segment(const void*) noexcept {}
  void register_block(const void*, std::size_t) noexcept {}
  void unregister_block(const void*) noexcept {}
  void reset() noexcept {}
  std::size_t segment_count() const { return 0; }
  std::size_t block_count() const { return 0; }
  const std::string& name() const noexcept { return name_; }

 private:
  std::string name_;
};

#endif

}  // namespace gpuswap
