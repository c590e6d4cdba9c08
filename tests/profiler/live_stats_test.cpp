// The live stats segment: owner-only creation under a per-user name, refusal of a name that is
// taken by something not ours, the seqlock under concurrent updates and reads, removal at exit
// and of dead processes' segments. Every test uses its own name prefix, so test processes that
// ctest runs in parallel never see each other's segments.
#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <spdlog/sinks/ringbuffer_sink.h>

#include "core/errors.hpp"
#include "core/logging.hpp"
#include "profiler/live_stats.hpp"
#include "profiler/live_stats_reader.hpp"
#include "profiler/live_stats_writer.hpp"

namespace gpuswap {
namespace {

std::string unique_prefix() {
  std::random_device device;
  return fmt::format("gstest-{}-{:08x}", ::getpid(), device());
}

std::string path_of(const std::string& name) { return fmt::format("/dev/shm/{}", name); }

void remove_all_with_prefix(const std::string& prefix) {
  const std::string start = prefix + ".";
  std::vector<std::string> names;
  if (DIR* dir = ::opendir("/dev/shm")) {
    while (const dirent* entry = ::readdir(dir)) {
      if (std::string_view(entry->d_name).substr(0, start.size()) == start)
        names.emplace_back(entry->d_name);
    }
    ::closedir(dir);
  }
  for (const auto& name : names) ::unlink(path_of(name).c_str());
}

std::size_t count_with_prefix(const std::string& prefix) {
  const std::string start = prefix + ".";
  std::size_t count = 0;
  if (DIR* dir = ::opendir("/dev/shm")) {
    while (const dirent* entry = ::readdir(dir)) {
      if (std::string_view(entry->d_name).substr(0, start.size()) == start) ++count;
    }
    ::closedir(dir);
  }
  return count;
}

// Collects what gpuswap's logger emits at warn level or above while it lives.
class warning_capture {
 public:
  warning_capture() : sink_(std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(64)) {
    log().sinks().push_back(sink_);
  }
  ~warning_capture() {
    auto& sinks = log().sinks();
    sinks.erase(std::remove(sinks.begin(), sinks.end(), sink_), sinks.end());
  }
  warning_capture(const warning_capture&) = delete;
  warning_capture& operator=(const warning_capture&) = delete;

  std::vector<std::string> warnings() {
    std::vector<std::string> found;
    for (const auto& message : sink_->last_raw()) {
      if (message.level >= spdlog::level::warn) {
        found.emplace_back(message.payload.data(), message.payload.size());
      }
    }
    return found;
  }

 private:
  std::shared_ptr<spdlog::sinks::ringbuffer_sink_mt> sink_;
};

// Figures whose consistency a reader can check: allocated <= reserved, and bytes_in_total is
// a hash of every other caller-set field. A copy mixing two updates fails the hash.
std::uint64_t figures_hash(const live_figures& f) {
  std::uint64_t hash = 1469598103934665603ULL;
  const auto mix = [&hash](const void* data, std::size_t size) {
    const auto* bytes = static_cast<const unsigned char*>(data);
    for (std::size_t i = 0; i < size; ++i) {
      hash ^= bytes[i];
      hash *= 1099511628211ULL;
    }
  };
  mix(f.device_name, sizeof f.device_name);
  for (const std::uint64_t value :
       {f.device_index, f.budget_bytes, f.allocated_bytes, f.reserved_bytes, f.swapped_out_bytes,
        f.in_flight_bytes, f.bytes_out_total, f.stall_ns_total, f.stall_count,
        f.pinned_host_used_bytes, f.pinned_host_limit_bytes}) {
    mix(&value, sizeof value);
  }
  mix(&f.bandwidth_out_bytes_per_s, sizeof(double));
  mix(&f.bandwidth_in_bytes_per_s, sizeof(double));
  return hash;
}

live_figures make_figures(std::uint64_t k) {
  live_figures f;
  const std::string name = fmt::format("sim-gpu-{}", k);
  std::memcpy(f.device_name, name.data(), name.size());
  f.device_index = k % 8;
  f.budget_bytes = 8ULL << 30;
  f.reserved_bytes = k * 4096 + 8192;
  f.allocated_bytes = f.reserved_bytes - k % 4096;
  f.swapped_out_bytes = k * 3;
  f.in_flight_bytes = k % 1000;
  f.bytes_out_total = k * 11;
  f.stall_ns_total = k * 13;
  f.stall_count = k;
  f.bandwidth_out_bytes_per_s = static_cast<double>(k) * 0.5;
  f.bandwidth_in_bytes_per_s = static_cast<double>(k) * 0.25;
  f.pinned_host_used_bytes = k * 17;
  f.pinned_host_limit_bytes = k * 17 + 5;
  f.bytes_in_total = figures_hash(f);
  return f;
}

bool consistent(const live_figures& f) {
  return f.allocated_bytes <= f.reserved_bytes && f.bytes_in_total == figures_hash(f);
}

struct file_identity {
  ino_t inode;
  uid_t owner;
  mode_t mode;
  off_t size;
  std::string content;
};

file_identity identify(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(::lstat(path.c_str(), &st), 0) << path;
  file_identity id{st.st_ino, st.st_uid, st.st_mode & 07777, st.st_size, {}};
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd >= 0) {
    char buffer[256];
    const ssize_t got = ::read(fd, buffer, sizeof buffer);
    if (got > 0) id.content.assign(buffer, static_cast<std::size_t>(got));
    ::close(fd);
  }
  return id;
}

// Creates /dev/shm/<name> holding `content` with exactly `mode`.
void create_file(const std::string& name, mode_t mode, const std::string& content) {
  const std::string path = path_of(name);
  const int fd = ::open(path.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0) << path << ": " << std::strerror(errno);
  ASSERT_EQ(::fchmod(fd, mode), 0);
  ASSERT_EQ(::write(fd, content.data(), content.size()), static_cast<ssize_t>(content.size()));
  ::close(fd);
}

// A pid that certainly belonged to a process that has exited (and been reaped).
pid_t dead_pid() {
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  int status = 0;
  ::waitpid(child, &status, 0);
  return child;
}

class live_stats : public ::testing::Test {
 protected:
  void SetUp() override { prefix_ = unique_prefix(); }
  void TearDown() override { remove_all_with_prefix(prefix_); }

  live_stats_options options() const {
    live_stats_options o;
    o.name_prefix = prefix_;
    o.device_name = "sim:0";
    return o;
  }
  live_read_options read_options() const {
    live_read_options o;
    o.name_prefix = prefix_;
    return o;
  }
  std::string own_name() const { return live_stats_segment_name(prefix_, ::geteuid(), ::getpid()); }

  std::string prefix_;
};

TEST_F(live_stats, segment_is_owner_only_under_a_per_user_name_whatever_the_umask) {
  const mode_t original = ::umask(022);
  for (const mode_t mask : {mode_t{0}, mode_t{022}, mode_t{077}}) {
    ::umask(mask);
    auto writer = live_stats_writer::open(options());
    // The writer must leave the umask as it found it.
    EXPECT_EQ(::umask(mask), mask);
    ASSERT_TRUE(writer.enabled()) << writer.problem();
    EXPECT_EQ(writer.name(), fmt::format("{}.{}.{}", prefix_, ::geteuid(), ::getpid()));
    struct stat st {};
    ASSERT_EQ(::lstat(path_of(writer.name()).c_str(), &st), 0);
    EXPECT_TRUE(S_ISREG(st.st_mode));
    EXPECT_EQ(st.st_mode & 07777, 0600U) << "umask " << mask;
    EXPECT_EQ(st.st_uid, ::geteuid());
    EXPECT_EQ(static_cast<std::size_t>(st.st_size), sizeof(live_stats_segment));
  }
  ::umask(original);
}

TEST_F(live_stats, reader_reads_back_what_the_writer_published) {
  auto writer = live_stats_writer::open(options());
  ASSERT_TRUE(writer.enabled()) << writer.problem();

  auto initial = read_live_stats(static_cast<std::uint64_t>(::getpid()), read_options());
  ASSERT_TRUE(initial.has_value());
  EXPECT_EQ(initial->status, live_snapshot_status::ok) << initial->problem;
  EXPECT_EQ(initial->figures.heartbeat, 0U);
  EXPECT_STREQ(initial->figures.device_name, "sim:0");

  const live_figures published = make_figures(42);
  writer.update(published);
  writer.update(published);
  auto snapshot = read_live_stats(static_cast<std::uint64_t>(::getpid()), read_options());
  ASSERT_TRUE(snapshot.has_value());
  ASSERT_EQ(snapshot->status, live_snapshot_status::ok) << snapshot->problem;
  const live_figures& f = snapshot->figures;
  EXPECT_EQ(f.pid, static_cast<std::uint64_t>(::getpid()));
  EXPECT_EQ(f.heartbeat, 2U);
  EXPECT_STREQ(f.device_name, "sim-gpu-42");
  EXPECT_EQ(f.allocated_bytes, published.allocated_bytes);
  EXPECT_EQ(f.reserved_bytes, published.reserved_bytes);
  EXPECT_EQ(f.swapped_out_bytes, published.swapped_out_bytes);
  EXPECT_EQ(f.pinned_host_limit_bytes, published.pinned_host_limit_bytes);
  EXPECT_EQ(f.bandwidth_in_bytes_per_s, published.bandwidth_in_bytes_per_s);
  EXPECT_TRUE(consistent(f));
  EXPECT_GT(f.start_time_ns, 0U);
  EXPECT_GE(f.last_update_ns, f.start_time_ns);

  const auto all = read_all_live_stats(read_options());
  ASSERT_EQ(all.size(), 1U);
  EXPECT_EQ(all[0].segment_name, writer.name());
  EXPECT_EQ(all[0].figures.heartbeat, 2U);
}

TEST_F(live_stats, unknown_rates_are_published_as_zero_not_rejected_by_readers) {
  auto writer = live_stats_writer::open(options());
  ASSERT_TRUE(writer.enabled()) << writer.problem();
  live_figures f;
  f.bandwidth_out_bytes_per_s = std::numeric_limits<double>::quiet_NaN();
  f.bandwidth_in_bytes_per_s = -1.0;
  writer.update(f);
  auto snapshot = read_live_stats(static_cast<std::uint64_t>(::getpid()), read_options());
  ASSERT_TRUE(snapshot.has_value());
  ASSERT_EQ(snapshot->status, live_snapshot_status::ok) << snapshot->problem;
  EXPECT_EQ(snapshot->figures.bandwidth_out_bytes_per_s, 0.0);
  EXPECT_EQ(snapshot->figures.bandwidth_in_bytes_per_s, 0.0);
}

TEST_F(live_stats, destructor_and_close_remove_the_segment) {
  std::string name;
  {
    auto writer = live_stats_writer::open(options());
    ASSERT_TRUE(writer.enabled()) << writer.problem();
    name = writer.name();
    EXPECT_EQ(::access(path_of(name).c_str(), F_OK), 0);
    auto moved = std::move(writer);  // the moved-from writer must not remove it
    EXPECT_EQ(::access(path_of(name).c_str(), F_OK), 0);
  }
  EXPECT_NE(::access(path_of(name).c_str(), F_OK), 0);

  auto writer = live_stats_writer::open(options());
  ASSERT_TRUE(writer.enabled()) << writer.problem();
  writer.close();
  EXPECT_FALSE(writer.enabled());
  EXPECT_NE(::access(path_of(name).c_str(), F_OK), 0);
  writer.update(make_figures(1));  // disabled: does nothing, does not crash
}

TEST_F(live_stats, refuses_a_group_readable_segment_under_its_name_and_leaves_it_alone) {
  create_file(own_name(), 0644, "not yours to take");
  const file_identity before = identify(path_of(own_name()));

  warning_capture capture;
  live_stats_writer writer = live_stats_writer::open(options());
  EXPECT_FALSE(writer.enabled());
  EXPECT_NE(writer.problem().find("0644"), std::string::npos) << writer.problem();
  const auto warnings = capture.warnings();
  ASSERT_EQ(warnings.size(), 1U);
  EXPECT_NE(warnings[0].find(path_of(own_name())), std::string::npos) << warnings[0];
  writer.update(make_figures(3));

  const file_identity after = identify(path_of(own_name()));
  EXPECT_EQ(after.inode, before.inode);
  EXPECT_EQ(after.mode, 0644U);
  EXPECT_EQ(after.owner, before.owner);
  EXPECT_EQ(after.size, before.size);
  EXPECT_EQ(after.content, "not yours to take");
}

TEST_F(live_stats, refuses_a_segment_under_its_name_owned_by_another_user) {
  if (::geteuid() != 0) {
    GTEST_SKIP() << "needs root to create a file owned by another user (uid 65534)";
  }
  create_file(own_name(), 0600, "nobody's");
  ASSERT_EQ(::chown(path_of(own_name()).c_str(), 65534, 65534), 0) << std::strerror(errno);
  const file_identity before = identify(path_of(own_name()));

  warning_capture capture;
  live_stats_writer writer = live_stats_writer::open(options());
  EXPECT_FALSE(writer.enabled());
  EXPECT_NE(writer.problem().find("65534"), std::string::npos) << writer.problem();
  EXPECT_EQ(capture.warnings().size(), 1U);

  const file_identity after = identify(path_of(own_name()));
  EXPECT_EQ(after.inode, before.inode);
  EXPECT_EQ(after.owner, 65534U);
  EXPECT_EQ(after.mode, 0600U);
  EXPECT_EQ(after.content, "nobody's");
}

TEST_F(live_stats, a_second_writer_in_the_process_is_refused_and_the_first_keeps_working) {
  auto first = live_stats_writer::open(options());
  ASSERT_TRUE(first.enabled()) << first.problem();
  warning_capture capture;
  auto second = live_stats_writer::open(options());
  EXPECT_FALSE(second.enabled());
  EXPECT_EQ(capture.warnings().size(), 1U);
  second = live_stats_writer();
  first.update(make_figures(7));
  auto snapshot = read_live_stats(static_cast<std::uint64_t>(::getpid()), read_options());
  ASSERT_TRUE(snapshot.has_value());
  EXPECT_EQ(snapshot->status, live_snapshot_status::ok) << snapshot->problem;
  EXPECT_EQ(snapshot->figures.heartbeat, 1U);
}

TEST_F(live_stats, an_invalid_prefix_disables_the_writer_with_one_warning) {
  live_stats_options bad = options();
  bad.name_prefix = "../escape";
  warning_capture capture;
  auto writer = live_stats_writer::open(bad);
  EXPECT_FALSE(writer.enabled());
  EXPECT_EQ(capture.warnings().size(), 1U);
  EXPECT_NE(writer.problem().find("name_prefix"), std::string::npos) << writer.problem();
  EXPECT_THROW(bad.validate(), config_error);
  EXPECT_NO_THROW(options().validate());
}

TEST_F(live_stats, replaces_the_dead_segment_of_an_earlier_process_with_our_pid) {
  // What a restarted container leaves: our name, owner-only, a header naming our pid but a
  // process that started at another time.
  live_stats_segment old{};
  old.header.magic = live_stats_magic;
  old.header.layout_version = live_stats_layout_version;
  old.header.segment_size = sizeof(live_stats_segment);
  old.header.writer_pid = static_cast<std::uint64_t>(::getpid());
  old.header.writer_start_ticks = process_start_ticks(static_cast<std::uint64_t>(::getpid())) + 1;
  ASSERT_GT(old.header.writer_start_ticks, 1U) << "/proc/self/stat unreadable";
  create_file(own_name(), 0600, std::string(reinterpret_cast<const char*>(&old), sizeof old));
  ASSERT_EQ(read_live_stats(static_cast<std::uint64_t>(::getpid()), read_options())->status,
            live_snapshot_status::invalid);

  auto writer = live_stats_writer::open(options());
  ASSERT_TRUE(writer.enabled()) << writer.problem();
  auto snapshot = read_live_stats(static_cast<std::uint64_t>(::getpid()), read_options());
  ASSERT_TRUE(snapshot.has_value());
  EXPECT_EQ(snapshot->status, live_snapshot_status::ok) << snapshot->problem;
}

TEST_F(live_stats, reader_skips_segments_that_are_not_ours_alone_without_blocking) {
  const auto uid = static_cast<std::uint64_t>(::geteuid());
  const std::string readable = live_stats_segment_name(prefix_, uid, 11);
  create_file(readable, 0644, std::string(sizeof(live_stats_segment), '\0'));
  // A FIFO would block an open without O_NONBLOCK; a symlink would lead elsewhere.
  const std::string fifo = live_stats_segment_name(prefix_, uid, 12);
  ASSERT_EQ(::mkfifo(path_of(fifo).c_str(), 0600), 0);
  const std::string link = live_stats_segment_name(prefix_, uid, 13);
  ASSERT_EQ(::symlink("/etc/passwd", path_of(link).c_str()), 0);
  if (::geteuid() == 0) {
    const std::string foreign = live_stats_segment_name(prefix_, uid, 14);
    create_file(foreign, 0600, std::string(sizeof(live_stats_segment), '\0'));
    ASSERT_EQ(::chown(path_of(foreign).c_str(), 65534, 65534), 0);
  }
  live_read_options o = read_options();
  o.clean_stale = false;
  EXPECT_TRUE(read_all_live_stats(o).empty());
  for (const std::uint64_t pid : {11, 12, 13, 14})
    EXPECT_FALSE(read_live_stats(pid, o).has_value());
  // Cleaning never removes what is not ours alone, dead pid or not.
  EXPECT_EQ(clean_stale_segments(prefix_), 0U);
  EXPECT_EQ(::access(path_of(readable).c_str(), F_OK), 0);
}

TEST_F(live_stats, stale_segments_of_dead_processes_are_removed) {
  // A live process's segment that must stay (opened first: open itself cleans).
  auto live = live_stats_writer::open(options());
  ASSERT_TRUE(live.enabled()) << live.problem();
  // A child opens a writer and dies without running destructors.
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto writer = live_stats_writer::open(options());
    writer.update(make_figures(5));
    ::_exit(writer.enabled() ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  const std::string child_name =
      live_stats_segment_name(prefix_, ::geteuid(), static_cast<std::uint64_t>(child));
  ASSERT_EQ(::access(path_of(child_name).c_str(), F_OK), 0);

  live_read_options o = read_options();
  auto snapshot = read_live_stats(static_cast<std::uint64_t>(child), o);
  ASSERT_TRUE(snapshot.has_value());
  EXPECT_EQ(snapshot->status, live_snapshot_status::stale) << snapshot->problem;
  EXPECT_TRUE(consistent(snapshot->figures));

  // Also garbage under a dead pid's name.
  const std::string garbage =
      live_stats_segment_name(prefix_, ::geteuid(), static_cast<std::uint64_t>(dead_pid()));
  create_file(garbage, 0600, "garbage");

  EXPECT_EQ(clean_stale_segments(prefix_), 2U);
  EXPECT_NE(::access(path_of(child_name).c_str(), F_OK), 0);
  EXPECT_NE(::access(path_of(garbage).c_str(), F_OK), 0);
  EXPECT_EQ(::access(path_of(live.name()).c_str(), F_OK), 0);
}

TEST_F(live_stats, the_reader_cleans_stale_segments_before_listing) {
  create_file(live_stats_segment_name(prefix_, ::geteuid(), static_cast<std::uint64_t>(dead_pid())),
              0600, std::string(sizeof(live_stats_segment), '\0'));
  live_read_options keep = read_options();
  keep.clean_stale = false;
  EXPECT_EQ(read_all_live_stats(keep).size(), 1U);
  EXPECT_TRUE(read_all_live_stats(read_options()).empty());
  EXPECT_EQ(count_with_prefix(prefix_), 0U);
}

TEST_F(live_stats, the_global_writer_removes_its_segment_at_exit) {
  // exit() runs the atexit handler; _exit() does not, so the second child shows that it is the
  // handler, not the death of the process, that removes the segment.
  for (const bool clean_exit : {true, false}) {
    std::fflush(nullptr);  // exit() in the child flushes what it inherited
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      live_stats_writer* writer = live_stats_writer::install_global(options());
      const bool ok = writer != nullptr && writer->enabled() &&
                      live_stats_writer::install_global({}) == writer &&
                      live_stats_writer::global() == writer;
      if (clean_exit) std::exit(ok ? 0 : 1);
      ::_exit(ok ? 0 : 1);
    }
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    const std::string name =
        live_stats_segment_name(prefix_, ::geteuid(), static_cast<std::uint64_t>(child));
    EXPECT_EQ(::access(path_of(name).c_str(), F_OK) == 0, !clean_exit) << name;
  }
}

TEST_F(live_stats, a_forked_child_neither_writes_into_nor_removes_its_parents_segment) {
  auto writer = live_stats_writer::open(options());
  ASSERT_TRUE(writer.enabled()) << writer.problem();
  writer.update(make_figures(1));
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    writer.update(make_figures(99));
    writer.close();  // as the destructor would
    ::_exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_EQ(::access(path_of(writer.name()).c_str(), F_OK), 0);
  auto snapshot = read_live_stats(static_cast<std::uint64_t>(::getpid()), read_options());
  ASSERT_TRUE(snapshot.has_value());
  EXPECT_EQ(snapshot->figures.heartbeat, 1U);
  EXPECT_STREQ(snapshot->figures.device_name, "sim-gpu-1");
}

TEST_F(live_stats, a_sequence_stuck_odd_reads_as_torn_within_the_deadline) {
  auto writer = live_stats_writer::open(options());
  ASSERT_TRUE(writer.enabled()) << writer.problem();
  writer.update(make_figures(9));
  // Play a writer stopped in mid-update (we own the file, so we can map it writable).
  const int fd = ::open(path_of(writer.name()).c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  void* address =
      ::mmap(nullptr, sizeof(live_stats_segment), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  ASSERT_NE(address, MAP_FAILED);
  auto& sequence = static_cast<live_stats_segment*>(address)->header.sequence;
  const std::uint64_t even = std::atomic_ref<std::uint64_t>(sequence).load();
  std::atomic_ref<std::uint64_t>(sequence).store(even + 1);

  live_read_options o = read_options();
  o.deadline = std::chrono::milliseconds(5);
  const auto start = std::chrono::steady_clock::now();
  auto snapshot = read_live_stats(static_cast<std::uint64_t>(::getpid()), o);
  const auto took = std::chrono::steady_clock::now() - start;
  ASSERT_TRUE(snapshot.has_value());
  EXPECT_EQ(snapshot->status, live_snapshot_status::torn);
  EXPECT_FALSE(snapshot->has_figures());
  EXPECT_EQ(snapshot->figures.allocated_bytes, 0U);
  // A bound on blocking, not a speed test: the deadline is 5 ms, the limit 100 ms.
  EXPECT_LT(took, std::chrono::milliseconds(100));

  // Even a deadline asked above the limit is held to it.
  o.deadline = std::chrono::seconds(10);
  const auto start_long = std::chrono::steady_clock::now();
  EXPECT_EQ(read_live_stats(static_cast<std::uint64_t>(::getpid()), o)->status,
            live_snapshot_status::torn);
  EXPECT_LT(std::chrono::steady_clock::now() - start_long, std::chrono::milliseconds(150));

  std::atomic_ref<std::uint64_t>(sequence).store(even);
  snapshot = read_live_stats(static_cast<std::uint64_t>(::getpid()), read_options());
  ASSERT_TRUE(snapshot.has_value());
  EXPECT_EQ(snapshot->status, live_snapshot_status::ok);
  ::munmap(address, sizeof(live_stats_segment));
}

TEST_F(live_stats, concurrent_updates_and_reads_never_yield_a_mixed_copy) {
  auto writer = live_stats_writer::open(options());
  ASSERT_TRUE(writer.enabled()) << writer.problem();
  constexpr std::uint64_t updates_per_thread = 20000;
  std::atomic<int> writers_running{2};
  std::atomic<std::uint64_t> ok_reads{0};
  std::atomic<std::uint64_t> bad_reads{0};

  std::vector<std::thread> threads;
  for (std::uint64_t t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      for (std::uint64_t k = 1; k <= updates_per_thread; ++k)
        writer.update(make_figures(k * 2 + t));
      writers_running.fetch_sub(1);
    });
  }
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&] {
      live_read_options o = read_options();
      do {
        auto snapshot = read_live_stats(static_cast<std::uint64_t>(::getpid()), o);
        if (!snapshot) {
          bad_reads.fetch_add(1);
        } else if (snapshot->has_figures()) {
          const bool initial = snapshot->figures.heartbeat == 0;
          if (!initial && !consistent(snapshot->figures)) bad_reads.fetch_add(1);
          ok_reads.fetch_add(1);
        }
      } while (writers_running.load() > 0);
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(bad_reads.load(), 0U);
  EXPECT_GT(ok_reads.load(), 0U);
  auto last = read_live_stats(static_cast<std::uint64_t>(::getpid()), read_options());
  ASSERT_TRUE(last.has_value());
  EXPECT_TRUE(consistent(last->figures));
  EXPECT_EQ(last->figures.heartbeat + writer.dropped(), 2 * updates_per_thread);
}

TEST(live_stats_seqlock, a_load_racing_stores_is_consistent_or_refused) {
  // The seqlock alone, on one in-process segment, with nothing else slowing the race down.
  auto segment = std::make_unique<live_stats_segment>();
  std::vector<live_figures> ring;
  for (std::uint64_t k = 0; k < 64; ++k) ring.push_back(make_figures(k));
  live_stats_store(*segment, ring[0]);
  std::atomic<bool> reading{true};
  std::atomic<bool> writer_started{false};
  std::thread writer([&] {
    writer_started.store(true);
    for (std::uint64_t k = 1; reading.load(std::memory_order_relaxed); ++k) {
      live_stats_store(*segment, ring[k % ring.size()]);
    }
  });
  while (!writer_started.load()) std::this_thread::yield();
  std::uint64_t ok = 0;
  std::uint64_t refused = 0;
  std::uint64_t mixed = 0;
  // On a machine with a free core for each thread nearly every load races a store; on a busy
  // one they race only when a thread is preempted mid-copy, so the crash test is the sharper one.
  for (int attempt = 0; attempt < 500000; ++attempt) {
    live_figures copy;
    if (live_stats_try_load(*segment, copy) == live_load_result::ok) {
      ++ok;
      if (!consistent(copy)) ++mixed;
    } else {
      ++refused;
    }
  }
  reading.store(false);
  writer.join();
  EXPECT_EQ(mixed, 0U) << ok << " consistent loads, " << refused << " refused";
  EXPECT_EQ(std::atomic_ref<std::uint64_t>(segment->header.sequence).load() % 2, 0U);
}

}  // namespace
}  // namespace gpuswap
