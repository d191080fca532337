// Low-latency dispatch and combine: the layout of the low-latency area of the communication buffer, and the
// launchers (arguments already validated by api_ll.cpp).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "deepep/deepep.h"

struct deepepComm;

namespace deepep {

constexpr int kLowLatencySets = 2;
// Low-latency kernels run one block per SM, on every rank the same number of blocks (the smallest SM count among
// the ranks, agreed at setup), and every block signals on its own: the flags below have a word per sending block.
constexpr int kMaxLowLatencyBlocks = 160;

// Byte layout of the low-latency area, identical on every rank (it follows from the config). Offsets are from the
// area's start, which lies `ll_offset` bytes into every rank's communication buffer:
//   state            LowLatencyState, local to the rank (peers never touch it)
//   acks             uint64 [set][R][kMaxLowLatencyBlocks]: the last operation on the set that block b of rank s
//                    finished (written by that block)
//   dispatch flags   uint64 [set][R][kMaxLowLatencyBlocks]: (seq << 32) | the call's options | tokens (see
//                    dispatch_flag_word), written by block b of source rank s after its share of the token rows and ids
//   combine flags    uint64 [set][R][kMaxLowLatencyBlocks]: (seq << 32) | hidden and top-k (combine_flag_word),
//                    written by block b of rank s after its share of the rows of this rank's tokens
//   mask             uint32 [R]: 1 for a rank masked out of low-latency calls (local; see deepepCommLowLatencyMaskRank)
//   dispatch mask    uint32 [set][R]: 1 for a rank masked when the set's last dispatch was sent, which its combine
//                    leaves out (local; written by the dispatch's send)
//   round words      uint64 [R][kMaxLowLatencyBlocks]: (epoch << 32) | round, written by block b of rank s in
//                    deepepCommMeasureFlagRound (no call reads them)
//   set 0, set 1     each: receive region, E_loc * R * T rows: a dispatch receives into its first R * T rows
//                    ([source][token], one row per token that names an expert here, however many it names), and the
//                    same bytes are the combine buffer [E_loc][R*T][H] BF16 of the zero-copy combine, and where a
//                    combine copies its rows for NVSHMEM puts; then combine rows [T][K] BF16 [H]; then send rows [T]
//                    (a dispatch's cast rows, staged in symmetric memory for NVSHMEM puts); then ids [R][T][K] int32
//                    (every source token's expert ids, -1 for none); then send ids [T][K] (this rank's, staged for
//                    NVSHMEM puts)
struct LowLatencyArea {
  int64_t max_tokens = 0;  // T; 0: no area
  int max_hidden = 0;
  int max_topk = 0;
  int max_local_experts = 0;
  size_t ack_offset = 0;
  size_t dispatch_flags_offset = 0;
  size_t combine_flags_offset = 0;
  size_t mask_offset = 0;           // [R] uint32
  size_t dispatch_mask_offset = 0;  // [set][R] uint32
  size_t round_words_offset = 0;
  size_t control_bytes = 0;        // everything before set 0 (zeroed at setup)
  size_t receive_bytes = 0;        // per set
  size_t combine_rows_offset = 0;  // from the set's start
  size_t combine_rows_bytes = 0;   // per set
  size_t send_rows_offset = 0;     // from the set's start
  size_t send_rows_bytes = 0;      // per set
  size_t ids_offset = 0;           // from the set's start: [R][T][K] int32, then [R] int32 experts per rank
  size_t send_ids_offset = 0;      // from the set's start
  size_t set_bytes = 0;
  size_t total_bytes = 0;
};

// The area `config` asks for on `nranks` ranks (all zero when low_latency_max_tokens is 0). Throws for a config
// whose numbers cannot describe one.
LowLatencyArea low_latency_area(const deepepConfig& config, int nranks);

// Byte layout of one dispatched row in a receive slot: payload (FP8 bytes or BF16), then float32 scales (FP8 only).
struct LowLatencyRow {
  size_t payload_bytes = 0;
  size_t scales_offset = 0;
  size_t row_bytes = 0;
};
LowLatencyRow low_latency_row(int hidden, bool fp8);

// The number of blocks of every low-latency kernel on ranks whose smallest SM count is `min_sm_count`.
int low_latency_blocks(int min_sm_count);

// The table of buffer bases the low-latency kernels store through ([nranks], device memory): a peer's NVLink address,
// or nullptr for a peer reached through NVSHMEM (outside the NVLink domain, or every peer with
// DEEPEP_LL_TRANSPORT_NVSHMEM). This rank's own entry is always its buffer.
std::vector<void*> low_latency_direct_table(const deepepComm& comm, int transport);

void launch_low_latency_dispatch(const deepepComm& comm, const deepepLowLatencyDispatchArgs& args, cudaStream_t stream);
void launch_low_latency_combine(const deepepComm& comm, const deepepLowLatencyCombineArgs& args, cudaStream_t stream);
// This rank's side of a low-latency dispatch (or `combine`) it refused, on `buffer_set` in `phase`
// (deepepLowLatencyRefuseCall).
void launch_low_latency_refusal(const deepepComm& comm, bool combine, int buffer_set, deepepLowLatencyPhase_t phase,
                                cudaStream_t stream);

// The device array [R] of this rank's low-latency mask (1: masked).
uint32_t* low_latency_mask(const deepepComm& comm);

// The device array [R] of the ranks the last dispatch on `set` left out (1: left out of its combine as well).
uint32_t* low_latency_dispatch_mask(const deepepComm& comm, int set);

// This rank's low-latency mask, copied to the host (1: masked); does not synchronise the device first.
cudaError_t read_low_latency_mask(const deepepComm& comm, std::vector<uint32_t>* mask);

// Masks `rank` (or takes it back, taking its acknowledgements as up to date). Synchronises the device first.
void set_low_latency_mask(const deepepComm& comm, int rank, bool masked);

// Microseconds per low-latency kernel that only exchanges one round of per-block flags among the ranks (every peer
// reachable over NVLink), launched as the calls are, back to back from a graph: the median over passes of
// `iterations` kernels. `epoch` (1, 2, ...) numbers the communicator's measurements, the same on every rank.
// Collective; waits for `stream` first, then runs on a stream of its own. A wait that times out is recorded as the
// communicator's asynchronous error.
double measure_flag_round(const deepepComm& comm, uint32_t epoch, int iterations, cudaStream_t stream);

// Device address of `buffer_set`'s combine buffer on this rank.
void* low_latency_combine_buffer(const deepepComm& comm, int buffer_set);

}  // namespace deepep
