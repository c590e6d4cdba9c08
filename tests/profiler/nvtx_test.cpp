// NVTX annotations, checked the way Nsight Systems would receive them: the test tool
// tests/profiler/nvtx_injection.cpp is loaded by NVTX itself (NVTX_INJECTION64_PATH, set below
// before the process's first NVTX call) and logs every call it receives; the tests read that log
// back. No GPU is needed.
#include <dlfcn.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "profiler/nvtx_domain.hpp"
#include "profiler/nvtx_memory_pool.hpp"
#include "profiler/nvtx_ranges.hpp"
#include "profiler/nvtx_registry.hpp"

#include "support/nvtx_test_tool.hpp"

namespace gpuswap {
namespace {

// ---- always: the names, ids and colours the domain is built from ----------------------------

TEST(NvtxDomain, CategoriesHaveDistinctIdsNamesAndColours) {
  std::set<std::string_view> names;
  std::set<std::uint32_t> colours;
  for (std::uint32_t id = 1; id <= nvtx_category_count; ++id) {
    const auto c = static_cast<nvtx_category>(id);
    EXPECT_EQ(nvtx_category_id(c), id);
    EXPECT_NE(to_string(c), "unknown") << id;
    names.insert(to_string(c));
    colours.insert(nvtx_color(c));
    EXPECT_EQ(nvtx_color(c) >> 24, 0xFFu) << "opaque ARGB for " << to_string(c);
  }
  EXPECT_EQ(names.size(), nvtx_category_count);
  EXPECT_EQ(colours.size(), nvtx_category_count);
  EXPECT_EQ(to_string(nvtx_category::swap_out), "swap_out");
  EXPECT_EQ(to_string(default_name(nvtx_category::stall)), "stall");
}

TEST(NvtxDomain, HotPathNamesAreDistinct) {
  std::set<std::string_view> names;
  for (std::size_t i = 0; i < nvtx_name_count; ++i) {
    names.insert(to_string(static_cast<nvtx_name>(i)));
  }
  EXPECT_EQ(names.size(), nvtx_name_count);
  EXPECT_FALSE(names.contains("unknown"));
  EXPECT_EQ(to_string(phase_name(nvtx_phase::backward)), "backward");
}

TEST(NvtxDomain, CompiledOutApiIsEmpty) {
  if (nvtx_compiled_in) GTEST_SKIP() << "NVTX is compiled in; this checks the OFF build";
  EXPECT_TRUE(std::is_empty_v<nvtx_range>);
  EXPECT_TRUE(std::is_empty_v<nvtx_layer_range>);
  nvtx_swap_range r(nvtx_category::swap_out, 1024, 3, 1);
  nvtx_mark(nvtx_category::evict, 1024, 3, 1);
  nvtx_memory_pool pool("off");
  std::vector<std::byte> seg(4096);
  pool.register_segment(seg.data(), seg.size());
  pool.register_block(seg.data(), 64);
  EXPECT_EQ(pool.segment_count(), 0u);
  EXPECT_EQ(pool.block_count(), 0u);
}

#if defined(GPUSWAP_WITH_NVTX) && GPUSWAP_WITH_NVTX && defined(GPUSWAP_NVTX_INJECTION_PATH)

using json = nlohmann::json;

constexpr const char* core_only_env = "GPUSWAP_NVTX_INJECTION_CORE_ONLY";
constexpr const char* no_tool_env = "GPUSWAP_NVTX_TEST_NO_TOOL";

// NVTX looks for its tool once, at the process's first NVTX call; this runs before main().
// A death-test child asked to run without a tool drops the path its parent exported.
[[maybe_unused]] const bool injection_env_ready = [] {
  if (std::getenv(no_tool_env) != nullptr) {
    ::unsetenv("NVTX_INJECTION64_PATH");
  } else {
    ::setenv("NVTX_INJECTION64_PATH", GPUSWAP_NVTX_INJECTION_PATH, 1);
  }
  return true;
}();

using test_tool = testing_support::nvtx_test_tool;

std::vector<json> entries_where(const json& log, const std::string& call) {
  std::vector<json> out;
  for (const auto& e : log) {
    if (e.at("call") == call) out.push_back(e);
  }
  return out;
}

std::vector<std::string> errors_in(const json& log) {
  std::vector<std::string> out;
  for (const auto& e : entries_where(log, "error")) out.push_back(e.at("what"));
  return out;
}

std::string payload_text(const json& e) {
  if (!e.contains("payload")) return e.value("payload_type", "none");
  const json& p = e.at("payload");
  if (e.at("payload_type") == "ext") {
    return "bytes=" + p.at("bytes").dump() + " buffer=" + p.at("buffer_id").dump() +
           " layer=" + p.at("layer").dump();
  }
  return e.at("payload_type").get<std::string>() + "=" + p.dump();
}

// One line per push/pop/mark: what an Nsight row shows of it.
std::string summary(const json& e) {
  std::string s = e.at("call").get<std::string>() + " " + e.at("message").get<std::string>() +
                  " depth=" + e.at("depth").dump();
  if (e.at("call") != "pop") {
    s += " [" + e.at("category_name").get<std::string>() + "] " + payload_text(e);
  }
  return s;
}

// The annotated events of the gpuswap domain, per OS thread, in order.
std::map<std::int64_t, std::vector<std::string>> rows_by_thread(const json& log) {
  std::map<std::int64_t, std::vector<std::string>> rows;
  for (const auto& e : log) {
    const std::string call = e.at("call");
    if ((call == "push" || call == "pop" || call == "mark") && e.at("domain") == "gpuswap") {
      rows[e.at("thread").get<std::int64_t>()].push_back(summary(e));
    }
  }
  return rows;
}

class NvtxInjection : public ::testing::Test {
 protected:
  void SetUp() override {
    tool_ = test_tool::get();
    ASSERT_NE(tool_, nullptr) << "NVTX did not load the test tool from "
                              << GPUSWAP_NVTX_INJECTION_PATH;
    set_nvtx_enabled(true);
    start_ = tool_->log_size();
  }
  void TearDown() override { set_nvtx_enabled(true); }

  json new_entries() const { return tool_->log_since(start_); }

  const test_tool* tool_ = nullptr;
  std::size_t start_ = 0;
};

TEST_F(NvtxInjection, DomainCategoriesStringsAndSchemaAreRegisteredOnce) {
  const json log = tool_->log();
  ASSERT_FALSE(log.empty());
  EXPECT_EQ(log.at(0).at("call"), "initialize");

  std::vector<std::string> domains;
  for (const auto& e : entries_where(log, "domain_create")) domains.push_back(e.at("domain"));
  EXPECT_EQ(std::count(domains.begin(), domains.end(), "gpuswap"), 1);

  std::map<std::uint32_t, std::string> categories;
  for (const auto& e : entries_where(log, "name_category")) {
    if (e.at("domain") == "gpuswap") categories[e.at("category")] = e.at("name");
  }
  const std::map<std::uint32_t, std::string> expected_categories{
      {1, "alloc"}, {2, "swap_out"}, {3, "swap_in"}, {4, "prefetch"},
      {5, "stall"}, {6, "evict"},    {7, "layer"},   {8, "iteration"}};
  EXPECT_EQ(categories, expected_categories);

  std::multiset<std::string> strings;
  for (const auto& e : entries_where(log, "register_string")) {
    if (e.at("domain") == "gpuswap") strings.insert(e.at("string"));
  }
  const std::multiset<std::string> expected_strings{
      "alloc", "free",    "swap_out", "swap_in",   "prefetch",   "stall",
      "evict", "forward", "backward", "iteration", "empty_cache"};
  EXPECT_EQ(strings, expected_strings);

  const auto schemas = entries_where(log, "schema_register");
  ASSERT_EQ(schemas.size(), 1u);
  const json& schema = schemas[0];
  EXPECT_EQ(schema.at("name"), "gpuswap_buffer");
  EXPECT_EQ(schema.at("static_size"), sizeof(nvtx_buffer_payload));
  const json expected_entries = json::parse(R"([
      {"name": "bytes", "type": 18, "offset": 0},
      {"name": "buffer_id", "type": 18, "offset": 8},
      {"name": "layer", "type": 15, "offset": 16}])");
  EXPECT_EQ(schema.at("entries"), expected_entries);
  EXPECT_EQ(get_nvtx_registry().buffer_schema_id, schema.at("schema_id").get<std::uint64_t>());

  for (const auto& e : entries_where(log, "initialize_extension")) {
    EXPECT_TRUE(e.at("accepted").get<bool>()) << e.dump();
  }
  EXPECT_EQ(errors_in(log), std::vector<std::string>{});
}

// A training step as the swap engine and the layer schedule annotate it: the compute thread
// nests layer phases in the iteration and allocations, stalls, prefetch and eviction marks in
// the layers; the copy-stream threads carry the swaps on rows of their own.
TEST_F(NvtxInjection, TrainingStepNestsRangesAndPutsSwapsOnCopyThreads) {
  constexpr std::uint64_t mib = std::uint64_t{1} << 20;
  const auto copy_thread = [](const char* row, auto&& body) {
    std::thread t([&] {
      nvtx_name_thread(row);
      body();
    });
    t.join();
  };
  {
    nvtx_iteration_range step(7);
    for (std::int32_t layer = 0; layer < 2; ++layer) {
      nvtx_layer_range fwd(nvtx_phase::forward, layer);
      { nvtx_range alloc(nvtx_category::alloc, 8 * mib); }
      copy_thread("gpuswap D2H", [&] {
        nvtx_swap_range out(nvtx_category::swap_out, 4 * mib, 100 + layer, layer);
      });
    }
    {
      nvtx_layer_range bwd(nvtx_phase::backward, 1);
      nvtx_mark(nvtx_category::prefetch, 4 * mib, 100, 0);
      copy_thread("gpuswap H2D", [&] {
        nvtx_swap_range in(nvtx_category::swap_in, 4 * mib, 101, 1);
      });
      {
        nvtx_range stall(nvtx_category::stall, 4 * mib, 101, 1);
      }
      nvtx_mark(nvtx_category::evict, 2 * mib, 55, 1);
      nvtx_range free_range(nvtx_category::alloc, nvtx_name::free, 8 * mib);
    }
    nvtx_mark_message(nvtx_category::alloc, "empty_cache released 3 segments", 96 * mib);
  }

  const json log = new_entries();
  EXPECT_EQ(errors_in(log), std::vector<std::string>{});
  const auto rows = rows_by_thread(log);
  ASSERT_EQ(rows.size(), 4u) << "compute thread + one row per copy thread (3 threads made)";

  const std::int64_t main_tid = ::gettid();
  ASSERT_TRUE(rows.contains(main_tid));
  const std::vector<std::string> expected_main{
      "push iteration depth=1 [iteration] uint64=7",
      "push forward depth=2 [layer] int32=0",
      "push alloc depth=3 [alloc] uint64=8388608",
      "pop alloc depth=3",
      "pop forward depth=2",
      "push forward depth=2 [layer] int32=1",
      "push alloc depth=3 [alloc] uint64=8388608",
      "pop alloc depth=3",
      "pop forward depth=2",
      "push backward depth=2 [layer] int32=1",
      "mark prefetch depth=2 [prefetch] bytes=4194304 buffer=100 layer=0",
      "push stall depth=3 [stall] bytes=4194304 buffer=101 layer=1",
      "pop stall depth=3",
      "mark evict depth=2 [evict] bytes=2097152 buffer=55 layer=1",
      "push free depth=3 [alloc] uint64=8388608",
      "pop free depth=3",
      "pop backward depth=2",
      "mark empty_cache released 3 segments depth=1 [alloc] uint64=100663296",
      "pop iteration depth=1",
  };
  EXPECT_EQ(rows.at(main_tid), expected_main);

  // The copy threads: each swap is the outermost range of its own row, not nested in the layer.
  std::multiset<std::vector<std::string>> copy_rows;
  for (const auto& [tid, row] : rows) {
    if (tid != main_tid) copy_rows.insert(row);
  }
  const std::multiset<std::vector<std::string>> expected_copy_rows{
      {"push swap_out depth=1 [swap_out] bytes=4194304 buffer=100 layer=0", "pop swap_out depth=1"},
      {"push swap_out depth=1 [swap_out] bytes=4194304 buffer=101 layer=1", "pop swap_out depth=1"},
      {"push swap_in depth=1 [swap_in] bytes=4194304 buffer=101 layer=1", "pop swap_in depth=1"},
  };
  EXPECT_EQ(copy_rows, expected_copy_rows);

  // Each copy thread named its row before annotating.
  std::multiset<std::string> thread_names;
  for (const auto& e : entries_where(log, "name_thread")) {
    thread_names.insert(e.at("name"));
    EXPECT_EQ(e.at("os_thread").get<std::int64_t>(), e.at("thread").get<std::int64_t>());
  }
  EXPECT_EQ(thread_names, (std::multiset<std::string>{"gpuswap D2H", "gpuswap D2H", "gpuswap H2D"}));

  // Colours, message kinds and payload types as Nsight receives them.
  for (const auto& e : log) {
    if (e.at("call") != "push" && e.at("call") != "mark") continue;
    const auto category = static_cast<nvtx_category>(e.at("category").get<std::uint32_t>());
    EXPECT_EQ(e.at("color_type"), "argb");
    EXPECT_EQ(e.at("color").get<std::uint32_t>(), nvtx_color(category)) << e.dump();
    const bool free_form = e.at("message") == "empty_cache released 3 segments";
    EXPECT_EQ(e.at("message_type"), free_form ? "ascii" : "registered") << e.dump();
    if (e.at("payload_type") == "ext") {
      EXPECT_EQ(e.at("schema"), "gpuswap_buffer");
    }
  }
}

TEST_F(NvtxInjection, RuntimeSwitchSilencesEventsAndKeepsPushPopBalanced) {
  set_nvtx_enabled(false);
  {
    nvtx_swap_range r(nvtx_category::swap_out, 4096, 1, 0);
    nvtx_layer_range l(nvtx_phase::forward, 0);
    nvtx_mark(nvtx_category::evict, 4096, 1, 0);
    nvtx_name_thread("silenced");
  }
  EXPECT_EQ(new_entries(), json::array());

  // Switched off inside a range: the range still ends.
  set_nvtx_enabled(true);
  {
    nvtx_iteration_range it(1);
    set_nvtx_enabled(false);
  }
  // Switched on inside a range that never began: no stray pop.
  {
    nvtx_iteration_range it(2);
    set_nvtx_enabled(true);
  }
  const json log = new_entries();
  EXPECT_EQ(errors_in(log), std::vector<std::string>{});
  const auto rows = rows_by_thread(log);
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows.begin()->second, (std::vector<std::string>{
                                      "push iteration depth=1 [iteration] uint64=1",
                                      "pop iteration depth=1",
                                  }));
}

TEST_F(NvtxInjection, MemoryPoolDescribesSegmentsAsHeapsAndBlocksAsRegions) {
  const std::size_t heaps_before = tool_->live_heaps();
  const std::size_t regions_before = tool_->live_regions();
  constexpr std::size_t kib = 1024;
  std::vector<std::byte> seg_a(1024 * kib);
  std::vector<std::byte> seg_b(256 * kib);
  std::vector<std::byte> elsewhere(64 * kib);
  std::byte* const a = seg_a.data();
  std::byte* const b = seg_b.data();
  {
    nvtx_memory_pool pool("gpuswap sim:0");
    pool.register_segment(a, seg_a.size());
    pool.register_segment(b, seg_b.size());
    pool.register_block(a, 256 * kib);
    pool.register_block(a + 256 * kib, 512 * kib);
    pool.register_block(b + 128 * kib, 128 * kib);
    EXPECT_EQ(pool.segment_count(), 2u);
    EXPECT_EQ(pool.block_count(), 3u);
    EXPECT_EQ(tool_->live_heaps(), heaps_before + 2);
    EXPECT_EQ(tool_->live_regions(), regions_before + 3);

    // Not the tool's business: outside every segment, straddling a segment's end, a repeat, a
    // block that was never registered, a double free.
    pool.register_block(elsewhere.data(), 64);
    pool.register_block(b + 192 * kib, 128 * kib);
    pool.register_block(a, 256 * kib);
    pool.unregister_block(a + 900 * kib);
    pool.unregister_block(a);
    pool.unregister_block(a);
    EXPECT_EQ(pool.block_count(), 2u);
    EXPECT_EQ(tool_->live_regions(), regions_before + 2);

    // The allocator reuses the address for a new block.
    pool.register_block(a, 128 * kib);
    // empty_cache would release segment b; reset() forgets every block.
    pool.unregister_segment(b);
    EXPECT_EQ(pool.segment_count(), 1u);
    EXPECT_EQ(tool_->live_heaps(), heaps_before + 1);
    pool.reset();
    EXPECT_EQ(pool.block_count(), 0u);
    EXPECT_EQ(tool_->live_regions(), regions_before);
    pool.register_block(a + 512 * kib, 64 * kib);
    EXPECT_EQ(tool_->live_regions(), regions_before + 1);

    // Switched off: nothing new is registered, what was registered is still taken back.
    set_nvtx_enabled(false);
    pool.register_block(a, 64 * kib);
    pool.unregister_block(a + 512 * kib);
    EXPECT_EQ(tool_->live_regions(), regions_before);
    set_nvtx_enabled(true);
  }  // the destructor unregisters segment a
  EXPECT_EQ(tool_->live_heaps(), heaps_before);

  const json log = new_entries();
  EXPECT_EQ(errors_in(log), std::vector<std::string>{});
  const auto heaps = entries_where(log, "heap_register");
  ASSERT_EQ(heaps.size(), 2u);
  EXPECT_EQ(heaps[0].at("ptr").get<std::uintptr_t>(), reinterpret_cast<std::uintptr_t>(a));
  EXPECT_EQ(heaps[0].at("size"), seg_a.size());
  EXPECT_EQ(heaps[0].at("name"), "gpuswap sim:0");
  EXPECT_EQ(heaps[0].at("domain"), "gpuswap");
  EXPECT_EQ(heaps[0].at("usage"), 1) << "NVTX_MEM_HEAP_USAGE_TYPE_SUB_ALLOCATOR";
  EXPECT_EQ(heaps[0].at("category"), nvtx_category_id(nvtx_category::alloc));

  std::vector<std::string> calls;
  for (const auto& e : log) {
    const std::string call = e.at("call");
    if (call.starts_with("heap_") || call.starts_with("region_")) calls.push_back(call);
  }
  const std::vector<std::string> expected_calls{
      "heap_register",     "heap_register",     "region_register",   "region_register",
      "region_register",   "region_unregister", "region_register",   "heap_unregister",
      "heap_reset",        "region_register",   "region_unregister", "heap_unregister"};
  EXPECT_EQ(calls, expected_calls);
  const auto resets = entries_where(log, "heap_reset");
  ASSERT_EQ(resets.size(), 1u);
  EXPECT_EQ(resets[0].at("regions_dropped"), 2) << "the 512 KiB block and the reused address";
}

// ---- other tools, in child processes (NVTX picks its tool once per process) -------------------

// Each child re-runs this test binary with only the calling test selected ("threadsafe" death
// test style), so its first NVTX call happens under the environment set here.
class NvtxChildProcess : public ::testing::Test {
 protected:
  void SetUp() override {
    GTEST_FLAG_SET(death_test_style, "threadsafe");
    (void)get_nvtx_registry();  // this process keeps the tool it already has
  }
  void TearDown() override {
    ::unsetenv(core_only_env);
    ::unsetenv(no_tool_env);
  }
};

[[noreturn]] void exit_with(const std::string& failure) {
  if (!failure.empty()) std::fprintf(stderr, "child check failed: %s\n", failure.c_str());
  std::fflush(stderr);
  std::_Exit(failure.empty() ? 0 : 1);
}

// A tool without NVTX's payload and memory extensions (an older Nsight) still gets every range
// with its byte count, and the memory pool tracks nothing.
std::string check_tool_without_extensions() {
  const test_tool* tool = test_tool::get();
  if (tool == nullptr) return "the tool was not loaded";
  if (get_nvtx_registry().buffer_schema_id != 0) return "a schema id from a tool that has none";
  const std::size_t start = tool->log_size();
  { nvtx_swap_range r(nvtx_category::swap_out, 4096, 9, 2); }
  nvtx_memory_pool pool("child");
  std::vector<std::byte> seg(4096);
  pool.register_segment(seg.data(), seg.size());
  pool.register_block(seg.data(), 64);
  if (pool.segment_count() != 0 || pool.block_count() != 0) return "the pool tracked segments";
  const auto rows = rows_by_thread(tool->log_since(start));
  const std::vector<std::string> expected{"push swap_out depth=1 [swap_out] uint64=4096",
                                          "pop swap_out depth=1"};
  if (rows.size() != 1 || rows.begin()->second != expected) {
    return "unexpected events: " + tool->log_since(start).dump();
  }
  return {};
}

TEST_F(NvtxChildProcess, ToolWithoutExtensionsGetsThePlainByteCount) {
  ::setenv(core_only_env, "1", 1);
  EXPECT_EXIT(exit_with(check_tool_without_extensions()), ::testing::ExitedWithCode(0), "");
}

// No tool at all (the common case in production): every call is harmless and nothing loads.
std::string check_without_tool() {
  if (test_tool::get() != nullptr) return "the tool was loaded";
  if (get_nvtx_registry().buffer_schema_id != 0) return "a schema id without a tool";
  {
    nvtx_iteration_range it(1);
    nvtx_layer_range l(nvtx_phase::backward, 3);
    nvtx_swap_range r(nvtx_category::swap_in, 4096, 9, 3);
    nvtx_mark(nvtx_category::stall, 4096, 9, 3);
    nvtx_mark_message(nvtx_category::alloc, "oom", 1);
    nvtx_name_thread("main");
  }
  nvtx_memory_pool pool("child");
  std::vector<std::byte> seg(4096);
  pool.register_segment(seg.data(), seg.size());
  pool.register_block(seg.data(), 64);
  pool.unregister_block(seg.data());
  pool.reset();
  if (pool.segment_count() != 0) return "the pool tracked segments without a tool";
  return {};
}

TEST_F(NvtxChildProcess, WithoutAToolEverythingIsANoOp) {
  ::setenv(no_tool_env, "1", 1);
  EXPECT_EXIT(exit_with(check_without_tool()), ::testing::ExitedWithCode(0), "");
}

#else

TEST(NvtxInjection, NeedsNvtxAndTheTestTool) {
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
