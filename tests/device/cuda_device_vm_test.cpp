// cuda_device's virtual memory beyond what device_conformance_test.cpp checks on every backend:
// the driver's answers at the edges (address space and memory running out part way), which
// only a GPU can give. Skipped, with the reason, without one.
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
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
// virtual address space (2^48 or 2^49 bytes); the driver answers CUDA_ERROR_OUT_OF_MEMORY.
TEST_F(cuda_device_vm, reserving_more_than_the_address_space_returns_null) {
  void* r = nullptr;
  EXPECT_NO_THROW(r = dev_->reserve_address_range(std::size_t{1} << 52));
  EXPECT_EQ(r, nullptr);
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

}  // namespace
}  // namespace gpuswap
