// Segment files that are truncated, oversized, random, or valid with fields damaged: the reader
// never crashes, never hangs, and returns either an error entry or figures that pass its range
// checks. Files are owner-only under our own name pattern, so the reader does read them.
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "profiler/live_stats.hpp"
#include "profiler/live_stats_reader.hpp"

namespace gpuswap {
namespace {

double stress_scale() {
  const char* text = std::getenv("GPUSWAP_STRESS_SCALE");
  if (text == nullptr || *text == '\0') return 1.0;
  const double scale = std::strtod(text, nullptr);
  return std::isfinite(scale) && scale > 0.0 ? scale : 1.0;
}

std::string path_of(const std::string& name) { return fmt::format("/dev/shm/{}", name); }

void write_file(const std::string& name, const std::vector<unsigned char>& bytes) {
  const std::string path = path_of(name);
  const int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC | O_NOFOLLOW, 0600);
  ASSERT_GE(fd, 0) << path << ": " << std::strerror(errno);
  ASSERT_EQ(::fchmod(fd, 0600), 0);
  if (!bytes.empty()) {
    ASSERT_EQ(::write(fd, bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
  }
  ::close(fd);
}

std::vector<unsigned char> valid_segment(std::uint64_t pid, std::uint64_t start_ticks) {
  live_stats_segment segment{};
  segment.header.magic = live_stats_magic;
  segment.header.layout_version = live_stats_layout_version;
  segment.header.segment_size = sizeof(live_stats_segment);
  segment.header.writer_pid = pid;
  segment.header.writer_start_ticks = start_ticks;
  segment.header.sequence = 4;
  live_figures figures;
  figures.pid = pid;
  std::strcpy(figures.device_name, "fuzz");
  figures.allocated_bytes = 1 << 20;
  figures.reserved_bytes = 2 << 20;
  figures.bandwidth_out_bytes_per_s = 1e9;
  std::memcpy(segment.figures, &figures, sizeof figures);
  std::vector<unsigned char> bytes(sizeof segment);
  std::memcpy(bytes.data(), &segment, sizeof segment);
  return bytes;
}

// What the reader promises about any figures it returns.
void expect_sane(const live_snapshot& snapshot) {
  if (!snapshot.has_figures()) {
    EXPECT_FALSE(snapshot.problem.empty());
    // No figures leak out of an error entry.
    EXPECT_EQ(snapshot.figures.allocated_bytes, 0U);
    EXPECT_EQ(snapshot.figures.heartbeat, 0U);
    return;
  }
  const live_figures& f = snapshot.figures;
  EXPECT_EQ(f.pid, snapshot.pid);
  const void* nul = std::memchr(f.device_name, '\0', sizeof f.device_name);
  ASSERT_NE(nul, nullptr);
  for (const char* c = f.device_name; c != nul; ++c) {
    EXPECT_TRUE(*c >= 0x20 && *c < 0x7f) << "unprintable byte " << static_cast<int>(*c);
  }
  EXPECT_TRUE(std::isfinite(f.bandwidth_in_bytes_per_s) && f.bandwidth_in_bytes_per_s >= 0.0);
  EXPECT_TRUE(std::isfinite(f.bandwidth_out_bytes_per_s) && f.bandwidth_out_bytes_per_s >= 0.0);
}

class live_stats_fuzz : public ::testing::Test {
 protected:
  void SetUp() override {
    std::random_device device;
    seed_ = device();
    prefix_ = fmt::format("gsfuzz-{}-{:08x}", ::getpid(), seed_);
    pid_ = static_cast<std::uint64_t>(::getpid());
    name_ = live_stats_segment_name(prefix_, ::geteuid(), pid_);
    options_.name_prefix = prefix_;
    options_.clean_stale = false;
    // A segment of a live pid that stays odd is read until the deadline: keep it short.
    options_.deadline = std::chrono::milliseconds(1);
  }
  void TearDown() override { ::unlink(path_of(name_).c_str()); }

  live_snapshot read_expecting_an_entry() {
    const auto start = std::chrono::steady_clock::now();
    auto snapshot = read_live_stats(pid_, options_);
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(100));
    EXPECT_TRUE(snapshot.has_value()) << "an owner-only file under our name must be reported";
    if (!snapshot) return {};
    expect_sane(*snapshot);
    return *snapshot;
  }

  unsigned seed_ = 0;
  std::string prefix_;
  std::uint64_t pid_ = 0;
  std::string name_;
  live_read_options options_;
};

TEST_F(live_stats_fuzz, named_damage_is_reported_with_its_reason) {
  const std::uint64_t ticks = process_start_ticks(pid_);
  struct damage {
    const char* what;
    std::size_t offset;  // of a uint64 in the segment, or a size for truncation
    std::uint64_t value;
    const char* expect;  // in the problem text
  };
  const damage cases[] = {
      {"wrong magic", offsetof(live_stats_header, magic), 0x1234, "magic"},
      {"newer layout", offsetof(live_stats_header, layout_version), 99, "layout version 99"},
      {"huge size field", offsetof(live_stats_header, segment_size), ~0ULL, "size field"},
      {"another pid", offsetof(live_stats_header, writer_pid), pid_ + 1, "pid"},
      {"stuck odd", offsetof(live_stats_header, sequence), 5, "deadline"},
  };
  for (const auto& c : cases) {
    auto bytes = valid_segment(pid_, ticks);
    std::memcpy(bytes.data() + c.offset, &c.value, sizeof c.value);
    write_file(name_, bytes);
    const live_snapshot snapshot = read_expecting_an_entry();
    EXPECT_FALSE(snapshot.has_figures()) << c.what;
    EXPECT_NE(snapshot.problem.find(c.expect), std::string::npos)
        << c.what << ": " << snapshot.problem;
  }
  for (const std::size_t size :
       {std::size_t{0}, std::size_t{1}, sizeof(live_stats_header), sizeof(live_stats_segment) - 1,
        sizeof(live_stats_segment) + 1, std::size_t{1} << 20}) {
    auto bytes = valid_segment(pid_, ticks);
    bytes.resize(size, 0xab);
    write_file(name_, bytes);
    const live_snapshot snapshot = read_expecting_an_entry();
    EXPECT_EQ(snapshot.status, live_snapshot_status::invalid) << size;
    EXPECT_NE(snapshot.problem.find("bytes"), std::string::npos) << snapshot.problem;
  }
  // NaN rate, unterminated name, figures naming another process.
  for (int which = 0; which < 3; ++which) {
    auto bytes = valid_segment(pid_, ticks);
    live_figures f;
    std::memcpy(&f, bytes.data() + offsetof(live_stats_segment, figures), sizeof f);
    if (which == 0) f.bandwidth_in_bytes_per_s = std::nan("");
    if (which == 1) std::memset(f.device_name, 'x', sizeof f.device_name);
    if (which == 2) f.pid = 1;
    std::memcpy(bytes.data() + offsetof(live_stats_segment, figures), &f, sizeof f);
    write_file(name_, bytes);
    EXPECT_EQ(read_expecting_an_entry().status, live_snapshot_status::invalid) << which;
  }
  // The undamaged segment reads back, control characters in the name replaced.
  auto bytes = valid_segment(pid_, ticks);
  bytes[offsetof(live_stats_segment, figures) + offsetof(live_figures, device_name)] = '\x1b';
  write_file(name_, bytes);
  const live_snapshot snapshot = read_expecting_an_entry();
  EXPECT_EQ(snapshot.status, live_snapshot_status::ok) << snapshot.problem;
  EXPECT_STREQ(snapshot.figures.device_name, "?uzz");
}

TEST_F(live_stats_fuzz, random_damage_never_crashes_or_hangs_the_reader) {
  std::mt19937_64 random(seed_);
  const std::uint64_t ticks = process_start_ticks(pid_);
  const int rounds = static_cast<int>(std::lround(3000 * stress_scale()));
  int with_figures = 0;
  for (int round = 0; round < rounds; ++round) {
    std::vector<unsigned char> bytes;
    switch (random() % 6) {
      case 0: {  // random bytes of a random size, usually near the real one
        const std::size_t size =
            random() % 2 ? random() % (2 * sizeof(live_stats_segment)) : sizeof(live_stats_segment);
        bytes.resize(size);
        for (auto& b : bytes) b = static_cast<unsigned char>(random());
        break;
      }
      case 1:  // a valid segment truncated
        bytes = valid_segment(pid_, ticks);
        bytes.resize(random() % bytes.size());
        break;
      case 2: {  // a valid header, random figures
        bytes = valid_segment(pid_, ticks);
        for (std::size_t i = sizeof(live_stats_header); i < bytes.size(); ++i) {
          bytes[i] = static_cast<unsigned char>(random());
        }
        break;
      }
      case 3: {  // a valid header, random figures with our pid in them
        bytes = valid_segment(pid_, ticks);
        for (std::size_t i = sizeof(live_stats_header) + sizeof(std::uint64_t); i < bytes.size();
             ++i) {
          bytes[i] = static_cast<unsigned char>(random());
        }
        break;
      }
      case 4: {  // a few header words replaced by extreme values
        bytes = valid_segment(pid_, ticks);
        const std::uint64_t extremes[] = {
            0, 1, ~0ULL, 1ULL << 63, live_stats_magic, sizeof(live_stats_segment), pid_};
        for (int n = 0, count = 1 + static_cast<int>(random() % 3); n < count; ++n) {
          const std::size_t word = random() % (sizeof(live_stats_header) / 8);
          const std::uint64_t value = extremes[random() % std::size(extremes)];
          std::memcpy(bytes.data() + word * 8, &value, 8);
        }
        break;
      }
      default: {  // a few random bytes flipped anywhere
        bytes = valid_segment(pid_, ticks);
        for (int n = 0, count = 1 + static_cast<int>(random() % 8); n < count; ++n) {
          bytes[random() % bytes.size()] ^= static_cast<unsigned char>(1 + random() % 255);
        }
        break;
      }
    }
    write_file(name_, bytes);
    const live_snapshot snapshot = read_expecting_an_entry();
    if (snapshot.has_figures()) ++with_figures;
    if (bytes.size() != sizeof(live_stats_segment)) {
      ASSERT_EQ(snapshot.status, live_snapshot_status::invalid) << "seed " << seed_;
    }
    if (HasFailure()) {
      FAIL() << "seed " << seed_ << ", round " << round;
    }
  }
  // And the whole-directory reader on the last one.
  EXPECT_EQ(read_all_live_stats(options_).size(), 1U);
  std::printf("[ figures  ] %d fuzzed segments (seed %u), %d read as figures\n", rounds, seed_,
              with_figures);
}

TEST_F(live_stats_fuzz, garbage_of_a_dead_process_is_cleaned_and_of_a_live_one_kept) {
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ASSERT_GT(child, 0);
  ::waitpid(child, nullptr, 0);
  const std::string dead =
      live_stats_segment_name(prefix_, ::geteuid(), static_cast<std::uint64_t>(child));
  write_file(dead, {1, 2, 3});
  write_file(name_, {1, 2, 3});  // our own pid: perhaps a writer still initialising it
  EXPECT_EQ(clean_stale_segments(prefix_), 1U);
  EXPECT_NE(::access(path_of(dead).c_str(), F_OK), 0);
  EXPECT_EQ(::access(path_of(name_).c_str(), F_OK), 0);
  ::unlink(path_of(dead).c_str());
}

}  // namespace
}  // namespace gpuswap
