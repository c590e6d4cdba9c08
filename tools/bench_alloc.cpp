#include "tools/bench_alloc.hpp"

#include <fmt/format.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <random>

#include "allocator/caching_allocator.hpp"
#include "core/errors.hpp"
#include "device/sim_device.hpp"

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

}  // namespace

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

    auto cached_dev = phantom_device(p);
    caching_allocator cached(*cached_dev, {});
    const stream_t stream = cached_dev->default_stream();
    auto passthrough_dev = phantom_device(p);

    auto run_gpuswap = [&] {
      return replay(
          p, ptrs, [&](std::size_t n) { return cached.allocate(n, stream); },
          [&](void* q) { cached.deallocate(q); });
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

    // Warm-up, then the timed repetitions interleaved so that drift in the machine's state
    // (frequency, other load) falls on all three alike.
    run_gpuswap();
    run_malloc();
    run_passthrough();
    std::vector<double> g, m, d, gc, mc, dc;
    for (int r = 0; r < options.repetitions; ++r) {
      const timing tg = run_gpuswap();
      const timing tm = run_malloc();
      const timing td = run_passthrough();
      g.push_back(tg.wall_ns);
      gc.push_back(tg.cpu_ns);
      m.push_back(tm.wall_ns);
      mc.push_back(tm.cpu_ns);
      d.push_back(td.wall_ns);
      dc.push_back(td.cpu_ns);
    }
    results.push_back(alloc_bench_result{live, median(g), median(m), median(d), median(gc),
                                         median(mc), median(dc)});
  }
  return results;
}

nlohmann::json to_json(const alloc_bench_options& options,
                       const std::vector<alloc_bench_result>& results) {
  nlohmann::json rows = nlohmann::json::array();
  for (const alloc_bench_result& r : results) {
    rows.push_back({{"live", r.live},
                    {"gpuswap_ns", r.gpuswap_ns},
                    {"malloc_ns", r.malloc_ns},
                    {"passthrough_ns", r.passthrough_ns},
                    {"gpuswap_cpu_ns", r.gpuswap_cpu_ns},
                    {"malloc_cpu_ns", r.malloc_cpu_ns},
                    {"passthrough_cpu_ns", r.passthrough_cpu_ns}});
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
          {"results", std::move(rows)}};
}

std::string format_alloc_bench_table(const std::vector<alloc_bench_result>& results) {
  std::string out = fmt::format("ns per alloc+free pair, median (wall-clock | thread CPU)\n");
  out += fmt::format("{:>8}  {:>10} {:>10} {:>11}  {:>10} {:>10} {:>11}\n", "live", "gpuswap",
                     "malloc", "passthrough", "gpuswap", "malloc", "passthrough");
  for (const alloc_bench_result& r : results) {
    out += fmt::format("{:>8}  {:>10.1f} {:>10.1f} {:>11.1f}  {:>10.1f} {:>10.1f} {:>11.1f}\n",
                       r.live, r.gpuswap_ns, r.malloc_ns, r.passthrough_ns, r.gpuswap_cpu_ns,
                       r.malloc_cpu_ns, r.passthrough_cpu_ns);
  }
  return out;
}

}  // namespace gpuswap
