#include "core/logging.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "support/fd_capture.hpp"

namespace gpuswap {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

using testing_support::fd_capture;

// Every test leaves the level where the process starts it.
class logging : public ::testing::Test {
 protected:
  void TearDown() override { set_log_level(log_level::warn); }
};

TEST_F(logging, starts_at_warn) {
  EXPECT_EQ(get_log_level(), log_level::warn);
  EXPECT_EQ(log().level(), spdlog::level::warn);
}

TEST_F(logging, writes_to_stderr_and_never_to_stdout) {
  set_log_level(log_level::debug);
  fd_capture out(1);
  fd_capture err(2);
  log().debug("debug {}", 1);
  log().info("info {}", 2);
  log().warn("warn {}", 3);
  log().error("error {}", 4);
  const std::string err_text = err.finish();
  const std::string out_text = out.finish();
  EXPECT_EQ(out_text, "");
  EXPECT_EQ(err_text,
            "[gpuswap] [debug] debug 1\n"
            "[gpuswap] [info] info 2\n"
            "[gpuswap] [warning] warn 3\n"
            "[gpuswap] [error] error 4\n");
}

struct level_case {
  log_level level;
  std::vector<std::string> shown;
  std::vector<std::string> hidden;
};

TEST_F(logging, filters_below_the_level) {
  const std::vector<level_case> cases{
      {log_level::debug, {"m-debug", "m-info", "m-warn", "m-error"}, {}},
      {log_level::info, {"m-info", "m-warn", "m-error"}, {"m-debug"}},
      {log_level::warn, {"m-warn", "m-error"}, {"m-debug", "m-info"}},
      {log_level::error, {"m-error"}, {"m-debug", "m-info", "m-warn"}},
      {log_level::off, {}, {"m-debug", "m-info", "m-warn", "m-error"}},
  };
  for (const level_case& c : cases) {
    SCOPED_TRACE(std::string(to_string(c.level)));
    set_log_level(c.level);
    EXPECT_EQ(get_log_level(), c.level);
    fd_capture err(2);
    log().debug("m-debug");
    log().info("m-info");
    log().warn("m-warn");
    log().error("m-error");
    const std::string text = err.finish();
    for (const std::string& m : c.shown) EXPECT_THAT(text, HasSubstr(m));
    for (const std::string& m : c.hidden) EXPECT_THAT(text, Not(HasSubstr(m)));
  }
}

TEST_F(logging, one_logger_for_every_thread) {
  std::vector<spdlog::logger*> seen(8, nullptr);
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < seen.size(); ++i) {
    threads.emplace_back([&seen, i] { seen[i] = &log(); });
  }
  for (std::thread& t : threads) t.join();
  for (spdlog::logger* p : seen) EXPECT_EQ(p, &log());
  EXPECT_EQ(log().name(), "gpuswap");
}

TEST_F(logging, stays_out_of_spdlogs_registry) {
  // A host program's own spdlog setup must neither clash with ours nor reconfigure it.
  static_cast<void>(log());
  EXPECT_EQ(spdlog::get("gpuswap"), nullptr);
  spdlog::set_level(spdlog::level::trace);
  EXPECT_EQ(get_log_level(), log_level::warn);
  spdlog::set_level(spdlog::level::info);
}

}  // namespace
}  // namespace gpuswap
