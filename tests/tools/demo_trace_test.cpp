// End to end: the trace of a budgeted training run (what `gpuswap demo --trace` writes) is a
// Chrome trace with the three stream tracks, every swap in it is whole, and reading it back sums
// up to exactly what the run itself counted.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include <unistd.h>

#include "allocator/caching_allocator.hpp"
#include "device/sim_device.hpp"
#include "profiler/chrome_trace.hpp"
#include "profiler/event_recorder.hpp"
#include "profiler/trace_summary.hpp"
#include "tools/model_spec.hpp"
#include "tools/workload_runner.hpp"
#include "support/small_sim.hpp"

namespace gpuswap {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr std::size_t mib = std::size_t{1} << 20;

using testing_support::small_real_device;

// Records into the global recorder for its lifetime, and leaves it off and empty after, even
// when an assertion returns early.
class recording {
 public:
  recording() {
    global_recorder().clear();
    global_recorder().enable(true);
  }
  ~recording() {
    global_recorder().enable(false);
    global_recorder().clear();
  }
  recording(const recording&) = delete;
  recording& operator=(const recording&) = delete;
};

struct temp_file {
  fs::path path = fs::temp_directory_path() /
                  ("gpuswap_demo_trace_test_" + std::to_string(::getpid()) + ".json");
  ~temp_file() {
    std::error_code ec;
    fs::remove(path, ec);
  }
};

TEST(demo_trace, the_trace_of_a_budgeted_run_adds_up_to_the_run) {
  const model_spec model = model_spec::load_named("tiny_cnn");
  runner_options o;
  o.batch = 128;
  o.steps = 2;
  std::size_t peak = 0;
  {
    sim_device dev(small_real_device());
    peak = run_workload(dev, model, o).peak_allocated_bytes;
  }
  constexpr std::size_t unit = caching_allocator::round_large;
  o.device_limit = (peak * 80 / 100 + unit - 1) / unit * unit;  // binding, feasible
  o.policy = offload_policy::all;
  o.prefetch = prefetch_policy::one_layer;

  sim_device dev(small_real_device());
  run_report r;
  std::vector<trace_event> events;
  std::uint64_t dropped = 0;
  {
    recording on;
    r = run_workload(dev, model, o);
    events = global_recorder().collect();
    dropped = global_recorder().dropped();
  }
  ASSERT_GT(r.swaps.bytes_out, 0U) << "the budget does not bind";
  ASSERT_GT(r.swaps.bytes_in, 0U);
  ASSERT_LE(r.peak_reserved_bytes, r.budget_bytes);
  ASSERT_EQ(dropped, 0U);
  ASSERT_FALSE(events.empty());

  temp_file file;
  write_chrome_trace(file.path.string(), events, chrome_trace_options{dev.name()});

  // It parses as JSON, as a viewer would read it.
  json trace;
  {
    std::ifstream in(file.path);
    ASSERT_TRUE(in.good());
    ASSERT_NO_THROW(trace = json::parse(in));
  }
  ASSERT_TRUE(trace.contains("traceEvents"));
  ASSERT_TRUE(trace["traceEvents"].is_array());

  // The three stream tracks exist and carry the slices they are for: layer phases on compute,
  // swap-outs on D2H, swap-ins on H2D, with the bytes the engine counted.
  std::map<std::int64_t, std::string> thread_name;
  for (const json& e : trace["traceEvents"]) {
    if (e.value("ph", "") == "M" && e.value("name", "") == "thread_name") {
      thread_name[e.at("tid").get<std::int64_t>()] = e.at("args").at("name").get<std::string>();
    }
  }
  std::map<std::string, int> slices_on;
  std::map<std::string, std::uint64_t> bytes_on;
  for (const json& e : trace["traceEvents"]) {
    if (e.value("ph", "") != "X") continue;
    const auto tid = e.at("tid").get<std::int64_t>();
    ASSERT_TRUE(thread_name.contains(tid)) << e.dump();
    std::string track = thread_name[tid];
    if (const auto lane = track.find(" ("); lane != std::string::npos) track.resize(lane);  // "D2H copy (2)"
    ++slices_on[track];
    if (e.value("cat", "") == "swap") bytes_on[track] += e.at("args").at("bytes").get<std::uint64_t>();
  }
  EXPECT_GT(slices_on["compute"], 0);
  EXPECT_GT(slices_on["D2H copy"], 0);
  EXPECT_GT(slices_on["H2D copy"], 0);
  EXPECT_EQ(bytes_on["D2H copy"], r.swaps.bytes_out);
  EXPECT_EQ(bytes_on["H2D copy"], r.swaps.bytes_in);
  EXPECT_EQ(bytes_on["compute"], 0U);

  // Every begin has its end, and the file says the same as the events it was written from.
  trace_summary from_events = summarize(events);
  from_events.device_name = dev.name();  // the events do not carry it; the file's header does
  const trace_summary from_file = summarize_file(file.path.string());
  EXPECT_EQ(from_events.unmatched_events, 0U);
  EXPECT_TRUE(read_chrome_trace(file.path.string()).unmatched.empty());
  EXPECT_TRUE(from_file == from_events) << to_json(from_file).dump(1) << "\nvs\n" << to_json(from_events).dump(1);

  // And both say what the run counted.
  EXPECT_EQ(from_file.bytes_swapped_out, r.swaps.bytes_out);
  EXPECT_EQ(from_file.bytes_swapped_in, r.swaps.bytes_in);
  EXPECT_EQ(from_file.swaps_out, r.swaps.swaps_out);
  EXPECT_EQ(from_file.swaps_in, r.swaps.swaps_in);
  EXPECT_EQ(from_file.swaps_in_on_demand, r.swaps.demand_fetches);
  EXPECT_EQ(from_file.stalls, r.swaps.stalls);
  EXPECT_EQ(from_file.iterations, static_cast<std::uint64_t>(o.steps));
  EXPECT_LE(from_file.peak_device_reserved, r.budget_bytes);
}

}  // namespace
}  // namespace gpuswap
