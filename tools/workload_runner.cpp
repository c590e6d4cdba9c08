#include "tools/workload_runner.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <unordered_map>

#include "allocator/caching_allocator.hpp"
#include "allocator/pinned_host_pool.hpp"
#include "core/errors.hpp"
#include "core/human_bytes.hpp"
#include "core/logging.hpp"
#include "device/sim_device.hpp"
#include "prefetcher/layer_schedule.hpp"
#include "prefetcher/prefetcher.hpp"
#include "profiler/device_timeline.hpp"
#include "profiler/event_recorder.hpp"
#include "profiler/live_stats_writer.hpp"
#include "tools/training_math.hpp"
#include "tools/workload_graph.hpp"

namespace gpuswap {

// Note [One iteration]
// Forward, layer by layer on the compute stream: create the output tensor (the allocator may
// evict idle tensors to make room), acquire the inputs, launch, release; then swap out the
// tensors the plan offloads whose last forward use this was, and free those nobody needs again.
// Backward, in reverse: ask the prefetcher which tensors to start bringing back, acquire what
// the step reads (a tensor still on the host is fetched on demand: a stall), allocate the error
// signals, launch, free what is used up. Then the SGD update and a host synchronisation, as a
// training loop that reads its loss does. Every step is bracketed by layer_schedule markers,
// which measure the step times the next iteration's plan uses.
//
// "Launch" is a call to the run's training_math (tools/training_math.hpp), chosen once: host
// functions on the simulator, CUDA kernels on a GPU, or modelled costs alone. Every one of
// them enqueues on the compute stream before the step's release_all, so the release events the
// swap engine records (and its swap-outs wait for) come after the step's work, whichever it is.
// Each call carries the step's modelled cost and touched buffers for the simulator's clock.

// Note [A fresh cache each iteration]
// Under a budget with offload, the cache that backward leaves behind is cut for backward's
// sizes (ResNet-50 at batch 256 under half its peak: 9.8 GiB reserved, 1.1 GiB allocated as
// forward begins). Forward then finds no block that fits and no headroom, and the allocator
// releases its unused segments behind a device-wide synchronize in the middle of the forward
// pass, which waits for every swap-out in flight as well (Note [Waiting for swap-outs in
// order] in allocator/swap_engine.cpp). Right after the iteration's own synchronize nothing
// is pending and the device is idle, so the runner gives the unused segments back there, where
// waiting costs nothing. On a GPU this costs the segments' cudaFree and cudaMalloc once per
// iteration (a few calls per layer, small next to a step that offloads); runs without a budget
// keep the steady state that never calls the device.
// With expandable segments the runner keeps its cache: forward's requests are served by
// mapping pages where address space is free, after unmapping just the pages they need
// (waiting for the compute stream only, not the device), and giving everything back each
// iteration only made it unmap and map again what the next iteration reuses. `gpuswap
// simulate`, `auto`, at 50% of the peak on h100-pcie5: VGG-16 2.31x -> 2.29x, ResNet-50 2.65x
// -> 2.60x, GPT-7B 6.17x -> 6.15x.

namespace {

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

struct link_figures {
  double h2d_bandwidth, d2h_bandwidth, h2d_latency_ns, d2h_latency_ns;
};

// The host link as the planner should see it: the simulator's own figures, or on a GPU a
// measured 64 MiB pinned copy each way.
link_figures probe_link(device& dev) {
  if (auto* sim = dynamic_cast<sim_device*>(&dev)) {
    const sim_options& o = sim->options();
    return {o.h2d_bandwidth, o.d2h_bandwidth, o.h2d_latency_ns, o.d2h_latency_ns};
  }
  const std::size_t n = std::size_t{64} << 20;
  void* host = dev.allocate_pinned(n);
  void* devp = dev.allocate_device(n);
  link_figures f{12e9, 12e9, 10'000, 10'000};
  if (host != nullptr && devp != nullptr) {
    stream_t s = dev.create_stream(stream_priority::normal);
    event_t a = dev.create_event(), b = dev.create_event(), c = dev.create_event();
    dev.record_event(a, s);
    dev.copy_async(devp, host, n, copy_kind::host_to_device, s);
    dev.record_event(b, s);
    dev.copy_async(host, devp, n, copy_kind::device_to_host, s);
    dev.record_event(c, s);
    dev.synchronize_event(c);
    f.h2d_bandwidth = static_cast<double>(n) / (dev.elapsed_ms(a, b) / 1e3);
    f.d2h_bandwidth = static_cast<double>(n) / (dev.elapsed_ms(b, c) / 1e3);
    for (event_t e : {a, b, c}) dev.destroy_event(e);
    dev.destroy_stream(s);
  }
  dev.free_device(devp);
  dev.free_pinned(host);
  return f;
}

// Note [Plannable budget]
// The planner counts bytes; the allocator holds whole segments (2 MiB units) and loses some of
// them to blocks that do not pack. So the plan aims below the budget: whole segments only, less
// a tenth for fragmentation. With expandable segments (Note [Expandable segments] in
// allocator/caching_allocator_expandable.cpp) free memory is never stranded between live
// blocks; what is lost is a partial page at each end of a large block and the small pool's
// packing, so a fiftieth is held back. Measured with `gpuswap simulate`, `auto`, at 50% of the
// no-offload peak on h100-pcie5: VGG-16 2.45x holding back a tenth, 2.31x a fiftieth, 2.30x
// nothing; ResNet-50 2.86x, 2.65x, 2.64x; GPT-7B 6.80x, 6.17x, 6.10x. With plain segments a
// fiftieth is ruinous (VGG-16 5.01x): the cache cannot place 3 GiB blocks that close to the
// budget.
std::size_t plannable_budget(std::size_t budget, bool expandable_segments) {
  const std::size_t unit = caching_allocator::round_large;
  const std::size_t whole = budget / unit * unit;
  return whole - whole / (expandable_segments ? 50 : 10);
}

kernel_cost share_of(const kernel_cost& c, double share) {
  return share == 1 ? c : kernel_cost{c.flops * share, c.memory_bytes * share, c.fixed_ns * share};
}

// Note [Parts of a step]
// A layer whose graph splits its saved state into the pieces its operators keep (Note [A
// block's saved pieces] in tools/workload_graph.cpp) runs as one kernel per part, each with its
// share of the layer's modelled cost, inside the one layer step the schedule and the planner
// see. In forward a part allocates its pieces, runs, and sends them to the host at once when the
// plan offloads them, so their D2H runs under the parts after it and the next block finds the
// room; in backward the parts run in reverse, each waiting only for its own pieces (which the
// prefetcher brings back in that order) and freeing them when done, so the H2D of a block's
// later pieces runs under its first parts. (Asking the prefetcher again after each part, into
// the room just freed, was tried: GPT-7B on an H100 at a quarter of its peak 9.44x -> 9.31x, at
// half 6.83x -> 6.86x, Titan X unchanged; not kept.) The graph tells the planner where in the
// step each piece is made, sent out, needed and freed (Note [Inside a step] in
// prefetcher/memory_timeline.cpp), so its model and the prefetcher's deadlines follow this
// order: a change here must keep place_pieces in tools/workload_graph.cpp in step. Real math
// computes a layer in one call, so there a layer runs as one part holding all its pieces, made
// and freed with the whole step (no layer with reference math keeps saved state today).

class runner final : public eviction_advisor {
 public:
  runner(device& dev, const model_spec& model, const runner_options& o)
      : dev_(dev),
        model_(model),
        opts_(o),
        batch_(o.batch > 0 ? o.batch : model.default_batch),
        alloc_(dev, caching_allocator_options{.device_limit = o.device_limit,
                                              .expandable_segments = o.expandable_segments}),
        pool_(dev, pinned_host_pool_options{o.host_limit}),
        timeline_(dev),
        engine_(dev, alloc_, pool_, swap_engine_options{}, &timeline_),
        compute_(dev.create_stream(stream_priority::normal)),
        math_(make_training_math({dev, alloc_, pool_, compute_, model, batch_}, o.real_math)),
        real_(math_->computes()),
        schedule_(dev, compute_),
        link_(probe_link(dev)) {
    auto* sim = dynamic_cast<sim_device*>(&dev);
    graph_ = sim != nullptr
                 ? build_workload_graph(model, batch_, [sim](const kernel_cost& c) { return sim->kernel_ns(c); })
                 : build_workload_graph(model, batch_, [](const kernel_cost& c) {
                     return c.flops / 1e13 * 1e9;  // a first guess until measured
                   });
    alloc_.set_external_memory_reporter([this] { return engine_.memory_report(); });
    schedule_.set_timeline(&timeline_);
    dev_.name_stream(compute_, "gpuswap compute");
    engine_.set_advisor(this);
    // Note [Parts of a step]
    parts_ = graph_.parts;
    for (std::vector<layer_part>& parts : parts_) {
      if (parts.size() > 1 && real_) {  // real math computes a layer in one call
        layer_part whole;
        for (const layer_part& part : parts) {
          whole.saved.insert(whole.saved.end(), part.saved.begin(), part.saved.end());
        }
        parts.assign(1, whole);
        for (int t : whole.saved) {  // made, sent, needed and freed with the whole step
          tensor_info& info = graph_.profile.tensors[static_cast<std::size_t>(t)];
          info.made_at = info.needed_at = 0;
          info.sent_at = info.freed_at = 1;
        }
      }
      if (parts.empty()) parts.push_back(layer_part{});
    }
    buffers_.assign(graph_.profile.tensors.size(), 0);
    errors_.assign(graph_.profile.tensors.size(), nullptr);
    const std::size_t steps = graph_.profile.steps.size();
    release_after_.assign(steps, {});
    for (const tensor_info& t : graph_.profile.tensors) {
      release_after_[static_cast<std::size_t>(graph_.profile.last_use(t.id))].push_back(t.id);
    }
  }

  ~runner() override {
    engine_.set_advisor(nullptr);
    try {
      dev_.synchronize();
    } catch (const std::exception& e) {
      log().error("workload runner: synchronize at teardown failed: {}", e.what());
    }
    for (buffer_id& b : buffers_) {
      if (b != 0) engine_.destroy(b);
      b = 0;
    }
    for (void*& e : errors_) {
      alloc_.deallocate(e);
      e = nullptr;
    }
    for (void* p : params_) alloc_.deallocate(p);
    for (void* p : grads_) alloc_.deallocate(p);
    pool_.deallocate(staging_);
    math_.reset();  // gives back what it holds while the compute stream still exists
    dev_.destroy_stream(compute_);
  }

  // eviction_advisor: the step at which the tensor behind `id` is next read.
  std::uint64_t next_use(buffer_id id) const override {
    auto it = tensor_of_.find(id);
    if (it == tensor_of_.end()) return UINT64_MAX;
    const int next = graph_.profile.next_use_after(it->second, current_step_);
    return next < 0 ? UINT64_MAX : static_cast<std::uint64_t>(next);
  }

  run_report run() {
    run_report r;
    r.model = model_.name;
    r.device_name = dev_.name();
    r.batch = batch_;
    r.steps = opts_.steps;
    r.real_math = real_;
    r.math = math_->kind();
    r.budget_bytes = alloc_.budget();
    setup();
    plan(r);
    std::uint64_t pinned_after_first = 0;
    losses_.assign(static_cast<std::size_t>(std::max(opts_.steps, 0)), std::nanf(""));
    for (int it = 0; it < opts_.steps; ++it) {
      if (it == 1) {
        schedule_.apply_to(graph_.profile);
        plan(r);
      }
      const double t0 = dev_.host_time_ns();
      iteration(it, it + 1 == opts_.steps);
      const double t1 = dev_.host_time_ns();
      r.step_ns.push_back(t1 - t0);
      double compute = 0;
      for (const step_info& s : schedule_.steps()) compute += s.compute_ns;
      r.compute_ns.push_back(compute);
      if (it == 0) pinned_after_first = pool_.stats().num_pinned_allocs;
      trace_event boundary = trace_event::marker(event_kind::iteration, t1, trace_track::host);
      boundary.value = it;  // the iteration's index
      global_recorder().record(boundary);
    }
    engine_.synchronize();
    if (real_) r.losses = losses_;
    const allocator_stats s = alloc_.stats();
    r.peak_reserved_bytes = static_cast<std::size_t>(s.reserved_bytes.all().peak);
    r.peak_allocated_bytes = static_cast<std::size_t>(s.allocated_bytes.all().peak);
    r.swaps = engine_.stats();
    r.pinned_allocations = pool_.stats().num_pinned_allocs;
    r.pinned_allocations_after_first_step = r.pinned_allocations - pinned_after_first;
    // Layers without parameters keep no entry. Only now, after the device has run the update
    // kernels that fill the entries: compacting earlier would see every entry still empty and
    // leave the kernels writing into erased vectors.
    last_gradients_.erase(std::remove_if(last_gradients_.begin(), last_gradients_.end(),
                                         [](const std::vector<float>& v) { return v.empty(); }),
                          last_gradients_.end());
    r.last_gradients = std::move(last_gradients_);
    if (opts_.keep_tensors && real_) {
      for (std::size_t l = 0; l < params_.size(); ++l) {
        if (params_[l] == nullptr) continue;
        r.final_params.push_back(math_->read(static_cast<const float*>(params_[l]), model_.layers[l].param_elems));
      }
    }
    return r;
  }

 private:
  std::size_t bytes_of(int tensor) const {
    return graph_.profile.tensors[static_cast<std::size_t>(tensor)].bytes;
  }

  void setup() {
    const std::size_t dt = static_cast<std::size_t>(model_.dtype_bytes);
    math_->prepare();
    params_.assign(model_.layers.size(), nullptr);
    grads_.assign(model_.layers.size(), nullptr);
    for (const layer_spec& layer : model_.layers) {
      if (layer.param_elems == 0) continue;
      const std::size_t n = layer.param_elems;
      void* p = alloc_.allocate(n * dt, compute_);
      void* g = alloc_.allocate(n * dt, compute_);
      params_[static_cast<std::size_t>(layer.index)] = p;
      grads_[static_cast<std::size_t>(layer.index)] = g;
      touched_buffer t[2] = {{p, n * dt}, {g, n * dt}};
      math_->init_layer(layer, static_cast<float*>(p), static_cast<float*>(g), opts_.seed,
                        {kernel_cost{0, 2.0 * static_cast<double>(n * dt), 0}, t});
    }
    staging_ = pool_.allocate(bytes_of(graph_.input_tensor));
    dev_.synchronize();
    math_->on_synchronized();
  }

  void plan(run_report& r) {
    planner_options po;
    po.policy = opts_.policy;
    po.budget_bytes = opts_.policy == offload_policy::none
                          ? 0
                          : plannable_budget(alloc_.budget(), alloc_.expandable_segments());
    po.d2h_bandwidth = link_.d2h_bandwidth;
    po.h2d_bandwidth = link_.h2d_bandwidth;
    po.d2h_latency_ns = link_.d2h_latency_ns;
    po.h2d_latency_ns = link_.h2d_latency_ns;
    po.prefetch = opts_.prefetch;
    r.plan = plan_offload(graph_.profile, po);
    prefetch_ = std::make_unique<prefetcher>(
        graph_.profile, r.plan,
        prefetch_options{opts_.prefetch, link_.h2d_bandwidth, link_.h2d_latency_ns});
    offload_ = r.plan.offload;
  }

  // Note [Prefetching as the profile counts]
  // The prefetcher weighs a swap-in against what the steps until its use will hold, in the
  // profile's terms (Note [Held until used] in prefetcher/prefetcher.cpp), where a backward
  // step's error signals are that step's scratch. The runner allocates an error signal in the
  // step that produces it and frees it after the step that consumes it, so as a step begins
  // the allocator already holds its output's error signal, which the profile counts in the
  // step's scratch as well. Those signals are left out of what is allocated here, so that they
  // are not counted twice (VGG-16 at batch 256 on an H100 under half its peak, `auto`: 2.49x
  // counted twice, 2.42x once; pool1's output then comes back beside relu2_1's).
  //
  // A swap-in the prefetcher returns can still find no block: the budget has the bytes, the
  // cache has them only in pieces (try_allocate neither waits nor releases segments). The
  // tensor then stays on the host, and is handed back to the prefetcher to be tried again at
  // the next step, when more is free; nothing behind it goes now, since a later tensor would
  // take room that the earlier one, needed sooner, waits for (Note [Prefetch in order of need]
  // in allocator/swap_engine.cpp). Before, it came back only on demand, as its step began:
  // ResNet-50 at batch 256 on an H100 under half its peak, `auto`, 11 demand fetches in 3
  // iterations and 3.26x; retried, none and 2.83x.

  // At the start of a backward step: the swap-ins the prefetcher says are due, given what the
  // budget leaves free now.
  void issue_prefetches(int step, int layer) {
    // The room the plan was made for (Note [Plannable budget]), so that prefetches do not
    // take the slack the allocator needs for blocks that do not pack.
    const std::size_t budget =
        plannable_budget(alloc_.budget(), alloc_.expandable_segments());
    auto allocated = static_cast<std::size_t>(alloc_.stats().allocated_bytes.all().current);
    allocated -= std::min(allocated, error_bytes_);  // Note [Prefetching as the profile counts]
    const std::size_t free_budget = allocated < budget ? budget - allocated : 0;
    bool held_back = false;
    for (int t : prefetch_->issue_before(step, free_budget)) {
      const buffer_id id = buffers_[static_cast<std::size_t>(t)];
      const bool demanded = graph_.profile.first_backward_use(t) <= step;
      if (held_back && !demanded) {
        prefetch_->unissue(t);
        continue;
      }
      if (id == 0) continue;
      if (engine_.prefetch(id)) {
        global_recorder().record(trace_event::marker(event_kind::prefetch_issued, dev_.host_time_ns(),
                                                     trace_track::host, id, bytes_of(t), layer));
      } else if (const buffer_state st = engine_.state(id);
                 !demanded && (st == buffer_state::host || st == buffer_state::swapping_out)) {
        prefetch_->unissue(t);  // Note [Prefetching as the profile counts]: no block yet
        held_back = true;
      }
    }
  }

  // Swaps the tensor out if the plan offloads it, this step is its last forward use and
  // backward reads it again; a tensor already on its way is left alone.
  void swap_out_if_planned(int tensor, int step) {
    const workload_profile& p = graph_.profile;
    const buffer_id id = buffers_[static_cast<std::size_t>(tensor)];
    if (id == 0 || !offload_[static_cast<std::size_t>(tensor)]) return;
    if (p.last_forward_use(tensor) != step || p.first_backward_use(tensor) < 0) return;
    if (engine_.state(id) != buffer_state::device) return;
    engine_.swap_out(id, compute_);
  }

  // Allocates (zeroed) the error signal of `tensor` if it has none yet.
  float* error_of(int tensor) {
    void*& e = errors_[static_cast<std::size_t>(tensor)];
    if (e == nullptr) {
      const std::size_t n = bytes_of(tensor);
      e = alloc_.allocate(n, compute_);
      error_bytes_ += n;
      touched_buffer t{e, n};
      math_->zero(e, n, {kernel_cost{0, static_cast<double>(n), 0}, {&t, 1}});
    }
    return static_cast<float*>(e);
  }

  void create_tensor(int tensor, int layer) {
    const buffer_id id = engine_.create(bytes_of(tensor), compute_, layer);
    buffers_[static_cast<std::size_t>(tensor)] = id;
    tensor_of_[id] = tensor;
  }

  void destroy_tensor(int tensor) {
    buffer_id& id = buffers_[static_cast<std::size_t>(tensor)];
    if (id == 0) return;
    tensor_of_.erase(id);
    engine_.destroy(id);
    id = 0;
  }

  // Acquires a tensor for the compute stream and remembers to release it after the launch.
  float* use(int tensor, std::vector<buffer_id>& held, std::vector<touched_buffer>& touched) {
    const buffer_id id = buffers_[static_cast<std::size_t>(tensor)];
    if (id == 0) {
      throw_error(fmt::format("workload runner: tensor {} ({}) is not alive",
                              tensor, graph_.profile.tensors[static_cast<std::size_t>(tensor)].name));
    }
    void* p = engine_.acquire(id, compute_);
    held.push_back(id);
    touched.push_back({p, bytes_of(tensor)});
    return static_cast<float*>(p);
  }

  void release_all(std::vector<buffer_id>& held) {
    for (buffer_id id : held) engine_.release(id, compute_);
    held.clear();
  }

  // After a step: offload what the plan says leaves now, free what nobody needs any more.
  // Note [Live figures]: published after every step, from the figures the step just sampled;
  // the bandwidths are over the last completed iteration (the copies' own measured time).
  void publish_live_stats() {
    if (opts_.live_stats == nullptr || samples_.empty()) return;
    const memory_sample& m = samples_.back();
    const swap_stats s = engine_.stats();
    live_figures f;
    f.budget_bytes = alloc_.budget();
    f.allocated_bytes = m.allocated;
    f.reserved_bytes = m.reserved;
    f.swapped_out_bytes = s.bytes_on_host;
    f.in_flight_bytes = s.bytes_in_flight;
    f.bytes_out_total = s.bytes_out;
    f.bytes_in_total = s.bytes_in;
    f.stall_ns_total = static_cast<std::uint64_t>(s.stall_ns);
    f.stall_count = s.stalls;
    f.bandwidth_out_bytes_per_s = s.copy_out_ns > 0 ? static_cast<double>(s.bytes_out) / (s.copy_out_ns / 1e9) : 0;
    f.bandwidth_in_bytes_per_s = s.copy_in_ns > 0 ? static_cast<double>(s.bytes_in) / (s.copy_in_ns / 1e9) : 0;
    f.pinned_host_used_bytes = m.pinned;
    f.pinned_host_limit_bytes = opts_.host_limit;
    opts_.live_stats->update(f);
  }

  void after_step(int step) {
    sample_memory();
    publish_live_stats();
    if (log().should_log(spdlog::level::debug)) {
      const memory_sample& m = samples_.back();
      log().debug("runner: step {} ({} {}) allocated {} reserved {} on host {}", step,
                  graph_.profile.steps[static_cast<std::size_t>(step)].ph == phase::forward ? "forward" : "backward",
                  graph_.profile.steps[static_cast<std::size_t>(step)].layer, human_bytes(m.allocated),
                  human_bytes(m.reserved), human_bytes(m.on_host));
    }
    for (const tensor_info& t : graph_.profile.tensors) swap_out_if_planned(t.id, step);
    for (int t : release_after_[static_cast<std::size_t>(step)]) destroy_tensor(t);
  }

  // What the allocator and the pinned pool hold as each step is enqueued: the profile of
  // memory over the iteration, placed on the clock once the step times are known.
  struct memory_sample {
    std::size_t allocated, reserved, pinned, on_host;
  };
  void sample_memory() {
    const allocator_stats a = alloc_.stats();
    const external_memory_report h = engine_.memory_report();
    samples_.push_back({static_cast<std::size_t>(a.allocated_bytes.all().current),
                        static_cast<std::size_t>(a.reserved_bytes.all().current), h.pinned_used,
                        h.swapped_out});
  }
  void record_memory_counters() {
    auto& recorder = global_recorder();
    const auto& times = schedule_.step_times();
    if (recorder.enabled()) {
      for (std::size_t i = 0; i < times.size() && i < samples_.size(); ++i) {
        const memory_sample& m = samples_[i];
        recorder.record(trace_event::device_counter(times[i].end_ns, static_cast<double>(m.allocated),
                                                    static_cast<double>(m.reserved)));
        recorder.record(trace_event::host_counter(times[i].end_ns, static_cast<double>(m.pinned),
                                                  static_cast<double>(m.on_host)));
      }
    }
    samples_.clear();
  }

  void iteration(int it, bool last) {
    prefetch_->reset();
    const std::size_t dt = static_cast<std::size_t>(model_.dtype_bytes);
    // Load the batch: host data into pinned staging, then H2D into the input tensor (the
    // labels go where the training math reads them).
    math_->load_batch(opts_.seed * 1000 + static_cast<std::uint64_t>(it), static_cast<float*>(staging_));
    current_step_ = 0;
    create_tensor(graph_.input_tensor, -1);
    {
      void* in = engine_.acquire(buffers_[static_cast<std::size_t>(graph_.input_tensor)], compute_);
      dev_.copy_async(in, staging_, bytes_of(graph_.input_tensor), copy_kind::host_to_device, compute_);
      engine_.release(buffers_[static_cast<std::size_t>(graph_.input_tensor)], compute_);
    }

    std::vector<buffer_id> held;
    std::vector<touched_buffer> touched;
    for (const layer_spec& layer : model_.layers) {
      const int l = layer.index;
      const int step = graph_.forward_step(l);
      current_step_ = step;
      schedule_.begin_step(phase::forward, l);
      const int out_t = graph_.output_tensor[static_cast<std::size_t>(l)];
      create_tensor(out_t, l);
      const float* params = static_cast<const float*>(params_[static_cast<std::size_t>(l)]);
      float* loss = layer.op == layer_kind::softmax_xent ? &losses_[static_cast<std::size_t>(it)] : nullptr;
      for (const layer_part& part : parts_[static_cast<std::size_t>(l)]) {  // Note [Parts of a step]
        for (int t : part.saved) create_tensor(t, l);
        std::vector<const float*> inputs;
        for (int in : layer.inputs) inputs.push_back(use(graph_.tensor_of(in), held, touched));
        float* out = use(out_t, held, touched);
        for (int t : part.saved) use(t, held, touched);
        if (params != nullptr) touched.push_back({params, layer.param_elems * dt});
        math_->forward(layer, inputs, params, out, loss,
                       {share_of(graph_.forward_cost[static_cast<std::size_t>(l)], part.share), touched});
        release_all(held);
        touched.clear();
        for (int t : part.saved) swap_out_if_planned(t, step);
      }
      schedule_.end_step(phase::forward, l);
      after_step(step);
    }

    for (int l = graph_.layers - 1; l >= 0; --l) {
      const layer_spec& layer = model_.layers[static_cast<std::size_t>(l)];
      const int step = graph_.backward_step(l);
      current_step_ = step;
      schedule_.begin_step(phase::backward, l);
      issue_prefetches(step, l);
      const int out_t = graph_.output_tensor[static_cast<std::size_t>(l)];
      const std::vector<layer_part>& parts = parts_[static_cast<std::size_t>(l)];
      for (auto part = parts.rbegin(); part != parts.rend(); ++part) {  // Note [Parts of a step]
        std::vector<const float*> inputs;
        std::vector<float*> grad_inputs;
        for (int in : layer.inputs) {
          const int t = graph_.tensor_of(in);
          inputs.push_back(layer.backward_needs_input ? use(t, held, touched) : nullptr);
          if (t == graph_.input_tensor) {
            grad_inputs.push_back(nullptr);  // the data needs no gradient
          } else {
            float* e = error_of(t);
            grad_inputs.push_back(e);
            touched.push_back({e, bytes_of(t)});
          }
        }
        const float* out = layer.backward_needs_output ? use(out_t, held, touched) : nullptr;
        for (int t : part->saved) use(t, held, touched);
        const bool is_loss = layer.op == layer_kind::softmax_xent;
        const float* grad_out = is_loss ? nullptr : error_of(out_t);
        if (grad_out != nullptr) touched.push_back({grad_out, bytes_of(out_t)});
        const float* params = static_cast<const float*>(params_[static_cast<std::size_t>(l)]);
        float* grad_params = static_cast<float*>(grads_[static_cast<std::size_t>(l)]);
        if (params != nullptr) {
          touched.push_back({params, layer.param_elems * dt});
          touched.push_back({grad_params, layer.param_elems * dt});
        }
        math_->backward(layer, inputs, out, grad_out, params, grad_inputs, grad_params,
                        {share_of(graph_.backward_cost[static_cast<std::size_t>(l)], part->share), touched});
        release_all(held);
        touched.clear();
        for (int t : part->saved) destroy_tensor(t);  // used up: the room goes to the next part
      }
      // The output's error signal is used up.
      if (void*& e = errors_[static_cast<std::size_t>(out_t)]; e != nullptr) {
        alloc_.deallocate(e);
        e = nullptr;
        error_bytes_ -= std::min(error_bytes_, bytes_of(out_t));
      }
      schedule_.end_step(phase::backward, l);
      after_step(step);
    }

    update(last);
    schedule_.end_iteration();
    record_memory_counters();
    dev_.synchronize();  // the training loop reads its loss
    math_->on_synchronized();
    engine_.poll();
    if (opts_.device_limit != 0 && opts_.policy != offload_policy::none &&
        !alloc_.expandable_segments()) {
      alloc_.empty_cache();  // Note [A fresh cache each iteration]
    }
  }

  void update(bool last) {
    const std::size_t dt = static_cast<std::size_t>(model_.dtype_bytes);
    if (last && opts_.keep_tensors && real_) last_gradients_.assign(model_.layers.size(), {});
    for (const layer_spec& layer : model_.layers) {
      const auto l = static_cast<std::size_t>(layer.index);
      if (params_[l] == nullptr) continue;
      auto* p = static_cast<float*>(params_[l]);
      auto* g = static_cast<float*>(grads_[l]);
      const std::size_t n = layer.param_elems;
      touched_buffer t[2] = {{p, n * dt}, {g, n * dt}};
      std::vector<float>* keep = last && opts_.keep_tensors && real_ ? &last_gradients_[l] : nullptr;
      math_->update(layer, p, g, opts_.learning_rate, keep,
                    {kernel_cost{2.0 * static_cast<double>(n), 3.0 * static_cast<double>(n * dt), 0}, t});
    }
    // last_gradients_ is filled once the update work has run and the training math has been
    // told (iteration() synchronizes, then on_synchronized) before run() reads and compacts it.
  }

  device& dev_;
  const model_spec& model_;
  const runner_options opts_;
  const int batch_;
  caching_allocator alloc_;
  pinned_host_pool pool_;
  device_timeline timeline_;
  swap_engine engine_;
  stream_t compute_;
  // Declared after what it uses, so it goes before them; the destructor resets it first anyway.
  std::unique_ptr<training_math> math_;
  const bool real_;  // math_ computes: there are losses, gradients and parameters to report
  layer_schedule schedule_;
  link_figures link_;
  workload_graph graph_;
  std::unique_ptr<prefetcher> prefetch_;
  std::vector<bool> offload_;
  std::vector<std::vector<layer_part>> parts_;  // per layer, as run: at least one
  std::vector<buffer_id> buffers_;          // per tensor, this iteration; 0 = not alive
  std::unordered_map<buffer_id, int> tensor_of_;
  std::vector<void*> errors_;               // per tensor: its error signal in backward
  std::size_t error_bytes_ = 0;             // what errors_ holds now
  std::vector<std::vector<int>> release_after_;  // per step: tensors whose last use it is
  std::vector<void*> params_, grads_;       // per layer
  void* staging_ = nullptr;                 // pinned input batch
  std::vector<float> losses_;
  std::vector<std::vector<float>> last_gradients_;
  int current_step_ = 0;
  std::vector<memory_sample> samples_;
};

}  // namespace

double run_report::steady_step_ns() const {
  if (step_ns.size() <= 1) return step_ns.empty() ? 0 : step_ns[0];
  return median(std::vector<double>(step_ns.begin() + 1, step_ns.end()));
}

double run_report::steady_compute_ns() const {
  if (compute_ns.size() <= 1) return compute_ns.empty() ? 0 : compute_ns[0];
  return median(std::vector<double>(compute_ns.begin() + 1, compute_ns.end()));
}

run_report run_workload(device& dev, const model_spec& model, const runner_options& options) {
  if (options.steps < 1) {
    throw_config_error("steps", std::to_string(options.steps), "an integer >= 1");
  }
  runner r(dev, model, options);
  return r.run();
}

}  // namespace gpuswap
