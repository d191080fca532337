// The routing of a high-throughput dispatch, kept for combine and cached dispatches.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "deepep/deepep.h"

struct deepepComm;

namespace deepep {

constexpr int kMaxNvlRanks = 8;    // ranks of one NVLink domain the intranode kernels serve
constexpr int kMaxBlocks = 160;    // num_sms limit (one block per SM)
constexpr int kRoutingTile = 256;  // tokens per block of the routing kernels (one thread each)

// Host-visible results of a count exchange (mapped pinned memory, written by the notify kernel).
struct HandleHostInfo {
  int64_t num_recv_tokens;
  int32_t recv_tokens_per_expert[DEEPEP_MAX_LOCAL_EXPERTS];
  uint64_t ticket;  // the notify's or a reporting dispatch's (each has its own slot): stored last, after a system fence
};

}  // namespace deepep

struct deepepHandle {
  deepepComm* comm = nullptr;
  // The communicator's device and rank count (kept: the handle may outlive its communicator).
  int device = -1;
  int nranks = 0;
  int64_t max_tokens = 0;

  // What the routing in the device arrays describes (host copies, set by notify / worst-case dispatch).
  bool routed = false;               // send-side routing computed
  bool dispatched = false;           // a dispatch ran on that routing: combine reads the receive ranges it wrote
  bool recv_counts_on_host = false;  // host->num_recv_tokens is valid
  int64_t num_tokens = 0;
  int num_experts = 0;
  int expert_alignment = 1;
  int num_sms = 0;

  // Device arrays, one allocation (see deepepHandleCreate), and the event recorded after each call that uses them.
  void* device_storage = nullptr;
  cudaEvent_t last_use = nullptr;
  bool used_in_capture = false;      // a captured graph may use the storage at any time: destroy waits for the device
  int32_t* send_pos = nullptr;       // [max_tokens, R]: row of token t in rank d's receive order, -1 if not sent
  int32_t* send_counts = nullptr;    // [R]: tokens sent to each rank
  int32_t* expert_counts = nullptr;  // [R * max local experts]: this rank's tokens per expert
  int32_t* send_ranges = nullptr;    // [R][kMaxBlocks][2]: (first row, rows) each block sends to each rank
  int32_t* recv_ranges = nullptr;    // [R][kMaxBlocks][2]: (first row, rows) each block receives from each rank
  int32_t* recv_counts = nullptr;    // [R]: rows received from each rank
  int32_t* recv_expert_counts = nullptr;  // [max local experts]: rows received for each local expert (unaligned)
  int32_t* tile_counts = nullptr;         // [ceil(max_tokens / kRoutingTile), R]: scratch of the routing kernels
  uint32_t* routing_ticket = nullptr;     // routing tiles finished (0 between calls)
  int32_t* routing_faults = nullptr;      // 1 when this call's routing skipped ids out of range (recorded)
  // Cleared with routing_faults (the next word) by every routing. Set by a worst-case dispatch whose counts step failed
  // (a rank refused it: that rank + 1; the ranks disagreed, or a wait timed out: -1): no rank moved rows or wrote
  // receive ranges, so a combine of this routing moves and waits for none, and says so (combine_kernel).
  int32_t* dispatch_failed = nullptr;
  // The seq of the collective operation that routed the handle (its count exchange, or the worst-case dispatch that
  // made it), written by that operation's kernel: a cached dispatch and a combine compare it across ranks, so that
  // ranks passing the handles of different dispatches get an error (intranode.cu, routing_pair).
  uint32_t* routing_op = nullptr;
  int64_t* num_recv_device = nullptr;

  deepep::HandleHostInfo host_info = {};  // receive counts of the last notify (valid when recv_counts_on_host)
  uint64_t report_ticket = 0;             // of the last dispatch, when it reports its counts and they are uncollected
  int64_t report_rows = 0;                // rows that dispatch's outputs hold

  // The stream captures that used the handle (check_capture_use in api_ht.cpp): a graph's replays read the device
  // routing and, where the capture routed the handle, write it again, while the host fields above are those that the
  // calls set when they were made.
  unsigned long long capture_id = 0;          // the last capture that used the handle (0: none did)
  bool several_captures = false;              // more than one capture used it
  unsigned long long routing_capture_id = 0;  // the capture whose dispatch routed it (0: routed outside every one)
};
