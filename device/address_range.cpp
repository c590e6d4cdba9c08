#include "device/address_range.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>

#include "core/errors.hpp"

namespace gpuswap {

namespace {
std::size_t round_up(std::size_t n, std::size_t a) { return (n + a - 1) / a * a; }
// Freed spans at least this big are handed back to the kernel so that a long simulated run
// with real backing does not keep every page it ever touched.
constexpr std::size_t release_threshold = std::size_t{1} << 20;
// The smallest host page of the platforms we run on; mmap's results are aligned to it.
constexpr std::size_t host_page = 4096;
}  // namespace

address_range::address_range(std::size_t reserve_bytes, bool accessible, std::size_t alignment)
    : alignment_(alignment), accessible_(accessible) {
  reserved_ = round_up(reserve_bytes, std::max(std::size_t{2} << 20, alignment));
  // mmap aligns to the host page only: reserve `alignment` more and give the slack at both ends
  // back, so that the base, and with it every allocation, is aligned (the simulated virtual
  // memory's pages are 2 MiB like CUDA's, and callers may rely on it).
  const std::size_t slack = alignment > host_page ? alignment : 0;
  int prot = accessible ? (PROT_READ | PROT_WRITE) : PROT_NONE;
  void* p = mmap(nullptr, reserved_ + slack, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) {
    throw_device_error("mmap", std::strerror(errno), "reserving simulated address space");
  }
  char* raw = static_cast<char*>(p);
  const auto raw_address = reinterpret_cast<std::uintptr_t>(raw);
  const std::size_t head = slack == 0 ? 0 : round_up(raw_address, alignment) - raw_address;
  if (head > 0) munmap(raw, head);
  if (slack - head > 0) munmap(raw + head + reserved_, slack - head);
  base_ = raw + head;
  free_.emplace(0, reserved_);
}

address_range::~address_range() {
  if (base_ != nullptr) munmap(base_, reserved_);
}

void* address_range::allocate(std::size_t bytes) {
  if (bytes == 0 || bytes > reserved_) return nullptr;
  const std::size_t size = round_up(bytes, alignment_);
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < size) continue;
    const std::size_t offset = it->first;
    const std::size_t rest = it->second - size;
    free_.erase(it);
    if (rest > 0) free_.emplace(offset + size, rest);
    live_.emplace(offset, size);
    return base_ + offset;
  }
  return nullptr;
}

std::size_t address_range::free(void* ptr) noexcept {
  if (ptr == nullptr || !contains_address(ptr)) return 0;
  const std::size_t offset = static_cast<std::size_t>(static_cast<char*>(ptr) - base_);
  auto live = live_.find(offset);
  if (live == live_.end()) return 0;
  std::size_t start = offset;
  std::size_t size = live->second;
  live_.erase(live);
  if (accessible_ && size >= release_threshold) madvise(base_ + start, size, MADV_DONTNEED);
  const std::size_t freed = size;
  // Coalesce with the free neighbours on both sides.
  auto next = free_.lower_bound(start);
  if (next != free_.end() && next->first == start + size) {
    size += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == start) {
      start = prev->first;
      size += prev->second;
      free_.erase(prev);
    }
  }
  free_.emplace(start, size);
  return freed;
}

std::optional<address_range::span_info> address_range::find(const void* ptr) const {
  if (!contains_address(ptr)) return std::nullopt;
  const std::size_t offset =
      static_cast<std::size_t>(static_cast<const char*>(ptr) - base_);
  auto it = live_.upper_bound(offset);
  if (it == live_.begin()) return std::nullopt;
  --it;
  if (offset >= it->first + it->second) return std::nullopt;
  return span_info{base_ + it->first, it->second};
}

bool address_range::contains_address(const void* ptr) const noexcept {
  const auto p = reinterpret_cast<std::uintptr_t>(ptr);
  const auto b = reinterpret_cast<std::uintptr_t>(base_);
  return p >= b && p < b + reserved_;
}

}  // namespace gpuswap
