#include "profiler/trace_output.hpp"

#include <algorithm>
#include <exception>
#include <iterator>
#include <utility>

#include "core/logging.hpp"

namespace gpuswap {

// Note [Trace output drains the recorder]
// The recorder's rings are bounded (a thread that records more than ring_capacity events between
// two collect() calls loses the rest), and collect() takes the events out. So the trace_output
// keeps what it collected, and everyone who wants the events goes through it: each events() or
// write empties the rings again, and the file written at the end still has all of it. The
// events of one collect() come sorted; merging each batch into the sorted whole keeps the file's
// order independent of when anyone asked.

trace_output::trace_output(std::string path, chrome_trace_options options, event_recorder& recorder)
    : path_(std::move(path)), options_(std::move(options)), recorder_(recorder) {
  if (active() && !recorder_.enabled()) {
    recorder_.enable(true);
    enabled_recorder_ = true;
  }
}

trace_output::trace_output(const config& conf, chrome_trace_options options, event_recorder& recorder)
    : trace_output(conf.trace, std::move(options), recorder) {}

trace_output::~trace_output() {
  if (active()) {
    try {
      std::lock_guard lock(mutex_);
      drain_locked();
      if (!written_ || events_.size() != written_count_) write_locked(path_);  // else: done, or failed
    } catch (const std::exception& e) {
      log().error("trace: could not write the trace at exit: {}", e.what());
    } catch (...) {
      log().error("trace: could not write the trace at exit to {}", path_);
    }
  }
  if (enabled_recorder_) recorder_.enable(false);
}

void trace_output::drain_locked() {
  std::vector<trace_event> fresh = recorder_.collect();
  if (fresh.empty()) return;
  const auto old_size = static_cast<std::ptrdiff_t>(events_.size());
  events_.insert(events_.end(), std::make_move_iterator(fresh.begin()), std::make_move_iterator(fresh.end()));
  std::inplace_merge(events_.begin(), events_.begin() + old_size, events_.end(),
                     [](const trace_event& a, const trace_event& b) { return a.time_ns < b.time_ns; });
}

void trace_output::write_locked(const std::string& path) {
  chrome_trace_options o = options_;
  o.dropped_events = recorder_.dropped();
  if (path == path_) {
    // Marked before the attempt: a write that failed is not retried at destruction unless
    // there is more to write, so one failure is reported once.
    written_ = true;
    written_count_ = events_.size();
  }
  write_chrome_trace(path, events_, o);
}

std::vector<trace_event> trace_output::events() {
  std::lock_guard lock(mutex_);
  drain_locked();
  return events_;
}

void trace_output::clear() {
  std::lock_guard lock(mutex_);
  recorder_.clear();
  events_.clear();
  written_ = false;  // the file, if any, holds what was just forgotten
  written_count_ = 0;
}

void trace_output::write_to(const std::string& path) {
  std::lock_guard lock(mutex_);
  drain_locked();
  write_locked(path);
}

bool trace_output::flush() noexcept {
  if (!active()) return false;
  try {
    write_to(path_);
    return true;
  } catch (const std::exception& e) {
    log().error("trace: {}", e.what());
  } catch (...) {
    log().error("trace: could not write {}", path_);
  }
  return false;
}

}  // namespace gpuswap
