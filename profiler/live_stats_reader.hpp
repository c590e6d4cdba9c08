#pragma once
// Reading other processes' live statistics segments (profiler/live_stats.hpp) for
// `gpuswap top`, and removing the segments of dead processes.
//
// Guarantees: no call blocks or spins without bound (each segment has a deadline of at most
// 100 ms); a segment that is torn (its writer died mid-update), truncated, fuzzed or of another
// layout version is never returned as figures; a segment owned by another user, or readable by
// group or others, is skipped unread; nothing here throws.
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "profiler/live_stats.hpp"

namespace gpuswap {

enum class live_snapshot_status {
  ok,       // a consistent copy; the writer is alive
  stale,    // a consistent copy, but the writer is dead: figures are its last ones
  torn,     // no consistent copy within the deadline (writer died or stopped mid-update)
  invalid,  // not a segment of this layout: size, magic, version or a field out of range
};

std::string_view to_string(live_snapshot_status status) noexcept;

struct live_snapshot {
  std::string segment_name;  // "<prefix>.<uid>.<pid>" in /dev/shm
  std::uint64_t pid = 0;     // from the name
  live_snapshot_status status = live_snapshot_status::invalid;
  // Why status is not ok; empty when it is.
  std::string problem;
  // Meaningful only when has_figures(); zero otherwise. device_name is NUL-terminated and
  // printable ASCII, doubles are finite and non-negative.
  live_figures figures;

  bool has_figures() const noexcept {
    return status == live_snapshot_status::ok || status == live_snapshot_status::stale;
  }
};

struct live_read_options {
  // Empty: $GPUSWAP_LIVE_STATS_PREFIX when set, else "gpuswap". Tests set their own so that
  // parallel test processes never see each other's segments.
  std::string name_prefix;
  // How long one segment may take, from opening it to giving up on a sequence that stays odd
  // or keeps changing. Clamped to [1 us, 100 ms].
  std::chrono::nanoseconds deadline = std::chrono::milliseconds(50);
  // read_all_live_stats first removes dead processes' segments (clean_stale_segments).
  bool clean_stale = true;
};

// Every segment of this user (effective uid) with the prefix, sorted by pid: the readable
// ones with their figures, our own broken ones as entries with a problem. Segments owned by
// others or not owner-only are skipped (logged at debug level).
std::vector<live_snapshot> read_all_live_stats(const live_read_options& options = {}) noexcept;

// The segment of one process of this user; nullopt when there is none (or it is skipped as
// above). Never cleans stale segments, so a dead writer's segment reads as stale or torn.
std::optional<live_snapshot> read_live_stats(std::uint64_t pid,
                                             const live_read_options& options = {}) noexcept;

// Removes the segments of this user's dead processes: name "<prefix>.<euid>.<pid>", a regular
// file owned by the effective uid with no group or other permission bits, and a writer that
// is gone (no such pid, or a pid now used by a process that started at another time than the
// one recorded in the header). Returns how many were removed. `name_prefix` as in
// live_read_options.
std::size_t clean_stale_segments(std::string_view name_prefix = {}) noexcept;

// The prefix in effect for an option value (empty: environment, then default). Returns an
// empty string when the chosen prefix is not valid (is_valid_live_stats_prefix), or on
// allocation failure.
std::string resolve_live_stats_prefix(std::string_view name_prefix) noexcept;

// Start time of process `pid` in clock ticks since boot (/proc/<pid>/stat field 22); 0 when
// it cannot be read.
std::uint64_t process_start_ticks(std::uint64_t pid) noexcept;

// Whether the writer recorded as (pid, start_ticks) still runs. start_ticks 0 means unknown:
// then only the pid is checked.
bool live_stats_writer_alive(std::uint64_t pid, std::uint64_t start_ticks) noexcept;

// What a segment name in /dev/shm currently is, for deciding whether to remove it.
struct live_segment_probe {
  bool exists = false;
  bool owner_only = false;  // regular file, owned by our euid, no group/other bits
  uid_t owner = 0;
  mode_t mode = 0;            // permission bits
  bool header_valid = false;  // size, magic, version and pid match
  std::uint64_t writer_start_ticks = 0;
  bool stale = false;  // owner_only and its writer is gone
};
live_segment_probe probe_live_segment(const std::string& name, std::uint64_t pid) noexcept;

}  // namespace gpuswap
