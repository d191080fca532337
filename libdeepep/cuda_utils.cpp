#include "cuda_utils.hpp"

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

namespace deepep {

void fail_cuda(cudaError_t status, const char* expression, const char* file, int line) {
  const bool no_device = status == cudaErrorNoDevice || status == cudaErrorInsufficientDriver ||
                         status == cudaErrorInvalidDevice || status == cudaErrorStubLibrary;
  cudaGetLastError();  // clear the sticky-free error so later calls on this thread start clean
  const deepepResult_t code = no_device                             ? deepepNoDevice
                              : status == cudaErrorMemoryAllocation ? deepepOutOfMemory
                                                                    : deepepCudaError;
  fail(code, "%s failed: %s (%s) at %s:%d", expression, cudaGetErrorString(status), cudaGetErrorName(status), file,
       line);
}

DeviceGuard::DeviceGuard(int device) {
  DEEPEP_CUDA_CHECK(cudaGetDevice(&previous_));
  if (previous_ != device) DEEPEP_CUDA_CHECK(cudaSetDevice(device));
}

DeviceGuard::~DeviceGuard() {
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
}

void allow_dynamic_shared_memory(const void* kernel, size_t bytes, int device, const char* what) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> allowed;  // (kernel, device) -> dynamic bytes known to launch
  std::lock_guard<std::mutex> lock(mutex);
  size_t& current = allowed[{kernel, device}];
  if (current >= bytes) return;
  // Without an opt-in a launch may ask for 48 KB less the kernel's static shared memory, not 48 KB.
  cudaFuncAttributes attributes{};
  DEEPEP_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  if (bytes > static_cast<size_t>(attributes.maxDynamicSharedSizeBytes)) {
    int limit = 0;
    DEEPEP_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    if (attributes.sharedSizeBytes + bytes > static_cast<size_t>(limit)) {
      fail(deepepNotSupported,
           "%s needs %zu bytes of shared memory per block (and the kernel %zu of its own); device %d allows %d in all",
           what, bytes, attributes.sharedSizeBytes, device, limit);
    }
    DEEPEP_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  current = bytes;
}

int device_count() {
  int count = 0;
  DEEPEP_CUDA_CHECK(cudaGetDeviceCount(&count));
  if (count == 0) fail(deepepNoDevice, "no CUDA device is visible to this process");
  return count;
}

float median_event_ms(cudaStream_t stream, int warmup, int passes, const std::function<void()>& enqueue) {
  struct Events {  // destroyed on every path out
    cudaEvent_t start = nullptr, stop = nullptr;
    ~Events() {
      if (start != nullptr) cudaEventDestroy(start);
      if (stop != nullptr) cudaEventDestroy(stop);
    }
  } events;
  DEEPEP_CUDA_CHECK(cudaEventCreate(&events.start));
  DEEPEP_CUDA_CHECK(cudaEventCreate(&events.stop));
  std::vector<float> times;
  for (int run = 0; run < warmup + passes; ++run) {
    DEEPEP_CUDA_CHECK(cudaEventRecord(events.start, stream));
    enqueue();
    DEEPEP_CUDA_CHECK(cudaEventRecord(events.stop, stream));
    DEEPEP_CUDA_CHECK(cudaEventSynchronize(events.stop));
    float ms = 0.f;
    DEEPEP_CUDA_CHECK(cudaEventElapsedTime(&ms, events.start, events.stop));
    if (run >= warmup) times.push_back(ms);
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace deepep
