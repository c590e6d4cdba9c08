#include "profiler/chrome_trace.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "core/errors.hpp"

namespace gpuswap {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr int compute_tid = 1;
constexpr int d2h_tid = 2;
constexpr int h2d_tid = 3;
constexpr int host_tid = 4;

// One iteration of a two-layer network: forward 0 and 1 with their inputs swapped out, a
// prefetched swap-in and a demand swap-in (with its stall) in backward.
std::vector<trace_event> sample_events() {
  std::vector<trace_event> ev;
  ev.push_back(trace_event::marker(event_kind::iteration, 0, trace_track::host));
  ev.push_back(trace_event::device_counter(0, 1 << 20, 2 << 20));
  ev.push_back(trace_event::layer_phase(event_kind::layer_begin, 0, 0, event_detail::forward));
  ev.push_back(trace_event::marker(event_kind::alloc, 100, trace_track::host, 11, 4096));
  ev.push_back(trace_event::layer_phase(event_kind::layer_end, 1000, 0, event_detail::forward));
  ev.push_back(trace_event::swap(event_kind::swap_out_begin, 1000, 11, 4096, 0, 0x20));
  ev.push_back(trace_event::layer_phase(event_kind::layer_begin, 1000, 1, event_detail::forward));
  ev.push_back(trace_event::swap(event_kind::swap_out_end, 1500, 11, 4096, 0, 0x20));
  ev.push_back(trace_event::marker(event_kind::evict, 1500, trace_track::d2h, 11, 4096, 0,
                                   event_detail::belady));
  ev.push_back(trace_event::device_counter(1500, 4096, 2 << 20));
  ev.push_back(trace_event::swap(event_kind::swap_out_begin, 2000, 12, 8192, 1, 0x20));
  ev.push_back(trace_event::layer_phase(event_kind::layer_end, 2000, 1, event_detail::forward));
  ev.push_back(trace_event::swap(event_kind::swap_out_end, 2600, 12, 8192, 1, 0x20));
  ev.push_back(trace_event::layer_phase(event_kind::layer_begin, 2600, 1, event_detail::backward));
  ev.push_back(
      trace_event::marker(event_kind::prefetch_issued, 2600, trace_track::h2d, 11, 4096, 0));
  ev.push_back(trace_event::swap(event_kind::swap_in_begin, 2600, 11, 4096, 0, 0x30,
                                 event_detail::prefetch));
  ev.push_back(trace_event::swap(event_kind::swap_in_end, 3100, 11, 4096, 0, 0x30));
  ev.push_back(trace_event::layer_phase(event_kind::layer_end, 3600, 1, event_detail::backward));
  ev.push_back(
      trace_event::swap(event_kind::swap_in_begin, 3600, 12, 8192, 1, 0x30, event_detail::demand));
  ev.push_back(trace_event::stall_for(3600, 700, 12, 1, 0x10));
  ev.push_back(trace_event::swap(event_kind::swap_in_end, 4300, 12, 8192, 1, 0x30));
  ev.push_back(trace_event::layer_phase(event_kind::layer_begin, 4300, 0, event_detail::backward));
  ev.push_back(trace_event::layer_phase(event_kind::layer_end, 5300, 0, event_detail::backward));
  ev.push_back(trace_event::host_counter(5300, 12288, 16384));
  ev.push_back(trace_event::marker(event_kind::oom, 5400, trace_track::host, 0, 1 << 30));
  return ev;
}

std::vector<json> with(const json& trace, const std::string& key, const json& value) {
  std::vector<json> out;
  for (const json& e : trace["traceEvents"]) {
    if (e.contains(key) && e[key] == value) out.push_back(e);
  }
  return out;
}

const json* named(const json& trace, const std::string& name, const std::string& ph) {
  for (const json& e : trace["traceEvents"]) {
    if (e.value("name", "") == name && e.value("ph", "") == ph) return &e;
  }
  return nullptr;
}

struct temp_dir {
  fs::path path;
  temp_dir() {
    path = fs::temp_directory_path() /
           ("gpuswap_chrome_trace_test_" +
            std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

TEST(ChromeTrace, HasTheTraceEventFormatEnvelope) {
  chrome_trace_options options;
  options.device_name = "sim:test";
  options.dropped_events = 3;
  options.other_data = {{"run", "unit"}};
  const json trace = to_chrome_trace(sample_events(), options);
  ASSERT_TRUE(trace["traceEvents"].is_array());
  EXPECT_EQ(trace["displayTimeUnit"], "ns");
  EXPECT_EQ(trace["otherData"]["device"], "sim:test");
  EXPECT_EQ(trace["otherData"]["dropped_events"], 3);
  EXPECT_EQ(trace["otherData"]["unmatched_events"], 0);
  EXPECT_EQ(trace["otherData"]["run"], "unit");

  const json* process = named(trace, "process_name", "M");
  ASSERT_NE(process, nullptr);
  EXPECT_EQ((*process)["args"]["name"], "gpuswap (sim:test)");

  std::map<int, std::string> names;
  std::map<int, int> sort_index;
  for (const json& e : with(trace, "ph", "M")) {
    if (e["name"] == "thread_name") names[e["tid"].get<int>()] = e["args"]["name"];
    if (e["name"] == "thread_sort_index") sort_index[e["tid"].get<int>()] = e["args"]["sort_index"];
  }
  EXPECT_EQ(names[compute_tid], "compute");
  EXPECT_EQ(names[d2h_tid], "D2H copy");
  EXPECT_EQ(names[h2d_tid], "H2D copy");
  EXPECT_EQ(names[host_tid], "host");
  EXPECT_LT(sort_index[compute_tid], sort_index[d2h_tid]);
  EXPECT_LT(sort_index[d2h_tid], sort_index[h2d_tid]);
  // Every event belongs to the one process.
  for (const json& e : trace["traceEvents"]) EXPECT_EQ(e["pid"], 1);
}

TEST(ChromeTrace, SwapsAreCompleteSlicesOnTheCopyTracksInMicroseconds) {
  const json trace = to_chrome_trace(sample_events());
  std::vector<json> outs;
  std::vector<json> ins;
  for (const json& e : with(trace, "cat", "swap")) {
    ASSERT_EQ(e["ph"], "X");
    (e["name"] == "swap out" ? outs : ins).push_back(e);
  }
  ASSERT_EQ(outs.size(), 2u);
  ASSERT_EQ(ins.size(), 2u);
  EXPECT_EQ(outs[0]["tid"], d2h_tid);
  EXPECT_DOUBLE_EQ(outs[0]["ts"].get<double>(), 1.0);
  EXPECT_DOUBLE_EQ(outs[0]["dur"].get<double>(), 0.5);
  EXPECT_EQ(outs[0]["args"]["bytes"], 4096);
  EXPECT_EQ(outs[0]["args"]["buffer"], 11);
  EXPECT_EQ(outs[0]["args"]["layer"], 0);
  EXPECT_EQ(outs[0]["args"]["stream"], 0x20);
  EXPECT_EQ(ins[0]["tid"], h2d_tid);
  EXPECT_EQ(ins[0]["args"]["reason"], "prefetch");
  EXPECT_EQ(ins[1]["args"]["reason"], "demand");
  EXPECT_DOUBLE_EQ(ins[1]["ts"].get<double>(), 3.6);
  EXPECT_DOUBLE_EQ(ins[1]["dur"].get<double>(), 0.7);
}

TEST(ChromeTrace, LayerPhasesAndStallsAreSlicesOnCompute) {
  const json trace = to_chrome_trace(sample_events());
  const json* f1 = named(trace, "forward 1", "X");
  const json* b0 = named(trace, "backward 0", "X");
  const json* stall = named(trace, "stall", "X");
  ASSERT_NE(f1, nullptr);
  ASSERT_NE(b0, nullptr);
  ASSERT_NE(stall, nullptr);
  EXPECT_EQ((*f1)["tid"], compute_tid);
  EXPECT_DOUBLE_EQ((*f1)["ts"].get<double>(), 1.0);
  EXPECT_DOUBLE_EQ((*f1)["dur"].get<double>(), 1.0);
  EXPECT_EQ((*b0)["args"]["phase"], "backward");
  EXPECT_EQ((*stall)["tid"], compute_tid);
  EXPECT_EQ((*stall)["args"]["wait_ns"], 700);
  EXPECT_EQ((*stall)["args"]["buffer"], 12);
}

TEST(ChromeTrace, MarkersAreInstantsAndMemoryIsCounters) {
  const json trace = to_chrome_trace(sample_events());
  const json* evict = named(trace, "evict (belady)", "i");
  const json* prefetch = named(trace, "prefetch", "i");
  const json* oom = named(trace, "OOM", "i");
  ASSERT_NE(evict, nullptr);
  ASSERT_NE(prefetch, nullptr);
  ASSERT_NE(oom, nullptr);
  EXPECT_EQ((*evict)["tid"], d2h_tid);
  EXPECT_EQ((*prefetch)["tid"], h2d_tid);
  EXPECT_EQ((*oom)["args"]["bytes"], 1 << 30);

  const auto device = with(trace, "name", "device memory");
  ASSERT_EQ(device.size(), 2u);
  EXPECT_EQ(device[1]["ph"], "C");
  EXPECT_EQ(device[1]["args"]["allocated"], 4096);
  EXPECT_EQ(device[1]["args"]["reserved"], 2 << 20);
  const json* host = named(trace, "host memory", "C");
  ASSERT_NE(host, nullptr);
  EXPECT_EQ((*host)["args"]["pinned"], 12288);
  EXPECT_EQ((*host)["args"]["used"], 16384);
}

// A flow end point must lie inside the slice it binds to, on that slice's track.
bool inside(const json& point, const json& slice) {
  const double ts = point["ts"].get<double>();
  return point["tid"] == slice["tid"] && ts >= slice["ts"].get<double>() &&
         ts <= slice["ts"].get<double>() + slice["dur"].get<double>();
}

TEST(ChromeTrace, FlowsLinkEachSwapOutToTheNextSwapInOfItsBuffer) {
  // Buffer 5 goes out and in twice: the arrows must pair cycle 1 with cycle 1.
  std::vector<trace_event> ev;
  ev.push_back(trace_event::swap(event_kind::swap_out_begin, 0, 5, 64, 0));
  ev.push_back(trace_event::swap(event_kind::swap_out_end, 100, 5, 64, 0));
  ev.push_back(trace_event::swap(event_kind::swap_in_begin, 1000, 5, 64, 0));
  ev.push_back(trace_event::swap(event_kind::swap_in_end, 1100, 5, 64, 0));
  ev.push_back(trace_event::swap(event_kind::swap_out_begin, 2000, 5, 64, 0));
  ev.push_back(trace_event::swap(event_kind::swap_out_end, 2100, 5, 64, 0));
  ev.push_back(trace_event::swap(event_kind::swap_in_begin, 3000, 5, 64, 0));
  ev.push_back(trace_event::swap(event_kind::swap_in_end, 3100, 5, 64, 0));
  const json trace = to_chrome_trace(ev);
  const auto starts = with(trace, "ph", "s");
  const auto finishes = with(trace, "ph", "f");
  ASSERT_EQ(starts.size(), 2u);
  ASSERT_EQ(finishes.size(), 2u);
  const auto slices = with(trace, "cat", "swap");
  ASSERT_EQ(slices.size(), 4u);  // out, in, out, in by start time
  for (std::size_t k = 0; k < 2; ++k) {
    EXPECT_EQ(starts[k]["id"], finishes[k]["id"]);
    EXPECT_EQ(starts[k]["cat"], finishes[k]["cat"]);
    EXPECT_EQ(finishes[k]["bp"], "e");
    EXPECT_TRUE(inside(starts[k], slices[2 * k])) << starts[k].dump();
    EXPECT_TRUE(inside(finishes[k], slices[2 * k + 1])) << finishes[k].dump();
  }
  EXPECT_NE(starts[0]["id"], starts[1]["id"]);

  chrome_trace_options no_flows;
  no_flows.flows = false;
  EXPECT_TRUE(with(to_chrome_trace(ev, no_flows), "ph", "s").empty());
}

TEST(ChromeTrace, PartlyOverlappingSlicesGoOnExtraLanesSoEveryLaneNests) {
  std::vector<trace_event> ev;
  // Three copies on D2H: [0,100) and [50,150) overlap partly, [60,80) nests in the first.
  ev.push_back(trace_event::swap(event_kind::swap_out_begin, 0, 1, 64, 0));
  ev.push_back(trace_event::swap(event_kind::swap_out_begin, 50, 2, 64, 0));
  ev.push_back(trace_event::swap(event_kind::swap_out_begin, 60, 3, 64, 0));
  ev.push_back(trace_event::swap(event_kind::swap_out_end, 80, 3, 64, 0));
  ev.push_back(trace_event::swap(event_kind::swap_out_end, 100, 1, 64, 0));
  ev.push_back(trace_event::swap(event_kind::swap_out_end, 150, 2, 64, 0));
  // Compute: a stall inside a phase nests and stays on lane 0.
  ev.push_back(trace_event::layer_phase(event_kind::layer_begin, 0, 0, event_detail::forward));
  ev.push_back(trace_event::stall_for(10, 20, 1, 0));
  ev.push_back(trace_event::layer_phase(event_kind::layer_end, 100, 0, event_detail::forward));
  const json trace = to_chrome_trace(ev);

  std::map<int, std::string> names;
  for (const json& e : with(trace, "name", "thread_name")) names[e["tid"]] = e["args"]["name"];
  EXPECT_EQ(names.size(), 5u) << "four tracks and one extra D2H lane";
  std::map<int, std::vector<std::pair<double, double>>> by_tid;
  for (const json& e : with(trace, "ph", "X")) {
    const double ts = e["ts"].get<double>();
    by_tid[e["tid"]].emplace_back(ts, ts + e["dur"].get<double>());
  }
  ASSERT_EQ(by_tid.size(), 3u);
  EXPECT_EQ(by_tid[compute_tid].size(), 2u);
  EXPECT_EQ(by_tid[d2h_tid].size(), 2u);
  for (const auto& [tid, slices] : by_tid) {
    EXPECT_TRUE(names.contains(tid)) << tid;
    for (const auto& a : slices) {
      for (const auto& b : slices) {
        const bool disjoint = a.second <= b.first || b.second <= a.first;
        const bool nested = (a.first <= b.first && b.second <= a.second) ||
                            (b.first <= a.first && a.second <= b.second);
        EXPECT_TRUE(disjoint || nested) << "tid " << tid;
      }
    }
  }
  const auto extra = std::find_if(names.begin(), names.end(),
                                  [](const auto& n) { return n.second == "D2H copy (2)"; });
  ASSERT_NE(extra, names.end());
  // Reading back folds the lane into its track.
  const trace_timeline back = timeline_from_chrome_trace(trace);
  EXPECT_EQ(back.slices, make_timeline(ev).slices);
}

TEST(ChromeTrace, UnmatchedBeginsAndEndsAreCountedNotFatal) {
  std::vector<trace_event> ev;
  ev.push_back(trace_event::swap(event_kind::swap_out_end, 10, 1, 64, 0));  // no begin
  ev.push_back(trace_event::layer_phase(event_kind::layer_begin, 20, 3, event_detail::forward));
  ev.push_back(trace_event::swap(event_kind::swap_in_begin, 30, 2, 64, 0));  // no end
  // An end of the other phase does not close the forward phase.
  ev.push_back(trace_event::layer_phase(event_kind::layer_end, 40, 3, event_detail::backward));
  const trace_timeline t = make_timeline(ev);
  EXPECT_TRUE(t.slices.empty());
  EXPECT_EQ(t.unmatched.size(), 4u);
  const json trace = to_chrome_trace(ev);
  EXPECT_EQ(trace["otherData"]["unmatched_events"], 4);
  EXPECT_NE(named(trace, "unmatched swap_out_end", "i"), nullptr);
  EXPECT_NE(named(trace, "unmatched layer_begin", "i"), nullptr);
}

TEST(ChromeTrace, NestedPhasesOfOneLayerPairInnermostFirst) {
  std::vector<trace_event> ev;
  ev.push_back(trace_event::layer_phase(event_kind::layer_begin, 0, 2, event_detail::forward));
  ev.push_back(trace_event::layer_phase(event_kind::layer_begin, 10, 2, event_detail::forward));
  ev.push_back(trace_event::layer_phase(event_kind::layer_end, 20, 2, event_detail::forward));
  ev.push_back(trace_event::layer_phase(event_kind::layer_end, 100, 2, event_detail::forward));
  const trace_timeline t = make_timeline(ev);
  ASSERT_EQ(t.slices.size(), 2u);
  EXPECT_EQ(t.slices[0].begin_ns, 0);
  EXPECT_EQ(t.slices[0].end_ns, 100);
  EXPECT_EQ(t.slices[1].begin_ns, 10);
  EXPECT_EQ(t.slices[1].end_ns, 20);
}

TEST(ChromeTrace, TimesAreRoundedToWholeNanoseconds) {
  std::vector<trace_event> ev;
  ev.push_back(trace_event::swap(event_kind::swap_out_begin, 1234.4, 1, 64, 0));
  ev.push_back(trace_event::swap(event_kind::swap_out_end, 2000.6, 1, 64, 0));
  const json trace = to_chrome_trace(ev);
  const json* s = named(trace, "swap out", "X");
  ASSERT_NE(s, nullptr);
  EXPECT_DOUBLE_EQ((*s)["ts"].get<double>(), 1.234);
  EXPECT_DOUBLE_EQ((*s)["dur"].get<double>(), 0.767);
}

void expect_same_events(const std::vector<trace_event>& a, const std::vector<trace_event>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].time_ns, b[i].time_ns) << i;
    EXPECT_EQ(a[i].kind, b[i].kind) << i;
    EXPECT_EQ(a[i].track, b[i].track) << i;
    EXPECT_EQ(a[i].detail, b[i].detail) << i;
    EXPECT_EQ(a[i].bytes, b[i].bytes) << i;
    EXPECT_EQ(a[i].buffer, b[i].buffer) << i;
    EXPECT_EQ(a[i].layer, b[i].layer) << i;
    EXPECT_EQ(a[i].stream, b[i].stream) << i;
    EXPECT_EQ(a[i].value, b[i].value) << i;
    EXPECT_EQ(a[i].value2, b[i].value2) << i;
  }
}

TEST(ChromeTrace, WrittenFileReadsBackAsTheSameTimeline) {
  temp_dir dir;
  std::vector<trace_event> ev = sample_events();
  ev.push_back(trace_event::swap(event_kind::swap_out_end, 9000.5, 99, 1, 2));  // unmatched
  ev.push_back(trace_event::device_counter(7777.25, 123.5, 1e12));              // odd values
  const std::string path = (dir.path / "run.json").string();
  chrome_trace_options options;
  options.device_name = "sim:h100-pcie5/phantom";
  options.dropped_events = 5;
  write_chrome_trace(path, ev, options);

  // Only the trace is left: the temporary file was renamed.
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(dir.path)) files.push_back(entry.path());
  ASSERT_EQ(files.size(), 1u);
  EXPECT_EQ(files[0].filename(), "run.json");

  const trace_timeline expected = make_timeline(ev, options.device_name, 5);
  const trace_timeline actual = read_chrome_trace(path);
  EXPECT_EQ(actual.device_name, expected.device_name);
  EXPECT_EQ(actual.dropped_events, 5u);
  EXPECT_EQ(actual.slices, expected.slices);
  expect_same_events(actual.markers, expected.markers);
  expect_same_events(actual.counters, expected.counters);
  expect_same_events(actual.unmatched, expected.unmatched);
  EXPECT_EQ(actual.begin_ns, expected.begin_ns);
  EXPECT_EQ(actual.end_ns, expected.end_ns);
}

TEST(ChromeTrace, WriteErrorsNameThePath) {
  const std::string path = "/nonexistent-gpuswap-dir/sub/run.json";
  try {
    write_chrome_trace(path, sample_events());
    FAIL() << "expected gpuswap::error";
  } catch (const error& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
}

TEST(ChromeTrace, ReadErrorsNameThePath) {
  temp_dir dir;
  const std::string missing = (dir.path / "missing.json").string();
  EXPECT_THROW(read_chrome_trace(missing), error);

  const std::string garbage = (dir.path / "garbage.json").string();
  std::ofstream(garbage) << "{ not json";
  try {
    read_chrome_trace(garbage);
    FAIL() << "expected gpuswap::error";
  } catch (const error& e) {
    EXPECT_NE(std::string(e.what()).find(garbage), std::string::npos) << e.what();
  }

  const std::string other = (dir.path / "other.json").string();
  std::ofstream(other) << R"({"hello": 1})";
  EXPECT_THROW(read_chrome_trace(other), error);

  // A trace with a malformed field is an error, not a crash.
  const std::string bad = (dir.path / "bad.json").string();
  std::ofstream(bad) << R"({"traceEvents":[{"ph":"X","cat":"swap","ts":"soon"}]})";
  EXPECT_THROW(read_chrome_trace(bad), error);
}

TEST(ChromeTrace, EventsOfOtherProducersAreIgnored) {
  const json trace = {{"traceEvents",
                       {{{"ph", "X"}, {"cat", "gpu"}, {"name", "kernel"}, {"ts", 1}, {"dur", 2}},
                        {{"ph", "i"},
                         {"cat", "marker"},
                         {"name", "x"},
                         {"ts", 1},
                         {"args", {{"kind", "no_such_kind"}}}}}}};
  const trace_timeline t = timeline_from_chrome_trace(trace);
  EXPECT_TRUE(t.slices.empty());
  EXPECT_TRUE(t.markers.empty());
}

}  // namespace
}  // namespace gpuswap
