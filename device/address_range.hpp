#pragma once
// address_range: a reserved span of virtual addresses carved into allocations, first fit with
// coalescing. The simulator uses one per memory kind so that its addresses are unique, aligned
// and checkable, and so that `phantom` memory (PROT_NONE: addresses without bytes) faults loudly
// if anything dereferences it.
#include <cstddef>
#include <map>
#include <optional>

namespace gpuswap {

class address_range {
 public:
  // Reserves `reserve_bytes` of address space; `accessible` maps it read/write (pages are only
  // backed when touched), otherwise PROT_NONE. The base and every allocation are aligned to
  // `alignment`. Throws device_error if the reservation fails.
  address_range(std::size_t reserve_bytes, bool accessible, std::size_t alignment);
  ~address_range();
  address_range(const address_range&) = delete;
  address_range& operator=(const address_range&) = delete;

  // nullptr when no free span is large enough. `bytes` must be > 0.
  void* allocate(std::size_t bytes);
  // Returns the allocation's rounded size, or 0 if `ptr` is not the start of a live allocation.
  std::size_t free(void* ptr) noexcept;

  struct span_info {
    char* base;
    std::size_t bytes;
  };
  // The live allocation containing `ptr`, if any.
  std::optional<span_info> find(const void* ptr) const;
  bool contains_address(const void* ptr) const noexcept;

 private:
  char* base_ = nullptr;
  std::size_t reserved_ = 0;
  std::size_t alignment_;
  bool accessible_;
  std::map<std::size_t, std::size_t> free_;  // offset -> bytes, coalesced
  std::map<std::size_t, std::size_t> live_;  // offset -> bytes
};

}  // namespace gpuswap
