// A budgeted training run of a real small network, as Nsight Systems would receive it: the NVTX
// test tool (tests/profiler/nvtx_injection.cpp) is loaded by NVTX itself, through
// NVTX_INJECTION64_PATH set below before the process's first NVTX call, and logs every call the
// library makes while the workload runner trains; the tests check that log against the run's own
// counters. No GPU is needed.
//
// This file is a program of its own, gpuswap_tools_nvtx_tests (tests/CMakeLists.txt): the tool
// is loaded for the whole process and logs every NVTX call, which the other tools tests need not
// pay for.
#include <dlfcn.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "allocator/caching_allocator.hpp"
#include "device/sim_device.hpp"
#include "profiler/nvtx_domain.hpp"
#include "profiler/nvtx_registry.hpp"
#include "tools/model_spec.hpp"
#include "tools/workload_runner.hpp"

#include "support/nvtx_test_tool.hpp"
#include "support/small_sim.hpp"

namespace gpuswap {
namespace {

#if defined(GPUSWAP_WITH_NVTX) && GPUSWAP_WITH_NVTX && defined(GPUSWAP_NVTX_INJECTION_PATH)

using json = nlohmann::json;

// NVTX looks for its tool once, at the process's first NVTX call; this runs before main().
[[maybe_unused]] const bool injection_env_ready = [] {
  ::setenv("NVTX_INJECTION64_PATH", GPUSWAP_NVTX_INJECTION_PATH, 1);
  return true;
}();

using test_tool = testing_support::nvtx_test_tool;

constexpr std::size_t mib = std::size_t{1} << 20;

using testing_support::small_real_device;

bool is_event(const json& e) {
  const std::string call = e.at("call");
  return call == "push" || call == "pop" || call == "mark";
}

std::uint64_t bytes_of(const json& e) {
  const json& p = e.at("payload");
  return e.at("payload_type") == "ext" ? p.at("bytes").get<std::uint64_t>() : p.get<std::uint64_t>();
}
std::uint64_t buffer_of(const json& e) { return e.at("payload").at("buffer_id").get<std::uint64_t>(); }
std::int32_t layer_of(const json& e) { return e.at("payload").at("layer").get<std::int32_t>(); }

// One push with its pop, as the test rebuilds it from one thread's calls.
struct range {
  json push;
  std::size_t begin = 0;  // index of the push in the run's log
  std::size_t end = 0;    // index of the pop
  std::int64_t thread = 0;
  std::vector<std::size_t> enclosing;  // indices (into ranges) of the open ranges around it
  std::string name() const { return push.at("message"); }
};

// What the budgeted training runs sent to the tool, and what they counted themselves.
struct recorded_run {
  model_spec model;
  run_report report;
  json log = json::array();          // the tool's entries made during the run
  json before = json::array();       // the entries made before it (registrations)
  std::int64_t thread = 0;           // the thread that ran it
  std::size_t heaps_before = 0, regions_before = 0, heaps_after = 0, regions_after = 0;
  std::vector<range> ranges;         // in push order
  std::vector<std::string> nesting_errors;
  int steps_per_run = 0;  // report.steps counts the steps of both runs
};

// Rebuilds the ranges of every thread; a pop that does not close the innermost open range of its
// thread, or a range still open at the end, is a nesting error.
void rebuild_ranges(recorded_run& run) {
  std::map<std::int64_t, std::vector<std::size_t>> open;  // per thread: indices into run.ranges
  for (std::size_t i = 0; i < run.log.size(); ++i) {
    const json& e = run.log[i];
    if (!is_event(e) || e.at("call") == "mark") continue;
    const auto tid = e.at("thread").get<std::int64_t>();
    auto& stack = open[tid];
    if (e.at("call") == "push") {
      range r{e, i, 0, tid, stack};
      run.ranges.push_back(std::move(r));
      stack.push_back(run.ranges.size() - 1);
      if (e.at("depth").get<std::size_t>() != stack.size()) {
        run.nesting_errors.push_back("push at entry " + std::to_string(i) + " reports depth " +
                                     e.at("depth").dump() + ", the thread has " + std::to_string(stack.size()));
      }
      continue;
    }
    if (stack.empty()) {
      run.nesting_errors.push_back("pop without a push at entry " + std::to_string(i));
      continue;
    }
    range& innermost = run.ranges[stack.back()];
    if (e.at("message") != innermost.name() || e.at("depth").get<std::size_t>() != stack.size()) {
      run.nesting_errors.push_back("pop at entry " + std::to_string(i) + " (" + e.dump() +
                                   ") does not close the innermost range " + innermost.name());
    }
    innermost.end = i;
    stack.pop_back();
  }
  for (const auto& [tid, stack] : open) {
    for (std::size_t r : stack) {
      run.nesting_errors.push_back("range " + run.ranges[r].name() + " on thread " + std::to_string(tid) +
                                   " is never popped");
    }
  }
}

// The engine's counts of two runs together, as the tool saw both.
void add_swaps(swap_stats& into, const swap_stats& s) {
  into.swaps_out += s.swaps_out;
  into.swaps_in += s.swaps_in;
  into.bytes_out += s.bytes_out;
  into.bytes_in += s.bytes_in;
  into.prefetches += s.prefetches;
  into.demand_fetches += s.demand_fetches;
  into.evictions += s.evictions;
  into.stalls += s.stalls;
  into.failed_swap_outs += s.failed_swap_outs;
  into.failed_swap_ins += s.failed_swap_ins;
}

// tiny_cnn for two steps (iteration 0 on estimated step times, 1 on measured ones) under a
// device_limit of 60% of what it needs, twice, recorded as one: first with the convolutions'
// inputs offloaded (policy conv) and prefetched by lookahead (swap-outs, prefetches), then with
// no plan (policy none), so that the allocator has the engine evict under pressure and backward
// fetches on demand, with stalls. One run no longer shows all five: since prefetches wait for
// room until their use (Note [Held until used], prefetcher.cpp), the planned run neither evicts
// nor fetches on demand at any budget it fits in.
const recorded_run& training_run() {
  static const recorded_run run = [] {
    recorded_run r;
    r.model = model_spec::load_named("tiny_cnn");
    runner_options o;
    o.batch = 128;
    o.steps = 2;
    std::size_t peak = 0;
    {
      sim_device dev(small_real_device());
      peak = run_workload(dev, r.model, o).peak_allocated_bytes;
    }
    constexpr std::size_t unit = caching_allocator::round_large;
    o.device_limit = (peak * 60 / 100 + unit - 1) / unit * unit;
    o.policy = offload_policy::conv;
    o.prefetch = prefetch_policy::lookahead;

    const test_tool* tool = test_tool::get();
    if (tool == nullptr) return r;
    sim_device dev(small_real_device());
    r.before = tool->log();
    r.heaps_before = tool->live_heaps();
    r.regions_before = tool->live_regions();
    r.thread = ::gettid();
    r.report = run_workload(dev, r.model, o);
    o.policy = offload_policy::none;
    sim_device dev_unplanned(small_real_device());
    const run_report unplanned = run_workload(dev_unplanned, r.model, o);
    add_swaps(r.report.swaps, unplanned.swaps);
    r.steps_per_run = r.report.steps;
    r.report.steps += unplanned.steps;
    r.heaps_after = tool->live_heaps();
    r.regions_after = tool->live_regions();
    const json all = tool->log();
    for (std::size_t i = r.before.size(); i < all.size(); ++i) r.log.push_back(all[i]);
    rebuild_ranges(r);
    return r;
  }();
  return run;
}

class NvtxTrainingStep : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_NE(test_tool::get(), nullptr) << "NVTX did not load the test tool from "
                                         << GPUSWAP_NVTX_INJECTION_PATH;
    ASSERT_TRUE(nvtx_enabled());
    const recorded_run& r = training_run();
    ASSERT_GT(r.report.swaps.bytes_out, 0u) << "the budget does not bind: nothing to see";
    ASSERT_GT(r.report.swaps.bytes_in, 0u);
    ASSERT_FALSE(r.log.empty());
  }

  static const recorded_run& run() { return training_run(); }

  static std::vector<const range*> ranges_named(const std::string& name) {
    std::vector<const range*> out;
    for (const range& r : run().ranges) {
      if (r.name() == name) out.push_back(&r);
    }
    return out;
  }
  static std::vector<json> marks_named(const std::string& name) {
    std::vector<json> out;
    for (const json& e : run().log) {
      if (e.at("call") == "mark" && e.at("message") == name) out.push_back(e);
    }
    return out;
  }
  // Whether the allocator handed out a block (a region registered) inside range `r`.
  static bool allocated_inside(const range& r) {
    for (std::size_t i = r.begin + 1; i < r.end; ++i) {
      const json& e = run().log[i];
      if (e.at("call") == "region_register" && e.at("thread").get<std::int64_t>() == r.thread) return true;
    }
    return false;
  }
};

TEST_F(NvtxTrainingStep, EverythingIsInTheGpuswapDomainAndTheToolSawNoError) {
  std::vector<std::string> domains;
  for (const json& e : run().before) {
    if (e.at("call") == "domain_create") domains.push_back(e.at("domain"));
  }
  EXPECT_EQ(domains, std::vector<std::string>{"gpuswap"}) << "one domain, created once, before the run";
  std::size_t events = 0;
  for (const json& e : run().log) {
    if (e.at("call") == "domain_create") ADD_FAILURE() << "a domain created during the run: " << e.dump();
    if (is_event(e)) {
      ++events;
      EXPECT_EQ(e.at("domain"), "gpuswap") << e.dump();
    }
    if (e.at("call") == "error") ADD_FAILURE() << "the tool's check: " << e.at("what");
  }
  EXPECT_GT(events, 0u);
}

// Note [NVTX in the engine] (allocator/swap_engine.cpp): the engine has no threads, so its ranges
// are on the thread that calls it, next to that thread's own ranges, and it names no thread
// unless swap_engine_options::nvtx_thread_name asks (the runner does not). The copies themselves
// are on the copy streams' rows of Nsight's CUDA trace, which a tool of NVTX alone cannot see.
TEST_F(NvtxTrainingStep, RangesAreOnTheTrainingThreadAndEveryPushHasItsPopInOrder) {
  EXPECT_EQ(run().nesting_errors, std::vector<std::string>{});
  std::set<std::int64_t> threads;
  for (const json& e : run().log) {
    if (is_event(e)) threads.insert(e.at("thread").get<std::int64_t>());
    EXPECT_NE(e.at("call"), "name_thread") << "a library does not rename its host's threads: " << e.dump();
  }
  EXPECT_EQ(threads, std::set<std::int64_t>{run().thread});
  // A swap range encloses nothing but the evictions its allocation forces.
  for (const range& r : run().ranges) {
    if (r.enclosing.empty()) continue;
    const std::string outer = run().ranges[r.enclosing.back()].name();
    if (outer == "swap_out" || outer == "prefetch") {
      ADD_FAILURE() << r.name() << " inside " << outer;
    } else if (outer == "swap_in") {
      EXPECT_EQ(r.name(), "swap_out") << "only an eviction nests in a demand fetch";
    }
  }
}

TEST_F(NvtxTrainingStep, SwapOutRangesCarryTheBytesTheEngineCounted) {
  const swap_stats& s = run().report.swaps;
  ASSERT_EQ(s.failed_swap_outs, 0u) << "a failed swap-out has a range but no bytes counted";
  const auto outs = ranges_named("swap_out");
  EXPECT_EQ(outs.size(), s.swaps_out);
  std::uint64_t bytes = 0;
  for (const range* r : outs) {
    const json& e = r->push;
    EXPECT_EQ(e.at("category").get<std::uint32_t>(), nvtx_category_id(nvtx_category::swap_out));
    EXPECT_EQ(e.at("category_name"), "swap_out");
    EXPECT_EQ(e.at("color").get<std::uint32_t>(), nvtx_color(nvtx_category::swap_out));
    ASSERT_EQ(e.at("payload_type"), "ext") << "bytes, buffer id and layer: " << e.dump();
    EXPECT_EQ(e.at("schema"), "gpuswap_buffer");
    EXPECT_GT(bytes_of(e), 0u);
    EXPECT_NE(buffer_of(e), nvtx_no_buffer);
    EXPECT_GE(layer_of(e), -1);
    EXPECT_LT(layer_of(e), static_cast<std::int32_t>(run().model.layers.size()));
    bytes += bytes_of(e);
  }
  EXPECT_EQ(bytes, s.bytes_out);
}

// A demand fetch is a swap_in range; a prefetch is a prefetch range, which brings the buffer in
// only when its block fits (Note [Prefetch never evicts]): those are the ranges inside which the
// allocator handed out a block. Together they are every byte the engine brought back, each of
// a buffer that went out before with the same size and layer.
TEST_F(NvtxTrainingStep, SwapInAndPrefetchRangesCarryTheBytesTheEngineCounted) {
  const swap_stats& s = run().report.swaps;
  ASSERT_EQ(s.failed_swap_ins, 0u);
  const auto demand = ranges_named("swap_in");
  const auto prefetch = ranges_named("prefetch");
  EXPECT_EQ(demand.size(), s.demand_fetches);
  EXPECT_GT(s.prefetches, 0u) << "the run was meant to prefetch";
  EXPECT_GT(s.demand_fetches, 0u) << "the run was meant to fetch on demand";

  std::map<std::uint64_t, json> last_out;  // buffer -> its latest swap_out push
  std::uint64_t bytes = 0, prefetched = 0;
  for (const range& r : run().ranges) {
    const std::string name = r.name();
    if (name == "swap_out") {
      last_out[buffer_of(r.push)] = r.push;
      continue;
    }
    if (name != "swap_in" && name != "prefetch") continue;
    const auto category = name == "swap_in" ? nvtx_category::swap_in : nvtx_category::prefetch;
    EXPECT_EQ(r.push.at("category").get<std::uint32_t>(), nvtx_category_id(category));
    EXPECT_EQ(r.push.at("category_name"), name);
    EXPECT_EQ(r.push.at("color").get<std::uint32_t>(), nvtx_color(category));
    ASSERT_EQ(r.push.at("payload_type"), "ext") << r.push.dump();
    const auto out = last_out.find(buffer_of(r.push));
    ASSERT_NE(out, last_out.end()) << name << " of a buffer that never went out: " << r.push.dump();
    EXPECT_EQ(bytes_of(r.push), bytes_of(out->second));
    EXPECT_EQ(layer_of(r.push), layer_of(out->second));
    if (name == "swap_in") {
      EXPECT_TRUE(allocated_inside(r)) << "a demand fetch always gets its block";
      bytes += bytes_of(r.push);
    } else if (allocated_inside(r)) {
      ++prefetched;
      bytes += bytes_of(r.push);
    }
  }
  EXPECT_EQ(prefetched, s.prefetches);
  EXPECT_EQ(bytes, s.bytes_in);
  EXPECT_EQ(demand.size() + prefetched, s.swaps_in);
  EXPECT_GE(prefetch.size(), prefetched);
}

// An eviction is a mark right after the swap_out range of the buffer it evicted; a stall is a
// mark per consumer wait the engine counted.
TEST_F(NvtxTrainingStep, EvictionAndStallMarksMatchTheEngine) {
  const swap_stats& s = run().report.swaps;
  EXPECT_GT(s.evictions, 0u) << "the run was meant to evict";
  const auto evicts = marks_named("evict");
  EXPECT_EQ(evicts.size(), s.evictions);
  EXPECT_GT(s.stalls, 0u) << "the run was meant to stall";
  const auto stalls = marks_named("stall");
  EXPECT_EQ(stalls.size(), s.stalls);

  // The annotation events of the run's thread, in order, to find what precedes each mark.
  std::vector<std::size_t> events;
  for (std::size_t i = 0; i < run().log.size(); ++i) {
    if (is_event(run().log[i])) events.push_back(i);
  }
  std::map<std::size_t, const range*> closed_at;  // pop index -> its range
  for (const range& r : run().ranges) closed_at[r.end] = &r;
  std::size_t checked = 0;
  for (std::size_t k = 0; k < events.size(); ++k) {
    const json& e = run().log[events[k]];
    if (e.at("call") != "mark") continue;
    const std::string name = e.at("message");
    const auto category = name == "evict" ? nvtx_category::evict
                          : name == "stall" ? nvtx_category::stall
                                            : nvtx_category::alloc;
    EXPECT_EQ(e.at("category").get<std::uint32_t>(), nvtx_category_id(category)) << e.dump();
    EXPECT_EQ(e.at("color").get<std::uint32_t>(), nvtx_color(category)) << e.dump();
    if (name == "stall") {
      ASSERT_EQ(e.at("payload_type"), "ext") << e.dump();
      EXPECT_GT(bytes_of(e), 0u);
    }
    if (name != "evict") continue;
    ASSERT_EQ(e.at("payload_type"), "ext") << e.dump();
    ASSERT_GT(k, 0u);
    const auto pop = closed_at.find(events[k - 1]);
    ASSERT_NE(pop, closed_at.end()) << "an evict mark that does not follow a range's end: " << e.dump();
    const json& out = pop->second->push;
    EXPECT_EQ(out.at("message"), "swap_out");
    EXPECT_EQ(buffer_of(out), buffer_of(e));
    EXPECT_EQ(bytes_of(out), bytes_of(e));
    EXPECT_EQ(layer_of(out), layer_of(e));
    ++checked;
  }
  EXPECT_EQ(checked, s.evictions);
}

// Every event passes a handle registered once per process, never a string to copy: no string is
// registered during the run, and each event's name is one registered before it.
TEST_F(NvtxTrainingStep, HotPathEventsUseRegisteredNamesAndNamedCategories) {
  std::set<std::string> registered;
  std::map<std::uint32_t, std::string> categories;
  for (const json& e : run().before) {
    if (e.at("call") == "register_string" && e.at("domain") == "gpuswap") registered.insert(e.at("string"));
    if (e.at("call") == "name_category" && e.at("domain") == "gpuswap") categories[e.at("category")] = e.at("name");
  }
  EXPECT_EQ(categories.size(), nvtx_category_count);
  std::size_t events = 0;
  for (const json& e : run().log) {
    EXPECT_NE(e.at("call"), "register_string") << "a string registered on the hot path: " << e.dump();
    if (e.at("call") != "push" && e.at("call") != "mark") continue;
    ++events;
    EXPECT_EQ(e.at("message_type"), "registered") << e.dump();
    EXPECT_TRUE(registered.contains(e.at("message").get<std::string>())) << e.dump();
    const auto category = e.at("category").get<std::uint32_t>();
    ASSERT_TRUE(categories.contains(category)) << e.dump();
    EXPECT_EQ(e.at("category_name"), categories.at(category)) << e.dump();
    EXPECT_EQ(e.at("color_type"), "argb") << e.dump();
  }
  EXPECT_GT(events, 0u);
}

// The allocator's pool as NVTX's memory API describes it: a heap per segment, a region per
// block. The heaps' sizes add up to the reserved bytes at every moment (so their peak is the
// run's), every region is given back before its heap, and by the end nothing is left.
TEST_F(NvtxTrainingStep, MemoryHeapsAndRegionsDescribeThePoolAndBalanceOut) {
  std::map<std::uint64_t, std::uint64_t> heap_size;  // live heaps
  std::uint64_t reserved = 0, peak_reserved = 0;
  std::size_t heaps = 0, heap_unregs = 0, regions = 0, region_unregs = 0, dropped = 0;
  for (const json& e : run().log) {
    const std::string call = e.at("call");
    if (call == "heap_register") {
      ++heaps;
      EXPECT_EQ(e.at("domain"), "gpuswap");
      EXPECT_EQ(e.at("usage"), 1) << "NVTX_MEM_HEAP_USAGE_TYPE_SUB_ALLOCATOR";
      EXPECT_EQ(e.at("category").get<std::uint32_t>(), nvtx_category_id(nvtx_category::alloc));
      EXPECT_EQ(e.at("name").get<std::string>().rfind("gpuswap ", 0), 0u) << e.dump();
      heap_size[e.at("heap")] = e.at("size");
      reserved += e.at("size").get<std::uint64_t>();
      peak_reserved = std::max(peak_reserved, reserved);
    } else if (call == "heap_unregister") {
      ++heap_unregs;
      dropped += e.at("regions_dropped").get<std::size_t>();
      reserved -= heap_size.at(e.at("heap"));
      heap_size.erase(e.at("heap"));
    } else if (call == "heap_reset") {
      dropped += e.at("regions_dropped").get<std::size_t>();
    } else if (call == "region_register") {
      ++regions;
    } else if (call == "region_unregister") {
      ++region_unregs;
    }
  }
  EXPECT_GT(heaps, 0u);
  EXPECT_GT(regions, heaps);
  EXPECT_EQ(peak_reserved, run().report.peak_reserved_bytes);
  EXPECT_LE(peak_reserved, run().report.budget_bytes);
  EXPECT_EQ(heap_unregs, heaps);
  EXPECT_EQ(region_unregs, regions) << "every block freed before its segment went";
  EXPECT_EQ(dropped, 0u);
  EXPECT_EQ(run().heaps_after, run().heaps_before);
  EXPECT_EQ(run().regions_after, run().regions_before);
}

// The layer schedule's phases as Nsight shows them (Note [Schedule ranges]): an iteration range
// per step, inside it one forward range per layer in order and one backward range per layer in
// reverse, each with its layer index; the swaps nest inside the iteration (a swap-out issued
// after its layer's forward step ends sits between two layer ranges), prefetches inside
// backward phases.
TEST_F(NvtxTrainingStep, LayerPhasesNestInsideIterations) {
  const int layers = static_cast<int>(run().model.layers.size());
  const auto iterations = ranges_named("iteration");
  ASSERT_EQ(iterations.size(), static_cast<std::size_t>(run().report.steps))
      << "one iteration range per step (layer_schedule opens them)";
  for (std::size_t it = 0; it < iterations.size(); ++it) {
    const range& r = *iterations[it];
    EXPECT_TRUE(r.enclosing.empty()) << "an iteration is outermost";
    EXPECT_EQ(r.push.at("category").get<std::uint32_t>(), nvtx_category_id(nvtx_category::iteration));
    EXPECT_EQ(r.push.at("payload_type"), "uint64");
    EXPECT_EQ(r.push.at("payload").get<std::uint64_t>(),
              it % static_cast<std::size_t>(run().steps_per_run));  // each run counts from 0
    // Its layer phases, directly inside it.
    std::vector<std::string> phases;
    for (const range& p : run().ranges) {
      if (p.enclosing.size() == 1 && &run().ranges[p.enclosing[0]] == &r) {
        if (p.push.at("category").get<std::uint32_t>() != nvtx_category_id(nvtx_category::layer)) {
          EXPECT_EQ(p.name(), "swap_out") << "between layer ranges only swap-outs: " << p.push.dump();
          continue;
        }
        if (p.push.at("payload_type") == "int32") {
          phases.push_back(p.name() + " " + p.push.at("payload").dump());
        } else {
          phases.push_back(p.name());
        }
      }
    }
    std::vector<std::string> expected;
    for (int l = 0; l < layers; ++l) expected.push_back("forward " + std::to_string(l));
    for (int l = layers - 1; l >= 0; --l) expected.push_back("backward " + std::to_string(l));
    EXPECT_EQ(phases, expected) << "iteration " << it;
  }
  for (const range& r : run().ranges) {
    const std::string name = r.name();
    if (name != "swap_out" && name != "swap_in" && name != "prefetch") continue;
    ASSERT_FALSE(r.enclosing.empty()) << name << " outside every iteration";
    EXPECT_EQ(run().ranges[r.enclosing.front()].name(), "iteration");
    if (name == "prefetch") {
      ASSERT_GE(r.enclosing.size(), 2u);
      EXPECT_EQ(run().ranges[r.enclosing[1]].name(), "backward") << "prefetches are issued in backward";
    }
  }
}

#else

TEST(NvtxTrainingStep, NeedsNvtxAndTheTestTool) {
#if !(defined(GPUSWAP_WITH_NVTX) && GPUSWAP_WITH_NVTX)
  GTEST_SKIP() << "built without NVTX (GPUSWAP_WITH_NVTX is OFF or no CUDA toolkit was found)";
#else
  GTEST_SKIP() << "the NVTX test tool gpuswap_nvtx_injection was not built "
                  "(GPUSWAP_NVTX_INJECTION_PATH is not defined; see tests/CMakeLists.txt)";
#endif
}

#endif

}  // namespace
}  // namespace gpuswap
