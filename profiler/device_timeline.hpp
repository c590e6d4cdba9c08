#pragma once
// device_timeline: places device events on the host's clock, so that copies and kernels can be
// drawn on the same timeline as host-side markers.
//
// At construction an epoch event is recorded on a fresh stream and waited for; the host clock
// read right after is the epoch's time. Any later completed event then happened at
// epoch + elapsed_ms(epoch, event). On the simulator this is exact (the host clock after the
// wait is the event's modelled time); on a GPU it is off by the wait's wake-up latency, a few
// microseconds, the same for every event.
#include "device/device.hpp"

namespace gpuswap {

class device_timeline {
 public:
  explicit device_timeline(device& dev);
  ~device_timeline();
  device_timeline(const device_timeline&) = delete;
  device_timeline& operator=(const device_timeline&) = delete;

  // The host-clock time of a recorded, completed event (device_error if not complete).
  double time_ns(event_t completed) const;
  double epoch_ns() const noexcept { return epoch_ns_; }

 private:
  device& dev_;
  event_t epoch_{};
  double epoch_ns_ = 0;
};

}  // namespace gpuswap
