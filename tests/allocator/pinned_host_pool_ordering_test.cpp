// pinned_host_pool ordering: a buffer handed back while a copy into or out of it is in flight
// must not reach a new owner before the copy's event completed (REFERENCE.md: "reusing its pinned
// buffer before the copy's event"). Every test here fails if the pool's event guard, or the wait
// it checks, is removed: the bytes show whose write landed last.
//
// The copies run on sim_device (real backing) behind a kernel that really blocks its stream's
// worker until the test opens a gate, so "the copy has not run yet" is a fact, not a race; its
// modelled cost is large, so query_event honestly answers "not complete" meanwhile.
#include "allocator/pinned_host_pool.hpp"

#include <gtest/gtest.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "device/sim_device.hpp"
#include "support/gate.hpp"

namespace gpuswap {
namespace {

using testing_support::gate;

constexpr std::size_t buffer_bytes = std::size_t{1} << 20;
constexpr std::uint8_t device_pattern = 0xab;  // what the device buffer holds
constexpr std::uint8_t old_owner_pattern = 0x11;
constexpr std::uint8_t new_owner_pattern = 0x22;

// A kernel that holds its stream's worker for a short real time: used only where the pool must
// block until the copy is done (a gate would deadlock a correct pool), so that a missing wait
// shows up as the copy not having landed yet.
void slow_kernel(sim_device& dev, stream_t stream) {
  kernel_cost cost;
  cost.fixed_ns = 1e9;
  dev.launch(stream, cost, [] { std::this_thread::sleep_for(std::chrono::milliseconds(200)); },
             {});
}

std::size_t count_not(const void* p, std::size_t n, std::uint8_t value) {
  const auto* b = static_cast<const std::uint8_t*>(p);
  std::size_t bad = 0;
  for (std::size_t i = 0; i < n; ++i) bad += b[i] != value;
  return bad;
}

class PinnedHostPoolOrderingTest : public ::testing::Test {
 protected:
  PinnedHostPoolOrderingTest() : dev_(options()) {
    copy_ = dev_.create_stream(stream_priority::high);
    other_ = dev_.create_stream(stream_priority::normal);
    device_buffer_ = dev_.allocate_device(buffer_bytes);
    fill_device(device_pattern);
  }
  ~PinnedHostPoolOrderingTest() override {
    dev_.synchronize();
    dev_.free_device(device_buffer_);
    dev_.destroy_stream(copy_);
    dev_.destroy_stream(other_);
  }

  static sim_options options() {
    sim_options o;
    o.backing = sim_backing::real;
    o.device_capacity = std::size_t{16} << 20;
    o.host_capacity = std::size_t{64} << 20;
    return o;
  }

  void fill_device(std::uint8_t value) {
    void* d = device_buffer_;
    const touched_buffer t{d, buffer_bytes};
    dev_.launch(other_, {}, [d, value] { std::memset(d, value, buffer_bytes); }, {&t, 1});
    dev_.synchronize_stream(other_);
  }

  // Reads the device buffer back through pageable host memory.
  std::vector<std::uint8_t> read_device() {
    std::vector<std::uint8_t> out(buffer_bytes);
    dev_.copy_async(out.data(), device_buffer_, buffer_bytes, copy_kind::device_to_host, other_);
    dev_.synchronize_stream(other_);
    return out;
  }

  sim_device dev_;
  stream_t copy_{};
  stream_t other_{};
  void* device_buffer_ = nullptr;
};

// D2H: the copy writes the old owner's buffer late. If the new owner got the same buffer, the
// copy lands on top of the new owner's bytes.
TEST_F(PinnedHostPoolOrderingTest, NewOwnerNeverGetsABufferAPendingCopyWillWrite) {
  pinned_host_pool pool(dev_, {});
  void* old_buf = pool.allocate(buffer_bytes);
  std::memset(old_buf, old_owner_pattern, buffer_bytes);
  gate g;
  g.launch(dev_, copy_);
  dev_.copy_async(old_buf, device_buffer_, buffer_bytes, copy_kind::device_to_host, copy_);
  pool.record_stream(old_buf, copy_);
  pool.deallocate(old_buf);  // right after enqueueing: the copy has not run

  void* new_buf = pool.allocate(buffer_bytes);
  std::memset(new_buf, new_owner_pattern, buffer_bytes);  // the new owner writes at once
  g.open();
  dev_.synchronize_stream(copy_);

  EXPECT_EQ(count_not(new_buf, buffer_bytes, new_owner_pattern), 0U)
      << "the pending D2H copy overwrote the new owner's buffer";
  EXPECT_EQ(count_not(old_buf, buffer_bytes, device_pattern), 0U);
  EXPECT_NE(new_buf, old_buf);
  pool.deallocate(new_buf);
}

// H2D: the copy reads the old owner's buffer late. If the new owner got the same buffer, the
// device receives the new owner's bytes instead of the old owner's.
TEST_F(PinnedHostPoolOrderingTest, NewOwnerNeverGetsABufferAPendingCopyWillRead) {
  pinned_host_pool pool(dev_, {});
  fill_device(0);
  void* old_buf = pool.allocate(buffer_bytes);
  std::memset(old_buf, old_owner_pattern, buffer_bytes);
  gate g;
  g.launch(dev_, copy_);
  dev_.copy_async(device_buffer_, old_buf, buffer_bytes, copy_kind::host_to_device, copy_);
  pool.record_stream(old_buf, copy_);
  pool.deallocate(old_buf);

  void* new_buf = pool.allocate(buffer_bytes);
  std::memset(new_buf, new_owner_pattern, buffer_bytes);
  g.open();
  dev_.synchronize_stream(copy_);

  const std::vector<std::uint8_t> on_device = read_device();
  EXPECT_EQ(count_not(on_device.data(), buffer_bytes, old_owner_pattern), 0U)
      << "the pending H2D copy read the new owner's bytes";
  EXPECT_EQ(count_not(new_buf, buffer_bytes, new_owner_pattern), 0U);
  pool.deallocate(new_buf);
}

// Every recorded stream guards the buffer, not just the last one recorded.
TEST_F(PinnedHostPoolOrderingTest, EveryRecordedStreamGuardsTheBuffer) {
  pinned_host_pool pool(dev_, {});
  void* old_buf = pool.allocate(buffer_bytes);
  gate g;
  g.launch(dev_, copy_);
  dev_.copy_async(old_buf, device_buffer_, buffer_bytes, copy_kind::device_to_host, copy_);
  pool.record_stream(old_buf, copy_);   // the slow copy
  pool.record_stream(old_buf, other_);  // and a stream that is idle
  pool.deallocate(old_buf);
  dev_.synchronize_stream(other_);  // the idle stream's event completes; the copy's does not

  void* new_buf = pool.allocate(buffer_bytes);
  std::memset(new_buf, new_owner_pattern, buffer_bytes);
  g.open();
  dev_.synchronize_stream(copy_);
  EXPECT_EQ(count_not(new_buf, buffer_bytes, new_owner_pattern), 0U)
      << "a buffer was reused when only one of its recorded streams had completed";
  pool.deallocate(new_buf);
}

// Once the event completed by the modelled clock, the buffer is reused, with the copy's bytes
// really in place (query_event never reports a copy that is still running).
TEST_F(PinnedHostPoolOrderingTest, BufferIsReusedOnceTheCopyEventCompleted) {
  pinned_host_pool pool(dev_, {});
  const stream_t busy = copy_;
  void* old_buf = pool.allocate(buffer_bytes);
  std::memset(old_buf, old_owner_pattern, buffer_bytes);
  slow_kernel(dev_, busy);
  dev_.copy_async(old_buf, device_buffer_, buffer_bytes, copy_kind::device_to_host, busy);
  pool.record_stream(old_buf, busy);
  pool.deallocate(old_buf);
  dev_.advance_host_ns(2e9);  // modelled host work past the copy; no synchronisation

  void* new_buf = pool.allocate(buffer_bytes);
  EXPECT_EQ(new_buf, old_buf);
  EXPECT_EQ(count_not(new_buf, buffer_bytes, device_pattern), 0U)
      << "the buffer was handed out before the copy really finished";
  EXPECT_EQ(pool.stats().num_reuses, 1U);
  EXPECT_EQ(pool.stats().num_pinned_allocs, 1U);
  pool.deallocate(new_buf);
}

// Under host_limit the pool must wait for the pending copy (ladder step 4) before reusing the
// buffer; without that wait the copy would still be running when the buffer is handed out.
TEST_F(PinnedHostPoolOrderingTest, LimitLadderWaitsForTheCopyBeforeReusing) {
  pinned_host_pool_options o;
  o.host_limit = buffer_bytes;
  pinned_host_pool pool(dev_, o);
  void* old_buf = pool.allocate(buffer_bytes);
  std::memset(old_buf, old_owner_pattern, buffer_bytes);
  slow_kernel(dev_, copy_);
  dev_.copy_async(old_buf, device_buffer_, buffer_bytes, copy_kind::device_to_host, copy_);
  pool.record_stream(old_buf, copy_);
  pool.deallocate(old_buf);

  void* new_buf = pool.allocate(buffer_bytes);  // only room for one: wait, then reuse
  ASSERT_EQ(new_buf, old_buf);
  EXPECT_EQ(count_not(new_buf, buffer_bytes, device_pattern), 0U)
      << "handed out before the pending copy landed";
  std::memset(new_buf, new_owner_pattern, buffer_bytes);
  dev_.synchronize();
  EXPECT_EQ(count_not(new_buf, buffer_bytes, new_owner_pattern), 0U);
  EXPECT_EQ(pool.stats().num_event_syncs, 1U);
  pool.deallocate(new_buf);
}

// When the event cannot be recorded, deallocate falls back to waiting for the stream; the buffer
// must not become reusable with the copy still running.
TEST_F(PinnedHostPoolOrderingTest, FailedEventRecordFallsBackToWaitingForTheStream) {
  pinned_host_pool pool(dev_, {});
  void* old_buf = pool.allocate(buffer_bytes);
  std::memset(old_buf, old_owner_pattern, buffer_bytes);
  slow_kernel(dev_, copy_);
  dev_.copy_async(old_buf, device_buffer_, buffer_bytes, copy_kind::device_to_host, copy_);
  pool.record_stream(old_buf, copy_);
  dev_.fail_nth(sim_call::event_record, 1);
  pool.deallocate(old_buf);
  dev_.clear_faults();
  EXPECT_EQ(pool.stats().num_fence_failures, 1U);

  void* new_buf = pool.allocate(buffer_bytes);
  if (new_buf == old_buf) {
    EXPECT_EQ(count_not(new_buf, buffer_bytes, device_pattern), 0U)
        << "a buffer whose event failed to record was reused before its copy landed";
  }
  std::memset(new_buf, new_owner_pattern, buffer_bytes);
  dev_.synchronize();
  EXPECT_EQ(count_not(new_buf, buffer_bytes, new_owner_pattern), 0U);
  pool.deallocate(new_buf);
  EXPECT_TRUE(pool.is_valid());
}

}  // namespace
}  // namespace gpuswap
