#pragma once
// Captures what a test's code writes to a file descriptor (stdout, stderr), including writes
// that bypass iostreams.
#include <unistd.h>

#include <cstdio>
#include <string>

namespace gpuswap::testing_support {

// Redirects one file descriptor (1 or 2) into a temporary file for its lifetime, so that
// writes that bypass iostreams (fwrite, write) are caught too.
class fd_capture {
 public:
  explicit fd_capture(int fd) : fd_(fd), file_(std::tmpfile()) {
    std::fflush(nullptr);
    saved_ = ::dup(fd_);
    ::dup2(::fileno(file_), fd_);
  }
  ~fd_capture() {
    restore();
    if (file_ != nullptr) std::fclose(file_);
  }
  fd_capture(const fd_capture&) = delete;
  fd_capture& operator=(const fd_capture&) = delete;

  // Stops capturing and returns everything written meanwhile.
  std::string finish() {
    restore();
    std::string out;
    std::rewind(file_);
    char buffer[4096];
    std::size_t n = 0;
    while ((n = std::fread(buffer, 1, sizeof buffer, file_)) > 0) out.append(buffer, n);
    return out;
  }

 private:
  void restore() {
    if (saved_ < 0) return;
    std::fflush(nullptr);
    ::dup2(saved_, fd_);
    ::close(saved_);
    saved_ = -1;
  }

  int fd_;
  std::FILE* file_;
  int saved_ = -1;
};

}  // namespace gpuswap::testing_support
