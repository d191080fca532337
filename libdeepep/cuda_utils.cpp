#include "cuda_utils.hpp"

namespace deepep {

void fail_cuda(cudaError_t status, const char* expression, const char* file, int line) {
  const bool no_device = status == cudaErrorNoDevice || status == cudaErrorInsufficientDriver ||
                         status == cudaErrorInvalidDevice || status == cudaErrorStubLibrary;
  cudaGetLastError();  // clear the sticky-free error so later calls on this thread start clean
  fail(no_device ? deepepNoDevice : deepepCudaError, "%s failed: %s (%s) at %s:%d", expression,
       cudaGetErrorString(status), cudaGetErrorName(status), file, line);
}

DeviceGuard::DeviceGuard(int device) {
  DEEPEP_CUDA_CHECK(cudaGetDevice(&previous_));
  if (previous_ != device) DEEPEP_CUDA_CHECK(cudaSetDevice(device));
}

DeviceGuard::~DeviceGuard() {
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
}

int device_count() {
  int count = 0;
  DEEPEP_CUDA_CHECK(cudaGetDeviceCount(&count));
  if (count == 0) fail(deepepNoDevice, "no CUDA device is visible to this process");
  return count;
}

}  // namespace deepep
