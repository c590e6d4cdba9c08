#include "profiler/live_stats_writer.hpp"

#include <pthread.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <utility>

#include <fmt/format.h>
#include <boost/interprocess/exceptions.hpp>
#include <boost/interprocess/mapped_region.hpp>
#include <boost/interprocess/permissions.hpp>
#include <boost/interprocess/shared_memory_object.hpp>

#include "core/errors.hpp"
#include "core/logging.hpp"
#include "profiler/live_stats_reader.hpp"

namespace gpuswap {

namespace bip = boost::interprocess;

// Note [Creating the live stats segment]
// Boost.Interprocess creates segments 0644 by default, and they outlive a crash; HAMi-core
// shipped world-readable segments and set umask(0) to get there. So:
// - the mode is passed explicitly (bip::permissions(0600)); Boost fchmods the new object to it,
//   so the result does not depend on the umask, and the umask is never touched;
// - the name carries the effective uid and the pid, and the create is exclusive (create_only:
//   O_CREAT|O_EXCL), so we never adopt an object someone else prepared for us;
// - after creating, fstat on the descriptor (and lstat of /dev/shm/<name>, which must be the
//   same inode) must show our euid and no group/other bits, else the object is removed again;
// - when the name is taken: a segment that is ours alone and whose writer is dead (a previous
//   process with our pid, e.g. pid 1 of an earlier container run) is removed and the create
//   retried once; anything else (another owner, a group/other bit, a live writer) is refused
//   and left exactly as it is.
// The writer's pid and start time go into the header so that readers and clean_stale_segments
// can tell a dead writer from a live one even when pids are reused.

// Note [Writer after fork]
// A child forked from the process inherits the mapping and the writer object. It must neither
// write into its parent's segment (two writers break the seqlock) nor remove it at exit. A
// pthread_atfork child handler bumps a generation counter that update() compares with the one
// it opened under (a relaxed load, cheaper than getpid() on every update), and removal compares
// getpid() with the creating pid.

namespace {

std::atomic<std::uint64_t> fork_generation{0};
std::once_flag atfork_once;

void note_fork_in_child() noexcept { fork_generation.fetch_add(1, std::memory_order_relaxed); }

std::uint64_t realtime_ns() noexcept {
  timespec now{};
  ::clock_gettime(CLOCK_REALTIME, &now);
  return static_cast<std::uint64_t>(now.tv_sec) * 1'000'000'000ULL +
         static_cast<std::uint64_t>(now.tv_nsec);
}

std::string shm_path(std::string_view name) {
  std::string path(live_stats_shm_dir);
  path += '/';
  path += name;
  return path;
}

double sane_rate(double rate) noexcept { return std::isfinite(rate) && rate > 0.0 ? rate : 0.0; }

// The process-global writer (never destroyed) and the lock that guards creating it; the lock
// is held only across live_stats_writer::open, which waits for no other process or thread.
std::atomic<live_stats_writer*> global_writer{nullptr};
std::mutex global_mutex;

}  // namespace

struct live_stats_writer::state {
  bip::mapped_region region;
  live_stats_segment* segment = nullptr;
  std::string name;
  dev_t device = 0;
  ino_t inode = 0;
  pid_t owner_pid = 0;
  std::uint64_t generation = 0;
  std::uint64_t start_time_ns = 0;
  char device_name[live_stats_device_name_size] = {};
  std::uint64_t device_index = 0;
  // Set by the thread inside update(); a second thread finding it set drops its update instead
  // of waiting. Guards heartbeat and the seqlock writer role; never waited on.
  std::atomic_flag busy = ATOMIC_FLAG_INIT;
  std::uint64_t heartbeat = 0;
  std::atomic<std::uint64_t> dropped{0};
  std::atomic<bool> removed{false};
};

void live_stats_options::validate() const {
  if (resolve_live_stats_prefix(name_prefix).empty()) {
    const char* from_env = std::getenv("GPUSWAP_LIVE_STATS_PREFIX");
    throw_config_error(name_prefix.empty() ? "GPUSWAP_LIVE_STATS_PREFIX" : "name_prefix",
                       name_prefix.empty() && from_env != nullptr ? from_env : name_prefix,
                       "1 to 64 characters of [A-Za-z0-9_-]");
  }
}

live_stats_writer::live_stats_writer() noexcept = default;
live_stats_writer::live_stats_writer(std::unique_ptr<state> opened) noexcept
    : state_(std::move(opened)) {}
live_stats_writer::live_stats_writer(live_stats_writer&&) noexcept = default;

live_stats_writer& live_stats_writer::operator=(live_stats_writer&& other) noexcept {
  if (this != &other) {
    remove_segment();
    state_ = std::move(other.state_);
    problem_ = std::move(other.problem_);
  }
  return *this;
}

live_stats_writer::~live_stats_writer() { remove_segment(); }

live_stats_writer live_stats_writer::disabled(std::string problem) noexcept {
  live_stats_writer writer;
  try {
    log().warn("live stats off ({}); `gpuswap top` will not show this process", problem);
  } catch (...) {
  }
  writer.problem_ = std::move(problem);
  return writer;
}

live_stats_writer live_stats_writer::open(const live_stats_options& options) noexcept {
  try {
    try {
      options.validate();
    } catch (const config_error& e) {
      return disabled(e.what());
    }
    const std::string prefix = resolve_live_stats_prefix(options.name_prefix);
    if (prefix.empty()) return disabled("cannot resolve the name prefix");
    std::call_once(atfork_once, [] { ::pthread_atfork(nullptr, nullptr, &note_fork_in_child); });
    clean_stale_segments(prefix);

    auto opened = std::make_unique<state>();
    opened->owner_pid = ::getpid();
    opened->generation = fork_generation.load(std::memory_order_relaxed);
    opened->name =
        live_stats_segment_name(prefix, ::geteuid(), static_cast<std::uint64_t>(opened->owner_pid));
    const std::string path = shm_path(opened->name);

    // See Note [Creating the live stats segment].
    bip::shared_memory_object shm;
    for (int attempt = 0;; ++attempt) {
      try {
        shm = bip::shared_memory_object(bip::create_only, opened->name.c_str(), bip::read_write,
                                        bip::permissions(0600));
        break;
      } catch (const bip::interprocess_exception& e) {
        if (e.get_error_code() != bip::already_exists_error || attempt > 0) {
          return disabled(fmt::format("cannot create {}: {}", path, e.what()));
        }
      }
      const live_segment_probe probe = probe_live_segment(opened->name, opened->owner_pid);
      if (!probe.exists) continue;  // it went away between the create and the probe
      if (!probe.owner_only) {
        return disabled(fmt::format(
            "{} already exists and is not a file only we can access (owner uid {}, mode {:04o}); "
            "it was left untouched",
            path, probe.owner, probe.mode));
      }
      if (!probe.stale) {
        return disabled(fmt::format(
            "{} already exists and its writer is alive (a second live stats writer in this "
            "process?)",
            path));
      }
      bip::shared_memory_object::remove(opened->name.c_str());
    }

    // From here on the object is ours: any failure removes it again.
    bool keep = false;
    struct remove_unless_kept {
      const std::string& name;
      const bool& keep;
      ~remove_unless_kept() {
        if (!keep) bip::shared_memory_object::remove(name.c_str());
      }
    } guard{opened->name, keep};

    struct stat by_fd {};
    struct stat by_name {};
    if (::fstat(shm.get_mapping_handle().handle, &by_fd) != 0 ||
        ::lstat(path.c_str(), &by_name) != 0) {
      return disabled(
          fmt::format("cannot stat {} after creating it: {}", path, std::strerror(errno)));
    }
    if (!S_ISREG(by_fd.st_mode) || by_fd.st_uid != ::geteuid() || (by_fd.st_mode & 077) != 0 ||
        by_fd.st_ino != by_name.st_ino || by_fd.st_dev != by_name.st_dev) {
      return disabled(fmt::format(
          "{} was created with owner uid {} and mode {:04o}, not uid {} and 0600; removed it", path,
          by_fd.st_uid, by_fd.st_mode & 07777, ::geteuid()));
    }
    opened->device = by_fd.st_dev;
    opened->inode = by_fd.st_ino;

    shm.truncate(static_cast<bip::offset_t>(sizeof(live_stats_segment)));
    opened->region = bip::mapped_region(shm, bip::read_write, 0, sizeof(live_stats_segment));
    opened->segment = static_cast<live_stats_segment*>(opened->region.get_address());

    opened->start_time_ns = realtime_ns();
    const std::size_t name_length =
        std::min(options.device_name.size(), live_stats_device_name_size - 1);
    std::memcpy(opened->device_name, options.device_name.data(), name_length);
    opened->device_index = options.device_index;

    // The header words before the magic, the magic last with release (readers load it with
    // acquire); the figures go through the seqlock like every later update.
    auto& header = opened->segment->header;
    const auto store = [](std::uint64_t& word, std::uint64_t value) {
      std::atomic_ref<std::uint64_t>(word).store(value, std::memory_order_relaxed);
    };
    store(header.layout_version, live_stats_layout_version);
    store(header.segment_size, sizeof(live_stats_segment));
    store(header.writer_pid, static_cast<std::uint64_t>(opened->owner_pid));
    store(header.writer_start_ticks,
          process_start_ticks(static_cast<std::uint64_t>(opened->owner_pid)));
    store(header.sequence, 0);
    live_figures initial;
    initial.pid = static_cast<std::uint64_t>(opened->owner_pid);
    initial.start_time_ns = opened->start_time_ns;
    std::memcpy(initial.device_name, opened->device_name, sizeof initial.device_name);
    initial.device_index = opened->device_index;
    initial.last_update_ns = opened->start_time_ns;
    live_stats_store(*opened->segment, initial);
    std::atomic_ref<std::uint64_t>(header.magic).store(live_stats_magic, std::memory_order_release);

    keep = true;
    return live_stats_writer(std::move(opened));
  } catch (const std::exception& e) {
    try {
      return disabled(fmt::format("cannot set up the segment: {}", e.what()));
    } catch (...) {
      return live_stats_writer();
    }
  } catch (...) {
    try {
      return disabled("cannot set up the segment");
    } catch (...) {
      return live_stats_writer();
    }
  }
}

bool live_stats_writer::enabled() const noexcept { return state_ != nullptr; }

const std::string& live_stats_writer::name() const noexcept {
  static const std::string none;
  return state_ ? state_->name : none;
}

const std::string& live_stats_writer::problem() const noexcept { return problem_; }

std::uint64_t live_stats_writer::dropped() const noexcept {
  return state_ ? state_->dropped.load(std::memory_order_relaxed) : 0;
}

void live_stats_writer::update(const live_figures& figures) noexcept {
  state* const s = state_.get();
  if (s == nullptr) return;
  // See Note [Writer after fork].
  if (s->generation != fork_generation.load(std::memory_order_relaxed)) return;
  if (s->busy.test_and_set(std::memory_order_acquire)) {
    s->dropped.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  live_figures published = figures;
  published.pid = static_cast<std::uint64_t>(s->owner_pid);
  published.start_time_ns = s->start_time_ns;
  if (published.device_name[0] == '\0') {
    std::memcpy(published.device_name, s->device_name, sizeof published.device_name);
    published.device_index = s->device_index;
  }
  published.device_name[live_stats_device_name_size - 1] = '\0';
  // Readers reject a segment holding a NaN or negative rate; publish 0 for "unknown" instead.
  published.bandwidth_out_bytes_per_s = sane_rate(published.bandwidth_out_bytes_per_s);
  published.bandwidth_in_bytes_per_s = sane_rate(published.bandwidth_in_bytes_per_s);
  published.last_update_ns = realtime_ns();
  published.heartbeat = ++s->heartbeat;
  live_stats_store(*s->segment, published);
  s->busy.clear(std::memory_order_release);
}

void live_stats_writer::remove_segment() noexcept {
  state* const s = state_.get();
  if (s == nullptr || s->removed.exchange(true)) return;
  if (::getpid() != s->owner_pid) return;  // see Note [Writer after fork]
  try {
    // Only the object we created: if the name now holds another inode, it is not ours to remove.
    const std::string path = shm_path(s->name);
    struct stat st {};
    if (::lstat(path.c_str(), &st) == 0 && st.st_ino == s->inode && st.st_dev == s->device) {
      bip::shared_memory_object::remove(s->name.c_str());
    }
  } catch (...) {
  }
}

void live_stats_writer::close() noexcept {
  remove_segment();
  state_.reset();
}

live_stats_writer* live_stats_writer::install_global(const live_stats_options& options) noexcept {
  if (live_stats_writer* existing = global_writer.load(std::memory_order_acquire)) return existing;
  try {
    const std::lock_guard<std::mutex> lock(global_mutex);
    if (live_stats_writer* existing = global_writer.load(std::memory_order_acquire))
      return existing;
    auto* created = new (std::nothrow) live_stats_writer(open(options));
    if (created == nullptr) return nullptr;
    // Removes the file at exit but keeps the mapping: a static destructor that still updates
    // the writer later writes into memory nobody else can find any more, harmlessly.
    std::atexit([] {
      if (live_stats_writer* writer = global_writer.load(std::memory_order_acquire)) {
        writer->remove_segment();
      }
    });
    global_writer.store(created, std::memory_order_release);
    return created;
  } catch (...) {
    return nullptr;
  }
}

live_stats_writer* live_stats_writer::global() noexcept {
  return global_writer.load(std::memory_order_acquire);
}

}  // namespace gpuswap
