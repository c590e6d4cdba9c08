// bench_vmm on the simulator: its figures are the model's vm_* costs, per call and per page.
#include "tools/bench_vmm.hpp"

#include <gtest/gtest.h>

#include "core/errors.hpp"
#include "device/sim_device.hpp"

namespace gpuswap {
namespace {

TEST(BenchVmm, reports_the_simulators_modelled_costs) {
  sim_options o;
  o.backing = sim_backing::phantom;
  o.device_capacity = std::size_t{1} << 30;
  o.vm_call_ns = 3'000;
  o.vm_map_ns_per_page = 700;
  o.vm_unmap_ns_per_page = 300;
  sim_device dev(o);
  vmm_bench_options opts;
  opts.pages = 64;
  opts.repetitions = 3;
  const vmm_bench_result r = run_vmm_bench(dev, opts);
  EXPECT_TRUE(r.modelled);
  EXPECT_EQ(r.page_bytes, o.vm_page_size);
  EXPECT_EQ(r.pages, 64u);
  EXPECT_DOUBLE_EQ(r.map_all_ns, 3'000 + 64 * 700);
  EXPECT_DOUBLE_EQ(r.unmap_all_ns, 3'000 + 64 * 300);
  EXPECT_DOUBLE_EQ(r.map_one_ns, 3'000 + 700);
  EXPECT_DOUBLE_EQ(r.unmap_one_ns, 3'000 + 300);
  EXPECT_EQ(dev.counters().vm_mapped, 0u) << "everything unmapped at the end";
  EXPECT_NE(format_vmm_bench(r).find("modelled"), std::string::npos);
  EXPECT_EQ(to_json(r)["pages"], 64);
}

TEST(BenchVmm, a_device_without_virtual_memory_is_a_clear_error) {
  sim_options o;
  o.vm_page_size = 0;
  sim_device dev(o);
  EXPECT_THROW(run_vmm_bench(dev, vmm_bench_options{}), error);
}

TEST(BenchVmm, at_most_a_quarter_of_the_device) {
  sim_options o;
  o.backing = sim_backing::phantom;
  o.device_capacity = std::size_t{64} << 20;
  sim_device dev(o);
  vmm_bench_options opts;
  opts.repetitions = 1;
  EXPECT_EQ(run_vmm_bench(dev, opts).pages, 8u) << "16 MiB of a 64 MiB device, in 2 MiB pages";
}

}  // namespace
}  // namespace gpuswap
