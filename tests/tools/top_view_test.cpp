// Draft for tests/tools/top_view_test.cpp (not assigned to the live-stats helper; the lead may
// add it as is). Formatting of `gpuswap top` from fixed snapshots.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tools/top_view.hpp"

namespace gpuswap {
namespace {

constexpr std::uint64_t now_ns = 1'700'000'000'000'000'000ULL;

live_snapshot live_process() {
  live_snapshot s;
  s.segment_name = "gpuswap.1000.4242";
  s.pid = 4242;
  s.status = live_snapshot_status::ok;
  live_figures& f = s.figures;
  f.pid = 4242;
  std::strcpy(f.device_name, "NVIDIA H100 80GB HBM3");
  f.budget_bytes = 8ULL << 30;
  f.allocated_bytes = 3ULL << 30;
  f.reserved_bytes = 4ULL << 30;
  f.swapped_out_bytes = 1536ULL << 20;
  f.in_flight_bytes = 256ULL << 20;
  f.stall_ns_total = 1'200'000'000;
  f.stall_count = 341;
  f.bandwidth_out_bytes_per_s = 12.0 * (1ULL << 30);
  f.bandwidth_in_bytes_per_s = 0.0;
  f.pinned_host_used_bytes = 2ULL << 30;
  f.pinned_host_limit_bytes = 0;
  f.last_update_ns = now_ns - 500'000'000;
  f.heartbeat = 99;
  return s;
}

live_snapshot torn_process() {
  live_snapshot s;
  s.segment_name = "gpuswap.1000.77";
  s.pid = 77;
  s.status = live_snapshot_status::torn;
  s.problem = "the writer died in the middle of an update (sequence stuck odd)";
  return s;
}

TEST(top_view, table_shows_every_figure_in_human_units) {
  const std::string table = format_top_table({live_process(), torn_process()}, now_ns);
  for (const char* expected :
       {"PID", "BUDGET", "SWAPPED", "IN FLIGHT", "STALL", "D2H", "H2D", "4242",
        "NVIDIA H100 80GB HBM3", "8.00 GiB", "3.00 GiB", "4.00 GiB", "1.50 GiB", "256.00 MiB",
        "1.20 s (341)", "12.00 GiB/s", "0 B/s", "2.00 GiB / none", "0.5s", "ok", "torn",
        "pid 77: torn: the writer died"}) {
    EXPECT_NE(table.find(expected), std::string::npos) << expected << "\n" << table;
  }
  // One header, two rows, one note.
  EXPECT_EQ(std::count(table.begin(), table.end(), '\n'), 4);
}

TEST(top_view, empty_table_says_so) {
  EXPECT_NE(format_top_table({}, now_ns).find("no gpuswap process"), std::string::npos);
}

TEST(top_view, json_has_exact_figures_and_error_entries) {
  const nlohmann::json j = top_json({live_process(), torn_process()}, now_ns);
  ASSERT_EQ(j.at("count"), 2);
  const auto& p = j.at("processes").at(0);
  EXPECT_EQ(p.at("pid"), 4242);
  EXPECT_EQ(p.at("status"), "ok");
  EXPECT_EQ(p.at("swapped_out_bytes"), 1536ULL << 20);
  EXPECT_EQ(p.at("stall_ns"), 1'200'000'000);
  EXPECT_DOUBLE_EQ(p.at("age_s").get<double>(), 0.5);
  const auto& t = j.at("processes").at(1);
  EXPECT_EQ(t.at("status"), "torn");
  EXPECT_FALSE(t.contains("allocated_bytes"));
  EXPECT_TRUE(t.contains("problem"));
  EXPECT_NO_THROW((void)j.dump());
}

TEST(top_view, a_device_name_with_non_ascii_bytes_still_dumps) {
  live_snapshot s = live_process();
  std::strcpy(s.figures.device_name, "gpu\xff\x1b[2J");
  EXPECT_NO_THROW((void)top_json({s}, now_ns).dump());
  EXPECT_EQ(format_top_table({s}, now_ns).find('\x1b'), std::string::npos);
}

}  // namespace
}  // namespace gpuswap
