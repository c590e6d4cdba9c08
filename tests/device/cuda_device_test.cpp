// cuda_device and the backend factory. Each test branches on cuda_available(): without a GPU
// (build machines, CI) it checks that the CUDA backend says so cleanly and the factory falls
// back; with one it checks that cuda_device really works. The branch that does not apply is
// skipped with its reason. The typed Device conformance suite is device_conformance_test.cpp.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/errors.hpp"
#include "core/logging.hpp"
#include "device/device_factory.hpp"
#if defined(GPUSWAP_HAVE_CUDA)
#include "device/cuda_device.hpp"
#endif

namespace gpuswap {
namespace {

bool starts_with(const std::string& text, std::string_view prefix) {
  return text.rfind(prefix, 0) == 0;
}

// --- without a GPU ----------------------------------------------------------------------------

class CudaDeviceWithoutGpu : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_available()) GTEST_SKIP() << "a CUDA device is present: the no-GPU checks do not apply";
  }
};

TEST_F(CudaDeviceWithoutGpu, ConstructionThrowsNoCudaDevice) {
#if defined(GPUSWAP_HAVE_CUDA)
  for (int attempt = 0; attempt < 2; ++attempt) {  // no state left behind by the first failure
    try {
      cuda_device device(0);
      FAIL() << "cuda_device constructed without a CUDA device: " << device.name();
    } catch (const no_cuda_device& e) {
      EXPECT_NE(std::string(e.what()).find("no CUDA device"), std::string::npos) << e.what();
      EXPECT_EQ(e.call(), "cudaGetDeviceCount") << e.what();
      EXPECT_TRUE(starts_with(e.error_name(), "cudaError")) << e.error_name();
      EXPECT_NE(std::string(e.what()).find(e.error_name()), std::string::npos) << e.what();
    }
  }
#else
  GTEST_SKIP() << "gpuswap was built without the CUDA backend: there is no cuda_device to construct";
#endif
}

TEST_F(CudaDeviceWithoutGpu, CudaAvailableGivesTheReason) {
  std::string why;
  EXPECT_FALSE(cuda_available(&why));
  EXPECT_FALSE(why.empty());
#if defined(GPUSWAP_HAVE_CUDA)
  EXPECT_NE(why.find("cudaGetDeviceCount"), std::string::npos) << why;
  EXPECT_EQ(cuda_device::device_count(), 0);
#else
  EXPECT_EQ(why, "gpuswap was built without the CUDA backend");
#endif
  EXPECT_FALSE(cuda_available());  // a null `why` is allowed
}

TEST_F(CudaDeviceWithoutGpu, AutoFallsBackToTheSimulatorAndSaysWhy) {
  device_request request;
  request.ordinal = 0;
  const log_level saved = get_log_level();
  set_log_level(log_level::info);
  ::testing::internal::CaptureStderr();
  const std::unique_ptr<device> dev = make_device(request);
  const std::string logged = ::testing::internal::GetCapturedStderr();
  set_log_level(saved);
  ASSERT_NE(dev, nullptr);
  EXPECT_TRUE(starts_with(dev->name(), "sim:")) << dev->name();
  EXPECT_NE(logged.find("fell back to the simulated device"), std::string::npos) << logged;
  EXPECT_NE(logged.find("no CUDA device"), std::string::npos) << logged;
}

TEST_F(CudaDeviceWithoutGpu, CudaChoiceThrowsNoCudaDevice) {
  device_request request;
  request.backend = backend_choice::cuda;
  try {
    const std::unique_ptr<device> dev = make_device(request);
    FAIL() << "make_device(cuda) returned " << dev->name() << " without a CUDA device";
  } catch (const no_cuda_device& e) {
    EXPECT_NE(std::string(e.what()).find("no CUDA device"), std::string::npos) << e.what();
  }
}

// --- either way -------------------------------------------------------------------------------

TEST(CudaDeviceFactory, SimChoiceIsAlwaysTheSimulatorAtTheRequestedOrdinal) {
  device_request request;
  request.backend = backend_choice::sim;
  request.ordinal = 3;
  request.sim.ordinal = 0;  // the request's ordinal wins
  const std::unique_ptr<device> dev = make_device(request);
  ASSERT_NE(dev, nullptr);
  EXPECT_TRUE(starts_with(dev->name(), "sim:")) << dev->name();
  EXPECT_EQ(dev->ordinal(), 3);
}

TEST(CudaDeviceFactory, BackendChoicesHaveNames) {
  EXPECT_EQ(to_string(backend_choice::auto_), "auto");
  EXPECT_EQ(to_string(backend_choice::cuda), "cuda");
  EXPECT_EQ(to_string(backend_choice::sim), "sim");
}

// --- with a GPU -------------------------------------------------------------------------------
#if defined(GPUSWAP_HAVE_CUDA)

// What a launched host function waits on. Shared with the function so that it outlives it.
class gate {
 public:
  void open() {
    open_.store(true);
    open_.notify_all();
  }
  void wait() const {
    while (!open_.load()) open_.wait(false);
  }

 private:
  std::atomic<bool> open_{false};
};

// Opens the gate when the test leaves, also early, so that no CUDA callback thread stays blocked.
struct open_on_exit {
  std::shared_ptr<gate> held;
  ~open_on_exit() { held->open(); }
};

class CudaDeviceWithGpu : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!cuda_available(&why)) GTEST_SKIP() << "no CUDA device here (" << why << ")";
    dev_ = std::make_unique<cuda_device>(0);
  }

  // Pinned buffers freed at the end of the test.
  std::byte* pinned(std::size_t bytes) {
    auto* ptr = static_cast<std::byte*>(dev_->allocate_pinned(bytes));
    if (ptr != nullptr) pinned_.push_back(ptr);
    return ptr;
  }
  void* on_device(std::size_t bytes) {
    void* ptr = dev_->allocate_device(bytes);
    if (ptr != nullptr) device_.push_back(ptr);
    return ptr;
  }
  void TearDown() override {
    if (!dev_) return;
    dev_->synchronize();
    for (void* p : device_) dev_->free_device(p);
    for (void* p : pinned_) dev_->free_pinned(p);
  }

  static void fill_pattern(std::byte* data, std::size_t bytes, std::uint32_t seed) {
    for (std::size_t i = 0; i < bytes; ++i) {
      data[i] = static_cast<std::byte>((i * 2654435761U + seed) >> 13);
    }
  }

  std::unique_ptr<cuda_device> dev_;
  std::vector<std::byte*> pinned_;
  std::vector<void*> device_;
};

TEST_F(CudaDeviceWithGpu, NameOrdinalAndMemory) {
  EXPECT_NE(dev_->name().find("(cuda:0)"), std::string::npos) << dev_->name();
  EXPECT_EQ(dev_->ordinal(), 0);
  const memory_info info = dev_->memory();
  EXPECT_GT(info.total_bytes, 0U);
  EXPECT_LE(info.free_bytes, info.total_bytes);
  EXPECT_LE(dev_->greatest_priority(), dev_->least_priority());
}

TEST_F(CudaDeviceWithGpu, AllocatesAndFreesEveryKind) {
  constexpr std::size_t bytes = std::size_t{1} << 20;
  void* d = dev_->allocate_device(bytes);
  void* p = dev_->allocate_pinned(bytes);
  void* m = dev_->allocate_managed(bytes);
  EXPECT_NE(d, nullptr);
  EXPECT_NE(p, nullptr);
  EXPECT_NE(m, nullptr);
  std::memset(p, 0x5a, bytes);  // pinned and managed memory are host-addressable
  std::memset(m, 0xa5, bytes);
  dev_->free_device(d);
  dev_->free_pinned(p);
  dev_->free_managed(m);
  EXPECT_EQ(dev_->allocate_device(0), nullptr);
  EXPECT_EQ(dev_->allocate_pinned(0), nullptr);
  EXPECT_EQ(dev_->allocate_managed(0), nullptr);
  dev_->free_device(nullptr);
  dev_->free_pinned(nullptr);
  dev_->free_managed(nullptr);
}

TEST_F(CudaDeviceWithGpu, ExhaustedDeviceMemoryIsNullAndLeavesNoError) {
  const std::size_t too_much = dev_->memory().total_bytes * 4;
  EXPECT_EQ(dev_->allocate_device(too_much), nullptr);
  // The failed cudaMalloc's error was cleared: the next calls succeed.
  void* ok = dev_->allocate_device(4096);
  EXPECT_NE(ok, nullptr);
  dev_->free_device(ok);
  dev_->synchronize();
}

TEST_F(CudaDeviceWithGpu, PatternRoundTripsThroughPinnedMemory) {
  constexpr std::size_t bytes = std::size_t{8} << 20;
  std::byte* in = pinned(bytes);
  std::byte* out = pinned(bytes);
  void* a = on_device(bytes);
  void* b = on_device(bytes);
  ASSERT_TRUE(in && out && a && b);
  fill_pattern(in, bytes, 7);
  std::memset(out, 0, bytes);
  const stream_t s = dev_->create_stream(stream_priority::normal);
  dev_->copy_async(a, in, bytes, copy_kind::host_to_device, s);
  dev_->copy_async(b, a, bytes, copy_kind::device_to_device, s);
  dev_->copy_async(out, b, bytes, copy_kind::device_to_host, s);
  dev_->synchronize_stream(s);
  EXPECT_EQ(std::memcmp(in, out, bytes), 0);
  dev_->destroy_stream(s);
}

// Stream A is held behind a gate (a host function) before it uploads the pattern; stream B
// waits for A's event and then downloads. Without wait_event, B's download runs while A is
// held, so B's event completes within the polling window and `out` receives the old zeros.
TEST_F(CudaDeviceWithGpu, EventOrdersACopyOnOneStreamAfterAnother) {
  constexpr std::size_t bytes = std::size_t{4} << 20;
  std::byte* zeros = pinned(bytes);
  std::byte* in = pinned(bytes);
  std::byte* out = pinned(bytes);
  void* buffer = on_device(bytes);
  ASSERT_TRUE(zeros && in && out && buffer);
  std::memset(zeros, 0, bytes);
  fill_pattern(in, bytes, 11);
  std::memset(out, 0xff, bytes);
  const stream_t a = dev_->create_stream(stream_priority::low);
  const stream_t b = dev_->create_stream(stream_priority::high);
  dev_->copy_async(buffer, zeros, bytes, copy_kind::host_to_device, a);
  dev_->synchronize_stream(a);

  const auto held = std::make_shared<gate>();
  const open_on_exit opener{held};
  const event_t uploaded = dev_->create_event();
  const event_t downloaded = dev_->create_event();
  dev_->launch(a, {}, [held] { held->wait(); }, {});
  dev_->copy_async(buffer, in, bytes, copy_kind::host_to_device, a);
  dev_->record_event(uploaded, a);
  dev_->wait_event(b, uploaded);
  dev_->copy_async(out, buffer, bytes, copy_kind::device_to_host, b);
  dev_->record_event(downloaded, b);

  // Bounded wait for the broken case to show (B finishing while A is held); nothing is asserted
  // about how long anything takes.
  for (int i = 0; i < 200 && !dev_->query_event(downloaded); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_FALSE(dev_->query_event(downloaded)) << "B's download finished while A was still held";
  EXPECT_FALSE(dev_->query_event(uploaded));
  held->open();
  dev_->synchronize_event(downloaded);
  EXPECT_TRUE(dev_->query_event(uploaded));
  EXPECT_TRUE(dev_->query_event(downloaded));
  EXPECT_EQ(std::memcmp(in, out, bytes), 0) << "B downloaded before A's upload";

  dev_->destroy_event(uploaded);
  dev_->destroy_event(downloaded);
  dev_->destroy_stream(a);
  dev_->destroy_stream(b);
}

TEST_F(CudaDeviceWithGpu, EventsQueryAndTime) {
  constexpr std::size_t bytes = std::size_t{16} << 20;
  std::byte* src = pinned(bytes);
  void* dst = on_device(bytes);
  ASSERT_TRUE(src && dst);
  const stream_t s = dev_->create_stream(stream_priority::normal);
  const event_t start = dev_->create_event();
  const event_t end = dev_->create_event();
  EXPECT_TRUE(dev_->query_event(start)) << "an event never recorded counts as complete";
  dev_->record_event(start, s);
  dev_->copy_async(dst, src, bytes, copy_kind::host_to_device, s);
  dev_->record_event(end, s);
  dev_->synchronize_event(end);
  EXPECT_TRUE(dev_->query_event(start));
  EXPECT_TRUE(dev_->query_event(end));
  EXPECT_GE(dev_->elapsed_ms(start, end), 0.0);
  dev_->destroy_event(start);
  dev_->destroy_event(end);
  dev_->destroy_stream(s);
}

TEST_F(CudaDeviceWithGpu, FailedCallsNameTheCallAndTheError) {
  const event_t never = dev_->create_event();
  const event_t also_never = dev_->create_event();
  try {
    dev_->elapsed_ms(never, also_never);  // timing needs recorded events
    FAIL() << "elapsed_ms of unrecorded events did not throw";
  } catch (const device_error& e) {
    EXPECT_EQ(e.call(), "cudaEventElapsedTime");
    EXPECT_TRUE(starts_with(e.error_name(), "cudaError")) << e.error_name();
  }
  dev_->destroy_event(never);
  dev_->destroy_event(also_never);
  // The error was cleared: the device keeps working.
  void* ok = dev_->allocate_device(4096);
  EXPECT_NE(ok, nullptr);
  dev_->free_device(ok);
}

TEST_F(CudaDeviceWithGpu, LaunchRunsInStreamOrderAndReleasesTheFunction) {
  constexpr std::size_t bytes = std::size_t{1} << 20;
  std::byte* in = pinned(bytes);
  std::byte* out = pinned(bytes);
  void* buffer = on_device(bytes);
  ASSERT_TRUE(in && out && buffer);
  fill_pattern(in, bytes, 3);
  std::memset(out, 0, bytes);
  const stream_t s = dev_->create_stream(stream_priority::normal);
  auto token = std::make_shared<int>(0);
  std::weak_ptr<int> watch = token;
  bool matched = false;
  dev_->copy_async(buffer, in, bytes, copy_kind::host_to_device, s);
  dev_->copy_async(out, buffer, bytes, copy_kind::device_to_host, s);
  // Runs after the download: it sees the pattern in `out`.
  dev_->launch(s, {}, [token = std::move(token), in, out, &matched] {
    matched = std::memcmp(in, out, bytes) == 0;
  }, {});
  dev_->synchronize_stream(s);
  EXPECT_TRUE(matched);
  EXPECT_TRUE(watch.expired()) << "the launched function outlived its run";
  dev_->destroy_stream(s);
}

TEST_F(CudaDeviceWithGpu, WrappedStreamsAreNotOwned) {
  const stream_t ours = dev_->create_stream(stream_priority::high);
  const stream_t wrapped = dev_->wrap_native_stream(dev_->native_stream(ours));
  EXPECT_NE(wrapped, ours);
  EXPECT_EQ(dev_->native_stream(wrapped), dev_->native_stream(ours));
  dev_->destroy_stream(wrapped);  // forgets the wrapper; `ours` must stay alive
  std::byte* src = pinned(4096);
  void* dst = on_device(4096);
  ASSERT_TRUE(src && dst);
  dev_->copy_async(dst, src, 4096, copy_kind::host_to_device, ours);
  dev_->synchronize_stream(ours);
  dev_->destroy_stream(ours);

  EXPECT_EQ(dev_->native_stream(dev_->default_stream()), nullptr);
  const stream_t legacy = dev_->wrap_native_stream(nullptr);
  dev_->copy_async(dst, src, 4096, copy_kind::host_to_device, legacy);
  dev_->synchronize_stream(legacy);
  dev_->destroy_stream(legacy);
}

TEST_F(CudaDeviceWithGpu, ManagedMemoryPrefetchesAndTakesAdvice) {
  constexpr std::size_t bytes = std::size_t{4} << 20;
  auto* managed = static_cast<std::byte*>(dev_->allocate_managed(bytes));
  ASSERT_NE(managed, nullptr);
  fill_pattern(managed, bytes, 5);
  const stream_t s = dev_->create_stream(stream_priority::normal);
  dev_->advise_managed(managed, bytes, managed_advice::accessed_by_device);
  dev_->advise_managed(managed, bytes, managed_advice::prefer_device);
  dev_->prefetch_managed(managed, bytes, /*to_device=*/true, s);
  dev_->prefetch_managed(managed, bytes, /*to_device=*/false, s);
  dev_->advise_managed(managed, bytes, managed_advice::prefer_host);
  dev_->synchronize_stream(s);
  std::vector<std::byte> expected(bytes);
  fill_pattern(expected.data(), bytes, 5);
  EXPECT_EQ(std::memcmp(expected.data(), managed, bytes), 0);
  dev_->destroy_stream(s);
  dev_->free_managed(managed);
}

TEST_F(CudaDeviceWithGpu, FactoryPrefersTheGpu) {
  device_request request;
  EXPECT_NE(make_device(request)->name().find("(cuda:0)"), std::string::npos);
  request.backend = backend_choice::cuda;
  EXPECT_NE(make_device(request)->name().find("(cuda:0)"), std::string::npos);
}

#endif  // GPUSWAP_HAVE_CUDA

}  // namespace
}  // namespace gpuswap
