// CUDA runtime helpers for host code: checked calls and a guard that binds the calling thread to a device.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "error.hpp"

namespace deepep {

// Maps a CUDA status to an Error. A missing driver or device is deepepNoDevice, so that callers can tell
// "this machine has no GPU" from a failure.
[[noreturn]] void fail_cuda(cudaError_t status, const char* expression, const char* file, int line);

#define DEEPEP_CUDA_CHECK(expr)                                                                        \
  do {                                                                                                 \
    const cudaError_t deepep_status_ = (expr);                                                         \
    if (deepep_status_ != cudaSuccess) ::deepep::fail_cuda(deepep_status_, #expr, __FILE__, __LINE__); \
  } while (0)

// Makes `device` current for the scope and restores the previous device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// Lets `kernel` launch with `bytes` of dynamic shared memory on `device` (the current device), opting in past the
// default 48 KiB once per kernel and device; throws deepepNotSupported naming `what` when the device allows less.
void allow_dynamic_shared_memory(const void* kernel, size_t bytes, int device, const char* what);

// Number of CUDA devices; throws deepepNoDevice when there is no driver or no device.
int device_count();

}  // namespace deepep
