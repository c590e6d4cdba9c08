#include "profiler/live_stats_reader.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>
#include <thread>
#include <utility>

#include <fmt/format.h>

#include "core/logging.hpp"

namespace gpuswap {

// Note [Reading a segment safely]
// The reader runs in `gpuswap top`, against files any local user can create in /dev/shm (it
// is world-writable, sticky), so it trusts nothing but what it checks on the descriptor it
// reads through:
// - open(2) with O_NOFOLLOW (a symlink planted under our name is not followed) and O_NONBLOCK
//   (a FIFO planted under our name cannot block the open); Boost's shared_memory_object opens
//   without O_NONBLOCK, so the reader uses open/fstat/mmap directly.
// - fstat on that descriptor: a regular file, owned by our effective uid, no group/other bits.
//   Anything else is skipped unread, never reported as figures (HAMi-core's world-readable
//   segments are the bug this guards against).
// - The size from fstat must be exactly sizeof(live_stats_segment) before anything is mapped,
//   so no access can fall outside the file. Only the owner (us) can truncate the file after
//   the check; gpuswap writers never do.
// - Header fields, then after a consistent copy every figure field, are range-checked.
// - The seqlock retry loop is bounded twice: by an attempt count and by a deadline of at most
//   100 ms. A sequence that is odd while the writer is dead cannot become even again, so that
//   case is reported as torn at once instead of after the deadline.

namespace {

constexpr auto max_deadline = std::chrono::milliseconds(100);
constexpr auto min_deadline = std::chrono::microseconds(1);
// Spins with a pause instruction before sleeping: a live writer's update takes well under a
// microsecond, so the first few retries nearly always succeed.
constexpr int spin_attempts = 64;
constexpr int max_attempts = 200000;
constexpr auto retry_sleep = std::chrono::microseconds(20);

template <typename... Args>
void log_debug(fmt::format_string<Args...> format, Args&&... args) noexcept {
  try {
    log().debug(format, std::forward<Args>(args)...);
  } catch (...) {
  }
}

template <typename... Args>
void log_warn(fmt::format_string<Args...> format, Args&&... args) noexcept {
  try {
    log().warn(format, std::forward<Args>(args)...);
  } catch (...) {
  }
}

void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

std::string shm_path(std::string_view name) {
  std::string path(live_stats_shm_dir);
  path += '/';
  path += name;
  return path;
}

class fd_guard {
 public:
  explicit fd_guard(int fd) noexcept : fd_(fd) {}
  ~fd_guard() {
    if (fd_ >= 0) ::close(fd_);
  }
  fd_guard(const fd_guard&) = delete;
  fd_guard& operator=(const fd_guard&) = delete;
  int get() const noexcept { return fd_; }

 private:
  int fd_;
};

class read_only_mapping {
 public:
  read_only_mapping(int fd, std::size_t size) noexcept
      : size_(size), address_(::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0)) {}
  ~read_only_mapping() {
    if (address_ != MAP_FAILED) ::munmap(address_, size_);
  }
  read_only_mapping(const read_only_mapping&) = delete;
  read_only_mapping& operator=(const read_only_mapping&) = delete;
  bool ok() const noexcept { return address_ != MAP_FAILED; }
  const live_stats_segment& segment() const noexcept {
    return *static_cast<const live_stats_segment*>(address_);
  }

 private:
  std::size_t size_;
  void* address_;
};

bool is_owner_only(const struct stat& st) noexcept {
  return S_ISREG(st.st_mode) && st.st_uid == ::geteuid() && (st.st_mode & 077) == 0;
}

// /proc/<pid>/stat's state (field 3) and starttime (field 22). The command name (field 2) may
// hold spaces and parentheses, so fields are counted from the last ')'.
bool read_proc_stat(std::uint64_t pid, char& state, std::uint64_t& start_ticks) noexcept {
  try {
    std::ifstream in(fmt::format("/proc/{}/stat", pid));
    if (!in) return false;
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const auto close = text.rfind(')');
    if (close == std::string::npos) return false;
    std::istringstream fields(text.substr(close + 1));
    std::string field;
    for (int index = 3; index <= 22; ++index) {
      if (!(fields >> field)) return false;
      if (index == 3) state = field.empty() ? '?' : field[0];
    }
    const auto [end, ec] = std::from_chars(field.data(), field.data() + field.size(), start_ticks);
    return ec == std::errc{} && end == field.data() + field.size();
  } catch (...) {
    return false;
  }
}

struct header_check {
  bool valid = false;
  std::string problem;
  std::uint64_t writer_start_ticks = 0;
};

header_check check_header(const live_stats_segment& segment, std::uint64_t pid) {
  header_check result;
  const auto& header = segment.header;
  // Acquire: the writer publishes the magic last, with release, after the other header words.
  const std::uint64_t magic = live_stats_load_header_word(header.magic, std::memory_order_acquire);
  if (magic != live_stats_magic) {
    result.problem = fmt::format(
        "magic {:#018x} is not gpuswap's (not a live stats segment, or still being created)",
        magic);
    return result;
  }
  const std::uint64_t version = live_stats_load_header_word(header.layout_version);
  if (version != live_stats_layout_version) {
    result.problem = fmt::format("layout version {}, this reader understands {}", version,
                                 live_stats_layout_version);
    return result;
  }
  const std::uint64_t size = live_stats_load_header_word(header.segment_size);
  if (size != sizeof(live_stats_segment)) {
    result.problem = fmt::format("size field says {} bytes, layout version {} has {}", size,
                                 live_stats_layout_version, sizeof(live_stats_segment));
    return result;
  }
  const std::uint64_t writer_pid = live_stats_load_header_word(header.writer_pid);
  if (writer_pid != pid) {
    result.problem = fmt::format("header names pid {}, the segment name pid {}", writer_pid, pid);
    return result;
  }
  result.writer_start_ticks = live_stats_load_header_word(header.writer_start_ticks);
  result.valid = true;
  return result;
}

// Range checks on a consistent copy; sanitises the device name for display.
std::string check_figures(live_figures& figures, std::uint64_t pid) {
  if (figures.pid != pid) {
    return fmt::format("figures name pid {}, the segment name pid {}", figures.pid, pid);
  }
  const auto* end =
      static_cast<const char*>(std::memchr(figures.device_name, '\0', sizeof figures.device_name));
  if (end == nullptr) return "device name is not NUL-terminated";
  for (char* c = figures.device_name; c != end; ++c) {
    // A name is shown on a terminal: no control characters or escape sequences get through.
    if (static_cast<unsigned char>(*c) < 0x20 || static_cast<unsigned char>(*c) >= 0x7f) *c = '?';
  }
  for (const double rate : {figures.bandwidth_out_bytes_per_s, figures.bandwidth_in_bytes_per_s}) {
    if (!std::isfinite(rate) || rate < 0.0) {
      return fmt::format("bandwidth {} is not a finite non-negative number", rate);
    }
  }
  return {};
}

std::chrono::nanoseconds clamp_deadline(std::chrono::nanoseconds deadline) noexcept {
  return std::clamp<std::chrono::nanoseconds>(deadline, min_deadline, max_deadline);
}

// Reads one segment. nullopt: it does not exist, or is skipped (not ours / not owner-only).
std::optional<live_snapshot> read_segment(const std::string& name, std::uint64_t pid,
                                          std::chrono::nanoseconds deadline) {
  const auto give_up_at = std::chrono::steady_clock::now() + clamp_deadline(deadline);
  const std::string path = shm_path(name);
  const fd_guard fd(
      ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC | O_NOCTTY));
  if (fd.get() < 0) {
    if (errno != ENOENT) log_debug("live stats: skipping {}: {}", path, std::strerror(errno));
    return std::nullopt;
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return std::nullopt;
  if (!is_owner_only(st)) {
    log_debug(
        "live stats: skipping {}: not a regular file owned by uid {} with mode 0600 "
        "(owner {}, mode {:04o})",
        path, ::geteuid(), st.st_uid, st.st_mode & 07777);
    return std::nullopt;
  }

  live_snapshot snapshot;
  snapshot.segment_name = name;
  snapshot.pid = pid;
  snapshot.status = live_snapshot_status::invalid;
  if (st.st_size < 0 || static_cast<std::uint64_t>(st.st_size) != sizeof(live_stats_segment)) {
    snapshot.problem = fmt::format("file is {} bytes, layout version {} has {}", st.st_size,
                                   live_stats_layout_version, sizeof(live_stats_segment));
    return snapshot;
  }
  const read_only_mapping mapping(fd.get(), sizeof(live_stats_segment));
  if (!mapping.ok()) {
    snapshot.problem = fmt::format("cannot map it: {}", std::strerror(errno));
    return snapshot;
  }
  const header_check header = check_header(mapping.segment(), pid);
  if (!header.valid) {
    snapshot.problem = header.problem;
    return snapshot;
  }

  bool saw_odd = false;
  for (int attempt = 0; attempt < max_attempts; ++attempt) {
    live_figures copy;
    const live_load_result result = live_stats_try_load(mapping.segment(), copy);
    if (result == live_load_result::ok) {
      std::string problem = check_figures(copy, pid);
      if (!problem.empty()) {
        snapshot.problem = std::move(problem);
        return snapshot;
      }
      snapshot.figures = copy;
      if (live_stats_writer_alive(pid, header.writer_start_ticks)) {
        snapshot.status = live_snapshot_status::ok;
      } else {
        snapshot.status = live_snapshot_status::stale;
        snapshot.problem = "the writer process is gone; these are its last figures";
      }
      return snapshot;
    }
    if (result == live_load_result::writing) {
      // Checked on the first odd sequence, then now and again: a syscall per retry would slow
      // the spin for nothing while a live writer finishes.
      if ((!saw_odd || attempt % spin_attempts == 0) &&
          !live_stats_writer_alive(pid, header.writer_start_ticks)) {
        snapshot.status = live_snapshot_status::torn;
        snapshot.problem = "the writer died in the middle of an update (sequence stuck odd)";
        return snapshot;
      }
      saw_odd = true;
    }
    if (std::chrono::steady_clock::now() >= give_up_at) break;
    if (attempt < spin_attempts) {
      cpu_relax();
    } else {
      std::this_thread::sleep_for(retry_sleep);
    }
  }
  snapshot.status = live_snapshot_status::torn;
  snapshot.problem = saw_odd ? "no consistent copy before the deadline (sequence stays odd: the "
                               "writer is stopped or died mid-update)"
                             : "no consistent copy before the deadline (sequence keeps changing)";
  return snapshot;
}

// Names in /dev/shm of the form <prefix>.<euid>.<pid>, with their pids.
std::vector<std::pair<std::string, std::uint64_t>> list_segments(std::string_view prefix) {
  std::vector<std::pair<std::string, std::uint64_t>> found;
  const std::string dir(live_stats_shm_dir);
  DIR* stream = ::opendir(dir.c_str());
  if (stream == nullptr) return found;
  const std::uint64_t uid = ::geteuid();
  while (const dirent* entry = ::readdir(stream)) {
    const std::string_view name(entry->d_name);
    if (const std::uint64_t pid = parse_live_stats_segment_name(name, prefix, uid); pid != 0) {
      try {
        found.emplace_back(std::string(name), pid);
      } catch (...) {
        break;
      }
    }
  }
  ::closedir(stream);
  return found;
}

}  // namespace

std::string_view to_string(live_snapshot_status status) noexcept {
  switch (status) {
    case live_snapshot_status::ok:
      return "ok";
    case live_snapshot_status::stale:
      return "stale";
    case live_snapshot_status::torn:
      return "torn";
    case live_snapshot_status::invalid:
      return "invalid";
  }
  return "?";
}

std::string resolve_live_stats_prefix(std::string_view name_prefix) noexcept {
  try {
    std::string prefix(name_prefix);
    if (prefix.empty()) {
      const char* from_env = std::getenv("GPUSWAP_LIVE_STATS_PREFIX");
      prefix = (from_env != nullptr && *from_env != '\0') ? from_env : live_stats_default_prefix;
    }
    if (!is_valid_live_stats_prefix(prefix)) return {};
    return prefix;
  } catch (...) {
    return {};
  }
}

std::uint64_t process_start_ticks(std::uint64_t pid) noexcept {
  char state = '?';
  std::uint64_t ticks = 0;
  return read_proc_stat(pid, state, ticks) ? ticks : 0;
}

bool live_stats_writer_alive(std::uint64_t pid, std::uint64_t start_ticks) noexcept {
  if (pid == 0 || pid > static_cast<std::uint64_t>(INT_MAX)) return false;
  // EPERM: it exists but is not ours to signal, which still means alive.
  if (::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return false;
  char state = '?';
  std::uint64_t ticks = 0;
  if (read_proc_stat(pid, state, ticks)) {
    // A zombie never updates again; a different start time means the pid was reused.
    if (state == 'Z' || state == 'X') return false;
    if (start_ticks != 0 && ticks != start_ticks) return false;
  }
  return true;
}

live_segment_probe probe_live_segment(const std::string& name, std::uint64_t pid) noexcept {
  live_segment_probe probe;
  try {
    const std::string path = shm_path(name);
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0) return probe;
    probe.exists = true;
    probe.owner = st.st_uid;
    probe.mode = st.st_mode & 07777;
    probe.owner_only = is_owner_only(st);
    if (!probe.owner_only) return probe;
    const fd_guard fd(
        ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC | O_NOCTTY));
    struct stat opened {};
    if (fd.get() >= 0 && ::fstat(fd.get(), &opened) == 0 && opened.st_ino == st.st_ino &&
        opened.st_dev == st.st_dev && is_owner_only(opened) &&
        opened.st_size == static_cast<off_t>(sizeof(live_stats_segment))) {
      const read_only_mapping mapping(fd.get(), sizeof(live_stats_segment));
      if (mapping.ok()) {
        const header_check header = check_header(mapping.segment(), pid);
        probe.header_valid = header.valid;
        probe.writer_start_ticks = header.writer_start_ticks;
      }
    }
    // An unreadable or half-created segment of a live process is left alone: its writer may be
    // initialising it right now. Of a dead process, it is garbage.
    probe.stale = !live_stats_writer_alive(pid, probe.header_valid ? probe.writer_start_ticks : 0);
  } catch (...) {
    probe.stale = false;
  }
  return probe;
}

std::size_t clean_stale_segments(std::string_view name_prefix) noexcept {
  std::size_t removed = 0;
  try {
    const std::string prefix = resolve_live_stats_prefix(name_prefix);
    if (prefix.empty()) return 0;
    for (const auto& [name, pid] : list_segments(prefix)) {
      const live_segment_probe probe = probe_live_segment(name, pid);
      if (!probe.stale) continue;
      if (::unlink(shm_path(name).c_str()) == 0) {
        ++removed;
        log_debug("live stats: removed the stale segment {} of dead process {}", name, pid);
      }
    }
  } catch (...) {
  }
  return removed;
}

std::vector<live_snapshot> read_all_live_stats(const live_read_options& options) noexcept {
  std::vector<live_snapshot> snapshots;
  try {
    const std::string prefix = resolve_live_stats_prefix(options.name_prefix);
    if (prefix.empty()) {
      log_warn("live stats: the name prefix '{}' is not 1 to 64 characters of [A-Za-z0-9_-]",
               options.name_prefix.empty() ? "$GPUSWAP_LIVE_STATS_PREFIX" : options.name_prefix);
      return snapshots;
    }
    if (options.clean_stale) clean_stale_segments(prefix);
    for (const auto& [name, pid] : list_segments(prefix)) {
      if (auto snapshot = read_segment(name, pid, options.deadline)) {
        snapshots.push_back(std::move(*snapshot));
      }
    }
    std::sort(snapshots.begin(), snapshots.end(),
              [](const live_snapshot& a, const live_snapshot& b) { return a.pid < b.pid; });
  } catch (...) {
    // Out of memory: what was read so far.
  }
  return snapshots;
}

std::optional<live_snapshot> read_live_stats(std::uint64_t pid,
                                             const live_read_options& options) noexcept {
  try {
    const std::string prefix = resolve_live_stats_prefix(options.name_prefix);
    if (prefix.empty() || pid == 0 || pid > static_cast<std::uint64_t>(INT_MAX)) {
      return std::nullopt;
    }
    return read_segment(live_stats_segment_name(prefix, ::geteuid(), pid), pid, options.deadline);
  } catch (...) {
    return std::nullopt;
  }
}

}  // namespace gpuswap
