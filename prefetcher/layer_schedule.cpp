#include "prefetcher/layer_schedule.hpp"

#include "profiler/device_timeline.hpp"
#include "profiler/event_recorder.hpp"

#include "core/logging.hpp"

namespace gpuswap {

namespace {

const char* phase_name(phase ph) { return ph == phase::forward ? "forward" : "backward"; }

}  // namespace

layer_schedule::layer_schedule(device& dev, stream_t compute) : dev_(dev), compute_(compute) {}

layer_schedule::~layer_schedule() {
  for (event_t e : pool_) dev_.destroy_event(e);
}

event_t layer_schedule::take_event() {
  if (pool_used_ == pool_.size()) pool_.push_back(dev_.create_event());
  return pool_[pool_used_++];
}

// Note [Schedule ranges]
// NVTX ranges belong where the markers are, not in each caller: the runner, the C API and the
// LibTorch hooks all mark steps through this class, and Nsight should show every one of them
// the same way. The iteration range opens lazily at an iteration's first step (there is no
// begin_iteration marker) and closes at end_iteration, after the last layer range; the swap
// engine's ranges (swap_out, prefetch, demand fetch) fall inside whichever is open on the
// same thread. The ranges are host-side: they span the enqueueing of a step's work, while the
// layer slices of the Chrome trace (end_iteration, below) span its execution on the device.

void layer_schedule::begin_step(phase ph, int layer) {
  if (!current_.empty() && !current_.back().ended) {
    const marked_step& open = current_.back();
    log().warn("layer_schedule: {} {} begins while {} {} is open; ending it here",
               phase_name(ph), layer, phase_name(open.ph), open.layer);
    end_step(open.ph, open.layer);
  }
  const event_t begin = take_event();
  dev_.record_event(begin, compute_);
  current_.push_back(marked_step{ph, layer, begin, begin, false});
  // Note [Schedule ranges].
  if (!iteration_range_) iteration_range_.emplace(static_cast<std::uint64_t>(iterations_));
  layer_range_.emplace(ph == phase::forward ? nvtx_phase::forward : nvtx_phase::backward, layer);
}

void layer_schedule::end_step(phase ph, int layer) {
  if (current_.empty() || current_.back().ended || current_.back().ph != ph ||
      current_.back().layer != layer) {
    log().warn("layer_schedule: end of {} {}, which is not the open step; ignored",
               phase_name(ph), layer);
    return;
  }
  marked_step& open = current_.back();
  open.end = take_event();
  dev_.record_event(open.end, compute_);
  open.ended = true;
  layer_range_.reset();
}

void layer_schedule::end_iteration() {
  if (!current_.empty() && !current_.back().ended) {
    end_step(current_.back().ph, current_.back().layer);
  }
  layer_range_.reset();
  iteration_range_.reset();
  if (current_.empty()) return;
  // The compute stream runs in order: once the last event is done, all are.
  dev_.synchronize_event(current_.back().end);
  std::vector<step_info> measured;
  measured.reserve(current_.size());
  step_times_.clear();
  auto& recorder = global_recorder();
  for (const marked_step& m : current_) {
    measured.push_back(step_info{m.ph, m.layer, dev_.elapsed_ms(m.begin, m.end) * 1e6});
    if (timeline_ == nullptr) continue;
    const double begin = timeline_->time_ns(m.begin);
    const double end = timeline_->time_ns(m.end);
    step_times_.push_back({begin, end});
    const event_detail ph = m.ph == phase::forward ? event_detail::forward : event_detail::backward;
    const auto stream = static_cast<std::uintptr_t>(compute_);
    recorder.record(trace_event::layer_phase(event_kind::layer_begin, begin, m.layer, ph, stream));
    recorder.record(trace_event::layer_phase(event_kind::layer_end, end, m.layer, ph, stream));
  }
  current_.clear();
  pool_used_ = 0;

  bool same = measured.size() == steps_.size();
  for (std::size_t i = 0; same && i < measured.size(); ++i) {
    same = measured[i].ph == steps_[i].ph && measured[i].layer == steps_[i].layer;
  }
  if (!same && iterations_ > 0) {
    if (!mismatch_logged_) {
      log().warn("layer_schedule: iteration {} ran {} steps in another order than the {} "
                 "learned; learning the new order",
                 iterations_ + 1, measured.size(), steps_.size());
      mismatch_logged_ = true;
    } else {
      log().debug("layer_schedule: iteration {} changed the step order again", iterations_ + 1);
    }
  }
  steps_ = std::move(measured);
  ++iterations_;
}

bool layer_schedule::apply_to(workload_profile& profile) const {
  if (steps_.empty() || profile.steps.size() != steps_.size()) return false;
  for (std::size_t i = 0; i < steps_.size(); ++i) {
    if (profile.steps[i].ph != steps_[i].ph || profile.steps[i].layer != steps_[i].layer) {
      return false;
    }
  }
  for (std::size_t i = 0; i < steps_.size(); ++i) {
    profile.steps[i].compute_ns = steps_[i].compute_ns;
  }
  return true;
}

}  // namespace gpuswap
