#pragma once
// reclaimer: the seam through which the caching allocator, short of device memory, asks a higher
// layer (the swap engine) to give some back by evicting idle buffers to the host. The allocator
// defines it and the higher layer implements and registers it, so that arrows point down only.
#include <cstddef>

#include "device/device.hpp"

namespace gpuswap {

class reclaimer {
 public:
  virtual ~reclaimer() = default;
  // Free at least `bytes` of device memory (by evicting idle buffers) if possible; returns the
  // bytes freed (0 if none). `stream` is the stream of the allocation that ran short.
  // Called WITHOUT any allocator lock held; it may call caching_allocator::deallocate (and
  // record_stream), but must not call caching_allocator::remove_reclaimer, which waits for
  // calls in flight to return.
  virtual std::size_t reclaim(std::size_t bytes, stream_t stream) = 0;
};

// What a higher layer reports for the OOM message: memory it moved off the device.
struct external_memory_report {
  std::size_t swapped_out = 0;   // bytes of device buffers currently held on the host
  std::size_t pinned_used = 0;   // pinned host bytes in use
  std::size_t pinned_limit = 0;  // the pinned host budget (host_limit)
};

}  // namespace gpuswap
