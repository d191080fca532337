// A collective call that refuses its own arguments on this rank still ends on every rank.
#pragma once

#include <cuda_runtime.h>

#include <exception>

namespace deepep {

// When the scope of a collective call is left by an exception before its kernel was launched (launched() not
// called), runs `refuse`, which launches this rank's side of the call moving no data (deepepRefuseCall,
// deepepLowLatencyRefuseCall), so that the other ranks finish it at once instead of waiting for this one until the
// timeout. Nothing inside a stream capture (nothing would run now), and no error of its own: the refusal's is the one
// the caller gets.
template <class Refuse>
class RefusalOnThrow {
 public:
  RefusalOnThrow(cudaStream_t stream, Refuse refuse)
      : stream_(stream), refuse_(refuse), exceptions_(std::uncaught_exceptions()) {}
  RefusalOnThrow(const RefusalOnThrow&) = delete;
  RefusalOnThrow& operator=(const RefusalOnThrow&) = delete;
  ~RefusalOnThrow() {
    if (launched_ || std::uncaught_exceptions() <= exceptions_) return;
    try {
      cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
      if (cudaStreamIsCapturing(stream_, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone) {
        cudaGetLastError();
        return;
      }
      refuse_();
    } catch (...) {
      cudaGetLastError();
    }
  }
  void launched() { launched_ = true; }

 private:
  cudaStream_t stream_;
  Refuse refuse_;
  int exceptions_;  // in flight when the call began (none: the C ABI is entered from C)
  bool launched_ = false;
};

}  // namespace deepep
