// The host-visible record of a fault found on the device. It lives in mapped pinned memory so the host can read it
// while kernels run; the first fault wins and later ones are dropped (the first is the cause, the rest follow).
#pragma once

#include <cstdint>

#include "deepep/deepep.h"

namespace deepep {

enum class Phase : int32_t {
  kNone = 0,
  kLayout = 1,
  kDispatchNotify = 2,
  kDispatch = 3,
  kCombine = 4,
  kRouting = 5,
  kLowLatencyDispatch = 6,
  kLowLatencyCombine = 7,
  kMeasurement = 8,
};

inline const char* phase_name(int32_t phase) {
  switch (static_cast<Phase>(phase)) {
    case Phase::kNone:
      return "none";
    case Phase::kLayout:
      return "dispatch layout";
    case Phase::kDispatchNotify:
      return "dispatch notify (count exchange)";
    case Phase::kDispatch:
      return "dispatch";
    case Phase::kCombine:
      return "combine";
    case Phase::kRouting:
      return "dispatch routing";
    case Phase::kLowLatencyDispatch:
      return "low-latency dispatch";
    case Phase::kLowLatencyCombine:
      return "low-latency combine";
    case Phase::kMeasurement:
      return "measurement (diagnostic)";
  }
  return "unknown phase";
}

// AsyncErrorRecord::detail of a peer whose call lays out the rows it exchanges otherwise than this rank's (value: the
// layout word it sent).
constexpr int64_t kDetailPeerLayout = -2;
// AsyncErrorRecord::detail of a peer that refused the call (deepepRefuseCall): its host raised the error.
constexpr int64_t kDetailPeerRefused = -3;
// AsyncErrorRecord::detail of a combine whose handle's worst-case dispatch failed (peer: the rank that refused that
// dispatch, or -1): it moved no rows.
constexpr int64_t kDetailDispatchFailed = -4;
// AsyncErrorRecord::detail of a low-latency dispatch whose source routed with another number of experts per rank
// (value: the source's): its tokens were left out.
constexpr int64_t kDetailPeerExperts = -5;
// AsyncErrorRecord::detail of a high-throughput dispatch or combine whose peer passed the handle of another dispatch
// than this rank's (value: the operations that routed the two handles, the peer's << 32 | this rank's): its rows
// were left out.
constexpr int64_t kDetailPeerRouting = -6;
// AsyncErrorRecord::detail of a high-throughput combine whose peer sent fewer rows than this rank's handle expects from
// it, with handles of the same routing (value: the rows expected at least): its rows were left out.
constexpr int64_t kDetailPeerFewerRows = -7;

struct AsyncErrorRecord {
  int32_t code;    // deepepResult_t; 0 while nothing happened
  int32_t rank;    // the rank that saw the fault
  int32_t phase;   // Phase
  int32_t peer;    // the peer waited for, or -1
  int64_t detail;  // e.g. the flat index of an out-of-range expert id
  int64_t value;   // e.g. the offending value
};

#ifdef __CUDACC__
// Records a fault once. Safe from any thread of any block; later faults leave the first record intact.
__device__ inline void record_async_error(AsyncErrorRecord* record, deepepResult_t code, int rank, Phase phase,
                                          int peer, int64_t detail, int64_t value) {
  // Claim with a CAS to -1 ("being written"), fill the details, then publish the code after a system fence: a host
  // that reads a positive code also reads the details that go with it. The host treats -1 as "not yet published".
  if (atomicCAS(reinterpret_cast<int*>(&record->code), 0, -1) == 0) {
    record->rank = rank;
    record->phase = static_cast<int32_t>(phase);
    record->peer = peer;
    record->detail = detail;
    record->value = value;
    __threadfence_system();
    atomicExch(reinterpret_cast<int*>(&record->code), static_cast<int>(code));
  }
}
#endif

}  // namespace deepep
