#include "tools/bench_alloc.hpp"

#include <fmt/format.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <random>

#if defined(__x86_64__)
#include <x86intrin.h>
#endif

#include "allocator/caching_allocator.hpp"
#include "core/errors.hpp"
#include "core/fast_clock.hpp"
#include "device/sim_device.hpp"
#include "profiler/event_recorder.hpp"

namespace gpuswap {
namespace {

// One replay of the pattern: N allocations in order, then frees in `order`.
struct pattern {
  std::vector<std::size_t> sizes;
  std::vector<std::size_t> order;  // a permutation of [0, N)
};

pattern make_pattern(std::size_t live, const alloc_bench_options& o) {
  std::mt19937_64 rng(o.seed + live);
  std::uniform_int_distribution<std::size_t> size(o.min_size, o.max_size);
  pattern p;
  p.sizes.resize(live);
  for (std::size_t& s : p.sizes) s = size(rng);
  p.order.resize(live);
  std::iota(p.order.begin(), p.order.end(), std::size_t{0});
  std::shuffle(p.order.begin(), p.order.end(), rng);
  return p;
}

double thread_cpu_ns() {
  timespec t{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) * 1e9 + static_cast<double>(t.tv_nsec);
}

struct timing {
  double wall_ns;
  double cpu_ns;
};

// Runs the pattern once through `alloc`/`release`; returns ns per pair. `ptrs` is scratch.
template <typename Alloc, typename Release>
timing replay(const pattern& p, std::vector<void*>& ptrs, Alloc&& alloc, Release&& release) {
  const std::size_t n = p.sizes.size();
  ptrs.assign(n, nullptr);
  const double cpu_start = thread_cpu_ns();
  const auto start = std::chrono::steady_clock::now();
  for (std::size_t i = 0; i < n; ++i) ptrs[i] = alloc(p.sizes[i]);
  for (std::size_t i : p.order) release(ptrs[i]);
  const auto stop = std::chrono::steady_clock::now();
  const double cpu_stop = thread_cpu_ns();
  for (void* q : ptrs) {
    if (q == nullptr) throw_out_of_memory("gpuswap bench alloc: an allocation failed");
  }
  const auto pairs = static_cast<double>(n);
  return {std::chrono::duration<double, std::nano>(stop - start).count() / pairs,
          (cpu_stop - cpu_start) / pairs};
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t m = v.size() / 2;
  return v.size() % 2 == 1 ? v[m] : (v[m - 1] + v[m]) / 2;
}

// A phantom device with room for the whole pattern at its peak, with every size rounded up
// to a 2 MiB segment's worth of slack.
std::unique_ptr<sim_device> phantom_device(const pattern& p) {
  const std::size_t bytes = std::accumulate(p.sizes.begin(), p.sizes.end(), std::size_t{0});
  sim_options o;
  o.preset = "bench";
  o.backing = sim_backing::phantom;
  o.device_capacity = (bytes + p.sizes.size() * 1024) * 2 + (std::size_t{1} << 30);
  o.host_capacity = std::size_t{1} << 20;
  return std::make_unique<sim_device>(o);
}

// (median of a / b) - 1, in percent: each repetition's run against its own baseline run.
double overhead_pct(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> ratio(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) ratio[i] = b[i] > 0 ? a[i] / b[i] : 1.0;
  return (median(std::move(ratio)) - 1.0) * 100.0;
}

// Note [Clock reads]
// The "on, wall" column costs more than a clock read's latency, and this shows why. Each clock
// is read in two loops of 100,000 iterations, timed by thread CPU time, median of 5: back to
// back (its cost alone), and each read right after a load from a random line of a 64 MiB array
// that the read does not depend on. Without the read, those loads overlap (a few ns an
// iteration); a read that waits for the loads before it makes each iteration wait for its miss.
// "after a miss" is the second loop minus the same loop without the read: what a read costs a
// thread whose misses are in flight, as the allocator's are (its pipelined frees prefetch ahead,
// Note [Pipelined frees] in allocator/caching_allocator.cpp). On the development VM (KVM) a bare
// rdtsc waits as the fenced one does.
volatile std::uint64_t clock_sink = 0;

template <typename Read>
double ns_per_read_alone(Read&& read) {
  constexpr int reads = 100'000;
  std::vector<double> runs;
  for (int r = 0; r < 5; ++r) {
    std::uint64_t sum = 0;
    const double start = thread_cpu_ns();
    for (int i = 0; i < reads; ++i) sum += read();
    runs.push_back((thread_cpu_ns() - start) / reads);
    clock_sink = sum;
  }
  return median(std::move(runs));
}

struct miss_loop {
  std::vector<std::uint64_t> lines;  // 64 MiB: misses the core's caches
  std::vector<std::uint32_t> order;  // the line (as an index into lines) each iteration loads
};

miss_loop make_miss_loop() {
  constexpr std::size_t words = (std::size_t{64} << 20) / sizeof(std::uint64_t);
  constexpr std::size_t words_per_line = 64 / sizeof(std::uint64_t);
  miss_loop m;
  m.lines.assign(words, 1);
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<std::size_t> line(0, words / words_per_line - 1);
  m.order.resize(100'000);
  for (std::uint32_t& i : m.order) i = static_cast<std::uint32_t>(line(rng) * words_per_line);
  return m;
}

template <typename Read>
double ns_per_iteration_after_miss(const miss_loop& m, Read&& read) {
  std::vector<double> runs;
  for (int r = 0; r < 5; ++r) {
    std::uint64_t sum = 0;
    const double start = thread_cpu_ns();
    for (std::uint32_t i : m.order) {
      sum += m.lines[i];
      sum += read();
    }
    runs.push_back((thread_cpu_ns() - start) / static_cast<double>(m.order.size()));
    clock_sink = sum;
  }
  return median(std::move(runs));
}

}  // namespace

std::vector<clock_read_cost> measure_clock_reads() {
  const miss_loop m = make_miss_loop();
  const double loop_alone = ns_per_read_alone([] { return std::uint64_t{0}; });
  const double loop_after_miss = ns_per_iteration_after_miss(m, [] { return std::uint64_t{0}; });
  std::vector<clock_read_cost> out;
  auto measure = [&](const char* name, auto read) {
    out.push_back({name, ns_per_read_alone(read) - loop_alone,
                   ns_per_iteration_after_miss(m, read) - loop_after_miss});
  };
  measure("steady_clock", [] {
    return static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  });
  measure("fast_clock", [] { return static_cast<std::uint64_t>(fast_clock_ns()); });
#if defined(__x86_64__)
  measure("lfence+rdtsc", [] {
    _mm_lfence();
    return static_cast<std::uint64_t>(__rdtsc());
  });
  measure("rdtsc", [] { return static_cast<std::uint64_t>(__rdtsc()); });
  measure("rdtscp", [] {
    unsigned aux = 0;
    return static_cast<std::uint64_t>(__rdtscp(&aux));
  });
#endif
  return out;
}

// Note [Tracing overhead]
// The targets (off < 1%, on < 10% of the hot path) are finer than the difference between two
// allocator instances: their block objects, index and rings sit at different addresses, and
// that alone moved the figure by +-10% when each mode had its own allocator. So one allocator
// replays the pattern in all three modes, switching with set_trace_hooks and
// recorder.enable between replays (every block is free then), and each repetition's ratio
// compares runs seconds apart on the same memory. Each timed replay follows an untimed one in
// its own mode, so that it starts from the caches its own mode leaves behind (for "on", rings
// just written), as every iteration of a training loop after the first does. What "on" costs
// the allocating thread is the recording; collecting is trace_output's drain thread's work,
// so the bench collects only after the timed replay. "No hooks" still tests the hooks_ flag (one
// predictable branch); what it removes is everything the hooks do.
//
// The rings hold a whole replay (up to 4 MiB at 100,000 live blocks), which a traced program
// does not have: it has rings of the default 16,384 events, which trace_output's thread drains
// every 10 ms. At this loop's rate (an event every 30-50 ns) such a ring fills in under a
// millisecond, so a bench run that way needs a drain every few thousand calls to drop nothing.
// Measured so: default rings, the clocks stopped every 4,096 calls while another thread
// collected (sleeping on a futex in between), "on" came out +9..17 / +16..24 / +6..24% at
// 1,000 / 10,000 / 100,000 live blocks in six runs, against +11..13 / +18..20 / +5..9% in three
// runs between them with replay-sized rings: no better, noisier (the drain thread shares the
// two cores with the loop); collecting on the timed thread itself was worse (+18..28% at
// 10,000, +19..35% at 100,000). A training loop allocates a thousand times less often, and
// between two of its calls other work evicts the ring's lines either way. So the rings stay
// replay-sized.

void alloc_bench_options::validate() const {
  if (live_counts.empty()) {
    throw_config_error("live_counts", "", "one or more counts of live blocks, each >= 1");
  }
  for (std::size_t n : live_counts) {
    if (n == 0 || n > 10'000'000) {
      throw_config_error("live_counts", std::to_string(n), "1 to 10,000,000 live blocks");
    }
  }
  if (min_size == 0 || min_size > max_size) {
    throw_config_error("min_size", std::to_string(min_size), "1 to max_size bytes");
  }
  if (max_size > (std::size_t{1} << 30)) {
    throw_config_error("max_size", std::to_string(max_size), "min_size to 1 GiB");
  }
  if (repetitions < 1 || repetitions > 1000) {
    throw_config_error("repetitions", std::to_string(repetitions), "1 to 1000");
  }
}

std::vector<alloc_bench_result> run_alloc_bench(const alloc_bench_options& options) {
  options.validate();
  std::vector<alloc_bench_result> results;
  for (std::size_t live : options.live_counts) {
    const pattern p = make_pattern(live, options);
    std::vector<void*> ptrs;

    // One gpuswap allocator for the three tracing modes (Note [Tracing overhead]). Its
    // recorder's rings hold one replay's events (an alloc and a free per block, plus segment
    // maps), so that "on" measures recording, not dropping.
    auto cached_dev = phantom_device(p);
    event_recorder recorder(2 * live + 4096);
    caching_allocator_options cached_opts;
    cached_opts.recorder = &recorder;
    caching_allocator cached(*cached_dev, cached_opts);
    const stream_t stream = cached_dev->default_stream();
    auto passthrough_dev = phantom_device(p);

    enum class mode { no_hooks, trace_off, trace_on, trace_on_wall_clock };
    std::uint64_t dropped = 0;
    std::uint64_t events = 0;
    auto run_gpuswap = [&](mode m) {
      const bool on = m == mode::trace_on || m == mode::trace_on_wall_clock;
      cached.set_trace_hooks(m != mode::no_hooks);
      cached_dev->set_wall_clock_timestamps(m == mode::trace_on_wall_clock);
      recorder.enable(on);
      auto once = [&] {
        return replay(
            p, ptrs, [&](std::size_t n) { return cached.allocate(n, stream); },
            [&](void* q) { cached.deallocate(q); });
      };
      // Outside the timed loop. After the untimed replay the rings are only emptied (clear()
      // reads each record's tag, for the stream changes, and builds nothing); after the timed
      // one they are collected.
      // Collecting copies and sorts every event, and doing that right before a timed replay
      // would start it on caches the collector filled, which in a traced program happens on
      // trace_output's drain thread, not on the allocating one (Note [Tracing overhead]).
      auto drain = [&](bool timed) {
        if (!on) return;
        if (timed) {
          dropped += recorder.dropped();
          events = recorder.collect().size();
        }
        recorder.clear();
      };
      // An untimed replay in the same mode first, so that each timed one starts from the
      // state its own mode leaves (its rings included): the steady state of a training loop,
      // not whatever the previous mode or the malloc run left in the caches.
      once();
      drain(false);
      const timing t = once();
      drain(true);
      recorder.enable(false);
      cached_dev->set_wall_clock_timestamps(false);
      return t;
    };
    auto run_malloc = [&] {
      return replay(
          p, ptrs, [](std::size_t n) { return std::malloc(n); }, [](void* q) { std::free(q); });
    };
    auto run_passthrough = [&] {
      return replay(
          p, ptrs, [&](std::size_t n) { return passthrough_dev->allocate_device(n); },
          [&](void* q) { passthrough_dev->free_device(q); });
    };

    // Warm-up (run_gpuswap has its own), then the timed repetitions interleaved so that drift
    // in the machine's state (frequency, other load) falls on all alike.
    run_malloc();
    run_passthrough();
    dropped = 0;
    // The four tracing modes run back to back in a rotating order, forwards and backwards in
    // turn, so that none always runs first, or always after the same one.
    constexpr int modes = 4;
    std::vector<double> g, m, d, gc, mc, dc, b, bc, t, tc, w, wc;
    for (int r = 0; r < options.repetitions; ++r) {
      timing by_mode[modes]{};
      for (int i = 0; i < modes; ++i) {
        const int k = (r / 2 + (r % 2 == 0 ? i : modes - 1 - i)) % modes;
        by_mode[k] = run_gpuswap(static_cast<mode>(k));
      }
      const timing tb = by_mode[static_cast<int>(mode::no_hooks)];
      const timing tg = by_mode[static_cast<int>(mode::trace_off)];
      const timing tt = by_mode[static_cast<int>(mode::trace_on)];
      const timing tw = by_mode[static_cast<int>(mode::trace_on_wall_clock)];
      w.push_back(tw.wall_ns);
      wc.push_back(tw.cpu_ns);
      const timing tm = run_malloc();
      const timing td = run_passthrough();
      g.push_back(tg.wall_ns);
      gc.push_back(tg.cpu_ns);
      b.push_back(tb.wall_ns);
      bc.push_back(tb.cpu_ns);
      t.push_back(tt.wall_ns);
      tc.push_back(tt.cpu_ns);
      m.push_back(tm.wall_ns);
      mc.push_back(tm.cpu_ns);
      d.push_back(td.wall_ns);
      dc.push_back(td.cpu_ns);
    }
    alloc_bench_result row{live, median(g), median(m), median(d), median(gc), median(mc),
                           median(dc)};
    row.no_hooks_ns = median(b);
    row.traced_ns = median(t);
    row.no_hooks_cpu_ns = median(bc);
    row.traced_cpu_ns = median(tc);
    row.trace_off_overhead_pct = overhead_pct(g, b);
    row.trace_on_overhead_pct = overhead_pct(t, b);
    row.trace_off_overhead_cpu_pct = overhead_pct(gc, bc);
    row.trace_on_overhead_cpu_pct = overhead_pct(tc, bc);
    row.traced_wall_clock_ns = median(w);
    row.traced_wall_clock_cpu_ns = median(wc);
    row.trace_on_wall_clock_overhead_pct = overhead_pct(w, b);
    row.trace_on_wall_clock_overhead_cpu_pct = overhead_pct(wc, bc);
    row.traced_events = events;
    row.trace_dropped = dropped;
    results.push_back(row);
  }
  return results;
}

namespace {

nlohmann::json results_json(const alloc_bench_options& options,
                            const std::vector<alloc_bench_result>& results) {
  nlohmann::json rows = nlohmann::json::array();
  for (const alloc_bench_result& r : results) {
    rows.push_back({{"live", r.live},
                    {"gpuswap_ns", r.gpuswap_ns},
                    {"malloc_ns", r.malloc_ns},
                    {"passthrough_ns", r.passthrough_ns},
                    {"gpuswap_cpu_ns", r.gpuswap_cpu_ns},
                    {"malloc_cpu_ns", r.malloc_cpu_ns},
                    {"passthrough_cpu_ns", r.passthrough_cpu_ns},
                    {"no_hooks_ns", r.no_hooks_ns},
                    {"traced_ns", r.traced_ns},
                    {"no_hooks_cpu_ns", r.no_hooks_cpu_ns},
                    {"traced_cpu_ns", r.traced_cpu_ns},
                    {"trace_off_overhead_pct", r.trace_off_overhead_pct},
                    {"trace_on_overhead_pct", r.trace_on_overhead_pct},
                    {"trace_off_overhead_cpu_pct", r.trace_off_overhead_cpu_pct},
                    {"trace_on_overhead_cpu_pct", r.trace_on_overhead_cpu_pct},
                    {"traced_wall_clock_ns", r.traced_wall_clock_ns},
                    {"traced_wall_clock_cpu_ns", r.traced_wall_clock_cpu_ns},
                    {"trace_on_wall_clock_overhead_pct", r.trace_on_wall_clock_overhead_pct},
                    {"trace_on_wall_clock_overhead_cpu_pct",
                     r.trace_on_wall_clock_overhead_cpu_pct},
                    {"traced_events", r.traced_events},
                    {"trace_dropped", r.trace_dropped}});
  }
  return {{"pattern",
           "random allocations (RMM): N allocations, sizes uniform in [min_size, "
           "max_size], freed in random order"},
          {"min_size", options.min_size},
          {"max_size", options.max_size},
          {"repetitions", options.repetitions},
          {"seed", options.seed},
          {"unit", "ns per alloc+free pair (median); *_ns wall-clock, *_cpu_ns thread CPU time"},
          {"gpuswap", "caching_allocator on a phantom sim_device"},
          {"passthrough", "sim_device allocate_device/free_device, no caching"},
          {"tracing",
           "one caching_allocator replays in three modes: gpuswap_* = trace off (hooks "
           "present, recorder disabled); no_hooks_* = set_trace_hooks(false); traced_* = "
           "recorder enabled, timestamps from the simulator's modelled clock; "
           "traced_wall_clock_* = the same with host-clock timestamps (core/fast_clock), as "
           "on a GPU. "
           "*_overhead_pct: median over repetitions of (run / no-hooks run of the same "
           "repetition) - 1, in percent"},
          {"trace_off_overhead_target_pct", trace_off_overhead_target_pct},
          {"trace_on_overhead_target_pct", trace_on_overhead_target_pct},
          {"results", std::move(rows)}};
}

}  // namespace

nlohmann::json to_json(const alloc_bench_options& options,
                       const std::vector<alloc_bench_result>& results,
                       const std::vector<clock_read_cost>& clocks) {
  nlohmann::json out = results_json(options, results);
  if (!clocks.empty()) {
    nlohmann::json reads = nlohmann::json::array();
    for (const clock_read_cost& c : clocks) {
      reads.push_back(
          {{"clock", c.clock}, {"alone_ns", c.alone_ns}, {"after_miss_ns", c.after_miss_ns}});
    }
    out["clock_reads"] = std::move(reads);
    out["clock_reads_method"] =
        "ns per read, thread CPU time, median of 5 loops of 100,000: alone_ns back to back; "
        "after_miss_ns each read after an independent load from a random line of a 64 MiB "
        "array, minus the same loop without the read";
  }
  return out;
}

std::string format_alloc_bench_table(const std::vector<alloc_bench_result>& results,
                                     const std::vector<clock_read_cost>& clocks) {
  std::string out = fmt::format("ns per alloc+free pair, median (wall-clock | thread CPU)\n");
  out += fmt::format("{:>8}  {:>10} {:>10} {:>11}  {:>10} {:>10} {:>11}\n", "live", "gpuswap",
                     "malloc", "passthrough", "gpuswap", "malloc", "passthrough");
  for (const alloc_bench_result& r : results) {
    out += fmt::format("{:>8}  {:>10.1f} {:>10.1f} {:>11.1f}  {:>10.1f} {:>10.1f} {:>11.1f}\n",
                       r.live, r.gpuswap_ns, r.malloc_ns, r.passthrough_ns, r.gpuswap_cpu_ns,
                       r.malloc_cpu_ns, r.passthrough_cpu_ns);
  }
  out += fmt::format(
      "\ntracing overhead on the gpuswap hot path vs no hooks, thread CPU ns per pair "
      "(median); % = median of paired ratios, CPU (wall); targets: off < {:.0f}%, on < {:.0f}%\n",
      trace_off_overhead_target_pct, trace_on_overhead_target_pct);
  out += fmt::format("{:>8}  {:>9} {:>9} {:>9} {:>9}  {:>17} {:>17} {:>17} {:>8}\n", "live",
                     "no hooks", "trace off", "trace on", "on, wall", "off %", "on %",
                     "on, wall %", "dropped");
  for (const alloc_bench_result& r : results) {
    out += fmt::format(
        "{:>8}  {:>9.1f} {:>9.1f} {:>9.1f} {:>9.1f}  {:>7.2f}% ({:>6.2f}%) {:>7.2f}% ({:>6.2f}%) "
        "{:>7.2f}% ({:>6.2f}%) {:>8}\n",
        r.live, r.no_hooks_cpu_ns, r.gpuswap_cpu_ns, r.traced_cpu_ns, r.traced_wall_clock_cpu_ns,
        r.trace_off_overhead_cpu_pct, r.trace_off_overhead_pct, r.trace_on_overhead_cpu_pct,
        r.trace_on_overhead_pct, r.trace_on_wall_clock_overhead_cpu_pct,
        r.trace_on_wall_clock_overhead_pct, r.trace_dropped);
  }
  out += "on: timestamps from the simulator's modelled clock (free to read); on, wall: from "
         "the host clock that every traced call reads on a GPU (core/fast_clock)\n";
  if (!clocks.empty()) {
    out += "\nhost clock, ns per read (thread CPU, median): alone | after a load that misses the "
           "cache, as on the hot path\n";
    for (const clock_read_cost& c : clocks) {
      out += fmt::format("{:>14}  {:>7.1f} | {:>7.1f}{}\n", c.clock, c.alone_ns, c.after_miss_ns,
                         c.clock == "fast_clock" ? "   <- on, wall" : "");
    }
  }
  return out;
}

}  // namespace gpuswap
