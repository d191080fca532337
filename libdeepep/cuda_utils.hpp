// CUDA runtime helpers for host code: checked calls and a guard that binds the calling thread to a device.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <functional>
#include <utility>

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

// Makes `device`'s primary context current for the scope, and afterwards the context that was current before: the very
// context, or none where none was. Restoring "the previous device" instead would create device 0's primary context (a
// few hundred MB on GPU 0) in a thread that had none current, since cudaGetDevice answers 0 there: in every rank's
// process of a C caller whose worker threads never chose a device. Constructed before an entry point's first runtime
// call, which would otherwise bind the runtime's default device in such a thread.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  bool restore_context_ = false;      // previous_context_ is to be made current again
  void* previous_context_ = nullptr;  // a CUcontext, or null for none
  bool restore_device_ = false;       // a driver without the context entry points: the runtime's device instead
  int previous_device_ = -1;
};

// Lets `kernel` launch with `bytes` of dynamic shared memory on `device` (the current device), opting in once per
// kernel and device past what it may ask for without (48 KiB less its static shared memory); throws
// deepepNotSupported naming `what` when the device allows less.
void allow_dynamic_shared_memory(const void* kernel, size_t bytes, int device, const char* what);

// `value` rounded up to a multiple of `alignment` (> 0), on the host or the device.
__host__ __device__ constexpr size_t align_up(size_t value, size_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

// Rows in the communication buffers (the dispatch's and the combine's regions, the low-latency receive slots) start on
// 128-byte lines, so that a warp's 512-byte store to a peer covers whole 32-byte sectors: with rows at a 16-byte
// offset the BF16 and FP8 dispatches at N = 4096 took 2-5 % longer (docs/performance.md).
constexpr size_t kRowAlignment = 128;

// Number of CUDA devices; throws deepepNoDevice when there is no driver or no device.
int device_count();

// Diagnostics: the median milliseconds that the work `enqueue` puts on `stream` takes, timed with events over `passes`
// runs (> 0) after `warmup` untimed ones; each run is waited for.
float median_event_ms(cudaStream_t stream, int warmup, int passes, const std::function<void()>& enqueue);

// Launches `kernel` on `stream`. `early`: it may start before the kernel ahead of it on the stream has finished
// (programmatic dependent launch), so that its blocks are resident when that kernel ends instead of launching only
// then; such a kernel must call wait_for_previous_grid (device_utils.cuh) before it touches anything, except where
// the kernel ahead is launch_clear_counts' (a plain launch, so what came before it is done): then only the arrays it
// clears wait. `cooperative`: all blocks resident at once.
// Unlike a <<<>>> launch followed by cudaGetLastError, the status is this launch's alone, not an error an earlier
// call on the thread (the application's) left behind. try_launch_kernel returns it, launch_kernel throws it.
template <typename... Params, typename... Args>
cudaError_t try_launch_kernel(void (*kernel)(Params...), int blocks, int threads, size_t shared, cudaStream_t stream,
                              bool early, bool cooperative, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  cudaLaunchAttribute attributes[2] = {};
  unsigned count = 0;
  if (early) {
    attributes[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[count++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cooperative) {
    attributes[count].id = cudaLaunchAttributeCooperative;
    attributes[count++].val.cooperative = 1;
  }
  config.attrs = attributes;
  config.numAttrs = count;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), int blocks, int threads, size_t shared, cudaStream_t stream, bool early,
                   bool cooperative, Args&&... args) {
  DEEPEP_CUDA_CHECK(
      try_launch_kernel(kernel, blocks, threads, shared, stream, early, cooperative, std::forward<Args>(args)...));
}

}  // namespace deepep
