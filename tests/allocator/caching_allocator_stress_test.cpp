// Stress: 20 fixed seeds x 100,000 operations (alloc, free, record_stream with a kernel reading
// the block on another stream, hand-off and cross-thread free, modelled host time, empty_cache)
// from 8 threads on 4 streams. Every block carries a pattern made from its id, written when it
// is allocated and checked byte for byte before it is freed, by the host and by the kernels that
// read it on other streams; a block handed out while still in use would be overwritten and
// caught. At the end: nothing live, nothing reserved after empty_cache, validate() clean.
//
// GPUSWAP_STRESS_SCALE (default 1.0) scales the operation count; sanitizer CI sets it lower.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "allocator/caching_allocator.hpp"
#include "core/errors.hpp"
#include "device/sim_device.hpp"

namespace gpuswap {
namespace {

constexpr std::size_t KiB = std::size_t{1} << 10;
constexpr std::size_t MiB = std::size_t{1} << 20;
constexpr int seeds = 20;
constexpr int ops_per_seed = 100'000;
constexpr int threads = 8;
constexpr int streams = 4;
constexpr std::size_t max_live_per_thread = 96;

double stress_scale() {
  const char* text = std::getenv("GPUSWAP_STRESS_SCALE");
  if (text == nullptr || *text == '\0') return 1.0;
  char* end = nullptr;
  const double v = std::strtod(text, &end);
  return (end != text && std::isfinite(v) && v > 0) ? v : 1.0;
}

struct live_block {
  void* ptr;
  std::size_t size;
  std::uint64_t id;
  std::size_t stream_index;  // the stream it was allocated on
};

// The pattern: the first and last 8 bytes hold the id, every other byte is the id's low byte
// mixed with a per-id salt, so that neighbouring ids differ everywhere.
unsigned char fill_byte(std::uint64_t id) {
  return static_cast<unsigned char>((id * 0x9E3779B97F4A7C15ull) >> 56);
}

void fill(const live_block& b) {
  auto* p = static_cast<unsigned char*>(b.ptr);
  std::memset(p, fill_byte(b.id), b.size);
  if (b.size >= 16) {
    std::memcpy(p, &b.id, 8);
    std::memcpy(p + b.size - 8, &b.id, 8);
  }
}

bool intact(const live_block& b) {
  const auto* p = static_cast<const unsigned char*>(b.ptr);
  std::size_t begin = 0, end = b.size;
  if (b.size >= 16) {
    std::uint64_t head = 0, tail = 0;
    std::memcpy(&head, p, 8);
    std::memcpy(&tail, p + b.size - 8, 8);
    if (head != b.id || tail != b.id) return false;
    begin = 8;
    end = b.size - 8;
  }
  const unsigned char v = fill_byte(b.id);
  std::uint64_t word = 0;
  std::memset(&word, v, 8);
  std::size_t i = begin;
  for (; i + 8 <= end; i += 8) {
    std::uint64_t w = 0;
    std::memcpy(&w, p + i, 8);
    if (w != word) return false;
  }
  for (; i < end; ++i) {
    if (p[i] != v) return false;
  }
  return true;
}

// Mostly small (log-uniform 1 B .. 8 KiB), some medium (.. 256 KiB), a few large (.. 3 MiB):
// all three pool paths, with byte volumes a 2-core CI machine fills and checks in seconds.
std::size_t draw_size(std::mt19937_64& rng) {
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const double pick = u(rng);
  double lo = 0, hi = 0;
  if (pick < 0.95) {
    lo = 0;
    hi = std::log(8.0 * KiB);
  } else if (pick < 0.995) {
    lo = std::log(8.0 * KiB);
    hi = std::log(256.0 * KiB);
  } else {
    lo = std::log(256.0 * KiB);
    hi = std::log(3.0 * MiB);
  }
  return static_cast<std::size_t>(std::exp(lo + (hi - lo) * u(rng)));
}

struct shared_state {
  sim_device* dev;
  caching_allocator* alloc;
  std::vector<stream_t> streams;
  std::mutex exchange_mutex;  // guards exchange
  std::vector<live_block> exchange;
  std::atomic<std::uint64_t> next_id{1};
  std::atomic<std::uint64_t> host_corruptions{0};
  std::atomic<std::uint64_t> kernel_corruptions{0};
  std::atomic<std::uint64_t> kernels{0};
  std::atomic<std::uint64_t> ooms{0};
  std::atomic<std::uint64_t> cross_thread_frees{0};
};

void check_and_free(shared_state& st, const live_block& b) {
  if (!intact(b)) st.host_corruptions.fetch_add(1);
  st.alloc->deallocate(b.ptr);
}

// A kernel on another stream than the block's that reads it; the block is recorded as used on
// that stream first. (On the block's own stream no record is needed, but the host's direct
// writes of the next owner are not stream-ordered, so the test keeps kernels off it.)
void read_on_other_stream(shared_state& st, const live_block& b, std::size_t pick) {
  const std::size_t n = st.streams.size();
  const stream_t s = st.streams[(b.stream_index + 1 + pick % (n - 1)) % n];
  st.alloc->record_stream(b.ptr, s);
  const touched_buffer touched[] = {{b.ptr, b.size}};
  st.dev->launch(
      s, kernel_cost{0, 0, 2000},
      [b, &st] {
        if (!intact(b)) st.kernel_corruptions.fetch_add(1);
      },
      touched);
  st.kernels.fetch_add(1);
}

void worker(shared_state& st, std::uint64_t seed, int ops) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> percent(0, 999);
  std::uniform_int_distribution<std::size_t> stream_pick(0, st.streams.size() - 1);
  std::vector<live_block> live;
  for (int op = 0; op < ops; ++op) {
    const int r = percent(rng);
    if (r < 380 && live.size() < max_live_per_thread) {  // allocate
      const std::size_t size = draw_size(rng);
      const std::size_t si = stream_pick(rng);
      void* p = nullptr;
      try {
        p = st.alloc->allocate(size, st.streams[si]);
      } catch (const out_of_memory&) {
        st.ooms.fetch_add(1);
        continue;
      }
      live_block b{p, size, st.next_id.fetch_add(1), si};
      fill(b);
      if (percent(rng) < 150) read_on_other_stream(st, b, stream_pick(rng));
      live.push_back(b);
    } else if (r < 700 && !live.empty()) {  // free one of ours
      std::uniform_int_distribution<std::size_t> which(0, live.size() - 1);
      const std::size_t i = which(rng);
      check_and_free(st, live[i]);
      live[i] = live.back();
      live.pop_back();
    } else if (r < 790 && !live.empty()) {  // hand one to whichever thread takes it
      std::lock_guard lock(st.exchange_mutex);
      st.exchange.push_back(live.back());
      live.pop_back();
    } else if (r < 880) {  // free one handed over (likely by another thread)
      live_block b{};
      {
        std::lock_guard lock(st.exchange_mutex);
        if (st.exchange.empty()) continue;
        b = st.exchange.back();
        st.exchange.pop_back();
      }
      check_and_free(st, b);
      st.cross_thread_frees.fetch_add(1);
    } else if (r < 940 && !live.empty()) {  // another stream reads a live block
      std::uniform_int_distribution<std::size_t> which(0, live.size() - 1);
      read_on_other_stream(st, live[which(rng)], stream_pick(rng));
    } else if (r < 995) {  // modelled host work: pending events complete by polling
      st.dev->advance_host_ns(static_cast<double>(percent(rng)) * 20.0);
    } else if (r < 998) {
      st.alloc->empty_cache();
    } else {
      EXPECT_EQ(st.alloc->validate(), "");
    }
  }
  for (const live_block& b : live) check_and_free(st, b);
}

TEST(caching_allocator_stress_test, seeds_times_operations_from_many_threads) {
  const double scale = stress_scale();
  const int ops_per_thread = std::max(1, static_cast<int>(ops_per_seed * scale) / threads);
  std::uint64_t total_kernels = 0, total_ooms = 0, total_cross = 0, total_retries = 0;
  std::int64_t peak_reserved = 0;
  for (int seed = 1; seed <= seeds; ++seed) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    sim_options o;
    o.backing = sim_backing::real;
    o.device_capacity = std::size_t{512} << 20;
    sim_device dev(o);
    caching_allocator_options opts;
    opts.device_limit = 28 * MiB;  // room for the live set; the ladder still runs at times
    auto alloc = std::make_unique<caching_allocator>(dev, opts);
    shared_state st;
    st.dev = &dev;
    st.alloc = alloc.get();
    for (int i = 0; i < streams; ++i)
      st.streams.push_back(dev.create_stream(stream_priority::normal));

    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back(worker, std::ref(st), static_cast<std::uint64_t>(seed) * 1000 + t,
                        ops_per_thread);
    }
    for (std::thread& t : pool) t.join();
    for (const live_block& b : st.exchange) check_and_free(st, b);
    st.exchange.clear();

    dev.synchronize();
    EXPECT_EQ(st.host_corruptions.load(), 0u);
    EXPECT_EQ(st.kernel_corruptions.load(), 0u);
    EXPECT_EQ(alloc->validate(), "");
    auto stats = alloc->stats();
    EXPECT_EQ(stats.allocation.all().current, 0);
    EXPECT_EQ(stats.allocated_bytes.all().current, 0);
    EXPECT_EQ(stats.num_invalid_frees, 0u);
    EXPECT_LE(stats.reserved_bytes.all().peak, static_cast<std::int64_t>(opts.device_limit));
    peak_reserved = std::max(peak_reserved, stats.reserved_bytes.all().peak);
    total_retries += stats.num_alloc_retries;
    alloc->empty_cache();
    stats = alloc->stats();
    EXPECT_EQ(stats.active.all().current, 0);
    EXPECT_EQ(stats.reserved_bytes.all().current, 0);
    EXPECT_EQ(stats.segment.all().current, 0);
    EXPECT_EQ(stats.num_device_allocs, stats.num_device_frees);
    EXPECT_EQ(alloc->validate(), "");
    EXPECT_EQ(dev.counters().device_used, 0u);
    total_kernels += st.kernels.load();
    total_ooms += st.ooms.load();
    total_cross += st.cross_thread_frees.load();
    alloc.reset();
    for (stream_t s : st.streams) dev.destroy_stream(s);
  }
  EXPECT_GT(total_kernels, 0u);
  EXPECT_GT(total_cross, 0u);
  std::printf(
      "[stress] scale %.3g: %d seeds x %d ops x %d threads; %llu cross-stream kernels, "
      "%llu cross-thread frees, %llu alloc retries, %llu OOMs, peak reserved %lld MiB\n",
      scale, seeds, ops_per_thread, threads, static_cast<unsigned long long>(total_kernels),
      static_cast<unsigned long long>(total_cross), static_cast<unsigned long long>(total_retries),
      static_cast<unsigned long long>(total_ooms), static_cast<long long>(peak_reserved >> 20));
}

}  // namespace
}  // namespace gpuswap
