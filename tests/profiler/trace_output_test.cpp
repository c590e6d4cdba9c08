// trace_output: `trace:FILE` writes a Chrome trace of everything recorded when its owner ends,
// or on demand; what it writes reads back as the timeline that was recorded; a path that cannot
// be written is logged, never thrown out of a destructor.
#include "profiler/trace_output.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "core/config.hpp"
#include "core/errors.hpp"
#include "profiler/chrome_trace.hpp"
#include "profiler/event_recorder.hpp"

#include "support/fd_capture.hpp"

namespace gpuswap {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::Not;

// A fresh directory per test, removed with everything in it.
class temp_dir {
 public:
  temp_dir() {
    static int n = 0;
    path_ = fs::temp_directory_path() /
            ("gpuswap_trace_output_test_" + std::to_string(::getpid()) + "_" + std::to_string(n++));
    fs::create_directories(path_);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::size_t entries() const {
    return static_cast<std::size_t>(std::distance(fs::directory_iterator(path_), fs::directory_iterator{}));
  }

 private:
  fs::path path_;
};

using testing_support::fd_capture;

// One swap out and back of buffer `id` (on the D2H and H2D tracks) starting at t.
void record_round_trip(event_recorder& r, double t, std::uint64_t id, std::uint64_t bytes) {
  r.record(trace_event::swap(event_kind::swap_out_begin, t, id, bytes, 2, 11));
  r.record(trace_event::swap(event_kind::swap_out_end, t + 100, id, bytes, 2, 11));
  r.record(trace_event::swap(event_kind::swap_in_begin, t + 500, id, bytes, 2, 12, event_detail::prefetch));
  r.record(trace_event::swap(event_kind::swap_in_end, t + 600, id, bytes, 2, 12, event_detail::prefetch));
}

std::size_t swap_slices(const trace_timeline& t) {
  std::size_t n = 0;
  for (const trace_slice& s : t.slices) n += s.kind == slice_kind::swap_out || s.kind == slice_kind::swap_in;
  return n;
}

TEST(trace_output, without_a_path_it_enables_nothing_and_writes_nothing) {
  temp_dir dir;
  event_recorder rec;
  {
    trace_output out(config{}, {}, rec);
    EXPECT_FALSE(out.active());
    EXPECT_FALSE(rec.enabled());
    EXPECT_FALSE(out.flush());
  }
  EXPECT_FALSE(rec.enabled());
  EXPECT_EQ(dir.entries(), 0u);
}

TEST(trace_output, the_config_key_names_the_file_written_when_it_is_destroyed) {
  temp_dir dir;
  const std::string path = dir.file("run.json");
  event_recorder rec;
  {
    trace_output out(parse_config("trace:" + path), chrome_trace_options{"sim:test"}, rec);
    EXPECT_TRUE(out.active());
    EXPECT_EQ(out.path(), path);
    EXPECT_TRUE(rec.enabled()) << "a trace path turns the recorder on";
    rec.record(trace_event::layer_phase(event_kind::layer_begin, 0, 0, event_detail::forward));
    record_round_trip(rec, 10, 7, 4096);
    rec.record(trace_event::layer_phase(event_kind::layer_end, 1000, 0, event_detail::forward));
    EXPECT_FALSE(fs::exists(path)) << "nothing is written before it is asked for or destroyed";
  }
  EXPECT_FALSE(rec.enabled()) << "the recorder is off again, as it was before";
  ASSERT_TRUE(fs::exists(path));
  const trace_timeline t = read_chrome_trace(path);
  EXPECT_EQ(t.device_name, "sim:test");
  ASSERT_EQ(t.slices.size(), 3u);
  EXPECT_EQ(t.slices[0].kind, slice_kind::forward);
  EXPECT_EQ(t.slices[1].kind, slice_kind::swap_out);
  EXPECT_EQ(t.slices[1].bytes, 4096u);
  EXPECT_EQ(t.slices[1].buffer, 7u);
  EXPECT_EQ(t.slices[2].kind, slice_kind::swap_in);
  EXPECT_EQ(t.slices[2].begin_ns, 510);
  EXPECT_TRUE(t.unmatched.empty());
  EXPECT_EQ(dir.entries(), 1u) << "no temporary file is left beside it";
}

TEST(trace_output, flush_writes_on_demand_and_the_destructor_adds_what_came_after) {
  temp_dir dir;
  const std::string path = dir.file("t.json");
  event_recorder rec;
  {
    trace_output out(path, {}, rec);
    record_round_trip(rec, 0, 1, 100);
    ASSERT_TRUE(out.flush());
    EXPECT_EQ(swap_slices(read_chrome_trace(path)), 2u);
    record_round_trip(rec, 1000, 2, 200);
    EXPECT_EQ(swap_slices(read_chrome_trace(path)), 2u) << "a flush is a snapshot";
  }
  const trace_timeline t = read_chrome_trace(path);
  EXPECT_EQ(swap_slices(t), 4u) << "the final write has the events of both parts";
  EXPECT_EQ(t.slices.front().buffer, 1u);
  EXPECT_EQ(t.slices.back().buffer, 2u);
}

TEST(trace_output, the_destructor_does_not_rewrite_a_file_that_holds_everything) {
  temp_dir dir;
  const std::string path = dir.file("t.json");
  event_recorder rec;
  {
    trace_output out(path, {}, rec);
    record_round_trip(rec, 0, 1, 100);
    ASSERT_TRUE(out.flush());
    fs::remove(path);  // had the destructor written again, the file would be back
  }
  EXPECT_FALSE(fs::exists(path));
}

TEST(trace_output, events_taken_for_a_summary_still_reach_the_file) {
  temp_dir dir;
  const std::string path = dir.file("t.json");
  event_recorder rec;
  {
    trace_output out(path, {}, rec);
    record_round_trip(rec, 500, 1, 100);
    const std::vector<trace_event> first = out.events();
    EXPECT_EQ(first.size(), 4u);
    EXPECT_TRUE(rec.collect().empty()) << "events() drains the recorder's bounded rings";
    record_round_trip(rec, 0, 2, 100);  // earlier than what is held: merged in by time
    const std::vector<trace_event> all = out.events();
    ASSERT_EQ(all.size(), 8u);
    for (std::size_t i = 1; i < all.size(); ++i) EXPECT_LE(all[i - 1].time_ns, all[i].time_ns) << i;
  }
  EXPECT_EQ(swap_slices(read_chrome_trace(path)), 4u);
}

TEST(trace_output, clear_leaves_only_what_comes_after_it) {
  temp_dir dir;
  const std::string path = dir.file("t.json");
  event_recorder rec;
  {
    trace_output out(path, {}, rec);
    record_round_trip(rec, 0, 1, 100);
    ASSERT_TRUE(out.flush());
    (void)out.events();
    record_round_trip(rec, 1000, 2, 100);  // still in the recorder
    out.clear();
    record_round_trip(rec, 2000, 3, 300);
  }
  const trace_timeline t = read_chrome_trace(path);
  ASSERT_EQ(swap_slices(t), 2u);
  EXPECT_EQ(t.slices.front().buffer, 3u);
  EXPECT_EQ(t.slices.front().bytes, 300u);
}

TEST(trace_output, write_to_writes_another_file_and_throws_naming_a_bad_path) {
  temp_dir dir;
  event_recorder rec;
  trace_output out(dir.file("main.json"), {}, rec);
  record_round_trip(rec, 0, 1, 100);
  out.write_to(dir.file("copy.json"));
  EXPECT_EQ(swap_slices(read_chrome_trace(dir.file("copy.json"))), 2u);
  EXPECT_FALSE(fs::exists(dir.file("main.json")));
  const std::string bad = dir.file("no/such/dir/t.json");
  try {
    out.write_to(bad);
    ADD_FAILURE() << "no exception";
  } catch (const error& e) {
    EXPECT_THAT(e.what(), HasSubstr(bad));
  }
}

TEST(trace_output, a_path_that_cannot_be_written_is_logged_and_never_thrown) {
  temp_dir dir;
  const std::string bad = dir.file("no/such/dir/t.json");
  event_recorder rec;
  fd_capture err(2);
  EXPECT_NO_THROW({
    trace_output out(bad, {}, rec);
    record_round_trip(rec, 0, 1, 100);
    EXPECT_FALSE(out.flush());
    record_round_trip(rec, 1000, 2, 100);
  });  // the destructor tries again, and fails again
  const std::string logged = err.finish();
  EXPECT_THAT(logged, HasSubstr("[error]"));
  EXPECT_THAT(logged, HasSubstr(bad));
  EXPECT_THAT(logged, HasSubstr("at exit")) << "the destructor's failure is logged too";
  EXPECT_FALSE(rec.enabled());
}

TEST(trace_output, a_failed_write_is_reported_once) {
  temp_dir dir;
  const std::string bad = dir.file("no/such/dir/t.json");
  event_recorder rec;
  fd_capture err(2);
  {
    trace_output out(bad, {}, rec);
    record_round_trip(rec, 0, 1, 100);
    EXPECT_THROW(out.write_to(bad), error);  // what a command that must fail does
  }
  const std::string logged = err.finish();
  EXPECT_THAT(logged, Not(HasSubstr("at exit"))) << "nothing new to write, so no second try";
}

TEST(trace_output, a_recorder_that_was_already_on_stays_on) {
  temp_dir dir;
  event_recorder rec;
  rec.enable(true);
  { trace_output out(dir.file("t.json"), {}, rec); }
  EXPECT_TRUE(rec.enabled());
  EXPECT_TRUE(fs::exists(dir.file("t.json"))) << "an empty trace is still a trace";
  EXPECT_NO_THROW((void)read_chrome_trace(dir.file("t.json")));
}

TEST(trace_output, the_default_recorder_is_the_global_one) {
  temp_dir dir;
  auto& g = global_recorder();
  ASSERT_FALSE(g.enabled());
  g.clear();
  {
    trace_output out(dir.file("t.json"));
    EXPECT_TRUE(g.enabled());
    record_round_trip(g, 0, 9, 64);
  }
  EXPECT_FALSE(g.enabled());
  EXPECT_EQ(swap_slices(read_chrome_trace(dir.file("t.json"))), 2u);
}

// A run that records far more than one ring holds between two reads loses nothing: the
// background drain empties the rings while the run goes on. Each burst fills three quarters of
// a 64-event ring, and the next burst starts only after two background drains have begun and
// ended since (so at least one whole drain ran after the burst); without the drainer the wait
// never ends and the test fails, and with a drain that missed events they show as drops.
TEST(trace_output, the_background_drain_keeps_a_long_run_within_bounded_rings) {
  temp_dir dir;
  event_recorder rec(64);
  constexpr int bursts = 40;
  constexpr int per_burst = 48;
  {
    trace_output out(dir.file("t.json"), {}, rec, std::chrono::milliseconds(1));
    for (int b = 0; b < bursts; ++b) {
      for (int i = 0; i < per_burst; ++i) {
        rec.record(trace_event::marker(event_kind::alloc, b * per_burst + i, trace_track::host, 1, 1));
      }
      const std::uint64_t seen = out.background_drains();
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
      while (out.background_drains() < seen + 2) {
        ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "no background drain";
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
    }
    EXPECT_EQ(rec.dropped(), 0u);
    const std::vector<trace_event> events = out.events();
    ASSERT_EQ(events.size(), static_cast<std::size_t>(bursts * per_burst));
    for (std::size_t i = 0; i < events.size(); ++i) {
      ASSERT_EQ(events[i].time_ns, static_cast<double>(i)) << "in time order";
    }
  }
  EXPECT_TRUE(fs::exists(dir.file("t.json")));
}

// Without the background drain (interval 0) the same run overflows: this is what the drain is for.
TEST(trace_output, without_the_background_drain_a_long_run_overflows_the_rings) {
  temp_dir dir;
  event_recorder rec(64);
  trace_output out(dir.file("t.json"), {}, rec, std::chrono::milliseconds(0));
  for (int i = 0; i < 40 * 48; ++i) {
    rec.record(trace_event::marker(event_kind::alloc, i, trace_track::host, 1, 1));
  }
  EXPECT_EQ(out.background_drains(), 0u);
  EXPECT_GT(rec.dropped(), 0u);
}

}  // namespace
}  // namespace gpuswap
