// caching_allocator: pools, rounding, splitting and coalescing, budget, OOM ladder and message,
// statistics, snapshot, reclaimers. Ordering across streams has its own file
// (caching_allocator_ordering_test.cpp), as do stress and fault injection.
#include "allocator/caching_allocator.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "core/errors.hpp"
#include "device/sim_device.hpp"
#include "support/small_sim.hpp"

namespace gpuswap {
namespace {

constexpr std::size_t KiB = std::size_t{1} << 10;
constexpr std::size_t MiB = std::size_t{1} << 20;
constexpr std::size_t GiB = std::size_t{1} << 30;

sim_options small_sim(std::size_t capacity = GiB) {
  return testing_support::sim_with_capacity(capacity);
}

caching_allocator_options limit(std::size_t bytes) {
  caching_allocator_options o;
  o.device_limit = bytes;
  return o;
}

// Frees merge at once, for the tests of coalescing and best fit themselves; the fast bins that
// defer merging have their own file (caching_allocator_fast_bin_test.cpp).
caching_allocator_options eager() {
  caching_allocator_options o;
  o.fast_bin_limit = 0;
  return o;
}

// The message as "label: value" lines, for field-by-field checks.
std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

// The one line starting with "  <label>: ", or "" (and a failure) if it is missing or repeated.
std::string field(const std::string& message, const std::string& label) {
  std::string found;
  int count = 0;
  for (const std::string& line : lines_of(message)) {
    const std::string prefix = "  " + label + ": ";
    if (line.rfind(prefix, 0) == 0) {
      found = line.substr(prefix.size());
      ++count;
    }
  }
  EXPECT_EQ(count, 1) << "field '" << label << "' in:\n" << message;
  return found;
}

class caching_allocator_test : public ::testing::Test {
 protected:
  sim_device dev{small_sim()};
  stream_t s0 = dev.default_stream();

  void expect_valid(const caching_allocator& a) { EXPECT_EQ(a.validate(), ""); }
};

TEST(caching_allocator_options_test, validate_names_the_field) {
  caching_allocator_options tiny = limit(MiB);
  try {
    tiny.validate();
    FAIL() << "a 1 MiB device_limit was accepted";
  } catch (const config_error& e) {
    EXPECT_EQ(e.key(), "device_limit");
    EXPECT_EQ(e.value(), std::to_string(MiB));
  }
  caching_allocator_options split;
  split.max_split_size = 20 * MiB;
  try {
    split.validate();
    FAIL() << "max_split_size of 20 MiB was accepted";
  } catch (const config_error& e) {
    EXPECT_EQ(e.key(), "max_split_size");
  }
  caching_allocator_options ok;
  ok.max_split_size = 21 * MiB;
  ok.device_limit = 2 * MiB;
  EXPECT_NO_THROW(ok.validate());
  EXPECT_NO_THROW(caching_allocator_options{}.validate());
}

TEST_F(caching_allocator_test, device_limit_above_capacity_is_a_config_error) {
  try {
    caching_allocator a(dev, limit(2 * GiB));
    FAIL() << "a budget above the physical capacity was accepted";
  } catch (const config_error& e) {
    EXPECT_EQ(e.key(), "device_limit");
  }
  caching_allocator whole(dev, {});
  EXPECT_EQ(whole.budget(), GiB);
  caching_allocator half(dev, limit(GiB / 2));
  EXPECT_EQ(half.budget(), GiB / 2);
}

TEST(caching_allocator_sizes, rounding_and_segment_sizes) {
  using ca = caching_allocator;
  EXPECT_EQ(ca::round_size(1), 512u);
  EXPECT_EQ(ca::round_size(512), 512u);
  EXPECT_EQ(ca::round_size(513), 1024u);
  EXPECT_EQ(ca::round_size(MiB + 1), MiB + 512);
  EXPECT_EQ(ca::round_size(std::numeric_limits<std::size_t>::max()), 0u);
  EXPECT_EQ(ca::round_size(std::numeric_limits<std::size_t>::max() - 511), 0u);
  EXPECT_EQ(ca::segment_size(512), 2 * MiB);
  EXPECT_EQ(ca::segment_size(MiB), 2 * MiB);
  EXPECT_EQ(ca::segment_size(MiB + 512), 20 * MiB);
  EXPECT_EQ(ca::segment_size(10 * MiB - 512), 20 * MiB);
  EXPECT_EQ(ca::segment_size(10 * MiB), 10 * MiB);
  EXPECT_EQ(ca::segment_size(11 * MiB + 512), 12 * MiB);
}

TEST_F(caching_allocator_test, zero_bytes_null_and_foreign_pointers) {
  caching_allocator a(dev, {});
  EXPECT_EQ(a.allocate(0, s0), nullptr);
  a.deallocate(nullptr);
  int local = 0;
  a.deallocate(&local);  // not ours: ignored, counted
  EXPECT_EQ(a.stats().num_invalid_frees, 1u);
  EXPECT_EQ(a.stats().allocation.all().allocated, 0);
  EXPECT_EQ(a.stats().num_device_allocs, 0u);
  void* p = a.allocate(100, s0);
  EXPECT_EQ(a.allocated_size(p), 512u);
  EXPECT_EQ(a.allocated_size(static_cast<char*>(p) + 1), 0u);  // interior pointer
  EXPECT_EQ(a.allocated_size(&local), 0u);
  a.deallocate(p);
  a.deallocate(p);  // double free: ignored, counted
  EXPECT_EQ(a.stats().num_invalid_frees, 2u);
  EXPECT_EQ(a.allocated_size(p), 0u);
  expect_valid(a);
}

TEST_F(caching_allocator_test, small_requests_pack_into_one_segment_and_coalesce) {
  caching_allocator a(dev, eager());
  void* x = a.allocate(1, s0);
  void* y = a.allocate(1000, s0);
  void* z = a.allocate(512, s0);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(x) % 512, 0u);
  EXPECT_EQ(static_cast<char*>(y), static_cast<char*>(x) + 512);  // packed, in order
  EXPECT_EQ(static_cast<char*>(z), static_cast<char*>(y) + 1024);
  auto st = a.stats();
  EXPECT_EQ(st.segment[stat_pool::small].current, 1);
  EXPECT_EQ(st.reserved_bytes[stat_pool::small].current, static_cast<std::int64_t>(2 * MiB));
  EXPECT_EQ(st.reserved_bytes[stat_pool::large].current, 0);
  EXPECT_EQ(st.allocated_bytes.all().current, 2048);
  EXPECT_EQ(st.requested_bytes.all().current, 1 + 1000 + 512);
  EXPECT_EQ(st.inactive_split.all().current, 1);  // the tail of the segment
  expect_valid(a);

  a.deallocate(y);  // a hole between two allocated blocks
  st = a.stats();
  EXPECT_EQ(st.inactive_split.all().current, 2);
  EXPECT_EQ(st.inactive_split_bytes.all().current, static_cast<std::int64_t>(2 * MiB - 1024));
  expect_valid(a);
  a.deallocate(x);  // merges with the hole
  EXPECT_EQ(a.stats().inactive_split.all().current, 2);
  expect_valid(a);
  a.deallocate(z);  // everything merges back into one whole-segment block
  st = a.stats();
  EXPECT_EQ(st.inactive_split.all().current, 0);
  EXPECT_EQ(st.active.all().current, 0);
  EXPECT_EQ(st.segment.all().current, 1);  // cached, not returned
  EXPECT_EQ(a.snapshot()["segments"][0]["blocks"].size(), 1u);
  expect_valid(a);
  a.empty_cache();
  EXPECT_EQ(a.stats().reserved_bytes.all().current, 0);
  EXPECT_EQ(a.stats().num_device_frees, 1u);
  expect_valid(a);
}

TEST_F(caching_allocator_test, small_remainder_splits_at_512_bytes) {
  caching_allocator a(dev, {});
  void* big = a.allocate(MiB, s0);
  void* rest = a.allocate(MiB - 512, s0);  // leaves exactly 512 bytes: split
  EXPECT_EQ(a.allocated_size(rest), MiB - 512);
  void* last = a.allocate(512, s0);
  EXPECT_EQ(static_cast<char*>(last), static_cast<char*>(rest) + MiB - 512);
  EXPECT_EQ(a.stats().segment.all().current, 1);
  for (void* p : {big, rest, last}) a.deallocate(p);
  expect_valid(a);
}

TEST_F(caching_allocator_test, large_pool_segments_and_remainder_rule) {
  caching_allocator a(dev, {});
  void* p5 = a.allocate(5 * MiB, s0);  // < 10 MiB: a 20 MiB segment
  auto st = a.stats();
  EXPECT_EQ(st.reserved_bytes[stat_pool::large].current, static_cast<std::int64_t>(20 * MiB));
  EXPECT_EQ(st.inactive_split_bytes.all().current, static_cast<std::int64_t>(15 * MiB));
  // 14.5 MiB fits the 15 MiB remainder; the 0.5 MiB left is not > 1 MiB, so no split.
  void* p14 = a.allocate(14 * MiB + 512 * KiB, s0);
  EXPECT_EQ(a.allocated_size(p14), 15 * MiB);
  EXPECT_EQ(a.stats().segment.all().current, 1);
  void* p12 = a.allocate(11 * MiB + 1, s0);  // >= 10 MiB: its own segment, rounded to 2 MiB
  EXPECT_EQ(a.stats().reserved_bytes[stat_pool::large].current,
            static_cast<std::int64_t>(32 * MiB));
  // The 12 MiB segment leaves 511.5 KiB, not more than 1 MiB: the block is not split.
  EXPECT_EQ(a.allocated_size(p12), 12 * MiB);
  for (void* p : {p5, p14, p12}) a.deallocate(p);
  expect_valid(a);
  EXPECT_EQ(a.stats().num_device_allocs, 2u);
}

TEST_F(caching_allocator_test, best_fit_and_same_stream_reuse) {
  caching_allocator a(dev, eager());
  void* a1 = a.allocate(64 * KiB, s0);
  void* sep1 = a.allocate(512, s0);
  void* a2 = a.allocate(16 * KiB, s0);
  void* sep2 = a.allocate(512, s0);
  a.deallocate(a1);
  a.deallocate(a2);
  void* b2 = a.allocate(16 * KiB, s0);
  EXPECT_EQ(b2, a2);  // the smallest hole that fits, not the first
  void* b1 = a.allocate(60 * KiB, s0);
  EXPECT_EQ(b1, a1);
  EXPECT_EQ(a.stats().num_device_allocs, 1u);
  expect_valid(a);
  for (void* p : {b1, b2, sep1, sep2}) a.deallocate(p);
  expect_valid(a);
}

TEST_F(caching_allocator_test, blocks_are_never_shared_across_streams_without_record_stream) {
  caching_allocator a(dev, {});
  stream_t s1 = dev.create_stream(stream_priority::normal);
  void* p = a.allocate(4096, s0);
  a.deallocate(p);
  void* q = a.allocate(4096, s1);
  EXPECT_NE(q, p);  // s0's free block is not s1's to take
  EXPECT_EQ(a.stats().segment.all().current, 2);
  a.deallocate(q);
  void* r = a.allocate(4096, s0);
  EXPECT_EQ(r, p);
  a.deallocate(r);
  expect_valid(a);
  auto snap = a.snapshot();
  EXPECT_NE(snap["segments"][0]["stream"], snap["segments"][1]["stream"]);
  dev.destroy_stream(s1);
}

TEST_F(caching_allocator_test, max_split_size_keeps_large_blocks_whole) {
  caching_allocator_options o;
  o.max_split_size = 40 * MiB;
  caching_allocator a(dev, o);
  void* big = a.allocate(50 * MiB, s0);
  a.deallocate(big);
  void* small = a.allocate(5 * MiB, s0);  // must not carve the 50 MiB block
  EXPECT_NE(small, big);
  EXPECT_EQ(a.stats().segment.all().current, 2);
  void* again = a.allocate(45 * MiB, s0);  // wastes 5 MiB < 20 MiB: reused whole
  EXPECT_EQ(again, big);
  EXPECT_EQ(a.allocated_size(again), 50 * MiB);
  a.deallocate(again);
  void* tiny_big = a.allocate(41 * MiB, s0);  // would waste 9 MiB: still reused
  EXPECT_EQ(tiny_big, big);
  a.deallocate(tiny_big);
  a.deallocate(small);
  expect_valid(a);

  caching_allocator_options unlimited;
  caching_allocator b(dev, unlimited);
  void* b_big = b.allocate(50 * MiB, s0);
  b.deallocate(b_big);
  void* b_small = b.allocate(5 * MiB, s0);
  EXPECT_EQ(b_small, b_big);  // without the rule the block is split
  EXPECT_EQ(b.stats().segment.all().current, 1);
  b.deallocate(b_small);
}

TEST_F(caching_allocator_test, reserved_never_exceeds_the_budget) {
  caching_allocator a(dev, limit(64 * MiB));
  void* x = a.allocate(30 * MiB, s0);
  void* y = a.allocate(30 * MiB, s0);
  // The preferred 20 MiB segment does not fit the 4 MiB left; the smallest one that holds the
  // request does.
  void* z = a.allocate(3 * MiB, s0);
  EXPECT_EQ(a.stats().reserved_bytes.all().current, static_cast<std::int64_t>(64 * MiB));
  EXPECT_EQ(a.stats().reserved_bytes.all().peak, static_cast<std::int64_t>(64 * MiB));
  EXPECT_THROW(a.allocate(512, s0), out_of_memory);  // a 2 MiB small segment would exceed it
  EXPECT_LE(a.stats().reserved_bytes.all().peak, static_cast<std::int64_t>(64 * MiB));
  EXPECT_EQ(a.stats().num_ooms, 1u);
  expect_valid(a);
  for (void* p : {x, y, z}) a.deallocate(p);
  void* w = a.allocate(512, s0);  // the ladder releases a cached segment for it
  EXPECT_NE(w, nullptr);
  a.deallocate(w);
  expect_valid(a);
}

TEST_F(caching_allocator_test, ladder_releases_cached_segments_before_failing) {
  caching_allocator a(dev, limit(64 * MiB));
  void* x = a.allocate(40 * MiB, s0);
  a.deallocate(x);  // cached: 40 MiB reserved, nothing allocated
  void* y = a.allocate(50 * MiB, s0);
  ASSERT_NE(y, nullptr);
  auto st = a.stats();
  EXPECT_EQ(st.num_alloc_retries, 1u);
  EXPECT_GE(st.num_cache_flushes, 1u);
  EXPECT_EQ(st.num_device_frees, 1u);
  EXPECT_EQ(st.num_device_allocs, 2u);
  EXPECT_EQ(st.reserved_bytes.all().current, static_cast<std::int64_t>(50 * MiB));
  EXPECT_EQ(st.num_ooms, 0u);
  a.deallocate(y);
  expect_valid(a);
}

TEST_F(caching_allocator_test, device_refusal_is_retried_after_releasing_the_cache) {
  caching_allocator a(dev, {});
  void* x = a.allocate(40 * MiB, s0);
  a.deallocate(x);
  dev.fail_nth(sim_call::device_alloc, 1);  // the next allocate_device returns nullptr
  void* y = a.allocate(50 * MiB, s0);
  ASSERT_NE(y, nullptr);
  EXPECT_EQ(a.stats().num_alloc_retries, 1u);
  EXPECT_EQ(a.stats().num_device_frees, 1u);
  a.deallocate(y);
  expect_valid(a);
}

TEST_F(caching_allocator_test, oom_message_field_by_field) {
  caching_allocator a(dev, limit(64 * MiB));
  void* x = a.allocate(30 * MiB, s0);
  void* y = a.allocate(30 * MiB, s0);
  std::string message;
  try {
    a.allocate(10 * MiB, s0);
    FAIL() << "10 MiB fitted in 4 MiB of budget";
  } catch (const out_of_memory& e) {
    message = e.what();
  }
  EXPECT_EQ(lines_of(message).front(),
            "gpuswap: out of device memory: tried to allocate 10.00 MiB on sim:custom/real");
  EXPECT_EQ(field(message, "requested"), "10.00 MiB (10485760 bytes)");
  EXPECT_EQ(field(message, "device"), "sim:custom/real (ordinal 0)");
  EXPECT_EQ(field(message, "budget"), "64.00 MiB (67108864 bytes), device_limit");
  const memory_info mem = dev.memory();
  EXPECT_EQ(field(message, "physical"), "1.00 GiB (1073741824 bytes) total, " +
                                            std::to_string(mem.free_bytes / MiB) + ".00 MiB (" +
                                            std::to_string(mem.free_bytes) + " bytes) free");
  EXPECT_EQ(field(message, "allocated"), "60.00 MiB (62914560 bytes)");
  EXPECT_EQ(field(message, "cached"),
            "0 B (0 bytes) reserved but unallocated (reserved in all 60.00 MiB (62914560 bytes))");
  EXPECT_EQ(field(message, "swapped out"), "n/a");
  EXPECT_EQ(field(message, "pinned host"), "n/a used of n/a limit");
  const std::string hint = field(message, "hint");
  EXPECT_NE(hint.find("device_limit"), std::string::npos) << hint;
  EXPECT_NE(hint.find("policy:auto"), std::string::npos) << hint;
  EXPECT_EQ(hint.find("max_split_size"), std::string::npos) << hint;

  a.set_external_memory_reporter([] { return external_memory_report{GiB, 3 * GiB / 2, 4 * GiB}; });
  try {
    a.allocate(10 * MiB, s0);
    FAIL();
  } catch (const out_of_memory& e) {
    message = e.what();
  }
  EXPECT_EQ(field(message, "swapped out"), "1.00 GiB (1073741824 bytes)");
  EXPECT_EQ(field(message, "pinned host"),
            "1.50 GiB (1610612736 bytes) used of 4.00 GiB (4294967296 bytes) limit");
  // Offload already moved buffers out: the hint no longer suggests turning it on.
  EXPECT_NE(field(message, "hint").find("offload is on and 1.00 GiB is already on the host"),
            std::string::npos)
      << message;
  EXPECT_EQ(field(message, "hint").find("policy:auto"), std::string::npos) << message;
  EXPECT_EQ(a.stats().num_ooms, 2u);
  a.deallocate(x);
  a.deallocate(y);
  expect_valid(a);
}

TEST_F(caching_allocator_test, oom_message_points_at_fragmentation) {
  caching_allocator a(dev, limit(60 * MiB));
  std::vector<void*> blocks;
  for (int i = 0; i < 12; ++i) blocks.push_back(a.allocate(5 * MiB, s0));  // 3 full segments
  EXPECT_EQ(a.stats().segment.all().current, 3);
  for (std::size_t i = 1; i < blocks.size(); i += 2) a.deallocate(blocks[i]);  // 30 MiB in holes
  std::string message;
  try {
    a.allocate(8 * MiB, s0);
    FAIL();
  } catch (const out_of_memory& e) {
    message = e.what();
  }
  EXPECT_EQ(field(message, "allocated"), "30.00 MiB (31457280 bytes)");
  EXPECT_EQ(
      field(message, "cached").rfind("30.00 MiB (31457280 bytes) reserved but unallocated", 0), 0u);
  const std::string hint = field(message, "hint");
  EXPECT_NE(hint.find("max_split_size"), std::string::npos) << hint;
  EXPECT_NE(hint.find("largest free block 5.00 MiB"), std::string::npos) << hint;
  EXPECT_EQ(a.stats().inactive_split_bytes.all().current, static_cast<std::int64_t>(30 * MiB));
  expect_valid(a);
  for (std::size_t i = 0; i < blocks.size(); i += 2) a.deallocate(blocks[i]);
  expect_valid(a);
}

TEST_F(caching_allocator_test, huge_requests_fail_cleanly) {
  caching_allocator a(dev, {});
  void* live = a.allocate(MiB, s0);
  const auto before = a.stats();
  for (std::size_t bytes : {std::size_t{1} << 50, std::numeric_limits<std::size_t>::max(),
                            std::numeric_limits<std::size_t>::max() - 100, GiB + 1}) {
    try {
      a.allocate(bytes, s0);
      FAIL() << bytes << " bytes were allocated";
    } catch (const out_of_memory& e) {
      const std::string message = e.what();
      EXPECT_NE(field(message, "requested").find("(" + std::to_string(bytes) + " bytes)"),
                std::string::npos)
          << message;
      EXPECT_NE(field(message, "hint").find("exceeds the budget"), std::string::npos) << message;
    }
  }
  try {
    a.allocate(std::size_t{1} << 50, s0);
  } catch (const out_of_memory& e) {
    EXPECT_EQ(field(e.what(), "requested"), "1.00 PiB (1125899906842624 bytes)");
  }
  try {
    a.allocate(std::numeric_limits<std::size_t>::max(), s0);
  } catch (const out_of_memory& e) {
    EXPECT_EQ(field(e.what(), "requested"), "16.00 EiB (18446744073709551615 bytes)");
  }
  const auto after = a.stats();
  EXPECT_EQ(after.num_ooms, before.num_ooms + 6);
  // Hopeless requests neither flush the cache nor touch the device.
  EXPECT_EQ(after.num_cache_flushes, before.num_cache_flushes);
  EXPECT_EQ(after.num_device_allocs, before.num_device_allocs);
  EXPECT_EQ(after.reserved_bytes.all().current, before.reserved_bytes.all().current);
  a.deallocate(live);
  expect_valid(a);
}

TEST_F(caching_allocator_test, stats_follow_pytorch_semantics) {
  caching_allocator a(dev, {});
  void* s = a.allocate(1000, s0);
  void* l = a.allocate(3 * MiB, s0);
  auto st = a.stats();
  EXPECT_EQ(st.allocation.all().current, 2);
  EXPECT_EQ(st.allocation[stat_pool::small].current, 1);
  EXPECT_EQ(st.allocation[stat_pool::large].current, 1);
  EXPECT_EQ(st.allocated_bytes.all().current, static_cast<std::int64_t>(1024 + 3 * MiB));
  EXPECT_EQ(st.requested_bytes.all().current, static_cast<std::int64_t>(1000 + 3 * MiB));
  EXPECT_EQ(st.active.all().current, 2);
  EXPECT_EQ(st.segment.all().current, 2);
  EXPECT_EQ(st.reserved_bytes.all().current, static_cast<std::int64_t>(22 * MiB));
  EXPECT_EQ(st.num_device_allocs, 2u);
  a.deallocate(l);
  st = a.stats();
  EXPECT_EQ(st.allocated_bytes.all().current, 1024);
  EXPECT_EQ(st.allocated_bytes.all().peak, static_cast<std::int64_t>(1024 + 3 * MiB));
  EXPECT_EQ(st.allocated_bytes.all().allocated, static_cast<std::int64_t>(1024 + 3 * MiB));
  EXPECT_EQ(st.allocated_bytes.all().freed, static_cast<std::int64_t>(3 * MiB));
  a.reset_peak_stats();
  st = a.stats();
  EXPECT_EQ(st.allocated_bytes.all().peak, 1024);
  EXPECT_EQ(st.allocated_bytes.all().allocated, static_cast<std::int64_t>(1024 + 3 * MiB));
  const nlohmann::json j = st.to_json();
  for (const char* key :
       {"allocation", "segment", "active", "inactive_split", "allocated_bytes", "reserved_bytes",
        "active_bytes", "inactive_split_bytes", "requested_bytes"}) {
    ASSERT_TRUE(j.contains(key)) << key;
    for (const char* pool : {"all", "small_pool", "large_pool"}) {
      ASSERT_TRUE(j[key].contains(pool)) << key << "." << pool;
      for (const char* f : {"current", "peak", "allocated", "freed"}) {
        EXPECT_TRUE(j[key][pool].contains(f)) << key << "." << pool << "." << f;
      }
    }
  }
  EXPECT_EQ(j["allocated_bytes"]["all"]["current"], 1024);
  for (const char* key : {"num_alloc_retries", "num_ooms", "num_cache_flushes", "num_device_allocs",
                          "num_device_frees", "fragmentation"}) {
    EXPECT_TRUE(j.contains(key)) << key;
  }
  a.deallocate(s);
  expect_valid(a);
}

TEST_F(caching_allocator_test, snapshot_lists_segments_and_block_states) {
  caching_allocator a(dev, {});
  stream_t s1 = dev.create_stream(stream_priority::normal);
  void* p = a.allocate(700, s0);
  void* q = a.allocate(2048, s0);
  a.record_stream(q, s1);
  // Keep s1 busy so that q stays pending after its free.
  dev.launch(s1, kernel_cost{0, 0, 1e9}, nullptr, {});
  a.deallocate(q);
  const nlohmann::json snap = a.snapshot();
  EXPECT_EQ(snap["device"], "sim:custom/real");
  EXPECT_EQ(snap["budget"], GiB);
  ASSERT_EQ(snap["segments"].size(), 1u);
  const auto& seg = snap["segments"][0];
  EXPECT_EQ(seg["pool"], "small");
  EXPECT_EQ(seg["size"], 2 * MiB);
  EXPECT_EQ(seg["address"], reinterpret_cast<std::uintptr_t>(p));
  ASSERT_EQ(seg["blocks"].size(), 3u);
  EXPECT_EQ(seg["blocks"][0]["state"], "active_allocated");
  EXPECT_EQ(seg["blocks"][0]["requested"], 700);
  EXPECT_EQ(seg["blocks"][0]["size"], 1024);
  EXPECT_EQ(seg["blocks"][1]["state"], "active_pending_free");
  EXPECT_EQ(seg["blocks"][1]["address"], reinterpret_cast<std::uintptr_t>(q));
  EXPECT_EQ(seg["blocks"][2]["state"], "inactive");
  EXPECT_EQ(snap["stats"]["active"]["all"]["current"], 2);
  expect_valid(a);
  dev.synchronize();
  a.deallocate(p);
  a.empty_cache();
  EXPECT_EQ(a.snapshot()["segments"].size(), 0u);
  expect_valid(a);
  dev.destroy_stream(s1);
}

TEST_F(caching_allocator_test, empty_cache_waits_for_pending_frees) {
  caching_allocator a(dev, {});
  stream_t s1 = dev.create_stream(stream_priority::normal);
  void* p = a.allocate(5 * MiB, s0);
  a.record_stream(p, s1);
  dev.launch(s1, kernel_cost{0, 0, 1e9}, nullptr, {});
  a.deallocate(p);
  EXPECT_EQ(a.stats().active.all().current, 1);  // pending: active, not allocated
  EXPECT_EQ(a.stats().allocation.all().current, 0);
  a.empty_cache();
  EXPECT_EQ(a.stats().reserved_bytes.all().current, 0);
  EXPECT_EQ(a.stats().active.all().current, 0);
  EXPECT_GE(dev.now_ns(), 1e9);  // it waited for s1's work (modelled)
  expect_valid(a);
  dev.destroy_stream(s1);
}

TEST_F(caching_allocator_test, failed_event_record_holds_the_block_until_a_device_sync) {
  caching_allocator a(dev, {});
  stream_t s1 = dev.create_stream(stream_priority::normal);
  void* p = a.allocate(4096, s0);
  a.record_stream(p, s1);
  dev.fail_always(sim_call::event_record);
  a.deallocate(p);  // noexcept: the failure is absorbed
  dev.clear_faults();
  EXPECT_EQ(a.stats().active.all().current, 1);
  expect_valid(a);
  void* q = a.allocate(4096, s0);
  EXPECT_NE(q, p);  // cannot be proven idle by an event: not reused
  a.deallocate(q);
  a.empty_cache();  // a device-wide synchronize proves it idle
  EXPECT_EQ(a.stats().active.all().current, 0);
  EXPECT_EQ(a.stats().reserved_bytes.all().current, 0);
  expect_valid(a);
  dev.destroy_stream(s1);
}

// Forwards to a sim_device, counting events created and calling `on_blocking_call` from inside
// every call that may wait for the device. The allocator must not hold its lock there: the
// callback takes it (through stats()), which would deadlock the test rather than pass it.
class probe_device final : public device {
 public:
  explicit probe_device(sim_device& inner) : inner_(inner) {}
  std::function<void()> on_blocking_call;
  int events_created = 0;
  int blocking_calls = 0;

  std::string name() const override { return inner_.name(); }
  int ordinal() const noexcept override { return inner_.ordinal(); }
  void* allocate_device(std::size_t bytes) override {
    blocking();
    return inner_.allocate_device(bytes);
  }
  void free_device(void* ptr) noexcept override {
    blocking();
    inner_.free_device(ptr);
  }
  void* allocate_pinned(std::size_t bytes) override { return inner_.allocate_pinned(bytes); }
  void free_pinned(void* ptr) noexcept override { inner_.free_pinned(ptr); }
  void* allocate_managed(std::size_t bytes) override { return inner_.allocate_managed(bytes); }
  void free_managed(void* ptr) noexcept override { inner_.free_managed(ptr); }
  void prefetch_managed(const void* ptr, std::size_t bytes, bool to_device,
                        stream_t stream) override {
    inner_.prefetch_managed(ptr, bytes, to_device, stream);
  }
  void advise_managed(const void* ptr, std::size_t bytes, managed_advice advice) override {
    inner_.advise_managed(ptr, bytes, advice);
  }
  memory_info memory() const override { return inner_.memory(); }
  stream_t create_stream(stream_priority p) override { return inner_.create_stream(p); }
  stream_t wrap_native_stream(void* native) override { return inner_.wrap_native_stream(native); }
  void* native_stream(stream_t s) const override { return inner_.native_stream(s); }
  void destroy_stream(stream_t s) noexcept override { inner_.destroy_stream(s); }
  stream_t default_stream() override { return inner_.default_stream(); }
  void synchronize_stream(stream_t s) override {
    blocking();
    inner_.synchronize_stream(s);
  }
  void synchronize() override {
    blocking();
    inner_.synchronize();
  }
  event_t create_event() override {
    ++events_created;
    return inner_.create_event();
  }
  void destroy_event(event_t e) noexcept override { inner_.destroy_event(e); }
  void record_event(event_t e, stream_t s) override { inner_.record_event(e, s); }
  void wait_event(stream_t s, event_t e) override { inner_.wait_event(s, e); }
  bool query_event(event_t e) override { return inner_.query_event(e); }
  void synchronize_event(event_t e) override {
    blocking();
    inner_.synchronize_event(e);
  }
  double elapsed_ms(event_t a, event_t b) override { return inner_.elapsed_ms(a, b); }
  void copy_async(void* dst, const void* src, std::size_t bytes, copy_kind kind,
                  stream_t s) override {
    inner_.copy_async(dst, src, bytes, kind, s);
  }
  void launch(stream_t s, const kernel_cost& cost, std::function<void()> fn,
              std::span<const touched_buffer> touched) override {
    inner_.launch(s, cost, std::move(fn), touched);
  }

 private:
  void blocking() {
    ++blocking_calls;
    if (on_blocking_call) on_blocking_call();
  }
  sim_device& inner_;
};

TEST_F(caching_allocator_test, events_come_from_a_reused_pool) {
  probe_device probe(dev);
  caching_allocator a(probe, {});
  stream_t s1 = dev.create_stream(stream_priority::normal);
  stream_t s2 = dev.create_stream(stream_priority::normal);
  const auto records_before = dev.calls(sim_call::event_record);
  for (int i = 0; i < 50; ++i) {
    void* p = a.allocate(4096, s0);
    a.record_stream(p, s1);
    a.record_stream(p, s1);  // the same stream twice: one use
    a.record_stream(p, s2);
    a.deallocate(p);
    dev.synchronize();
  }
  EXPECT_EQ(dev.calls(sim_call::event_record) - records_before, 100u);
  void* p = a.allocate(4096, s0);      // polls, and returns the completed events to the pool
  EXPECT_LE(probe.events_created, 2);  // not one per free
  EXPECT_EQ(a.stats().active.all().current, 1);
  a.deallocate(p);
  expect_valid(a);
  dev.destroy_stream(s1);
  dev.destroy_stream(s2);
}

TEST_F(caching_allocator_test, no_lock_is_held_across_blocking_device_calls) {
  probe_device probe(dev);
  caching_allocator a(probe, limit(64 * MiB));
  probe.on_blocking_call = [&a] { (void)a.stats(); };  // deadlocks if the lock is held
  stream_t s1 = dev.create_stream(stream_priority::normal);
  void* x = a.allocate(40 * MiB, s0);  // allocate_device
  a.record_stream(x, s1);
  dev.launch(s1, kernel_cost{0, 0, 1e6}, nullptr, {});
  a.deallocate(x);                     // pending on s1
  void* y = a.allocate(50 * MiB, s0);  // ladder: synchronize_event, free_device, allocate
  a.deallocate(y);
  a.empty_cache();  // free_device
  EXPECT_GE(probe.blocking_calls, 5);
  probe.on_blocking_call = nullptr;
  expect_valid(a);
  dev.destroy_stream(s1);
}

// A reclaimer that owns live blocks and gives them back on request, the way the swap engine
// evicts idle buffers. It checks that it is called without the allocator's lock held by calling
// into the allocator (a held lock would deadlock the test, not pass it).
class owning_reclaimer final : public reclaimer {
 public:
  explicit owning_reclaimer(caching_allocator& a) : alloc_(a) {}
  std::vector<void*> owned;
  std::vector<std::size_t> asked;

  std::size_t reclaim(std::size_t bytes, stream_t) override {
    asked.push_back(bytes);
    (void)alloc_.stats();  // takes the allocator lock
    std::size_t freed = 0;
    while (!owned.empty() && freed < bytes) {
      freed += alloc_.allocated_size(owned.back());
      alloc_.deallocate(owned.back());
      owned.pop_back();
    }
    return freed;
  }

 private:
  caching_allocator& alloc_;
};

TEST_F(caching_allocator_test, reclaimers_are_asked_before_oom) {
  caching_allocator a(dev, limit(64 * MiB));
  owning_reclaimer r(a);
  r.owned.push_back(a.allocate(30 * MiB, s0));
  r.owned.push_back(a.allocate(30 * MiB, s0));
  a.add_reclaimer(&r);
  a.add_reclaimer(&r);  // registered once
  void* p = a.allocate(30 * MiB, s0);
  ASSERT_NE(p, nullptr);
  ASSERT_EQ(r.asked.size(), 1u);
  EXPECT_GE(r.asked[0], 30 * MiB);
  EXPECT_EQ(r.owned.size(), 1u);
  expect_valid(a);

  a.remove_reclaimer(&r);
  EXPECT_THROW(a.allocate(30 * MiB, s0), out_of_memory);
  EXPECT_EQ(r.asked.size(), 1u);
  a.deallocate(p);
  for (void* q : r.owned) a.deallocate(q);
  expect_valid(a);
}

TEST_F(caching_allocator_test, a_reclaimer_that_frees_nothing_ends_in_oom) {
  struct empty_reclaimer final : reclaimer {
    int calls = 0;
    std::size_t reclaim(std::size_t, stream_t) override {
      ++calls;
      return 0;
    }
  } r;
  caching_allocator a(dev, limit(32 * MiB));
  void* x = a.allocate(30 * MiB, s0);
  a.add_reclaimer(&r);
  EXPECT_THROW(a.allocate(10 * MiB, s0), out_of_memory);
  EXPECT_EQ(r.calls, 1);
  a.remove_reclaimer(&r);
  a.deallocate(x);
  expect_valid(a);
}

TEST_F(caching_allocator_test, many_live_blocks_freed_in_random_order) {
  // Grows the address index well past its first size and empties it in shuffled order, so that
  // deletions shift entries across probe runs (and the end of the table).
  caching_allocator a(dev, eager());
  std::vector<void*> live;
  for (int i = 0; i < 20000; ++i)
    live.push_back(a.allocate(512 + static_cast<std::size_t>(i % 7) * 512, s0));
  expect_valid(a);
  std::mt19937_64 rng(7);
  std::shuffle(live.begin(), live.end(), rng);
  for (std::size_t i = 0; i < live.size(); ++i) {
    ASSERT_GT(a.allocated_size(live[i]), 0u) << i;
    a.deallocate(live[i]);
    EXPECT_EQ(a.allocated_size(live[i]), 0u);
    if (i % 5000 == 0) expect_valid(a);
  }
  EXPECT_EQ(a.stats().allocation.all().current, 0);
  EXPECT_EQ(a.stats().inactive_split.all().current, 0);  // every segment merged back whole
  EXPECT_EQ(a.stats().num_invalid_frees, 0u);
  expect_valid(a);
}

TEST_F(caching_allocator_test, destructor_returns_every_segment) {
  {
    caching_allocator a(dev, {});
    void* x = a.allocate(MiB, s0);
    void* y = a.allocate(30 * MiB, s0);
    a.deallocate(x);
    (void)y;  // leaked by its owner: still returned, with a warning
    EXPECT_GT(dev.counters().device_used, 0u);
  }
  EXPECT_EQ(dev.counters().device_used, 0u);
}

}  // namespace
}  // namespace gpuswap
