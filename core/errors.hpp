#pragma once
// gpuswap's exception hierarchy. Each kind is thrown from exactly one function below, so that
// messages stay uniform and a breakpoint on that function catches every throw of the kind.
//
//   std::runtime_error
//     gpuswap::error                 anything gpuswap reports that is not an allocation failure
//       gpuswap::config_error        a bad GPUSWAP_CONF key or value (names key, value, accepted)
//       gpuswap::device_error        a failed device call (names the call and the backend's error)
//         gpuswap::no_cuda_device    no driver or no GPU: callers may fall back to the simulator
//   std::bad_alloc
//     gpuswap::out_of_memory         an allocation that cannot be served, with the figures
//
// out_of_memory derives from std::bad_alloc alone (not from gpuswap::error) so that
// `catch (const std::exception&)` stays unambiguous and code written for operator new's failure
// handles it; this is what RMM does too.
#include <new>
#include <stdexcept>
#include <string>
#include <string_view>

namespace gpuswap {

class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class config_error : public error {
 public:
  config_error(std::string key, std::string value, std::string message);
  const std::string& key() const noexcept { return key_; }
  const std::string& value() const noexcept { return value_; }

 private:
  std::string key_;
  std::string value_;
};

class device_error : public error {
 public:
  device_error(std::string call, std::string error_name, std::string message);
  // The device call that failed, e.g. "cudaMemcpyAsync".
  const std::string& call() const noexcept { return call_; }
  // The backend's name for the error, e.g. "cudaErrorInvalidValue" or "sim_fault_injected".
  const std::string& error_name() const noexcept { return error_name_; }

 private:
  std::string call_;
  std::string error_name_;
};

class no_cuda_device : public device_error {
 public:
  using device_error::device_error;
};

class out_of_memory : public std::bad_alloc {
 public:
  explicit out_of_memory(std::string message) : message_(std::move(message)) {}
  const char* what() const noexcept override { return message_.c_str(); }

 private:
  std::string message_;
};

// The single throw site of each kind.
[[noreturn]] void throw_error(std::string message);
[[noreturn]] void throw_config_error(std::string_view key, std::string_view value,
                                     std::string_view accepted, std::string_view problem = {});
[[noreturn]] void throw_device_error(std::string_view call, std::string_view error_name,
                                     std::string_view detail);
[[noreturn]] void throw_no_cuda_device(std::string_view call, std::string_view error_name,
                                       std::string_view detail);
[[noreturn]] void throw_out_of_memory(std::string message);

}  // namespace gpuswap
