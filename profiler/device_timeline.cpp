#include "profiler/device_timeline.hpp"

namespace gpuswap {

device_timeline::device_timeline(device& dev) : dev_(dev) {
  epoch_ = dev_.create_event();
  // A stream of its own: the epoch must not wait behind work already queued elsewhere.
  stream_t s = dev_.create_stream(stream_priority::normal);
  try {
    dev_.record_event(epoch_, s);
    dev_.synchronize_event(epoch_);
  } catch (...) {
    dev_.destroy_stream(s);
    dev_.destroy_event(epoch_);
    throw;
  }
  epoch_ns_ = dev_.host_time_ns();
  dev_.destroy_stream(s);
}

device_timeline::~device_timeline() { dev_.destroy_event(epoch_); }

double device_timeline::time_ns(event_t completed) const {
  return epoch_ns_ + dev_.elapsed_ms(epoch_, completed) * 1e6;
}

}  // namespace gpuswap
