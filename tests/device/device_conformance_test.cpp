// The typed conformance suite every Device backend passes: sim_device always (both backings
// where bytes are not inspected), cuda_device when a GPU is present (skipped, with the reason,
// when not).
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <thread>
#include <type_traits>
#include <vector>

#include "core/errors.hpp"
#include "device/device_factory.hpp"
#include "device/sim_device.hpp"
#include "support/cuda_test_backend.hpp"

namespace gpuswap {
namespace {

struct sim_real_backend {
  static constexpr bool has_bytes = true;
  static std::unique_ptr<device> make(std::string*) {
    sim_options o;
    o.device_capacity = std::size_t{256} << 20;
    o.host_capacity = std::size_t{256} << 20;
    return std::make_unique<sim_device>(o);
  }
};

struct sim_phantom_backend {
  static constexpr bool has_bytes = false;
  static std::unique_ptr<device> make(std::string*) {
    sim_options o = sim_preset("h100-pcie5");
    o.backing = sim_backing::phantom;
    return std::make_unique<sim_device>(o);
  }
};

using cuda_backend = testing_support::cuda_test_backend;

template <typename Backend>
class device_conformance : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    dev_ = Backend::make(&why);
    if (!dev_) GTEST_SKIP() << "backend not available here: " << why;
  }
  void TearDown() override {
    if (dev_) dev_->synchronize();
  }
  std::unique_ptr<device> dev_;
};

using backends = ::testing::Types<sim_real_backend, sim_phantom_backend, cuda_backend>;
struct backend_names {
  template <typename T>
  static std::string GetName(int) {
    if (std::is_same_v<T, sim_real_backend>) return "sim_real";
    if (std::is_same_v<T, sim_phantom_backend>) return "sim_phantom";
    return "cuda";
  }
};
TYPED_TEST_SUITE(device_conformance, backends, backend_names);

TYPED_TEST(device_conformance, reports_name_and_memory) {
  device& d = *this->dev_;
  EXPECT_FALSE(d.name().empty());
  const memory_info m = d.memory();
  EXPECT_GT(m.total_bytes, 0u);
  EXPECT_LE(m.free_bytes, m.total_bytes);
}

TYPED_TEST(device_conformance, zero_bytes_and_null_frees_are_defined) {
  device& d = *this->dev_;
  EXPECT_EQ(d.allocate_device(0), nullptr);
  EXPECT_EQ(d.allocate_pinned(0), nullptr);
  EXPECT_EQ(d.allocate_managed(0), nullptr);
  d.free_device(nullptr);
  d.free_pinned(nullptr);
  d.free_managed(nullptr);
}

TYPED_TEST(device_conformance, exhaustion_returns_null_without_throwing) {
  device& d = *this->dev_;
  const std::size_t pib = std::size_t{1} << 50;
  void* p = nullptr;
  EXPECT_NO_THROW(p = d.allocate_device(pib));
  EXPECT_EQ(p, nullptr);
  EXPECT_NO_THROW(p = d.allocate_device(SIZE_MAX));
  EXPECT_EQ(p, nullptr);
  // The device is still usable afterwards.
  void* q = d.allocate_device(4096);
  ASSERT_NE(q, nullptr);
  d.free_device(q);
}

TYPED_TEST(device_conformance, allocations_are_aligned_and_accounted) {
  device& d = *this->dev_;
  const std::size_t before = d.memory().free_bytes;
  void* a = d.allocate_device(std::size_t{8} << 20);
  void* b = d.allocate_device(1000);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(a) % 256, 0u);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(b) % 256, 0u);
  EXPECT_NE(a, b);
  EXPECT_LE(d.memory().free_bytes, before - (std::size_t{8} << 20));
  d.free_device(a);
  d.free_device(b);
  void* h = d.allocate_pinned(1 << 20);
  ASSERT_NE(h, nullptr);
  d.free_pinned(h);
}

TYPED_TEST(device_conformance, streams_and_events_life_cycle) {
  device& d = *this->dev_;
  stream_t s = d.create_stream(stream_priority::high);
  stream_t low = d.create_stream(stream_priority::low);
  event_t e = d.create_event();
  EXPECT_TRUE(d.query_event(e)) << "an event never recorded counts as complete";
  d.record_event(e, s);
  d.wait_event(low, e);
  d.synchronize_event(e);
  EXPECT_TRUE(d.query_event(e));
  d.synchronize_stream(low);
  EXPECT_EQ(d.wrap_native_stream(nullptr), d.default_stream());
  d.destroy_event(e);
  d.destroy_stream(s);
  d.destroy_stream(low);
}

TYPED_TEST(device_conformance, elapsed_time_between_events_is_not_negative) {
  device& d = *this->dev_;
  stream_t s = d.create_stream(stream_priority::normal);
  event_t a = d.create_event();
  event_t b = d.create_event();
  void* buf = d.allocate_pinned(4096);
  ASSERT_NE(buf, nullptr);
  d.record_event(a, s);
  d.launch(s, kernel_cost{1e9, 0, 0}, [] { std::this_thread::sleep_for(std::chrono::milliseconds(2)); },
           {});
  d.record_event(b, s);
  d.synchronize_event(b);
  EXPECT_GT(d.elapsed_ms(a, b), 0.0);
  d.free_pinned(buf);
  d.destroy_event(a);
  d.destroy_event(b);
  d.destroy_stream(s);
}

TYPED_TEST(device_conformance, round_trip_through_pinned_memory_keeps_every_byte) {
  if (!TypeParam::has_bytes) GTEST_SKIP() << "phantom backing has no bytes";
  device& d = *this->dev_;
  const std::size_t n = std::size_t{3} << 20;
  auto* src = static_cast<unsigned char*>(d.allocate_pinned(n));
  auto* dst = static_cast<unsigned char*>(d.allocate_pinned(n));
  void* dev = d.allocate_device(n);
  ASSERT_TRUE(src && dst && dev);
  for (std::size_t i = 0; i < n; ++i) src[i] = static_cast<unsigned char>(i * 131 + 7);
  std::memset(dst, 0, n);
  stream_t s = d.create_stream(stream_priority::normal);
  d.copy_async(dev, src, n, copy_kind::host_to_device, s);
  d.copy_async(dst, dev, n, copy_kind::device_to_host, s);
  d.synchronize_stream(s);
  EXPECT_EQ(std::memcmp(src, dst, n), 0);
  d.free_device(dev);
  d.free_pinned(src);
  d.free_pinned(dst);
  d.destroy_stream(s);
}

// A copy on stream B that waits for an event recorded after a slow kernel on stream A must see
// what the kernel wrote. The kernel runs on host-addressable (pinned) memory so the same test
// runs on CUDA, where launch is a host function in stream order.
TYPED_TEST(device_conformance, event_orders_copy_after_kernel_on_another_stream) {
  if (!TypeParam::has_bytes) GTEST_SKIP() << "phantom backing has no bytes";
  device& d = *this->dev_;
  const std::size_t n = 1 << 20;
  auto* staging = static_cast<unsigned char*>(d.allocate_pinned(n));
  auto* out = static_cast<unsigned char*>(d.allocate_pinned(n));
  void* dev = d.allocate_device(n);
  ASSERT_TRUE(staging && out && dev);
  std::memset(staging, 0, n);
  stream_t a = d.create_stream(stream_priority::normal);
  stream_t b = d.create_stream(stream_priority::normal);
  event_t produced = d.create_event();
  d.launch(a, kernel_cost{1e9, 0, 0},
           [staging, n] {
             std::this_thread::sleep_for(std::chrono::milliseconds(30));
             std::memset(staging, 0xAB, n);
           },
           {});
  d.record_event(produced, a);
  d.wait_event(b, produced);
  d.copy_async(dev, staging, n, copy_kind::host_to_device, b);
  d.copy_async(out, dev, n, copy_kind::device_to_host, b);
  d.synchronize_stream(b);
  EXPECT_EQ(out[0], 0xAB);
  EXPECT_EQ(out[n - 1], 0xAB);
  d.synchronize();
  d.free_device(dev);
  d.free_pinned(staging);
  d.free_pinned(out);
  d.destroy_event(produced);
  d.destroy_stream(a);
  d.destroy_stream(b);
}

TYPED_TEST(device_conformance, managed_memory_can_be_prefetched_and_advised) {
  device& d = *this->dev_;
  const std::size_t n = std::size_t{4} << 20;
  void* m = d.allocate_managed(n);
  ASSERT_NE(m, nullptr);
  stream_t s = d.create_stream(stream_priority::normal);
  d.advise_managed(m, n, managed_advice::prefer_device);
  d.prefetch_managed(m, n, true, s);
  d.prefetch_managed(m, n, false, s);
  d.synchronize_stream(s);
  d.free_managed(m);
  d.destroy_stream(s);
}

// --- virtual memory (device.hpp): skipped, visibly, on a backend without it --------------------

#define SKIP_WITHOUT_VM(d)                                                                    \
  if ((d).vm_page_size() == 0) GTEST_SKIP() << (d).name() << " has no virtual memory management"

TYPED_TEST(device_conformance, vm_reservations_are_page_aligned_and_bad_sizes_throw) {
  device& d = *this->dev_;
  SKIP_WITHOUT_VM(d);
  const std::size_t page = d.vm_page_size();
  EXPECT_EQ(page & (page - 1), 0u) << page;
  void* r = d.reserve_address_range(8 * page);
  ASSERT_NE(r, nullptr);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(r) % page, 0u);
  EXPECT_THROW(d.reserve_address_range(0), device_error);
  EXPECT_THROW(d.reserve_address_range(page + page / 2), device_error);
  char* base = static_cast<char*>(r);
  EXPECT_THROW(d.map_pages(base + page / 2, page), device_error);
  EXPECT_THROW(d.map_pages(base, page / 2), device_error);
  EXPECT_THROW(d.map_pages(base + 7 * page, 2 * page), device_error) << "past the reservation";
  ASSERT_TRUE(d.map_pages(base + 2 * page, 2 * page));
  EXPECT_THROW(d.map_pages(base + 3 * page, 2 * page), device_error) << "a page is mapped";
  d.unmap_pages(base + 2 * page, 2 * page);
  d.release_address_range(r, 8 * page);
}

TYPED_TEST(device_conformance, vm_mapped_pages_count_as_device_memory_until_unmapped) {
  device& d = *this->dev_;
  SKIP_WITHOUT_VM(d);
  const std::size_t page = d.vm_page_size();
  char* r = static_cast<char*>(d.reserve_address_range(16 * page));
  ASSERT_NE(r, nullptr);
  const std::size_t before = d.memory().free_bytes;
  ASSERT_TRUE(d.map_pages(r + 2 * page, 4 * page));
  ASSERT_TRUE(d.map_pages(r + 6 * page, 2 * page));
  EXPECT_LE(d.memory().free_bytes, before - 6 * page);
  d.unmap_pages(r + 3 * page, page);  // one page of the first map, alone
  // Pages of both maps and the hole at once (the hole is skipped).
  d.unmap_pages(r + 2 * page, 6 * page);
  // A real GPU's free memory moves with other processes; allow a page either way.
  EXPECT_GE(d.memory().free_bytes + page, before);
  // Everything can be mapped again, in other pieces.
  ASSERT_TRUE(d.map_pages(r, 16 * page));
  d.unmap_pages(r, 16 * page);
  d.release_address_range(r, 16 * page);
}

TYPED_TEST(device_conformance, vm_map_beyond_the_device_returns_false_and_maps_nothing) {
  device& d = *this->dev_;
  SKIP_WITHOUT_VM(d);
  const std::size_t page = d.vm_page_size();
  const std::size_t bytes = (d.memory().total_bytes / page + 1) * page;
  char* r = static_cast<char*>(d.reserve_address_range(bytes));
  ASSERT_NE(r, nullptr);
  const std::size_t before = d.memory().free_bytes;
  bool mapped = true;
  EXPECT_NO_THROW(mapped = d.map_pages(r, bytes));
  EXPECT_FALSE(mapped);
  EXPECT_GE(d.memory().free_bytes + page, before);
  EXPECT_TRUE(d.map_pages(r, page)) << "nothing was left mapped by the failed call";
  d.unmap_pages(r, page);
  d.release_address_range(r, bytes);
}

TYPED_TEST(device_conformance, vm_copies_through_mapped_pages_keep_every_byte) {
  if (!TypeParam::has_bytes) GTEST_SKIP() << "phantom backing has no bytes";
  device& d = *this->dev_;
  SKIP_WITHOUT_VM(d);
  const std::size_t page = d.vm_page_size();
  char* r = static_cast<char*>(d.reserve_address_range(4 * page));
  char* other = static_cast<char*>(d.reserve_address_range(4 * page));
  ASSERT_TRUE(r && other);
  ASSERT_TRUE(d.map_pages(r, 2 * page));
  ASSERT_TRUE(d.map_pages(r + 2 * page, page));  // the span below crosses two maps
  ASSERT_TRUE(d.map_pages(other, 3 * page));
  const std::size_t n = 3 * page;
  auto* src = static_cast<unsigned char*>(d.allocate_pinned(n));
  auto* dst = static_cast<unsigned char*>(d.allocate_pinned(n));
  ASSERT_TRUE(src && dst);
  for (std::size_t i = 0; i < n; ++i) src[i] = static_cast<unsigned char>(i * 131 + 7);
  std::memset(dst, 0, n);
  stream_t s = d.create_stream(stream_priority::normal);
  d.copy_async(r, src, n, copy_kind::host_to_device, s);
  d.copy_async(other, r, n, copy_kind::device_to_device, s);
  d.copy_async(dst, other, n, copy_kind::device_to_host, s);
  d.synchronize_stream(s);
  EXPECT_EQ(std::memcmp(src, dst, n), 0);
  // Unmapping one page leaves its neighbours' bytes where they were.
  d.unmap_pages(other + page, page);
  std::memset(dst, 0, n);
  d.copy_async(dst, other, page, copy_kind::device_to_host, s);
  d.copy_async(dst + 2 * page, other + 2 * page, page, copy_kind::device_to_host, s);
  d.synchronize_stream(s);
  EXPECT_EQ(std::memcmp(src, dst, page), 0);
  EXPECT_EQ(std::memcmp(src + 2 * page, dst + 2 * page, page), 0);
  d.destroy_stream(s);
  d.free_pinned(src);
  d.free_pinned(dst);
  d.unmap_pages(r, 4 * page);
  d.unmap_pages(other, 4 * page);
  d.release_address_range(r, 4 * page);
  d.release_address_range(other, 4 * page);
}

}  // namespace
}  // namespace gpuswap
