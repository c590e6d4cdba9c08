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
// order independent of when anyone asked. A background thread drains every drain_interval
// while the trace is active: a run that only reads at the end (simulate, a training program
// with trace:FILE) would otherwise lose all but each thread's first ring_capacity events.
// Drains only append (each batch is sorted); the merge into one time order waits for a reader,
// so that draining stays cheap however long the trace grows.

trace_output::trace_output(std::string path, chrome_trace_options options, event_recorder& recorder,
                           std::chrono::milliseconds drain_interval)
    : path_(std::move(path)), options_(std::move(options)), recorder_(recorder) {
  if (active() && !recorder_.enabled()) {
    recorder_.enable(true);
    enabled_recorder_ = true;
  }
  if (active() && drain_interval.count() > 0) {
    drainer_ = std::jthread(
        [this, drain_interval](std::stop_token stop) { drain_periodically(stop, drain_interval); });
  }
}

void trace_output::drain_periodically(std::stop_token stop, std::chrono::milliseconds interval) {
  std::unique_lock lock(mutex_);
  for (;;) {
    // Returns at the interval or at once on a stop request, whatever the (never true) predicate.
    drain_wakeup_.wait_for(lock, stop, interval, [] { return false; });
    if (stop.stop_requested()) return;
    try {
      drain_locked();
      background_drains_.fetch_add(1, std::memory_order_release);
    } catch (const std::exception& e) {  // out of memory: the rings keep the events, or drop
      log().warn("trace: draining the recorder failed: {}", e.what());
    }
  }
}

trace_output::trace_output(const config& conf, chrome_trace_options options, event_recorder& recorder)
    : trace_output(conf.trace, std::move(options), recorder) {}

trace_output::~trace_output() {
  if (drainer_.joinable()) {
    drainer_.request_stop();
    drainer_.join();
  }
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
  events_.insert(events_.end(), std::make_move_iterator(fresh.begin()), std::make_move_iterator(fresh.end()));
}

void trace_output::sort_locked() {
  if (sorted_ == events_.size()) return;
  // Stable: events of equal time keep their drain order, and within a drain the recorder's.
  const auto by_time = [](const trace_event& a, const trace_event& b) { return a.time_ns < b.time_ns; };
  const auto middle = events_.begin() + static_cast<std::ptrdiff_t>(sorted_);
  std::stable_sort(middle, events_.end(), by_time);
  std::inplace_merge(events_.begin(), middle, events_.end(), by_time);
  sorted_ = events_.size();
}

void trace_output::write_locked(const std::string& path) {
  sort_locked();
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
  sort_locked();
  return events_;
}

void trace_output::clear() {
  std::lock_guard lock(mutex_);
  recorder_.clear();
  events_.clear();
  sorted_ = 0;
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
