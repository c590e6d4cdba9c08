#pragma once
// Publishes this process's live figures in an owner-only shared-memory segment
// (profiler/live_stats.hpp) that `gpuswap top` reads from another process.
//
// Nothing here throws or blocks, and nothing here can stop the host program: when the segment
// cannot be created safely (a segment of that name that belongs to another user or is readable
// by others, no /dev/shm, a bad prefix) the writer is disabled, logs exactly one warning on
// gpuswap's stderr logger, and update() does nothing.
#include <cstdint>
#include <memory>
#include <string>

#include "profiler/live_stats.hpp"

namespace gpuswap {

struct live_stats_options {
  // Empty: $GPUSWAP_LIVE_STATS_PREFIX when set, else "gpuswap". Must be 1 to 64 characters of
  // [A-Za-z0-9_-]. The segment is /dev/shm/<prefix>.<euid>.<pid>.
  std::string name_prefix;
  // Published when an update's figures leave device_name empty; cut to 63 bytes.
  std::string device_name;
  std::uint64_t device_index = 0;

  // Throws config_error naming name_prefix when the prefix in effect (see above) is not valid.
  void validate() const;
};

class live_stats_writer {
 public:
  // A disabled writer.
  live_stats_writer() noexcept;
  ~live_stats_writer();
  live_stats_writer(live_stats_writer&&) noexcept;
  live_stats_writer& operator=(live_stats_writer&&) noexcept;
  live_stats_writer(const live_stats_writer&) = delete;
  live_stats_writer& operator=(const live_stats_writer&) = delete;

  // Creates this process's segment (exclusively, mode 0600), after removing dead processes'
  // segments of this user. Never throws: on any failure returns a disabled writer whose
  // problem() says why, having logged one warning.
  static live_stats_writer open(const live_stats_options& options) noexcept;

  bool enabled() const noexcept;
  // The segment name ("gpuswap.1000.4242"); empty when disabled.
  const std::string& name() const noexcept;
  // Why the writer is disabled; empty when enabled.
  const std::string& problem() const noexcept;

  // Publishes `figures` (stamping pid, start time, last update time and heartbeat). Wait-free:
  // if another thread is inside update() at the same moment, this call is dropped rather than
  // waiting (the next update carries newer figures); dropped() counts them. Does nothing when
  // disabled, or in a child forked from the process that opened the segment.
  void update(const live_figures& figures) noexcept;
  std::uint64_t dropped() const noexcept;

  // Removes the segment now (readers that have it mapped keep their copy) and disables the
  // writer. Only the process that created the segment removes it.
  void close() noexcept;

  // The process-global writer: opened by the first call (later calls return the same one and
  // ignore their options), never destroyed (allocator destructors may still update it while
  // the process exits), its segment removed by an atexit handler. Returns nullptr only when
  // memory for it could not be had.
  static live_stats_writer* install_global(const live_stats_options& options) noexcept;
  // The global writer, or nullptr before install_global.
  static live_stats_writer* global() noexcept;

 private:
  struct state;
  explicit live_stats_writer(std::unique_ptr<state> opened) noexcept;
  static live_stats_writer disabled(std::string problem) noexcept;
  // Unlinks the segment if it is still the one this process created; keeps the mapping.
  void remove_segment() noexcept;

  std::unique_ptr<state> state_;
  std::string problem_;
};

}  // namespace gpuswap
