#pragma once
// The read-back side of the NVTX test tool (tests/profiler/nvtx_injection.cpp), for test
// programs that have NVTX load it (NVTX_INJECTION64_PATH set before the first NVTX call) and
// then check what it logged. Needs GPUSWAP_NVTX_INJECTION_PATH (tests/CMakeLists.txt defines it
// where the tool is built).
#include <dlfcn.h>

#include <cstddef>
#include <cstdlib>

#include <nlohmann/json.hpp>

#include "profiler/nvtx_registry.hpp"

#ifdef GPUSWAP_NVTX_INJECTION_PATH

namespace gpuswap::testing_support {

struct nvtx_test_tool {
  void* handle = nullptr;
  char* (*log_json)() = nullptr;
  std::size_t (*live_heaps)() = nullptr;
  std::size_t (*live_regions)() = nullptr;

  // The copy NVTX loaded; null when NVTX did not load the tool (or it lacks an entry point).
  static const nvtx_test_tool* get() {
    static const nvtx_test_tool tool = [] {
      (void)get_nvtx_registry();  // the first NVTX call: loads the tool, if any
      nvtx_test_tool t;
      t.handle = ::dlopen(GPUSWAP_NVTX_INJECTION_PATH, RTLD_NOW | RTLD_NOLOAD);
      if (t.handle != nullptr) {
        t.log_json = reinterpret_cast<char* (*)()>(::dlsym(t.handle, "gpuswap_nvtx_log_json"));
        t.live_heaps =
            reinterpret_cast<std::size_t (*)()>(::dlsym(t.handle, "gpuswap_nvtx_live_heaps"));
        t.live_regions =
            reinterpret_cast<std::size_t (*)()>(::dlsym(t.handle, "gpuswap_nvtx_live_regions"));
      }
      return t;
    }();
    const bool complete = tool.handle != nullptr && tool.log_json != nullptr &&
                          tool.live_heaps != nullptr && tool.live_regions != nullptr;
    return complete ? &tool : nullptr;
  }

  // Every call the tool received so far, in order.
  nlohmann::json log() const {
    char* text = log_json();
    nlohmann::json j = nlohmann::json::parse(text);
    std::free(text);
    return j;
  }
  // The entries after the first `from` (tests slice the log rather than clear it, so that the
  // once-per-process registrations stay visible to every test).
  nlohmann::json log_since(std::size_t from) const {
    nlohmann::json all = log();
    nlohmann::json out = nlohmann::json::array();
    for (std::size_t i = from; i < all.size(); ++i) out.push_back(all[i]);
    return out;
  }
  std::size_t log_size() const { return log().size(); }
};

}  // namespace gpuswap::testing_support

#endif  // GPUSWAP_NVTX_INJECTION_PATH
