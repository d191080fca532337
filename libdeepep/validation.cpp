#include "validation.hpp"

#include <cuda_runtime.h>

#include <atomic>
#include <cstdio>

#include "cuda_utils.hpp"

namespace deepep {

namespace {
thread_local bool checking_in_capture = false;
}  // namespace

CaptureScope::CaptureScope(cudaStream_t stream) : previous_(checking_in_capture) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
    cudaGetLastError();  // an invalid stream is reported by the launch itself
    status = cudaStreamCaptureStatusNone;
  }
  capturing_ = status == cudaStreamCaptureStatusActive;
  checking_in_capture = capturing_;
}

CaptureScope::~CaptureScope() { checking_in_capture = previous_; }

void require_not_capturing(cudaStream_t stream, const char* what, const char* why) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  DEEPEP_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) fail(deepepInvalidUsage, "%s cannot be captured%s", what, why);
}

void check_device_array(const deepepComm& comm, const void* pointer, size_t bytes, size_t alignment, const char* name) {
  if (bytes == 0) return;
  DEEPEP_REQUIRE(bytes <= kMaxDeviceBytes,
                 "%s would span more than %zu bytes, more than any GPU holds: its row count, row stride or size is "
                 "out of range",
                 name, kMaxDeviceBytes);
  DEEPEP_REQUIRE(pointer != nullptr, "%s is NULL but must hold %zu bytes", name, bytes);
  DEEPEP_REQUIRE(reinterpret_cast<uintptr_t>(pointer) % alignment == 0, "%s (%p) is not aligned to %zu bytes", name,
                 pointer, alignment);
  cudaPointerAttributes attributes = {};
  const cudaError_t status = cudaPointerGetAttributes(&attributes, pointer);
  if (status != cudaSuccess) {
    cudaGetLastError();
    fail(deepepInvalidArgument, "%s (%p) is not memory CUDA knows: %s", name, pointer, cudaGetErrorString(status));
  }
  if (attributes.type == cudaMemoryTypeManaged) return;
  // A graph allocation of the capture, not mapped yet: no query tells it from host memory (deepep.h, Conventions).
  if (attributes.type == cudaMemoryTypeUnregistered && checking_in_capture) return;
  if (attributes.type != cudaMemoryTypeDevice) {
    fail(deepepInvalidArgument, "%s (%p) is %s memory; it must be device memory on device %d", name, pointer,
         attributes.type == cudaMemoryTypeHost ? "pinned host" : "unregistered host", comm.device);
  }
  if (attributes.device != comm.device) {
    fail(deepepInvalidArgument, "%s (%p) lives on device %d but the communicator uses device %d", name, pointer,
         attributes.device, comm.device);
  }
}

// What an asynchronous error record's detail names (the peer, the value), after "rank r found <error> in <phase>: ".
static void describe_detail(const volatile AsyncErrorRecord* record, char* text, size_t size) {
  const long long value = record->value;
  if (record->detail == kDetailPeerRefused) {
    // A high-throughput combine's or cached dispatch's peer also says so when its handle's worst-case dispatch
    // failed (combine_kernel, dispatch_kernel).
    const bool handle_call = record->phase == static_cast<int32_t>(Phase::kCombine) ||
                             record->phase == static_cast<int32_t>(Phase::kDispatch);
    std::snprintf(text, size,
                  "rank %d refused the call (bad input there%s: see the error it raised), so no rows moved between "
                  "them",
                  record->peer, handle_call ? ", or a handle whose worst-case dispatch failed" : "");
  } else if (record->detail == kDetailDispatchFailed) {
    char cause[64] = "the ranks disagreed on it or timed out";
    if (record->peer >= 0) std::snprintf(cause, sizeof(cause), "rank %d refused it", record->peer);
    std::snprintf(text, size,
                  "the worst-case dispatch that routed its handle failed (%s: see the error recorded then), so no "
                  "rows moved and the output is not written; route the handle again",
                  cause);
  } else if (record->detail == kDetailPeerExperts) {
    std::snprintf(text, size,
                  "rank %d routed it with %lld experts per rank, another num_experts than this rank's (the ranks "
                  "must agree on it); its tokens were left out, so none of this call's outputs here are valid",
                  record->peer, value);
  } else if (record->detail == kDetailPeerRouting) {
    std::snprintf(text, size,
                  "rank %d passed the handle of another dispatch (routed by the communicator's operation %llu there, "
                  "%llu here; every rank must pass its handle of the same dispatch); its rows were left out, so none "
                  "of this call's outputs here are valid",
                  record->peer, static_cast<unsigned long long>(value) >> 32,
                  static_cast<unsigned long long>(value) & 0xffffffffu);
  } else if (record->detail == kDetailPeerFewerRows) {
    std::snprintf(text, size,
                  "rank %d sent fewer rows than this rank's handle expects from it (at least %lld in one block; the "
                  "ranks must pass their handles of the same dispatch, and a rank that refused the dispatch must "
                  "refuse its combine too); its rows were left out, so none of this call's outputs here are valid",
                  record->peer, value);
  } else if (record->detail == kDetailPeerLayout) {
    std::snprintf(text, size,
                  "rank %d called it with rows laid out otherwise (layout word %#llx; the ranks must agree on top-k "
                  "and hidden, and in a dispatch on the FP8 options); its rows were left out, and as it wrote them at "
                  "its own offsets, none of this call's outputs here are valid",
                  record->peer, static_cast<unsigned long long>(value));
  } else {
    std::snprintf(text, size, "entry %lld has value %lld (peer %d)", static_cast<long long>(record->detail), value,
                  record->peer);
  }
}

deepepResult_t read_async_error(const deepepComm& comm, std::string* message) {
  const volatile AsyncErrorRecord* record = comm.async_error;
  const int32_t code = record->code;
  if (code <= 0) return deepepSuccess;  // nothing, or a record still being written (published on a later read)
  // The kernel writes the details before the code: read them after it (a weakly ordered host such as Arm could
  // otherwise see the code with older details).
  std::atomic_thread_fence(std::memory_order_acquire);
  const auto found = static_cast<deepepResult_t>(code);
  char text[512];
  if (found == deepepTimeout) {
    std::snprintf(text, sizeof(text), "rank %d timed out in %s waiting for rank %d", record->rank,
                  phase_name(record->phase), record->peer);
  } else if (found == deepepBufferTooSmall) {
    std::snprintf(text, sizeof(text), "rank %d in %s: %lld rows arrive but the outputs hold %lld", record->rank,
                  phase_name(record->phase), static_cast<long long>(record->detail),
                  static_cast<long long>(record->value));
  } else {
    char detail[448];
    describe_detail(record, detail, sizeof(detail));
    std::snprintf(text, sizeof(text), "rank %d found %s in %s: %s", record->rank, deepepGetErrorString(found),
                  phase_name(record->phase), detail);
  }
  *message = std::string("asynchronous error: ") + text;
  return found;
}

void raise_async_error(const deepepComm& comm) {
  std::string message;
  const deepepResult_t found = read_async_error(comm, &message);
  if (found != deepepSuccess) throw Error(found, message);
}

}  // namespace deepep
