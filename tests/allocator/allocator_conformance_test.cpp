// What every device backend must give the caching allocator: the same typed suite runs on the
// simulated device (real backing) always, and on a CUDA device when one is present; without one
// the CUDA cases are skipped, visibly, with the reason.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "allocator/caching_allocator.hpp"
#include "core/errors.hpp"
#include "device/device_factory.hpp"
#include "device/sim_device.hpp"
#include "support/cuda_test_backend.hpp"

namespace gpuswap {
namespace {

constexpr std::size_t KiB = std::size_t{1} << 10;
constexpr std::size_t MiB = std::size_t{1} << 20;

struct sim_backend {
  static constexpr const char* name = "sim";
  static std::unique_ptr<device> make(std::string*) {
    sim_options o;
    o.backing = sim_backing::real;
    o.device_capacity = std::size_t{512} << 20;
    return std::make_unique<sim_device>(o);
  }
};

using cuda_backend = testing_support::cuda_test_backend;

// The same suite with large requests served from expandable segments (Note [Expandable
// segments]): on a GPU this runs cuda_device's virtual memory calls under the allocator.
struct sim_expandable_backend : sim_backend {
  static constexpr const char* name = "sim_expandable";
  static constexpr bool expandable = true;
};
struct cuda_expandable_backend : cuda_backend {
  static constexpr const char* name = "cuda_expandable";
  static constexpr bool expandable = true;
};

template <typename Backend>
class allocator_conformance_test : public ::testing::Test {
 protected:
  // A 2 MiB large request reserves a 20 MiB segment, or (expandable) its one 2 MiB page.
  static constexpr bool expandable = requires { Backend::expandable; };
  static constexpr std::size_t large_reserved_for_2mib = expandable ? 2 * MiB : 20 * MiB;

  void SetUp() override {
    std::string why;
    dev_ = Backend::make(&why);
    if (!dev_) {
      GTEST_SKIP() << Backend::name << " backend unavailable: " << why;
    }
    stream_ = dev_->create_stream(stream_priority::normal);
    // A budget well inside any device, so the suite never competes with other processes.
    caching_allocator_options o;
    o.device_limit = std::size_t{256} << 20;
    o.expandable_segments = expandable;
    alloc_ = std::make_unique<caching_allocator>(*dev_, o);
    if constexpr (expandable) {
      if (!alloc_->expandable_segments()) {
        GTEST_SKIP() << dev_->name() << " has no virtual memory management";
      }
    }
  }
  void TearDown() override {
    if (!dev_) return;
    if (alloc_) {
      EXPECT_EQ(alloc_->validate(), "");
    }
    dev_->synchronize();
    alloc_.reset();
    dev_->destroy_stream(stream_);
  }

  // Copies `n` bytes of a pattern into `p` and back through pinned host memory, on the stream.
  bool round_trips(void* p, std::size_t n, unsigned char seed) {
    auto* up = static_cast<unsigned char*>(dev_->allocate_pinned(n));
    auto* down = static_cast<unsigned char*>(dev_->allocate_pinned(n));
    if (up == nullptr || down == nullptr) return false;
    for (std::size_t i = 0; i < n; ++i) up[i] = static_cast<unsigned char>(seed + i * 31);
    std::memset(down, 0, n);
    dev_->copy_async(p, up, n, copy_kind::host_to_device, stream_);
    dev_->copy_async(down, p, n, copy_kind::device_to_host, stream_);
    dev_->synchronize_stream(stream_);
    const bool same = std::memcmp(up, down, n) == 0;
    dev_->free_pinned(up);
    dev_->free_pinned(down);
    return same;
  }

  std::unique_ptr<device> dev_;
  stream_t stream_{};
  std::unique_ptr<caching_allocator> alloc_;
};

using backends = ::testing::Types<sim_backend, cuda_backend, sim_expandable_backend,
                                  cuda_expandable_backend>;
class backend_names {
 public:
  template <typename T>
  static std::string GetName(int) {
    return T::name;
  }
};
TYPED_TEST_SUITE(allocator_conformance_test, backends, backend_names);

TYPED_TEST(allocator_conformance_test, allocates_usable_memory) {
  for (std::size_t n : {std::size_t{1}, std::size_t{4097}, 300 * KiB, 3 * MiB + 5}) {
    void* p = this->alloc_->allocate(n, this->stream_);
    ASSERT_NE(p, nullptr) << n;
    EXPECT_GE(this->alloc_->allocated_size(p), n);
    EXPECT_TRUE(this->round_trips(p, n, static_cast<unsigned char>(n))) << n;
    this->alloc_->deallocate(p);
  }
}

TYPED_TEST(allocator_conformance_test, alignment_is_at_least_256_bytes) {
  std::vector<void*> live;
  for (std::size_t n : {std::size_t{1}, std::size_t{3}, std::size_t{255}, std::size_t{257},
                        std::size_t{1000}, 64 * KiB + 1, MiB, MiB + 1, 11 * MiB + 3}) {
    void* p = this->alloc_->allocate(n, this->stream_);
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(p) % 256, 0u) << n;
    live.push_back(p);
  }
  for (void* p : live) this->alloc_->deallocate(p);
}

TYPED_TEST(allocator_conformance_test, zero_bytes_is_null_and_free_of_null_is_a_no_op) {
  EXPECT_EQ(this->alloc_->allocate(0, this->stream_), nullptr);
  this->alloc_->deallocate(nullptr);
  EXPECT_EQ(this->alloc_->stats().num_device_allocs, 0u);
  EXPECT_EQ(this->alloc_->stats().allocation.all().allocated, 0);
}

TYPED_TEST(allocator_conformance_test, freed_blocks_are_reused_on_the_same_stream) {
  void* p = this->alloc_->allocate(40 * KiB, this->stream_);
  this->alloc_->deallocate(p);
  void* q = this->alloc_->allocate(40 * KiB, this->stream_);
  EXPECT_EQ(q, p);
  EXPECT_EQ(this->alloc_->stats().num_device_allocs, 1u);
  this->alloc_->deallocate(q);
}

TYPED_TEST(allocator_conformance_test, live_blocks_never_overlap) {
  struct span {
    std::uintptr_t begin, end;
  };
  std::vector<void*> live;
  std::vector<span> spans;
  for (int i = 0; i < 200; ++i) {
    const std::size_t range = i % 10 == 0 ? 3 * MiB : 256 * KiB;  // mostly small, some large
    const std::size_t n = 1 + static_cast<std::size_t>(i) * 7919 % range;
    void* p = this->alloc_->allocate(n, this->stream_);
    const auto b = reinterpret_cast<std::uintptr_t>(p);
    for (const span& s : spans) ASSERT_TRUE(b + n <= s.begin || b >= s.end) << i;
    spans.push_back({b, b + n});
    live.push_back(p);
  }
  for (void* p : live) this->alloc_->deallocate(p);
}

TYPED_TEST(allocator_conformance_test, stats_track_allocations) {
  void* p = this->alloc_->allocate(1000, this->stream_);
  void* q = this->alloc_->allocate(2 * MiB, this->stream_);
  auto st = this->alloc_->stats();
  EXPECT_EQ(st.allocation.all().current, 2);
  EXPECT_EQ(st.allocated_bytes.all().current, static_cast<std::int64_t>(1024 + 2 * MiB));
  EXPECT_EQ(st.requested_bytes.all().current, static_cast<std::int64_t>(1000 + 2 * MiB));
  EXPECT_EQ(st.segment.all().current, 2);
  const auto reserved = static_cast<std::int64_t>(2 * MiB + this->large_reserved_for_2mib);
  EXPECT_EQ(st.reserved_bytes.all().current, reserved);
  this->alloc_->deallocate(p);
  this->alloc_->deallocate(q);
  st = this->alloc_->stats();
  EXPECT_EQ(st.allocation.all().current, 0);
  EXPECT_EQ(st.allocated_bytes.all().peak, static_cast<std::int64_t>(1024 + 2 * MiB));
  EXPECT_EQ(st.reserved_bytes.all().current, reserved);
}

TYPED_TEST(allocator_conformance_test, empty_cache_returns_everything_unused) {
  const memory_info before = this->dev_->memory();
  void* p = this->alloc_->allocate(30 * MiB, this->stream_);
  void* q = this->alloc_->allocate(100, this->stream_);
  this->alloc_->deallocate(p);
  this->alloc_->empty_cache();
  auto st = this->alloc_->stats();
  EXPECT_EQ(st.reserved_bytes.all().current, static_cast<std::int64_t>(2 * MiB));  // q's segment
  EXPECT_EQ(st.num_device_frees, 1u);
  this->alloc_->deallocate(q);
  this->alloc_->empty_cache();
  EXPECT_EQ(this->alloc_->stats().reserved_bytes.all().current, 0);
  if constexpr (std::is_same_v<TypeParam, sim_backend>) {
    // Only the model is alone on its device; a real GPU's free memory moves with other users.
    EXPECT_EQ(this->dev_->memory().free_bytes, before.free_bytes);
  }
}

TYPED_TEST(allocator_conformance_test, over_budget_is_out_of_memory) {
  EXPECT_THROW(this->alloc_->allocate(std::size_t{300} << 20, this->stream_), out_of_memory);
  EXPECT_EQ(this->alloc_->stats().num_ooms, 1u);
}

}  // namespace
}  // namespace gpuswap
