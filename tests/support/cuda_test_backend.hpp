#pragma once
// The CUDA backend for typed conformance suites: a cuda_device when a GPU can be used, else
// nullptr with the reason, which the suites turn into a visible GTEST_SKIP.
#include <memory>
#include <string>

#include "device/device_factory.hpp"

namespace gpuswap::testing_support {

struct cuda_test_backend {
  static constexpr const char* name = "cuda";
  static constexpr bool has_bytes = true;
  static std::unique_ptr<device> make(std::string* why) {
    if (!cuda_available(why)) return nullptr;
    device_request r;
    r.backend = backend_choice::cuda;
    return make_device(r);
  }
};

}  // namespace gpuswap::testing_support
