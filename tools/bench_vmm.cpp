#include "tools/bench_vmm.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <vector>

#include "core/errors.hpp"
#include "core/human_bytes.hpp"
#include "device/sim_device.hpp"

namespace gpuswap {

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

char* at(void* base, std::size_t offset) { return static_cast<char*>(base) + offset; }

}  // namespace

void vmm_bench_options::validate() const {
  if (pages < 1 || pages > 65'536) {
    throw_config_error("pages", std::to_string(pages), "1 to 65536 pages");
  }
  if (repetitions < 1 || repetitions > 1000) {
    throw_config_error("repetitions", std::to_string(repetitions), "1 to 1000");
  }
}

vmm_bench_result run_vmm_bench(device& dev, const vmm_bench_options& options) {
  options.validate();
  vmm_bench_result r;
  r.device = dev.name();
  r.modelled = dynamic_cast<sim_device*>(&dev) != nullptr;
  r.page_bytes = dev.vm_page_size();
  if (r.page_bytes == 0) {
    throw_error(fmt::format("bench vmm: {} has no virtual memory management", r.device));
  }
  // At most a quarter of the device's memory, so that other users keep theirs.
  const std::size_t fit = dev.memory().total_bytes / 4 / r.page_bytes;
  r.pages = std::max<std::size_t>(1, std::min(options.pages, fit));
  const std::size_t span = r.pages * r.page_bytes;
  void* base = dev.reserve_address_range(span);
  if (base == nullptr) {
    throw_error(fmt::format("bench vmm: {} could not reserve {}", r.device, human_bytes(span)));
  }
  std::vector<double> map_all, unmap_all, map_one, unmap_one;
  try {
    for (int rep = 0; rep < options.repetitions; ++rep) {
      double t0 = dev.host_time_ns();
      if (!dev.map_pages(base, span)) {
        throw_error(fmt::format("bench vmm: {} could not map {}", r.device, human_bytes(span)));
      }
      double t1 = dev.host_time_ns();
      dev.unmap_pages(base, span);
      double t2 = dev.host_time_ns();
      map_all.push_back(t1 - t0);
      unmap_all.push_back(t2 - t1);

      t0 = dev.host_time_ns();
      for (std::size_t p = 0; p < r.pages; ++p) {
        if (!dev.map_pages(at(base, p * r.page_bytes), r.page_bytes)) {
          dev.unmap_pages(base, p * r.page_bytes);
          throw_error(fmt::format("bench vmm: {} could not map page {}", r.device, p));
        }
      }
      t1 = dev.host_time_ns();
      for (std::size_t p = 0; p < r.pages; ++p) {
        dev.unmap_pages(at(base, p * r.page_bytes), r.page_bytes);
      }
      t2 = dev.host_time_ns();
      map_one.push_back((t1 - t0) / static_cast<double>(r.pages));
      unmap_one.push_back((t2 - t1) / static_cast<double>(r.pages));
    }
  } catch (...) {
    dev.release_address_range(base, span);
    throw;
  }
  dev.release_address_range(base, span);
  r.map_all_ns = median(map_all);
  r.unmap_all_ns = median(unmap_all);
  r.map_one_ns = median(map_one);
  r.unmap_one_ns = median(unmap_one);
  return r;
}

nlohmann::json to_json(const vmm_bench_result& r) {
  return {{"device", r.device},         {"modelled", r.modelled},
          {"page_bytes", r.page_bytes}, {"pages", r.pages},
          {"map_all_ns", r.map_all_ns}, {"unmap_all_ns", r.unmap_all_ns},
          {"map_one_ns", r.map_one_ns}, {"unmap_one_ns", r.unmap_one_ns}};
}

std::string format_vmm_bench(const vmm_bench_result& r) {
  const double n = static_cast<double>(r.pages);
  return fmt::format(
      "gpuswap bench vmm: {}{}\n"
      "  page {}, {} pages ({})\n"
      "  map   {} pages in one call  {:10.1f} us  ({:.2f} us a page)\n"
      "  unmap {} pages in one call  {:10.1f} us  ({:.2f} us a page)\n"
      "  map   one page a call      {:10.2f} us a call\n"
      "  unmap one page a call      {:10.2f} us a call\n",
      r.device, r.modelled ? " (modelled: the simulator's sim_options::vm_* estimates)" : "",
      human_bytes(r.page_bytes), r.pages, human_bytes(r.pages * r.page_bytes), r.pages,
      r.map_all_ns / 1e3, r.map_all_ns / 1e3 / n, r.pages, r.unmap_all_ns / 1e3,
      r.unmap_all_ns / 1e3 / n, r.map_one_ns / 1e3, r.unmap_one_ns / 1e3);
}

}  // namespace gpuswap
