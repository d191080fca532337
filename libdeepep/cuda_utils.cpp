#include "cuda_utils.hpp"

#include <cuda.h>

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

namespace {

// The driver calls DeviceGuard needs, reached through the runtime (the library does not link libcuda); all null where
// the driver does not give them.
struct ContextCalls {
  CUresult (*get_current)(CUcontext*) = nullptr;
  CUresult (*set_current)(CUcontext) = nullptr;
  CUresult (*device_of_ordinal)(CUdevice*, int) = nullptr;
  CUresult (*retain_primary)(CUcontext*, CUdevice) = nullptr;
};

void* driver_entry_point(const char* name) {
  void* function = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  const cudaError_t status = cudaGetDriverEntryPointByVersion(name, &function, 7000, cudaEnableDefault, &found);
  cudaGetLastError();
  return status == cudaSuccess && found == cudaDriverEntryPointSuccess ? function : nullptr;
}

const ContextCalls& context_calls() {
  static const ContextCalls calls = [] {
    ContextCalls found;
    void* get_current = driver_entry_point("cuCtxGetCurrent");
    void* set_current = driver_entry_point("cuCtxSetCurrent");
    void* device_of_ordinal = driver_entry_point("cuDeviceGet");
    void* retain_primary = driver_entry_point("cuDevicePrimaryCtxRetain");
    if (get_current != nullptr && set_current != nullptr && device_of_ordinal != nullptr && retain_primary != nullptr) {
      found.get_current = reinterpret_cast<CUresult (*)(CUcontext*)>(get_current);
      found.set_current = reinterpret_cast<CUresult (*)(CUcontext)>(set_current);
      found.device_of_ordinal = reinterpret_cast<CUresult (*)(CUdevice*, int)>(device_of_ordinal);
      found.retain_primary = reinterpret_cast<CUresult (*)(CUcontext*, CUdevice)>(retain_primary);
    }
    return found;
  }();
  return calls;
}

// The primary context of `device` (the one the runtime uses there), retained once for the process; null where the
// driver cannot give it.
CUcontext primary_context(int device) {
  static std::mutex mutex;
  static std::map<int, CUcontext> retained;
  const ContextCalls& calls = context_calls();
  if (calls.retain_primary == nullptr) return nullptr;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = retained.find(device);
  if (found != retained.end()) return found->second;
  CUdevice handle = 0;
  CUcontext context = nullptr;
  if (calls.device_of_ordinal(&handle, device) != CUDA_SUCCESS ||
      calls.retain_primary(&context, handle) != CUDA_SUCCESS)
    return nullptr;
  retained.emplace(device, context);
  return context;
}

}  // namespace

DeviceGuard::DeviceGuard(int device) {
  // From the driver's current context, not from cudaGetDevice: the runtime linked here keeps a per-thread device of
  // its own, which stays `device` in a thread this guard left with no context, and answers 0 in a thread that never
  // had one.
  const ContextCalls& calls = context_calls();
  const CUcontext target = primary_context(device);
  CUcontext current = nullptr;
  if (target != nullptr && calls.get_current(&current) == CUDA_SUCCESS) {
    if (current == target) return;
    const CUresult status = calls.set_current(target);
    if (status != CUDA_SUCCESS) {
      fail(deepepCudaError, "making device %d's primary context current failed (CUDA driver error %d)", device,
           static_cast<int>(status));
    }
    previous_context_ = current;
    restore_context_ = true;
    return;
  }
  DEEPEP_CUDA_CHECK(cudaGetDevice(&previous_device_));  // a driver without the entry points
  if (previous_device_ == device) return;
  DEEPEP_CUDA_CHECK(cudaSetDevice(device));
  restore_device_ = true;
}

DeviceGuard::~DeviceGuard() {
  if (restore_context_) {
    context_calls().set_current(static_cast<CUcontext>(previous_context_));  // the very context, or none
  } else if (restore_device_) {
    cudaSetDevice(previous_device_);
  }
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
