// High-throughput dispatch and combine inside one NVLink domain: launchers (arguments already validated).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "deepep/deepep.h"

struct deepepComm;
struct deepepHandle;

namespace deepep {

// Byte layout of one dispatched row in a peer's receive region: payload, FP8 scales, then metadata (source token
// index, top-k ids as int32, top-k weights), each part 16-byte aligned.
struct DispatchRowLayout {
  size_t payload_bytes = 0;
  size_t scale_bytes = 0;
  int num_topk = 0;
  size_t scales_offset = 0;
  size_t meta_offset = 0;
  size_t row_bytes = 0;
};
DispatchRowLayout dispatch_row_layout(size_t payload_bytes, size_t scale_bytes, int num_topk);

// A communicator's zero-copy dispatch area (deepepConfig zero_copy_dispatch) laid out for one call's rows: `rows`
// payloads of the call's payload_bytes from the area's start (the outputs' recv_x), then, from side_offset, as many
// side rows of side_bytes (each row's scales and metadata, as they follow the payload in a region's row). All zero
// on a communicator without one.
struct DispatchAreaLayout {
  int64_t rows = 0;
  size_t side_offset = 0;
  size_t side_bytes = 0;
};
DispatchAreaLayout dispatch_area_layout(const deepepComm& comm, const DispatchRowLayout& layout);

// Bytes of a combine row: BF16 payload then top-k weights.
size_t combine_row_bytes(int hidden, int num_topk);

// Rows that fit in one source's receive region of the communication buffer.
int64_t region_capacity_rows(const deepepComm& comm, size_t row_bytes);

int default_num_sms(int nranks);

// DEEPEP_DIAG_SKIP: kDiag* bits of stages to leave out when timing the others (0 in normal use).
int diag_bits();

// Computes send positions, counts and per-block ranges from topk_idx into the handle (one kernel).
void launch_prepare_routing(const deepepComm& comm, deepepHandle& handle, const deepepDispatchArgs& args, int num_sms,
                            cudaStream_t stream);
// Exchanges counts with every rank and writes receive counts into the handle (device and mapped host memory).
// The count exchange of an exact-size dispatch: the counts go into the handle and into comm.notify_host, whose ticket
// the kernel sets to `ticket` once they are there and every source sent them in agreement.
void launch_notify(const deepepComm& comm, deepepHandle& handle, int expert_alignment, uint64_t ticket,
                   cudaStream_t stream);
// `layout` is the validated row layout: the same on every rank for the same call, whatever this rank's token count
// (a rank with no tokens may pass NULL scales).
// `report_ticket` (not 0): the kernel also leaves the receive counts for the host, tagged with it (a worst-case
// dispatch reporting its counts, see deepepHandleWaitRecvCounts).
void launch_dispatch(const deepepComm& comm, deepepHandle& handle, const deepepDispatchArgs& args,
                     const DispatchRowLayout& layout, bool worst_case, uint64_t report_ticket, cudaStream_t stream);
void launch_combine(const deepepComm& comm, deepepHandle& handle, const deepepCombineArgs& args, cudaStream_t stream);
// This rank's side of a `call` it refused (deepepRefuseCall) on `blocks` blocks (the peers' block count for a cached
// dispatch or a combine, else 1); `handle` may be NULL or hold no routing.
void launch_refused(const deepepComm& comm, const deepepHandle* handle, deepepCall_t call, int blocks,
                    cudaStream_t stream);

// Median GB/s of `iterations` passes of 16-byte stores from this rank's region to the next rank's (blocking).
double measure_push_bandwidth(const deepepComm& comm, int num_sms, size_t bytes, int iterations, cudaStream_t stream);

}  // namespace deepep
