// A writer killed at random points, 1,000 times (scaled by GPUSWAP_STRESS_SCALE): every read
// after the kill returns within 100 ms and never yields a torn copy as figures. The writer
// child updates in a tight loop, so most kills land in the middle of an update and leave the
// sequence odd: without the seqlock's parity and re-check, the reader would return mixed
// figures and the hash check below would fail.
#include <dirent.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "profiler/live_stats.hpp"
#include "profiler/live_stats_reader.hpp"
#include "profiler/live_stats_writer.hpp"

namespace gpuswap {
namespace {

double stress_scale() {
  const char* text = std::getenv("GPUSWAP_STRESS_SCALE");
  if (text == nullptr || *text == '\0') return 1.0;
  const double scale = std::strtod(text, nullptr);
  return std::isfinite(scale) && scale > 0.0 ? scale : 1.0;
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

// The child publishes entry k % ring_size of a ring of figures at its k-th update.
constexpr std::uint64_t ring_size = 64;

// bytes_in_total is a hash of every other caller-set field, stall_count is the ring entry
// (which the writer's heartbeat must match modulo ring_size), and allocated <= reserved.
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
  const std::string name = fmt::format("crash-{}", k);
  std::memcpy(f.device_name, name.data(), name.size());
  f.device_index = k % 8;
  f.budget_bytes = (k % 5 + 1) << 30;
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

// What a consistent copy must satisfy; empty when it does.
std::string check(const live_figures& f, std::uint64_t pid) {
  if (f.pid != pid) return fmt::format("pid {} != {}", f.pid, pid);
  if (f.heartbeat == 0) {
    // The figures the writer publishes at open, before any update.
    if (f.stall_count != 0 || f.allocated_bytes != 0 || f.bytes_in_total != 0) {
      return "initial figures not zero";
    }
    return {};
  }
  if (f.allocated_bytes > f.reserved_bytes) return "allocated > reserved";
  if (f.bytes_in_total != figures_hash(f)) return "hash mismatch: a mixed copy";
  if (f.heartbeat % ring_size != f.stall_count) {
    return fmt::format("heartbeat {} but ring entry {}", f.heartbeat, f.stall_count);
  }
  return {};
}

// Removes every segment of the prefix when the test ends, passed or failed.
struct remove_segments_at_end {
  std::string prefix;
  ~remove_segments_at_end() {
    const std::string start = prefix + ".";
    std::vector<std::string> names;
    if (DIR* dir = ::opendir("/dev/shm")) {
      while (const dirent* entry = ::readdir(dir)) {
        if (std::string_view(entry->d_name).substr(0, start.size()) == start)
          names.emplace_back(entry->d_name);
      }
      ::closedir(dir);
    }
    for (const auto& name : names) ::unlink(fmt::format("/dev/shm/{}", name).c_str());
  }
};

// Kills and reaps the child if an assertion leaves the loop before the test did.
struct reap_child {
  pid_t pid = -1;
  ~reap_child() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }
};

[[noreturn]] void run_writer_child(const std::string& prefix, int ready_fd) {
  live_stats_options options;
  options.name_prefix = prefix;
  options.device_name = "crash-test";
  auto writer = live_stats_writer::open(options);
  if (!writer.enabled()) ::_exit(3);
  const char ready = 'r';
  if (::write(ready_fd, &ready, 1) != 1) ::_exit(4);
  // Precomputed, so that the loop is nearly all update() and a kill usually lands inside one.
  std::vector<live_figures> ring;
  for (std::uint64_t k = 0; k < ring_size; ++k) ring.push_back(make_figures(k));
  for (std::uint64_t k = 1;; ++k) writer.update(ring[k % ring_size]);
}

TEST(live_stats_crash, reads_after_a_writer_is_killed_are_bounded_and_never_torn) {
  std::random_device seed_source;
  const unsigned seed = seed_source();
  std::mt19937 random(seed);
  const std::string prefix = fmt::format("gscrash-{}-{:08x}", ::getpid(), seed);
  const auto kills = static_cast<int>(std::lround(1000 * stress_scale()));
  const remove_segments_at_end cleanup{prefix};

  int consistent_reads = 0;
  int torn_reads = 0;
  int invalid_reads = 0;
  int missing = 0;
  std::chrono::nanoseconds slowest{0};
  for (int i = 0; i < kills; ++i) {
    int ready[2];
    ASSERT_EQ(::pipe(ready), 0);
    std::fflush(nullptr);
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      ::close(ready[0]);
      run_writer_child(prefix, ready[1]);
    }
    reap_child guard{child};
    ::close(ready[1]);
    // Every other kill waits until the writer is updating; the rest may land anywhere, even
    // while the segment is being created and initialised.
    if (i % 2 == 0) {
      pollfd wait_ready{ready[0], POLLIN, 0};
      ASSERT_EQ(::poll(&wait_ready, 1, 5000), 1) << "writer child never became ready";
      std::this_thread::sleep_for(std::chrono::microseconds(random() % 300));
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(random() % 1500));
    }
    ::kill(child, SIGKILL);
    ::close(ready[0]);
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    guard.pid = -1;
    ASSERT_TRUE(WIFSIGNALED(status))
        << "writer child exited on its own with " << WEXITSTATUS(status);

    live_read_options options;
    options.name_prefix = prefix;
    options.clean_stale = false;
    const auto start = std::chrono::steady_clock::now();
    const auto snapshot = read_live_stats(static_cast<std::uint64_t>(child), options);
    const auto took = std::chrono::steady_clock::now() - start;
    slowest = std::max<std::chrono::nanoseconds>(slowest, took);
    // A bound on blocking, not a speed test.
    ASSERT_LT(took, std::chrono::milliseconds(100)) << "kill " << i << ", seed " << seed;

    if (!snapshot) {
      ++missing;
    } else if (snapshot->has_figures()) {
      // The writer is dead: never reported as live.
      EXPECT_EQ(snapshot->status, live_snapshot_status::stale);
      const std::string problem = check(snapshot->figures, static_cast<std::uint64_t>(child));
      ASSERT_TRUE(problem.empty()) << problem << " (kill " << i << ", seed " << seed << ")";
      ++consistent_reads;
    } else if (snapshot->status == live_snapshot_status::torn) {
      ++torn_reads;
    } else {
      ++invalid_reads;  // killed before the header was complete
    }
    clean_stale_segments(prefix);
    ASSERT_EQ(count_with_prefix(prefix), 0U)
        << "clean_stale_segments left the dead child's segment";
  }
  std::printf(
      "[ figures  ] %d kills (seed %u): %d consistent, %d torn, %d incomplete, %d before create; "
      "slowest read %.3f ms\n",
      kills, seed, consistent_reads, torn_reads, invalid_reads, missing,
      std::chrono::duration<double, std::milli>(slowest).count());
}

}  // namespace
}  // namespace gpuswap
