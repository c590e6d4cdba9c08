// cuda_device's virtual memory beyond what device_conformance_test.cpp checks on every backend:
// the driver's answers at the edges (address space and memory running out part way), access on
// pages mapped again, the bookkeeping under several threads, and the free paths on a thread
// with no current device, which only a GPU can give. Skipped, with the reason, without one.
#include <gtest/gtest.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/errors.hpp"
#include "device/device.hpp"
#include "support/cuda_test_backend.hpp"

namespace gpuswap {
namespace {

class cuda_device_vm : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    dev_ = testing_support::cuda_test_backend::make(&why);
    if (!dev_) GTEST_SKIP() << "no CUDA device: " << why;
    page_ = dev_->vm_page_size();
    if (page_ == 0) GTEST_SKIP() << dev_->name() << " has no virtual memory management";
  }
  std::unique_ptr<device> dev_;
  std::size_t page_ = 0;
};

TEST_F(cuda_device_vm, page_size_is_the_drivers_granularity) {
  // 2 MiB on every GPU since Pascal; a power of two in any case.
  EXPECT_EQ(page_ & (page_ - 1), 0u) << page_;
  EXPECT_GE(page_, std::size_t{64} << 10);
  RecordProperty("vm_page_size", std::to_string(page_));
}

// device.hpp: nullptr when the address space is exhausted. 2^52 bytes is beyond any GPU's
// virtual address space (2^48 or 2^49 bytes) and beyond the 2^47 bytes of x86-64 user space a
// UVA reservation must also fit in; whether the driver answers CUDA_ERROR_OUT_OF_MEMORY or
// CUDA_ERROR_INVALID_VALUE, the answer is null (Note [Oversized reservations]).
TEST_F(cuda_device_vm, reserving_more_than_the_address_space_returns_null) {
  for (const int log2 : {52, 60}) {
    void* r = nullptr;
    EXPECT_NO_THROW(r = dev_->reserve_address_range(std::size_t{1} << log2)) << "2^" << log2;
    EXPECT_EQ(r, nullptr) << "2^" << log2;
  }
  // The device still reserves.
  void* small = dev_->reserve_address_range(page_);
  EXPECT_NE(small, nullptr);
  dev_->release_address_range(small, page_);
}

// Less than the device's total but more than is free: cuMemCreate runs out part way, and the
// pages already made must be given back (Note [CUDA virtual memory]).
TEST_F(cuda_device_vm, a_map_that_runs_out_part_way_returns_false_and_gives_back_its_pages) {
  const memory_info info = dev_->memory();
  // What the context and other processes hold keeps the total out of reach.
  const std::size_t bytes = info.total_bytes / page_ * page_;
  ASSERT_GT(bytes, info.free_bytes) << "the whole device is free: nothing to run out of";
  char* r = static_cast<char*>(dev_->reserve_address_range(bytes));
  ASSERT_NE(r, nullptr);
  bool mapped = true;
  EXPECT_NO_THROW(mapped = dev_->map_pages(r, bytes));
  EXPECT_FALSE(mapped);
  EXPECT_GE(dev_->memory().free_bytes + 64 * page_, info.free_bytes)
      << "the pages mapped before the driver ran out were not all given back";
  // The device still maps.
  ASSERT_TRUE(dev_->map_pages(r, 4 * page_));
  dev_->unmap_pages(r, 4 * page_);
  dev_->release_address_range(r, bytes);
}

// Each page is its own allocation: unmapping every other page of one map frees half of it.
TEST_F(cuda_device_vm, unmapping_single_pages_of_one_map_frees_their_memory) {
  constexpr std::size_t pages = 64;
  char* r = static_cast<char*>(dev_->reserve_address_range(pages * page_));
  ASSERT_NE(r, nullptr);
  ASSERT_TRUE(dev_->map_pages(r, pages * page_));
  const std::size_t mapped_free = dev_->memory().free_bytes;
  for (std::size_t i = 0; i < pages; i += 2) dev_->unmap_pages(r + i * page_, page_);
  EXPECT_GE(dev_->memory().free_bytes + 2 * page_, mapped_free + pages / 2 * page_);
  // The holes can be mapped again, one page each, and the rest unmapped in one call.
  for (std::size_t i = 0; i < pages; i += 2) ASSERT_TRUE(dev_->map_pages(r + i * page_, page_));
  // A mapping starts with no access (cuMemUnmap's documentation): the pages mapped again must
  // have been given it, or this copy faults. It also crosses eight separate mappings.
  const std::size_t n = 8 * page_;
  auto* src = static_cast<unsigned char*>(dev_->allocate_pinned(n));
  auto* dst = static_cast<unsigned char*>(dev_->allocate_pinned(n));
  ASSERT_TRUE(src != nullptr && dst != nullptr);
  for (std::size_t i = 0; i < n; ++i) src[i] = static_cast<unsigned char>(i * 197 + 3);
  std::memset(dst, 0, n);
  const stream_t s = dev_->create_stream(stream_priority::normal);
  dev_->copy_async(r, src, n, copy_kind::host_to_device, s);
  dev_->copy_async(dst, r, n, copy_kind::device_to_host, s);
  dev_->synchronize_stream(s);
  EXPECT_EQ(std::memcmp(src, dst, n), 0);
  dev_->destroy_stream(s);
  dev_->free_pinned(src);
  dev_->free_pinned(dst);
  dev_->unmap_pages(r, pages * page_);
  dev_->release_address_range(r, pages * page_);
}

TEST_F(cuda_device_vm, release_unmaps_pages_left_mapped) {
  char* r = static_cast<char*>(dev_->reserve_address_range(8 * page_));
  ASSERT_NE(r, nullptr);
  const std::size_t before = dev_->memory().free_bytes;
  ASSERT_TRUE(dev_->map_pages(r + page_, 4 * page_));
  dev_->release_address_range(r, 8 * page_);
  EXPECT_GE(dev_->memory().free_bytes + page_, before);
}

// The caching allocator maps and unmaps from whichever thread allocates or frees. Each thread
// works on its own pages of one reservation, mapping, unmapping single pages out of order and
// mapping again; the bookkeeping (one map of page -> handle for the device) must come out
// exact: every page's memory given back, and no stale entry left, which would make the final
// map of the whole range throw "has pages mapped already".
TEST_F(cuda_device_vm, threads_map_and_unmap_disjoint_pages_at_once) {
  constexpr std::size_t threads = 8;
  constexpr std::size_t pages_each = 4;
  constexpr int rounds = 25;
  const std::size_t bytes = threads * pages_each * page_;
  char* r = static_cast<char*>(dev_->reserve_address_range(bytes));
  ASSERT_NE(r, nullptr);
  const std::size_t before = dev_->memory().free_bytes;
  std::atomic<int> failures{0};
  std::vector<std::thread> workers;
  for (std::size_t t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      char* mine = r + t * pages_each * page_;
      try {
        for (int i = 0; i < rounds; ++i) {
          if (!dev_->map_pages(mine, pages_each * page_)) {
            ++failures;
            return;
          }
          dev_->unmap_pages(mine + 2 * page_, page_);
          dev_->unmap_pages(mine, page_);
          if (!dev_->map_pages(mine, page_)) {
            ++failures;
            return;
          }
          dev_->unmap_pages(mine, pages_each * page_);  // page 2 is skipped: not mapped
        }
      } catch (...) {
        ++failures;
      }
    });
  }
  for (auto& w : workers) w.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_GE(dev_->memory().free_bytes + 2 * page_, before) << "pages were not given back";
  ASSERT_TRUE(dev_->map_pages(r, bytes)) << "out of memory with nothing else mapped";
  dev_->unmap_pages(r, bytes);
  dev_->release_address_range(r, bytes);
}

// The free paths make no device current (Note [CUDA virtual memory]): unmapping and releasing
// from a thread that never called CUDA must still give the memory back. A driver that wanted a
// current context would fail cuMemUnmap there, which unmap_pages can only log: the memory would
// stay used.
TEST_F(cuda_device_vm, a_thread_that_never_used_cuda_unmaps_and_releases) {
  constexpr std::size_t pages = 16;
  const std::size_t bytes = pages * page_;
  char* r = static_cast<char*>(dev_->reserve_address_range(bytes));
  ASSERT_NE(r, nullptr);
  const std::size_t before = dev_->memory().free_bytes;
  ASSERT_TRUE(dev_->map_pages(r, bytes));
  EXPECT_LE(dev_->memory().free_bytes, before - bytes);
  std::thread([&] {
    dev_->unmap_pages(r, bytes / 2);
    dev_->release_address_range(r, bytes);  // unmaps the other half first
  }).join();
  EXPECT_GE(dev_->memory().free_bytes + page_, before);
}

}  // namespace
}  // namespace gpuswap
