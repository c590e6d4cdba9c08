#pragma once
// Which CUDA errors mean "this process cannot use a GPU here" (no driver, no device, a stub
// library, a driver too old) as opposed to a GPU that misbehaves: the first become
// no_cuda_device, the second device_error. Shared by cuda_device and the kernels' launchers.
// device/ only: it includes the CUDA runtime's header.
#include <cuda_runtime.h>

namespace gpuswap {

inline bool cuda_means_no_device(cudaError_t status) noexcept {
  switch (status) {
    case cudaErrorInsufficientDriver:
    case cudaErrorNoDevice:
    case cudaErrorInvalidDevice:
    case cudaErrorDevicesUnavailable:
    case cudaErrorSystemDriverMismatch:
    case cudaErrorCompatNotSupportedOnDevice:
    case cudaErrorStubLibrary:
    case cudaErrorInitializationError:
    case cudaErrorSystemNotReady:
    case cudaErrorDeviceNotLicensed:
    case cudaErrorCallRequiresNewerDriver:
      return true;
    default:
      return false;
  }
}

}  // namespace gpuswap
