#include "profiler/trace_summary.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "core/errors.hpp"

namespace gpuswap {
namespace {

namespace fs = std::filesystem;

void phase(std::vector<trace_event>& ev, std::int32_t layer, event_detail which, double b,
           double e) {
  ev.push_back(trace_event::layer_phase(event_kind::layer_begin, b, layer, which));
  ev.push_back(trace_event::layer_phase(event_kind::layer_end, e, layer, which));
}

void swap_out(std::vector<trace_event>& ev, std::uint64_t buffer, std::uint64_t bytes,
              std::int32_t layer, double b, double e) {
  ev.push_back(trace_event::swap(event_kind::swap_out_begin, b, buffer, bytes, layer));
  ev.push_back(trace_event::swap(event_kind::swap_out_end, e, buffer, bytes, layer));
}

void swap_in(std::vector<trace_event>& ev, std::uint64_t buffer, std::uint64_t bytes,
             std::int32_t layer, double b, double e, event_detail why = event_detail::prefetch) {
  ev.push_back(trace_event::swap(event_kind::swap_in_begin, b, buffer, bytes, layer, 0, why));
  ev.push_back(trace_event::swap(event_kind::swap_in_end, e, buffer, bytes, layer));
}

TEST(TraceSummary, OverlapIsTheUnionOfCopiesIntersectedWithTheUnionOfCompute) {
  std::vector<trace_event> ev;
  phase(ev, 0, event_detail::forward, 0, 100);
  phase(ev, 1, event_detail::backward, 200, 300);
  swap_out(ev, 1, 1000, 0, 50, 150);  // 50 of 100 under compute
  swap_in(ev, 2, 3000, 1, 250, 400);  // 50 of 150 under compute
  swap_out(ev, 3, 500, 1, 260, 280);  // inside the swap-in: copy union unchanged
  const trace_summary s = summarize(ev);
  EXPECT_EQ(s.d2h_ns, 120);
  EXPECT_EQ(s.h2d_ns, 150);
  EXPECT_EQ(s.copy_ns(), 270);
  EXPECT_EQ(s.copy_busy_ns, 250);
  EXPECT_EQ(s.compute_ns, 200);
  EXPECT_EQ(s.copy_hidden_ns, 100);
  EXPECT_DOUBLE_EQ(s.overlap_pct, 40.0);
  EXPECT_EQ(s.begin_ns, 0);
  EXPECT_EQ(s.end_ns, 400);
}

TEST(TraceSummary, OverlappingComputeSlicesCountOnce) {
  std::vector<trace_event> ev;
  phase(ev, 0, event_detail::forward, 0, 100);
  phase(ev, 1, event_detail::forward, 50, 150);  // overlaps layer 0 (two compute streams)
  swap_out(ev, 1, 8, 0, 0, 200);
  const trace_summary s = summarize(ev);
  EXPECT_EQ(s.compute_ns, 150);
  EXPECT_EQ(s.copy_hidden_ns, 150);
  EXPECT_DOUBLE_EQ(s.overlap_pct, 75.0);
}

TEST(TraceSummary, NoCopiesMeansNoOverlapFigure) {
  std::vector<trace_event> ev;
  phase(ev, 0, event_detail::forward, 0, 100);
  const trace_summary s = summarize(ev);
  EXPECT_EQ(s.copy_busy_ns, 0);
  EXPECT_EQ(s.overlap_pct, 0.0);
  EXPECT_NE(format_summary(s).find("n/a"), std::string::npos);
}

TEST(TraceSummary, CountsBytesStallsPeaksAndMarkers) {
  std::vector<trace_event> ev;
  swap_out(ev, 1, 1000, 0, 0, 10);
  swap_out(ev, 2, 2000, 1, 10, 20);
  swap_in(ev, 2, 2000, 1, 30, 40, event_detail::prefetch);
  swap_in(ev, 1, 1000, 0, 40, 60, event_detail::demand);
  ev.push_back(trace_event::stall_for(40, 20, 1, 0));
  ev.push_back(trace_event::stall_for(70, 5, 9, -1));
  ev.push_back(trace_event::device_counter(0, 100, 400));
  ev.push_back(trace_event::device_counter(5, 300, 350));
  ev.push_back(trace_event::device_counter(6, 200, 500));
  ev.push_back(trace_event::host_counter(6, 3000, 7000));
  ev.push_back(trace_event::host_counter(7, 1000, 9000));
  for (auto why :
       {event_detail::belady, event_detail::belady, event_detail::lru, event_detail::pressure}) {
    ev.push_back(trace_event::marker(event_kind::evict, 1, trace_track::d2h, 1, 8, 0, why));
  }
  ev.push_back(trace_event::marker(event_kind::alloc, 1, trace_track::host));
  ev.push_back(trace_event::marker(event_kind::free, 2, trace_track::host));
  ev.push_back(trace_event::marker(event_kind::prefetch_issued, 3, trace_track::h2d));
  ev.push_back(trace_event::marker(event_kind::oom, 4, trace_track::host));
  ev.push_back(trace_event::marker(event_kind::iteration, 0, trace_track::host));

  const trace_summary s = summarize(ev);
  EXPECT_EQ(s.bytes_swapped_out, 3000u);
  EXPECT_EQ(s.bytes_swapped_in, 3000u);
  EXPECT_EQ(s.swaps_out, 2u);
  EXPECT_EQ(s.swaps_in, 2u);
  EXPECT_EQ(s.swaps_in_prefetched, 1u);
  EXPECT_EQ(s.swaps_in_on_demand, 1u);
  EXPECT_EQ(s.stalls, 2u);
  EXPECT_EQ(s.stall_ns, 25);
  EXPECT_EQ(s.peak_device_allocated, 300u);
  EXPECT_EQ(s.peak_device_reserved, 500u);
  EXPECT_EQ(s.peak_host_pinned, 3000u);
  EXPECT_EQ(s.peak_host_used, 9000u);
  EXPECT_EQ(s.evictions, 4u);
  EXPECT_EQ(s.evictions_belady, 2u);
  EXPECT_EQ(s.evictions_lru, 1u);
  EXPECT_EQ(s.evictions_pressure, 1u);
  EXPECT_EQ(s.allocs, 1u);
  EXPECT_EQ(s.frees, 1u);
  EXPECT_EQ(s.prefetches_issued, 1u);
  EXPECT_EQ(s.ooms, 1u);
  EXPECT_EQ(s.iterations, 1u);
  EXPECT_EQ(s.end_ns, 75);
}

TEST(TraceSummary, PerLayerBreakdown) {
  std::vector<trace_event> ev;
  phase(ev, 0, event_detail::forward, 0, 100);
  phase(ev, 1, event_detail::forward, 100, 300);
  phase(ev, 1, event_detail::backward, 300, 700);
  phase(ev, 0, event_detail::backward, 700, 900);
  phase(ev, 0, event_detail::forward, 1000, 1050);  // a second iteration adds up
  swap_out(ev, 10, 4096, 0, 100, 150);
  swap_in(ev, 10, 4096, 0, 650, 700);
  ev.push_back(trace_event::stall_for(700, 30, 10, 0));
  const trace_summary s = summarize(ev);
  ASSERT_EQ(s.layers.size(), 2u);
  const layer_summary& l0 = s.layers[0];
  const layer_summary& l1 = s.layers[1];
  EXPECT_EQ(l0.layer, 0);
  EXPECT_EQ(l0.forward_ns, 150);
  EXPECT_EQ(l0.backward_ns, 200);
  EXPECT_EQ(l0.bytes_out, 4096u);
  EXPECT_EQ(l0.bytes_in, 4096u);
  EXPECT_EQ(l0.swaps_out, 1u);
  EXPECT_EQ(l0.stall_ns, 30);
  EXPECT_EQ(l0.stalls, 1u);
  EXPECT_EQ(l1.layer, 1);
  EXPECT_EQ(l1.forward_ns, 200);
  EXPECT_EQ(l1.backward_ns, 400);
  EXPECT_EQ(l1.bytes_out, 0u);
  EXPECT_EQ(l1.stalls, 0u);
}

// A run with fractional modelled times, repeated buffers, unmatched events and odd counter
// values: its summary must survive the trip through a Chrome trace file bit for bit.
std::vector<trace_event> random_run(unsigned seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dt(0.0, 50'000.0);
  std::uniform_int_distribution<std::uint64_t> size(1, std::uint64_t{1} << 30);
  std::vector<trace_event> ev;
  double t = 1e9 + 0.37;  // a second into the run: times well above 2^20
  for (int iteration = 0; iteration < 3; ++iteration) {
    ev.push_back(trace_event::marker(event_kind::iteration, t, trace_track::host, 0, 0, -1));
    ev.back().value = iteration;
    for (int layer = 0; layer < 12; ++layer) {
      const double b = t;
      t += dt(rng);
      phase(ev, layer, event_detail::forward, b, t);
      const std::uint64_t bytes = size(rng);
      swap_out(ev, static_cast<std::uint64_t>(layer), bytes, layer, b + (t - b) / 3, t + dt(rng));
      ev.push_back(trace_event::device_counter(t, static_cast<double>(size(rng)),
                                               static_cast<double>(size(rng)) * 1.5));
    }
    for (int layer = 11; layer >= 0; --layer) {
      const double b = t;
      t += dt(rng);
      phase(ev, layer, event_detail::backward, b, t);
      swap_in(ev, static_cast<std::uint64_t>(layer), size(rng), layer, b - dt(rng) / 2,
              b + dt(rng) / 4, layer % 3 == 0 ? event_detail::demand : event_detail::prefetch);
      if (layer % 3 == 0) ev.push_back(trace_event::stall_for(b, dt(rng) / 7, 1, layer));
      ev.push_back(trace_event::host_counter(t, static_cast<double>(size(rng)), 0.5 + layer));
      ev.push_back(trace_event::marker(event_kind::evict, t, trace_track::d2h, 3, 64, layer,
                                       event_detail::lru));
    }
  }
  ev.push_back(trace_event::swap(event_kind::swap_in_begin, t, 999, 1, 3));  // never ends
  ev.push_back(trace_event::layer_phase(event_kind::layer_end, t + 1, 42, event_detail::forward));
  return ev;
}

TEST(TraceSummary, SummaryFromTheFileEqualsSummaryFromTheEvents) {
  const fs::path dir = fs::temp_directory_path() / "gpuswap_trace_summary_test";
  fs::create_directories(dir);
  for (unsigned seed : {1u, 2u, 3u}) {
    const auto ev = random_run(seed);
    const std::string path = (dir / ("run" + std::to_string(seed) + ".json")).string();
    chrome_trace_options options;
    options.device_name = "sim:a100-pcie4";
    options.dropped_events = seed;
    write_chrome_trace(path, ev, options);

    const trace_summary from_events = summarize(make_timeline(ev, "sim:a100-pcie4", seed));
    const trace_summary from_file = summarize_file(path);
    EXPECT_EQ(from_file, from_events) << "seed " << seed << "\nfrom events:\n"
                                      << to_json(from_events).dump(1) << "\nfrom file:\n"
                                      << to_json(from_file).dump(1);
    EXPECT_EQ(from_events.unmatched_events, 2u) << [&] {
      std::string kinds;
      for (const auto& e : make_timeline(ev).unmatched) {
        kinds += std::string(to_string(e.kind)) + " " + std::to_string(e.buffer) + "; ";
      }
      return kinds;
    }();
    EXPECT_EQ(from_events.dropped_events, seed);
    EXPECT_EQ(from_events.layers.size(), 12u);
    EXPECT_GT(from_events.copy_hidden_ns, 0);
    EXPECT_EQ(to_json(from_file), to_json(from_events));
  }
  fs::remove_all(dir);
}

TEST(TraceSummary, SummarizeFileErrorsNameThePath) {
  const std::string path = "/nonexistent-gpuswap/trace.json";
  try {
    summarize_file(path);
    FAIL() << "expected gpuswap::error";
  } catch (const error& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos);
  }
}

TEST(TraceSummary, JsonAndTextCarryTheFigures) {
  std::vector<trace_event> ev;
  phase(ev, 3, event_detail::forward, 0, 2'000'000);
  swap_out(ev, 1, std::uint64_t{3} << 30, 3, 0, 1'000'000);
  ev.push_back(trace_event::device_counter(0, 1.5 * (1 << 30), 2.0 * (1 << 30)));
  const trace_summary s = summarize(ev);
  const nlohmann::json j = to_json(s);
  EXPECT_EQ(j["bytes_swapped_out"], std::uint64_t{3} << 30);
  EXPECT_EQ(j["copy_hidden_ns"], 1'000'000);
  EXPECT_DOUBLE_EQ(j["overlap_pct"].get<double>(), 100.0);
  EXPECT_EQ(j["duration_ns"], 2'000'000);
  ASSERT_EQ(j["layers"].size(), 1u);
  EXPECT_EQ(j["layers"][0]["layer"], 3);
  EXPECT_EQ(j["layers"][0]["forward_ns"], 2'000'000);

  const std::string text = format_summary(s);
  EXPECT_NE(text.find("3.00 GiB in 1 swap(s)"), std::string::npos) << text;
  EXPECT_NE(text.find("100.0%"), std::string::npos) << text;
  EXPECT_NE(text.find("1.50 GiB allocated"), std::string::npos) << text;
  EXPECT_NE(text.find("forward ms"), std::string::npos) << text;
  EXPECT_EQ(text.back(), '\n');
}

}  // namespace
}  // namespace gpuswap

namespace gpuswap {
namespace {

// Note [Hidden copy time]: a copy is hidden only under the part of a layer phase that computes,
// not under the stall in which that phase waits for it.
TEST(TraceSummaryStalls, StallsAreCutOutOfTheComputeACopyHidesUnder) {
  const std::vector<trace_event> events = {
      trace_event::layer_phase(event_kind::layer_begin, 0, 1, event_detail::backward),
      trace_event::swap(event_kind::swap_in_begin, 10, 7, 4096, 1, 0, event_detail::demand),
      trace_event::stall_for(20, 40, 7, 1),
      trace_event::swap(event_kind::swap_in_end, 70, 7, 4096, 1, 0, event_detail::demand),
      trace_event::layer_phase(event_kind::layer_end, 100, 1, event_detail::backward),
  };
  const trace_summary s = summarize(events);
  EXPECT_EQ(s.copy_busy_ns, 60);
  EXPECT_EQ(s.compute_ns, 60);      // [0,20) and [60,100)
  EXPECT_EQ(s.copy_hidden_ns, 20);  // [10,20) and [60,70)
  EXPECT_EQ(s.stall_ns, 40);
}

}  // namespace
}  // namespace gpuswap
