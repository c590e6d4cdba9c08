// sim_device's virtual memory (reserve_address_range, map_pages, unmap_pages): what the
// caching allocator's expandable segments rely on, checked on the model. The checks every
// backend passes are in device_conformance_test.cpp; the CUDA-only ones in
// cuda_device_vm_test.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "core/errors.hpp"
#include "device/sim_device.hpp"

namespace gpuswap {
namespace {

constexpr std::size_t mib = std::size_t{1} << 20;
constexpr std::size_t page = 2 * mib;

sim_options small_real() {
  sim_options o;
  o.device_capacity = 64 * mib;
  o.host_capacity = 64 * mib;
  return o;
}

sim_options small_phantom() {
  sim_options o = small_real();
  o.backing = sim_backing::phantom;
  return o;
}

char* at(void* base, std::size_t pages) { return static_cast<char*>(base) + pages * page; }

template <typename Fn>
std::string device_error_call(Fn&& fn) {
  try {
    fn();
  } catch (const device_error& e) {
    return e.call();
  }
  return "(nothing thrown)";
}

std::size_t occurrences(const std::string& text, std::string_view what) {
  std::size_t n = 0;
  for (auto at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

std::size_t count_not(const void* p, std::size_t n, unsigned char value) {
  const auto* c = static_cast<const unsigned char*>(p);
  return static_cast<std::size_t>(std::count_if(c, c + n, [&](unsigned char b) { return b != value; }));
}

// --- options -----------------------------------------------------------------------------------

TEST(sim_vm_options, page_size_defaults_to_2_mib_and_is_validated) {
  EXPECT_EQ(sim_options{}.vm_page_size, 2 * mib);
  EXPECT_EQ(sim_device(small_real()).vm_page_size(), 2 * mib);
  EXPECT_EQ(sim_preset("h100-pcie5").vm_page_size, 2 * mib);
  for (std::size_t bad : {std::size_t{1}, std::size_t{2048}, std::size_t{3 * 4096},
                          std::size_t{2 * mib + 4096}}) {
    sim_options o;
    o.vm_page_size = bad;
    try {
      o.validate();
      ADD_FAILURE() << bad << " accepted";
    } catch (const config_error& e) {
      EXPECT_EQ(e.key(), "vm_page_size");
    }
  }
  sim_options o;
  o.vm_page_size = 4096;
  EXPECT_NO_THROW(o.validate());
  o.vm_page_size = 0;
  EXPECT_NO_THROW(o.validate());
  o.vm_map_ns_per_page = -1;
  EXPECT_THROW(o.validate(), config_error);
  o.vm_map_ns_per_page = 0;
  o.vm_unmap_ns_per_page = -1;
  EXPECT_THROW(o.validate(), config_error);
  o.vm_unmap_ns_per_page = 0;
  o.vm_call_ns = -1;
  EXPECT_THROW(o.validate(), config_error);
}

TEST(sim_vm_options, page_size_zero_models_a_device_without_the_calls) {
  sim_options o = small_real();
  o.vm_page_size = 0;
  sim_device d(o);
  EXPECT_EQ(d.vm_page_size(), 0u);
  EXPECT_THROW(d.reserve_address_range(page), device_error);
  void* p = d.allocate_device(page);
  EXPECT_THROW(d.map_pages(p, page), device_error);
  d.unmap_pages(p, page);  // no-ops, as device.hpp says
  d.release_address_range(p, page);
  EXPECT_TRUE(d.owns(p));
  d.free_device(p);
}

// --- reservations ------------------------------------------------------------------------------

TEST(sim_vm_reserve, ranges_are_page_aligned_disjoint_and_hold_no_memory) {
  sim_device d(small_real());
  void* a = d.reserve_address_range(4 * d.options().device_capacity);
  void* b = d.reserve_address_range(page);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(a) % page, 0u);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(b) % page, 0u);
  const auto ua = reinterpret_cast<std::uintptr_t>(a);
  const auto ub = reinterpret_cast<std::uintptr_t>(b);
  EXPECT_TRUE(ub >= ua + 4 * d.options().device_capacity || ub + page <= ua);
  EXPECT_EQ(d.memory().free_bytes, d.options().device_capacity);
  EXPECT_EQ(d.counters().vm_reserved, 4 * d.options().device_capacity + page);
  EXPECT_FALSE(d.owns(a)) << "reserved but unmapped address space is not device memory";
  d.release_address_range(a, 4 * d.options().device_capacity);
  d.release_address_range(b, page);
  EXPECT_EQ(d.counters().vm_reserved, 0u);
}

TEST(sim_vm_reserve, bad_sizes_throw_naming_the_call) {
  sim_device d(small_real());
  EXPECT_EQ(device_error_call([&] { d.reserve_address_range(0); }), "reserve_address_range");
  EXPECT_EQ(device_error_call([&] { d.reserve_address_range(page + 4096); }),
            "reserve_address_range");
}

TEST(sim_vm_reserve, exhausted_address_space_gives_null_and_recovers) {
  sim_device d(small_real());
  EXPECT_EQ(d.reserve_address_range(std::size_t{1} << 50), nullptr);
  // The region is 256 device capacities: 64 reservations of 4 capacities fill it.
  const std::size_t four = 4 * d.options().device_capacity;
  std::vector<void*> ranges;
  for (int i = 0; i < 65; ++i) {
    void* r = d.reserve_address_range(four);
    if (r == nullptr) break;
    ranges.push_back(r);
  }
  EXPECT_EQ(ranges.size(), 64u);
  d.release_address_range(ranges.back(), four);
  ranges.pop_back();
  void* again = d.reserve_address_range(four);
  EXPECT_NE(again, nullptr);
  ranges.push_back(again);
  for (void* r : ranges) d.release_address_range(r, four);
}

TEST(sim_vm_reserve, release_of_what_is_not_a_reservation_changes_nothing) {
  sim_device d(small_real());
  void* r = d.reserve_address_range(4 * page);
  ASSERT_TRUE(d.map_pages(r, page));
  ::testing::internal::CaptureStderr();
  d.release_address_range(r, 2 * page);        // wrong size
  d.release_address_range(at(r, 1), 3 * page);  // not its start
  int local = 0;
  d.release_address_range(&local, page);  // not ours at all
  const std::string logged = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(occurrences(logged, "release_address_range ignored"), 3u) << logged;
  EXPECT_TRUE(d.owns(r));
  EXPECT_EQ(d.counters().vm_reserved, 4 * page);
  EXPECT_EQ(d.counters().vm_mapped, page);
  d.unmap_pages(r, page);
  d.release_address_range(r, 4 * page);
  EXPECT_EQ(d.counters().vm_reserved, 0u);
}

TEST(sim_vm_reserve, release_unmaps_what_is_still_mapped) {
  sim_device d(small_real());
  void* r = d.reserve_address_range(8 * page);
  ASSERT_TRUE(d.map_pages(at(r, 2), 3 * page));
  EXPECT_EQ(d.memory().free_bytes, 64 * mib - 3 * page);
  d.release_address_range(r, 8 * page);
  EXPECT_EQ(d.memory().free_bytes, 64 * mib);
  EXPECT_EQ(d.counters().vm_mapped, 0u);
  EXPECT_FALSE(d.owns(at(r, 2)));
}

// --- map and unmap -----------------------------------------------------------------------------

TEST(sim_vm_map, mapped_pages_count_as_used_device_memory) {
  sim_device d(small_real());
  void* r = d.reserve_address_range(16 * page);
  ASSERT_TRUE(d.map_pages(at(r, 4), 4 * page));
  EXPECT_EQ(d.memory().free_bytes, 64 * mib - 4 * page);
  EXPECT_EQ(d.counters().device_used, 4 * page);
  EXPECT_EQ(d.counters().vm_mapped, 4 * page);
  EXPECT_TRUE(d.owns(at(r, 4)));
  EXPECT_TRUE(d.owns(at(r, 8) - 1));
  EXPECT_FALSE(d.owns(at(r, 8)));
  EXPECT_FALSE(d.owns(at(r, 4) - 1));
  // The same budget as allocate_device.
  void* block = d.allocate_device(8 * mib);
  ASSERT_NE(block, nullptr);
  EXPECT_EQ(d.counters().device_used, 4 * page + 8 * mib);
  d.free_device(block);
  d.unmap_pages(at(r, 4), 4 * page);
  EXPECT_EQ(d.memory().free_bytes, 64 * mib);
  EXPECT_EQ(d.counters().device_used, 0u);
  d.release_address_range(r, 16 * page);
}

TEST(sim_vm_map, misaligned_or_outside_one_reservation_throws_and_maps_nothing) {
  sim_device d(small_real());
  void* r = d.reserve_address_range(4 * page);
  void* next = d.reserve_address_range(4 * page);
  void* block = d.allocate_device(mib);
  auto map = [&](void* p, std::size_t n) { return device_error_call([&] { d.map_pages(p, n); }); };
  EXPECT_EQ(map(static_cast<char*>(r) + 4096, page), "map_pages");
  EXPECT_EQ(map(r, page + 4096), "map_pages");
  EXPECT_EQ(map(r, 0), "map_pages");
  EXPECT_EQ(map(at(r, 3), 2 * page), "map_pages") << "past the end of the reservation";
  EXPECT_EQ(map(r, 8 * page), "map_pages") << "across two reservations, even adjacent ones";
  EXPECT_EQ(map(block, page), "map_pages") << "not reserved address space";
  int local = 0;
  EXPECT_EQ(map(&local, page), "map_pages");
  d.release_address_range(r, 4 * page);
  EXPECT_EQ(map(r, page), "map_pages") << "a released reservation";
  EXPECT_EQ(d.counters().vm_mapped, 0u);
  EXPECT_EQ(d.counters().device_used, mib);
  d.free_device(block);
  d.release_address_range(next, 4 * page);
}

TEST(sim_vm_map, mapping_a_page_already_mapped_throws) {
  sim_device d(small_real());
  void* r = d.reserve_address_range(8 * page);
  ASSERT_TRUE(d.map_pages(at(r, 2), 2 * page));
  EXPECT_EQ(device_error_call([&] { d.map_pages(at(r, 2), 2 * page); }), "map_pages");
  EXPECT_EQ(device_error_call([&] { d.map_pages(at(r, 3), 2 * page); }), "map_pages");
  EXPECT_EQ(device_error_call([&] { d.map_pages(at(r, 0), 3 * page); }), "map_pages");
  EXPECT_EQ(device_error_call([&] { d.map_pages(at(r, 0), 8 * page); }), "map_pages");
  EXPECT_EQ(d.counters().vm_mapped, 2 * page);
  // Its neighbours on both sides are free to map.
  EXPECT_TRUE(d.map_pages(at(r, 0), 2 * page));
  EXPECT_TRUE(d.map_pages(at(r, 4), 4 * page));
  EXPECT_EQ(d.counters().vm_mapped, 8 * page);
  d.unmap_pages(r, 8 * page);
  d.release_address_range(r, 8 * page);
}

TEST(sim_vm_map, beyond_capacity_returns_false_and_maps_nothing) {
  sim_device d(small_real());
  void* r = d.reserve_address_range(64 * page);
  void* block = d.allocate_device(10 * mib);
  const memory_info before = d.memory();
  bool mapped = true;
  EXPECT_NO_THROW(mapped = d.map_pages(r, 32 * page));  // 64 MiB > the 54 MiB free
  EXPECT_FALSE(mapped);
  EXPECT_EQ(d.memory().free_bytes, before.free_bytes);
  EXPECT_EQ(d.counters().vm_mapped, 0u);
  EXPECT_FALSE(d.owns(r));
  EXPECT_TRUE(d.map_pages(r, 27 * page)) << "exactly what is free";
  EXPECT_EQ(d.memory().free_bytes, 0u);
  EXPECT_FALSE(d.map_pages(at(r, 27), page));
  EXPECT_EQ(d.allocate_device(mib), nullptr);
  d.unmap_pages(at(r, 10), page);  // a hole gives its page back to the budget
  EXPECT_TRUE(d.map_pages(at(r, 40), page));
  d.free_device(block);
  d.release_address_range(r, 64 * page);
}

TEST(sim_vm_map, one_page_of_a_multi_page_map_can_be_unmapped_alone) {
  sim_device d(small_real());
  void* r = d.reserve_address_range(8 * page);
  ASSERT_TRUE(d.map_pages(r, 6 * page));
  d.unmap_pages(at(r, 2), page);
  EXPECT_EQ(d.counters().vm_mapped, 5 * page);
  EXPECT_EQ(d.memory().free_bytes, 64 * mib - 5 * page);
  EXPECT_TRUE(d.owns(at(r, 1)));
  EXPECT_FALSE(d.owns(at(r, 2)));
  EXPECT_TRUE(d.owns(at(r, 3)));
  // The hole can be mapped again, on its own.
  ASSERT_TRUE(d.map_pages(at(r, 2), page));
  EXPECT_EQ(d.counters().vm_mapped, 6 * page);
  d.unmap_pages(r, 6 * page);
  EXPECT_EQ(d.counters().vm_mapped, 0u);
  d.release_address_range(r, 8 * page);
}

TEST(sim_vm_map, unmap_covers_pages_of_several_maps_and_skips_unmapped_ones) {
  sim_device d(small_real());
  void* r = d.reserve_address_range(16 * page);
  ASSERT_TRUE(d.map_pages(at(r, 0), 2 * page));
  ASSERT_TRUE(d.map_pages(at(r, 2), 2 * page));
  ASSERT_TRUE(d.map_pages(at(r, 8), 2 * page));
  d.unmap_pages(at(r, 1), 2 * page);  // one page of each of the first two maps
  EXPECT_EQ(d.counters().vm_mapped, 4 * page);
  EXPECT_TRUE(d.owns(at(r, 0)));
  EXPECT_FALSE(d.owns(at(r, 1)));
  EXPECT_FALSE(d.owns(at(r, 2)));
  EXPECT_TRUE(d.owns(at(r, 3)));
  d.unmap_pages(r, 16 * page);  // pages 1, 2 and 4..7, 10.. are not mapped: skipped
  EXPECT_EQ(d.counters().vm_mapped, 0u);
  EXPECT_EQ(d.memory().free_bytes, 64 * mib);
  d.unmap_pages(r, 16 * page);  // nothing mapped at all
  EXPECT_EQ(d.memory().free_bytes, 64 * mib);
  d.release_address_range(r, 16 * page);
}

TEST(sim_vm_map, misaligned_unmap_does_nothing) {
  sim_device d(small_real());
  void* r = d.reserve_address_range(4 * page);
  ASSERT_TRUE(d.map_pages(r, 4 * page));
  ::testing::internal::CaptureStderr();
  d.unmap_pages(static_cast<char*>(r) + 4096, page);
  d.unmap_pages(r, page + 4096);
  d.unmap_pages(r, 8 * page);  // past the reservation
  int local = 0;
  d.unmap_pages(&local, page);
  const std::string logged = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(occurrences(logged, "unmap_pages ignored"), 4u) << logged;
  EXPECT_EQ(d.counters().vm_mapped, 4 * page);
  d.release_address_range(r, 4 * page);
}

// A random sequence of maps and unmaps against a plain per-page model: the mapped-page runs
// merge and split correctly whatever the order.
TEST(sim_vm_map, random_maps_and_unmaps_agree_with_a_per_page_model) {
  sim_options o = small_phantom();
  o.vm_page_size = 64 * 1024;
  const std::size_t small_page = o.vm_page_size;
  sim_device d(o);
  constexpr std::size_t pages = 96;
  char* r = static_cast<char*>(d.reserve_address_range(pages * small_page));
  ASSERT_NE(r, nullptr);
  void* host = d.allocate_pinned(pages * small_page);
  stream_t s = d.create_stream(stream_priority::normal);
  std::vector<bool> model(pages, false);
  std::mt19937 rng(42);
  for (int step = 0; step < 3000; ++step) {
    const std::size_t first = rng() % pages;
    const std::size_t count = 1 + rng() % std::min<std::size_t>(8, pages - first);
    void* p = r + first * small_page;
    const bool any = std::any_of(model.begin() + first, model.begin() + first + count,
                                 [](bool m) { return m; });
    if (rng() % 2 == 0) {
      if (any) {
        EXPECT_THROW(d.map_pages(p, count * small_page), device_error);
      } else {
        ASSERT_TRUE(d.map_pages(p, count * small_page));
        std::fill(model.begin() + first, model.begin() + first + count, true);
      }
    } else {
      d.unmap_pages(p, count * small_page);
      std::fill(model.begin() + first, model.begin() + first + count, false);
    }
    const auto mapped = static_cast<std::size_t>(std::count(model.begin(), model.end(), true));
    ASSERT_EQ(d.counters().vm_mapped, mapped * small_page) << "step " << step;
    if (step % 50 != 0) continue;
    // Each maximal run of mapped pages is one span a copy may cover, whatever maps made it;
    // one page more is not.
    for (std::size_t i = 0; i < pages;) {
      if (!model[i]) {
        ++i;
        continue;
      }
      std::size_t end = i;
      while (end < pages && model[end]) ++end;
      const std::size_t n = (end - i) * small_page;
      EXPECT_NO_THROW(d.copy_async(host, r + i * small_page, n, copy_kind::device_to_host, s))
          << "step " << step << ", pages " << i << ".." << end;
      if (end < pages) {
        EXPECT_THROW(d.copy_async(host, r + i * small_page, n + small_page,
                                  copy_kind::device_to_host, s),
                     device_error);
      }
      i = end;
    }
  }
  d.synchronize_stream(s);
  d.destroy_stream(s);
  d.free_pinned(host);
  for (std::size_t i = 0; i < pages; ++i) {
    EXPECT_EQ(d.owns(r + i * small_page), model[i]) << "page " << i;
    EXPECT_EQ(d.owns(r + (i + 1) * small_page - 1), model[i]) << "page " << i;
  }
  d.release_address_range(r, pages * small_page);
  EXPECT_EQ(d.counters().device_used, 0u);
}

TEST(sim_vm_map, concurrent_maps_and_unmaps_of_disjoint_pages_keep_the_books) {
  sim_options o = small_phantom();
  o.device_capacity = 256 * mib;
  sim_device d(o);
  constexpr int threads = 4;
  constexpr std::size_t pages_each = 8;
  char* r = static_cast<char*>(d.reserve_address_range(threads * pages_each * page));
  std::vector<std::thread> workers;
  std::atomic<int> failures{0};
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      char* mine = r + static_cast<std::size_t>(t) * pages_each * page;
      for (int i = 0; i < 200; ++i) {
        const std::size_t p = static_cast<std::size_t>(i) % pages_each;
        if (!d.map_pages(mine + p * page, page)) failures.fetch_add(1);
        if (!d.owns(mine + p * page)) failures.fetch_add(1);
        if (i % 3 != 0) d.unmap_pages(mine + p * page, page);
        if (i % pages_each == pages_each - 1) d.unmap_pages(mine, pages_each * page);
      }
    });
  }
  for (auto& w : workers) w.join();
  EXPECT_EQ(failures.load(), 0);
  d.unmap_pages(r, threads * pages_each * page);
  EXPECT_EQ(d.counters().vm_mapped, 0u);
  EXPECT_EQ(d.counters().device_used, 0u);
  d.release_address_range(r, threads * pages_each * page);
}

// --- bytes (real backing) ----------------------------------------------------------------------

// Copies through mapped pages, across maps and around an unmapped page: device_conformance's
// vm_copies_through_mapped_pages_keep_every_byte, which runs on the simulator with real bytes.

TEST(sim_vm_bytes, fresh_pages_are_poisoned_and_forget_what_was_written_before) {
  sim_device d(small_real());
  void* r = d.reserve_address_range(2 * page);
  ASSERT_TRUE(d.map_pages(r, 2 * page));
  EXPECT_EQ(count_not(r, 2 * page, 0xCD), 0u);
  std::memset(r, 0x5A, 2 * page);  // real backing: the model's memory, addressable from here
  d.unmap_pages(r, page);
  ASSERT_TRUE(d.map_pages(r, page));
  EXPECT_EQ(count_not(r, page, 0xCD), 0u) << "a remapped page shows the old bytes";
  EXPECT_EQ(count_not(at(r, 1), page, 0x5A), 0u) << "the page left mapped lost its bytes";
  d.release_address_range(r, 2 * page);
}

TEST(sim_vm_bytes, without_poison_a_remapped_page_reads_zero_not_the_old_bytes) {
  sim_options o = small_real();
  o.poison_fresh_memory = false;
  sim_device d(o);
  void* r = d.reserve_address_range(page);
  ASSERT_TRUE(d.map_pages(r, page));
  std::memset(r, 0x5A, page);
  d.unmap_pages(r, page);
  ASSERT_TRUE(d.map_pages(r, page));
  EXPECT_EQ(count_not(r, page, 0), 0u);
  d.release_address_range(r, page);
}

TEST(sim_vm_bytes, a_kernel_writes_mapped_pages) {
  sim_device d(small_real());
  void* r = d.reserve_address_range(2 * page);
  ASSERT_TRUE(d.map_pages(r, 2 * page));
  auto* out = static_cast<unsigned char*>(d.allocate_pinned(2 * page));
  stream_t s = d.create_stream(stream_priority::normal);
  touched_buffer t{r, 2 * page};
  d.launch(s, kernel_cost{1e6, 0, 0}, [r] { std::memset(r, 0x42, 2 * page); }, {&t, 1});
  d.copy_async(out, r, 2 * page, copy_kind::device_to_host, s);
  d.synchronize_stream(s);
  EXPECT_EQ(count_not(out, 2 * page, 0x42), 0u);
  d.free_pinned(out);
  d.destroy_stream(s);
  d.release_address_range(r, 2 * page);
}

TEST(sim_vm_bytes_death, touching_an_unmapped_page_faults) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");  // the device has worker threads
  EXPECT_DEATH(
      {
        sim_device d(small_real());
        void* r = d.reserve_address_range(2 * page);
        if (!d.map_pages(r, 2 * page)) std::abort();
        static_cast<volatile char*>(r)[0] = 1;  // mapped: fine
        d.unmap_pages(r, page);
        static_cast<volatile char*>(r)[page] = 1;  // still mapped: fine
        static_cast<volatile char*>(r)[0] = 1;     // unmapped: SIGSEGV
        std::fprintf(stderr, "survived\n");
        std::exit(0);
      },
      "");
}

// --- what copies and kernels may touch ---------------------------------------------------------

TEST(sim_vm_checks, copies_and_kernels_touching_unmapped_pages_are_illegal_addresses) {
  for (sim_backing backing : {sim_backing::real, sim_backing::phantom}) {
    sim_options o = small_real();
    o.backing = backing;
    sim_device d(o);
    void* r = d.reserve_address_range(4 * page);
    ASSERT_TRUE(d.map_pages(r, 3 * page));
    d.unmap_pages(at(r, 1), page);
    void* host = d.allocate_pinned(2 * page);
    stream_t s = d.create_stream(stream_priority::normal);
    auto error_name = [](auto&& fn) -> std::string {
      try {
        fn();
      } catch (const device_error& e) {
        return e.error_name();
      }
      return "(nothing thrown)";
    };
    EXPECT_EQ(error_name([&] { d.copy_async(at(r, 1), host, page, copy_kind::host_to_device, s); }),
              "sim_illegal_address");
    EXPECT_EQ(error_name([&] { d.copy_async(host, r, 2 * page, copy_kind::device_to_host, s); }),
              "sim_illegal_address")
        << "a copy running from a mapped page into an unmapped one";
    EXPECT_EQ(error_name([&] { d.copy_async(at(r, 3), at(r, 2), page, copy_kind::device_to_device, s); }),
              "sim_illegal_address");
    EXPECT_EQ(error_name([&] { d.copy_async(at(r, 2), r, page, copy_kind::host_to_device, s); }),
              "sim_invalid_value")
        << "a mapped page is device memory, not a host source";
    touched_buffer hole{at(r, 1), 16};
    EXPECT_EQ(error_name([&] { d.launch(s, kernel_cost{}, [] {}, {&hole, 1}); }),
              "sim_illegal_address");
    touched_buffer across{r, 2 * page};
    EXPECT_EQ(error_name([&] { d.launch(s, kernel_cost{}, [] {}, {&across, 1}); }),
              "sim_illegal_address");
    // The mapped pages on either side of the hole still work.
    EXPECT_NO_THROW(d.copy_async(r, host, page, copy_kind::host_to_device, s));
    EXPECT_NO_THROW(d.copy_async(host, at(r, 2), page, copy_kind::device_to_host, s));
    touched_buffer fine{at(r, 2), page};
    EXPECT_NO_THROW(d.launch(s, kernel_cost{}, [] {}, {&fine, 1}));
    d.synchronize_stream(s);
    d.free_pinned(host);
    d.destroy_stream(s);
    d.release_address_range(r, 4 * page);
  }
}

// --- phantom backing ---------------------------------------------------------------------------

TEST(sim_vm_phantom, maps_an_80_gib_gpu_without_its_bytes) {
  sim_options o = sim_preset("h100-pcie5");
  o.backing = sim_backing::phantom;
  sim_device d(o);
  const std::size_t capacity = o.device_capacity;
  void* r = d.reserve_address_range(2 * capacity);
  ASSERT_NE(r, nullptr);
  ASSERT_TRUE(d.map_pages(r, capacity - 4 * page));
  EXPECT_FALSE(d.map_pages(at(r, capacity / page), 8 * page));
  EXPECT_TRUE(d.map_pages(at(r, capacity / page), 4 * page));
  EXPECT_EQ(d.memory().free_bytes, 0u);
  void* host = d.allocate_pinned(std::size_t{8} << 30);
  stream_t s = d.create_stream(stream_priority::normal);
  d.copy_async(host, at(r, 100), std::size_t{8} << 30, copy_kind::device_to_host, s);
  d.synchronize_stream(s);
  EXPECT_EQ(d.counters().bytes_d2h, std::size_t{8} << 30);
  d.unmap_pages(r, 2 * capacity);
  EXPECT_EQ(d.memory().free_bytes, capacity);
  d.free_pinned(host);
  d.destroy_stream(s);
  d.release_address_range(r, 2 * capacity);
}

// --- fault injection ---------------------------------------------------------------------------

TEST(sim_vm_faults, an_injected_fault_makes_map_pages_return_false_and_map_nothing) {
  EXPECT_EQ(to_string(sim_call::vm_map), "vm_map");
  sim_device d(small_real());
  void* r = d.reserve_address_range(4 * page);
  d.fail_nth(sim_call::vm_map, 2);
  EXPECT_TRUE(d.map_pages(r, page));
  EXPECT_FALSE(d.map_pages(at(r, 1), page));
  EXPECT_FALSE(d.owns(at(r, 1)));
  EXPECT_EQ(d.counters().vm_mapped, page);
  EXPECT_TRUE(d.map_pages(at(r, 1), page)) << "only the second call fails";
  EXPECT_EQ(d.calls(sim_call::vm_map), 3u);
  d.fail_always(sim_call::vm_map);
  EXPECT_FALSE(d.map_pages(at(r, 2), 2 * page));
  EXPECT_THROW(d.map_pages(r, page), device_error) << "a caller's bug is still reported";
  d.clear_faults();
  EXPECT_TRUE(d.map_pages(at(r, 2), 2 * page));
  EXPECT_EQ(d.counters().vm_mapped, 4 * page);
  d.release_address_range(r, 4 * page);
}

// --- the host clock ----------------------------------------------------------------------------

TEST(sim_vm_clock, map_and_unmap_move_the_host_clock_by_their_modelled_cost) {
  sim_options o = small_phantom();
  o.vm_call_ns = 10'000;
  o.vm_map_ns_per_page = 3'000;
  o.vm_unmap_ns_per_page = 700;
  sim_device d(o);
  void* r = d.reserve_address_range(64 * page);
  EXPECT_EQ(d.now_ns(), 0.0) << "reserving is not modelled";
  ASSERT_TRUE(d.map_pages(r, 4 * page));
  EXPECT_DOUBLE_EQ(d.now_ns(), 10'000 + 4 * 3'000);
  d.unmap_pages(at(r, 1), page);
  EXPECT_DOUBLE_EQ(d.now_ns(), 22'000 + 10'000 + 700);
  d.unmap_pages(r, 4 * page);  // three pages still mapped
  EXPECT_DOUBLE_EQ(d.now_ns(), 32'700 + 10'000 + 3 * 700);
  ASSERT_FALSE(d.map_pages(r, 64 * page));  // beyond capacity: the call, no pages
  EXPECT_DOUBLE_EQ(d.now_ns(), 44'800 + 10'000);
  ASSERT_TRUE(d.map_pages(r, 2 * page));
  d.release_address_range(r, 64 * page);  // unmaps the two left
  EXPECT_DOUBLE_EQ(d.now_ns(), 54'800 + 10'000 + 2 * 3'000 + 10'000 + 2 * 700);
  // Work enqueued after a map starts no earlier than the host's clock.
  void* r2 = d.reserve_address_range(page);
  ASSERT_TRUE(d.map_pages(r2, page));
  const double after_map = d.now_ns();
  stream_t s = d.create_stream(stream_priority::normal);
  d.launch(s, kernel_cost{0, 0, 1'000}, {}, {});
  EXPECT_DOUBLE_EQ(d.stream_tail_ns(s), after_map + 1'000);
  d.destroy_stream(s);
  d.release_address_range(r2, page);
}

TEST(sim_vm_clock, default_costs_are_the_documented_estimates) {
  const sim_options o;
  EXPECT_EQ(o.vm_call_ns, 2'000);
  EXPECT_EQ(o.vm_map_ns_per_page, 1'000);
  EXPECT_EQ(o.vm_unmap_ns_per_page, 500);
}

}  // namespace
}  // namespace gpuswap
