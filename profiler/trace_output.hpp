#pragma once
// trace_output: the `trace:FILE` configuration key made real. A program that owns one records
// every event into the event recorder and gets FILE, a Chrome trace (chrome_trace.hpp) of all
// of it, when the trace_output is destroyed (at exit, for one that main or a command owns), or
// earlier on demand.
//
//   trace_output trace(config_from_env());  // no trace key: touches nothing, writes nothing
//   trace.options().device_name = dev.name();
//   ... train ...
//   trace.flush();                          // optional: write now; errors are logged
//   // destroyed: writes again only if events arrived since
//
// The recorder is drained into the trace_output (events()), so a program that also wants the
// events, say for a summary, takes them from here rather than from the recorder, and the file
// still holds them. clear() forgets what came before, for a program that traces only its last
// part (the demo's limited run, simulate's last configuration).
//
// While active, a background thread drains the recorder every drain_interval, so that a long
// run does not overflow the recorder's bounded per-thread rings between two reads
// (Note [Trace output drains the recorder]).
//
// Thread safety: every member may be called from any thread (one mutex, below); the recorder
// takes events from any thread whatever this object is doing.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <stop_token>
#include <thread>
#include <span>
#include <string>
#include <vector>

#include "core/config.hpp"
#include "profiler/chrome_trace.hpp"
#include "profiler/event_recorder.hpp"
#include "profiler/trace_event.hpp"

namespace gpuswap {

class trace_output {
 public:
  static constexpr std::chrono::milliseconds default_drain_interval{10};

  // `path` empty: inactive (nothing is enabled or written; events() and clear() still work on
  // the recorder). Otherwise enables `recorder`, which the destructor switches off again if it
  // was off before, and drains it every `drain_interval` (zero: only when asked).
  explicit trace_output(std::string path, chrome_trace_options options = {},
                        event_recorder& recorder = global_recorder(),
                        std::chrono::milliseconds drain_interval = default_drain_interval);
  // The path of the config's trace key.
  explicit trace_output(const config& conf, chrome_trace_options options = {},
                        event_recorder& recorder = global_recorder());
  // Writes the file if anything was recorded since the last write to path() (or none was
  // tried; a failed one is not retried for the same events). Never throws: a failure is logged.
  ~trace_output();
  trace_output(const trace_output&) = delete;
  trace_output& operator=(const trace_output&) = delete;

  bool active() const noexcept { return !path_.empty(); }
  const std::string& path() const noexcept { return path_; }

  // What the next write puts in otherData (device name, ...). dropped_events is filled in from
  // the recorder at each write. Not to be changed while another thread writes.
  chrome_trace_options& options() noexcept { return options_; }

  // Drains the recorder into this object and returns a copy of every event held, by time.
  std::vector<trace_event> events();
  // Forgets every event held here and buffered in the recorder (and the recorder's drop count).
  void clear();

  // Drains done by the background thread so far.
  std::uint64_t background_drains() const noexcept {
    return background_drains_.load(std::memory_order_acquire);
  }

  // Writes everything recorded so far to `path`, atomically (write_chrome_trace). Throws
  // gpuswap::error naming the path.
  void write_to(const std::string& path);
  // Writes everything recorded so far to path(): true when written, false when inactive or
  // when writing failed (logged, not thrown).
  bool flush() noexcept;

 private:
  // Require mutex_. drain_locked appends the recorder's events; sort_locked puts them in time
  // order, which only readers need.
  void drain_locked();
  void sort_locked();
  void drain_periodically(std::stop_token stop, std::chrono::milliseconds interval);
  void write_locked(const std::string& path);

  const std::string path_;
  chrome_trace_options options_;
  event_recorder& recorder_;
  bool enabled_recorder_ = false;  // we switched it on, so the destructor switches it off

  // guards events_, sorted_, written_ and written_count_; held across the file write (no
  // device call).
  std::mutex mutex_;
  std::vector<trace_event> events_;  // by time_ns up to sorted_, then sorted batches
  std::size_t sorted_ = 0;
  bool written_ = false;           // a write to path() was tried when events_ had written_count_
  std::size_t written_count_ = 0;  // events (events_ only grows between two clear() calls)

  std::atomic<std::uint64_t> background_drains_{0};
  std::condition_variable_any drain_wakeup_;  // with mutex_; woken only by stop requests
  std::jthread drainer_;                      // last: stopped and joined first
};

}  // namespace gpuswap
