// C ABI of the low-latency calls: dispatch, combine, the zero-copy combine buffer. Checks every argument, then
// launches the low-latency kernels; a call refused on this rank alone still launches its side of it, moving nothing
// (one out of phase order launches nothing: check_phase_order).
#include <cuda_runtime.h>

#include <cstring>
#include <iterator>
#include <vector>

#include "comm.hpp"
#include "cuda_utils.hpp"
#include "deepep/deepep.h"
#include "error.hpp"
#include "lowlatency.hpp"
#include "refusal.hpp"
#include "validation.hpp"

using namespace deepep;

namespace {

// The communicator must have a low-latency area. (Peers outside the NVLink domain are reached through NVSHMEM.)
void require_low_latency(const deepepComm& comm) {
  if (comm.ll_area.max_tokens <= 0) {
    fail(deepepInvalidUsage,
         "this communicator has no low-latency area: create it with config low_latency_max_tokens > 0 (the most "
         "tokens per rank of a low-latency call)");
  }
}

void check_set_and_phase(int buffer_set, deepepLowLatencyPhase_t phase) {
  DEEPEP_REQUIRE(buffer_set == 0 || buffer_set == 1, "buffer_set is %d; it must be 0 or 1", buffer_set);
  DEEPEP_REQUIRE(phase == deepepLowLatencySendRecv || phase == deepepLowLatencySend || phase == deepepLowLatencyRecv,
                 "phase is %d; it must be deepepLowLatencySendRecv (0), deepepLowLatencySend (1) or "
                 "deepepLowLatencyRecv (2)",
                 static_cast<int>(phase));
}

// This rank's side of a low-latency call it refuses (deepepLowLatencyRefuseCall). A refused Recv completes its
// operation (nothing is due on the set any more); a refused Send completes its own and leaves an earlier Send's Recv
// due.
void refuse(const deepepComm& comm, bool combine, int buffer_set, deepepLowLatencyPhase_t phase, cudaStream_t stream) {
  // Before the launch: a refused Recv counts as made also where its launch fails (the caller is told so).
  if (phase == deepepLowLatencyRecv) comm.ll_recv_due[buffer_set] = deepepComm::kLowLatencyNoRecvDue;
  if (!combine && phase != deepepLowLatencyRecv) comm.ll_dispatch_book.forget(buffer_set);
  DeviceGuard guard(comm.device);
  launch_low_latency_refusal(comm, combine, buffer_set, phase, stream);
}

const char* operation_name(int combine) { return combine ? "combine" : "dispatch"; }

// "Every Send must be followed by its Recv before its set is used again" (deepep.h), checked on the host before
// anything is launched, and refused as a call this rank did not make (nothing launched, as Python's receive hooks do):
// a refusal's side of a Send would take the set's place in the sequence from the Send still waiting for its Recv, and
// a refusal's Recv side would tell the peers of a Send that never went out.
// Calls a capture records, and every call on a set a capture has recorded a call on (note_phase), are not checked:
// the graphs' launches, not the calls, send and receive there.
void check_phase_order(const deepepComm& comm, bool combine, int buffer_set, deepepLowLatencyPhase_t phase,
                       bool capturing) {
  if (capturing || comm.ll_set_captured[buffer_set]) return;
  const int due = comm.ll_recv_due[buffer_set];
  if (phase != deepepLowLatencyRecv) {
    if (due == deepepComm::kLowLatencyNoRecvDue) return;
    fail(deepepInvalidUsage,
         "a low-latency %s on buffer set %d, where the Recv of a %s Send is still due: make that Recv first (every "
         "Send is followed by its Recv before its set is used again)",
         operation_name(combine), buffer_set, operation_name(due));
  }
  if (due == static_cast<int>(combine)) return;
  if (due == deepepComm::kLowLatencyNoRecvDue) {
    fail(deepepInvalidUsage,
         "a low-latency %s Recv on buffer set %d, where no Send is due (its Send was not made, or was refused, or its "
         "Recv was made already)",
         operation_name(combine), buffer_set);
  }
  fail(deepepInvalidUsage, "a low-latency %s Recv on buffer set %d, where the Send that is due is a %s's",
       operation_name(combine), buffer_set, operation_name(due));
}

// The set's state once a call is launched: a Send leaves its Recv due, a Recv ends it.
// After a call launched: what is due on its set now. A captured one (not a refused one, which recorded nothing) ends
// the checks on its set.
void note_phase(const deepepComm& comm, bool combine, int buffer_set, deepepLowLatencyPhase_t phase, bool capturing) {
  if (capturing) comm.ll_set_captured[buffer_set] = true;
  if (comm.ll_set_captured[buffer_set]) return;
  if (phase == deepepLowLatencySend) comm.ll_recv_due[buffer_set] = static_cast<int>(combine);
  if (phase == deepepLowLatencyRecv) comm.ll_recv_due[buffer_set] = deepepComm::kLowLatencyNoRecvDue;
}

// A combine goes with its set's dispatch (LowLatencyDispatchBook::check_combine): eager calls on sets no capture used.
void check_combine_against_dispatch(const deepepComm& comm, const deepepLowLatencyCombineArgs& a,
                                    const ByteSpan (&given)[2]) {
  const int set = a.buffer_set;
  const LowLatencySizes sizes{a.num_tokens, a.num_topk, a.num_experts};
  const CombineRefusal refusal =
      comm.ll_dispatch_book.check_combine(set, a.phase != deepepLowLatencyRecv, sizes, given);
  const LowLatencySizes& had = comm.ll_dispatch_book.record(set).sizes;
  switch (refusal) {
    case CombineRefusal::kNone:
      return;
    case CombineRefusal::kNoDispatch:
      fail(deepepInvalidUsage,
           "no low-latency dispatch on buffer set %d has written routing on this rank (none was made, or this rank "
           "refused it: then refuse its combine as well, deepepLowLatencyRefuseCall)",
           set);
    case CombineRefusal::kOtherSizes:
      fail(deepepInvalidArgument,
           "num_tokens %lld, num_topk %d, num_experts %d: the dispatch on buffer set %d had %lld, %d, %d (a combine "
           "passes its dispatch's)",
           static_cast<long long>(a.num_tokens), a.num_topk, a.num_experts, set, static_cast<long long>(had.num_tokens),
           had.num_topk, had.num_experts);
    case CombineRefusal::kOtherSetsSrcInfo:
    case CombineRefusal::kOtherSetsLayoutRange:
      fail(deepepInvalidUsage,
           "%s is a routing array of the dispatch on buffer set %d, not of this combine's buffer set %d: pass the one "
           "its dispatch wrote",
           refusal == CombineRefusal::kOtherSetsSrcInfo ? "src_info" : "layout_range", 1 - set, set);
    case CombineRefusal::kRoutingWrittenOver:
      fail(deepepInvalidUsage,
           "the routing arrays (recv_src_info, recv_layout_range) of the dispatch on buffer set %d were written over "
           "by a later call's outputs since: this combine would read that call's data (give each buffer set's "
           "dispatch outputs of its own)",
           set);
  }
}

// An optional wait-statistics array (stats_wait_ns of a dispatch or a combine, int64 [R]): checked where given; the
// memory it covers, which the call writes.
ByteSpan checked_wait_stats(const deepepComm& comm, const int64_t* stats) {
  const size_t bytes = static_cast<size_t>(comm.nranks) * 8;
  if (stats != nullptr) check_device_array(comm, stats, bytes, 8, "stats_wait_ns");
  return span_of(stats, bytes);
}

void check_flag(int value, const char* name) {
  DEEPEP_REQUIRE(value == 0 || value == 1, "%s is %d; it must be 0 or 1", name, value);
}

// hidden must be a positive multiple of `multiple` (`why` says what needs it) and fit the area's rows.
void check_hidden(const deepepComm& comm, int hidden, int multiple, const char* why) {
  DEEPEP_REQUIRE(hidden > 0 && hidden % multiple == 0, "hidden is %d; it must be a positive multiple of %d %s", hidden,
                 multiple, why);
  DEEPEP_REQUIRE(hidden <= comm.ll_area.max_hidden,
                 "hidden is %d; this communicator's low-latency area holds rows of at most %d (config hidden)", hidden,
                 comm.ll_area.max_hidden);
}

int check_experts(const deepepComm& comm, int num_experts) {
  DEEPEP_REQUIRE(num_experts >= 1 && num_experts % comm.nranks == 0,
                 "num_experts (%d) must be a positive multiple of the number of ranks (%d)", num_experts, comm.nranks);
  const int local = num_experts / comm.nranks;
  DEEPEP_REQUIRE(local <= DEEPEP_MAX_LOCAL_EXPERTS, "num_experts / nranks is %d; at most %d experts per rank", local,
                 DEEPEP_MAX_LOCAL_EXPERTS);
  return local;
}

// Checks the tokens' routing; returns the element size of topk_idx.
void check_routing(const deepepComm& comm, int64_t num_tokens, const void* topk_idx, deepepDataType_t topk_type,
                   int num_topk, int64_t topk_row_stride) {
  const int64_t T = comm.ll_area.max_tokens;
  DEEPEP_REQUIRE(num_tokens >= 0 && num_tokens <= T,
                 "num_tokens is %lld; it must be in [0, %lld] (config low_latency_max_tokens)",
                 static_cast<long long>(num_tokens), static_cast<long long>(T));
  DEEPEP_REQUIRE(topk_type == deepepInt64 || topk_type == deepepInt32,
                 "topk_type is %d; topk_idx must be deepepInt64 or deepepInt32", static_cast<int>(topk_type));
  DEEPEP_REQUIRE(num_topk >= 1 && num_topk <= DEEPEP_MAX_TOPK, "num_topk is %d; it must be in [1, %d]", num_topk,
                 DEEPEP_MAX_TOPK);
  DEEPEP_REQUIRE(num_topk <= comm.ll_area.max_topk,
                 "num_topk is %d; this communicator's low-latency area holds at most %d (config num_topk)", num_topk,
                 comm.ll_area.max_topk);
  const int64_t stride = topk_row_stride != 0 ? topk_row_stride : num_topk;
  DEEPEP_REQUIRE(stride >= num_topk && stride <= (int64_t(1) << 32),
                 "topk_row_stride is %lld; it must be in [num_topk = %d, 2^32] (0: num_topk)",
                 static_cast<long long>(stride), num_topk);
  const size_t element = topk_type == deepepInt64 ? 8 : 4;
  check_device_array(comm, topk_idx, matrix_bytes(num_tokens, num_topk, stride, element), element, "topk_idx");
}

[[noreturn]] void fail_too_small(const deepepComm& comm, const char* what, size_t needed, size_t have) {
  fail(deepepBufferTooSmall,
       "%s needs %zu bytes per buffer set but the low-latency area holds %zu (sized from config hidden %d, num_topk "
       "%d, num_experts %d over %d ranks, low_latency_max_tokens %lld): raise those config fields",
       what, needed, have, comm.ll_area.max_hidden, comm.ll_area.max_topk, comm.ll_area.max_local_experts * comm.nranks,
       comm.nranks, static_cast<long long>(comm.ll_area.max_tokens));
}

deepepLowLatencyDispatchArgs dispatch_defaults() {
  deepepLowLatencyDispatchArgs args{};
  args.struct_size = sizeof(args);
  args.phase = deepepLowLatencySendRecv;
  args.topk_type = deepepInt64;
  args.use_fp8 = 1;
  args.stats_recv_count_type = deepepInt64;
  return args;
}

deepepLowLatencyCombineArgs combine_defaults() {
  deepepLowLatencyCombineArgs args{};
  args.struct_size = sizeof(args);
  args.phase = deepepLowLatencySendRecv;
  args.topk_type = deepepInt64;
  return args;
}

size_t combine_buffer_bytes(const deepepComm& comm, int local_experts, int hidden) {
  return static_cast<size_t>(local_experts) * comm.nranks * comm.ll_area.max_tokens * hidden * 2;
}

}  // namespace

extern "C" {

DEEPEP_API deepepResult_t deepepLowLatencyDispatchArgsInit(deepepLowLatencyDispatchArgs* args, size_t struct_size) {
  return guarded_call(__func__, [&] { init_struct(args, struct_size, dispatch_defaults(), "args"); });
}

DEEPEP_API deepepResult_t deepepLowLatencyCombineArgsInit(deepepLowLatencyCombineArgs* args, size_t struct_size) {
  return guarded_call(__func__, [&] { init_struct(args, struct_size, combine_defaults(), "args"); });
}

DEEPEP_API deepepResult_t deepepCommLowLatencyMaskRank(deepepComm_t comm, int rank, int masked) {
  return guarded_call(__func__, [&] {
    const deepepComm& c = *checked_comm(comm);
    DeviceGuard guard(c.device);  // first: the checks below call the runtime
    require_low_latency(c);
    DEEPEP_REQUIRE(rank >= 0 && rank < c.nranks, "rank is %d; it must be in [0, %d)", rank, c.nranks);
    check_flag(masked, "masked");
    if (rank == c.rank) {
      DEEPEP_REQUIRE(masked == 0, "rank %d is this rank: a rank cannot mask itself", rank);
      return;  // never masked: nothing to take back
    }
    // A receive still due would wait for a rank taken back, which sent it nothing while masked.
    for (int set = 0; masked == 0 && set < 2; ++set) {
      if (c.ll_recv_due[set] != deepepComm::kLowLatencyNoRecvDue) {
        fail(deepepInvalidUsage,
             "rank %d is taken back while the receive of the %s sent on buffer set %d is due; make that receive (the "
             "receive hook) first: a rank is taken back only while no low-latency call is in flight",
             rank, c.ll_recv_due[set] == 0 ? "dispatch" : "combine", set);
      }
    }
    set_low_latency_mask(c, rank, masked != 0);
  });
}

DEEPEP_API deepepResult_t deepepCommLowLatencyMaskedRanks(deepepComm_t comm, int* masked) {
  return guarded_call(__func__, [&] {
    DEEPEP_REQUIRE(masked != nullptr, "masked is NULL");
    const deepepComm& c = *checked_comm(comm);
    DeviceGuard guard(c.device);  // first: the checks below call the runtime
    require_low_latency(c);
    DEEPEP_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<uint32_t> mask;
    DEEPEP_CUDA_CHECK(read_low_latency_mask(c, &mask));
    for (int r = 0; r < c.nranks; ++r) masked[r] = mask[static_cast<size_t>(r)] != 0 ? 1 : 0;
  });
}

DEEPEP_API deepepResult_t deepepCommLowLatencyTimeline(deepepComm_t comm, int64_t* marks, int capacity_blocks,
                                                       int* num_blocks) {
  return guarded_call(__func__, [&] {
    DEEPEP_REQUIRE(marks != nullptr && num_blocks != nullptr, "marks and num_blocks must not be NULL");
    const deepepComm& c = *checked_comm(comm);
    DeviceGuard guard(c.device);  // first: the checks below call the runtime
    if (c.ll_timeline_device == nullptr) {
      fail(deepepInvalidUsage,
           "the low-latency timeline is off: set DEEPEP_LL_TIMELINE=1 before creating the communicator");
    }
    DEEPEP_REQUIRE(capacity_blocks >= c.ll_blocks, "capacity_blocks is %d; the timeline has %d blocks", capacity_blocks,
                   c.ll_blocks);
    DEEPEP_CUDA_CHECK(cudaMemcpy(marks, c.ll_timeline_device,
                                 static_cast<size_t>(c.ll_blocks) * DEEPEP_LL_TIMELINE_MARKS * sizeof(int64_t),
                                 cudaMemcpyDeviceToHost));
    *num_blocks = c.ll_blocks;
  });
}

DEEPEP_API deepepResult_t deepepCommMeasureFlagRound(deepepComm_t comm, int iterations, double* us,
                                                     struct CUstream_st* stream) {
  return guarded_call(__func__, [&] {
    const deepepComm& c = *checked_comm(comm);
    DeviceGuard guard(c.device);  // first: the checks below call the runtime
    // Counted before anything this rank alone may refuse, so that the ranks' epochs stay the same after a refusal.
    const uint32_t epoch = c.flag_round_epoch.fetch_add(1) + 1u;
    DEEPEP_REQUIRE(us != nullptr, "us is NULL");
    DEEPEP_REQUIRE(iterations >= 1 && iterations <= 10000, "iterations is %d; it must be in [1, 10000]", iterations);
    require_low_latency(c);
    for (int r = 0; r < c.nranks; ++r) {
      DEEPEP_REQUIRE(c.peer_buffers[r] != nullptr, "rank %d is not reachable over NVLink", r);
    }
    require_not_capturing(stream, "a measurement");
    raise_async_error(c);  // the kernels would not wait: a recorded error stops them
    std::vector<uint32_t> masked;
    DEEPEP_CUDA_CHECK(read_low_latency_mask(c, &masked));
    for (int r = 0; r < c.nranks; ++r) {
      if (masked[r] != 0) fail(deepepInvalidUsage, "rank %d is masked out of low-latency calls", r);
    }
    const double measured = measure_flag_round(c, epoch, iterations, stream);
    raise_async_error(c);  // a peer that did not come: the figure means nothing
    *us = measured;
  });
}

DEEPEP_API deepepResult_t deepepCommLowLatencyMaxTokens(deepepComm_t comm, int* max_tokens) {
  return guarded_call(__func__, [&] {
    DEEPEP_REQUIRE(max_tokens != nullptr, "max_tokens is NULL");
    *max_tokens = static_cast<int>(checked_comm(comm)->ll_area.max_tokens);
  });
}

DEEPEP_API deepepResult_t deepepLowLatencyDispatch(deepepComm_t comm, const deepepLowLatencyDispatchArgs* args,
                                                   struct CUstream_st* stream) {
  return guarded_call(__func__, [&] {
    const deepepComm& c = *checked_comm(comm);
    DeviceGuard guard(c.device);         // first: the checks below call the runtime
    const CaptureScope capture(stream);  // outputs may be allocations of the capture itself
    const deepepLowLatencyDispatchArgs a = checked_struct(args, "args", dispatch_defaults());
    require_low_latency(c);
    check_set_and_phase(a.buffer_set, a.phase);
    check_phase_order(c, false, a.buffer_set, a.phase, capture.capturing());
    RefusalOnThrow refusal(stream, [&] { refuse(c, false, a.buffer_set, a.phase, stream); });
    const int local = check_experts(c, a.num_experts);
    check_routing(c, a.num_tokens, a.topk_idx, a.topk_type, a.num_topk, a.topk_row_stride);
    check_flag(a.use_fp8, "use_fp8");
    check_flag(a.round_scale, "round_scale");
    check_flag(a.use_ue8m0, "use_ue8m0");
    const bool fp8 = a.use_fp8 != 0;
    DEEPEP_REQUIRE(fp8 || (a.round_scale == 0 && a.use_ue8m0 == 0),
                   "round_scale and use_ue8m0 shape FP8 scales; they need use_fp8 = 1");
    DEEPEP_REQUIRE(!a.use_ue8m0 || a.round_scale, "use_ue8m0 needs round_scale = 1 (UE8M0 holds powers of two)");
    if (fp8) {
      check_hidden(c, a.hidden, 128, "for FP8 output (one scale per 128 channels)");
    } else {
      check_hidden(c, a.hidden, 8, "for BF16 output (16-byte rows)");
    }
    const int64_t x_stride = a.x_row_stride != 0 ? a.x_row_stride : a.hidden;
    DEEPEP_REQUIRE(x_stride >= a.hidden && x_stride % 8 == 0,
                   "x_row_stride is %lld; rows must hold hidden (%d) elements and start on 16-byte boundaries",
                   static_cast<long long>(x_stride), a.hidden);
    check_device_array(c, a.x, matrix_bytes(a.num_tokens, a.hidden, x_stride, 2), 16, "x");
    const LowLatencyRow row = low_latency_row(a.hidden, fp8);
    const size_t T = static_cast<size_t>(c.ll_area.max_tokens);
    const size_t slots = static_cast<size_t>(local) * c.nranks * T;  // output rows: [E_loc][R * T]
    const size_t token_rows = static_cast<size_t>(c.nranks) * T;     // receive slots: [R][T]
    if (token_rows * row.row_bytes > c.ll_area.receive_bytes) {
      fail_too_small(c, "the dispatch's receive slots", token_rows * row.row_bytes, c.ll_area.receive_bytes);
    }
    const size_t scale_bytes = fp8 ? slots * (a.use_ue8m0 ? (a.hidden / 128 + 3) / 4 : a.hidden / 128) * 4 : 0;
    check_device_array(c, a.recv_x, slots * row.payload_bytes, 16, "recv_x");
    if (fp8) {
      check_device_array(c, a.recv_scales, scale_bytes, 4, "recv_scales");
    } else {
      DEEPEP_REQUIRE(a.recv_scales == nullptr, "recv_scales is given but the output is BF16 (use_fp8 = 0)");
    }
    check_device_array(c, a.recv_count, static_cast<size_t>(local) * 4, 4, "recv_count");
    check_device_array(c, a.recv_src_info, slots * 4, 4, "recv_src_info");
    check_device_array(c, a.recv_layout_range, static_cast<size_t>(local) * c.nranks * 2 * 4, 4, "recv_layout_range");
    check_flag(a.scales_token_contiguous, "scales_token_contiguous");
    DEEPEP_REQUIRE(a.stats_recv_count_type == deepepInt64 || a.stats_recv_count_type == deepepInt32,
                   "stats_recv_count_type is %d; it must be deepepInt64 or deepepInt32",
                   static_cast<int>(a.stats_recv_count_type));
    if (a.stats_recv_count != nullptr) {
      const size_t element = a.stats_recv_count_type == deepepInt64 ? 8 : 4;
      check_device_array(c, a.stats_recv_count, static_cast<size_t>(local) * element, element, "stats_recv_count");
    }
    const ByteSpan wait_stats = checked_wait_stats(c, a.stats_wait_ns);
    const ByteSpan outputs[LowLatencyDispatchBook::kDispatchOutputs] = {
        span_of(a.recv_x, slots * row.payload_bytes),
        span_of(a.recv_scales, scale_bytes),
        span_of(a.recv_count, static_cast<size_t>(local) * 4),
        span_of(a.recv_src_info, slots * 4),
        span_of(a.recv_layout_range, static_cast<size_t>(local) * c.nranks * 2 * 4),
        span_of(a.stats_recv_count, static_cast<size_t>(local) * (a.stats_recv_count_type == deepepInt64 ? 8 : 4)),
        wait_stats};
    launch_low_latency_dispatch(c, a, stream);
    refusal.launched();
    note_phase(c, false, a.buffer_set, a.phase, capture.capturing());
    c.ll_dispatch_book.note_dispatch(a.buffer_set, a.phase != deepepLowLatencyRecv, a.phase != deepepLowLatencySend,
                                     c.ll_set_captured[a.buffer_set], capture.capturing(),
                                     {a.num_tokens, a.num_topk, a.num_experts}, outputs);
  });
}

DEEPEP_API deepepResult_t deepepLowLatencyCombine(deepepComm_t comm, const deepepLowLatencyCombineArgs* args,
                                                  struct CUstream_st* stream) {
  return guarded_call(__func__, [&] {
    const deepepComm& c = *checked_comm(comm);
    DeviceGuard guard(c.device);         // first: the checks below call the runtime
    const CaptureScope capture(stream);  // outputs may be allocations of the capture itself
    const deepepLowLatencyCombineArgs a = checked_struct(args, "args", combine_defaults());
    require_low_latency(c);
    check_set_and_phase(a.buffer_set, a.phase);
    check_phase_order(c, true, a.buffer_set, a.phase, capture.capturing());
    RefusalOnThrow refusal(stream, [&] { refuse(c, true, a.buffer_set, a.phase, stream); });
    const int local = check_experts(c, a.num_experts);
    check_routing(c, a.num_tokens, a.topk_idx, a.topk_type, a.num_topk, a.topk_row_stride);
    check_flag(a.zero_copy, "zero_copy");
    check_hidden(c, a.hidden, 8, "(16-byte rows)");
    const size_t T = static_cast<size_t>(c.ll_area.max_tokens);
    const size_t slots = static_cast<size_t>(local) * c.nranks * T;
    const size_t combine_rows = T * a.num_topk * a.hidden * 2;
    if (combine_rows > c.ll_area.combine_rows_bytes) {
      fail_too_small(c, "the combine's receive rows", combine_rows, c.ll_area.combine_rows_bytes);
    }
    // The combine buffer holds the rows of a zero-copy combine, and the rows any combine puts through NVSHMEM.
    if (combine_buffer_bytes(c, local, a.hidden) > c.ll_area.receive_bytes) {
      fail_too_small(c, "the combine buffer", combine_buffer_bytes(c, local, a.hidden), c.ll_area.receive_bytes);
    }
    if (a.zero_copy) {
      DEEPEP_REQUIRE(a.x == nullptr, "x is given with zero_copy = 1 (the rows are read from the combine buffer)");
    } else {
      check_device_array(c, a.x, slots * a.hidden * 2, 16, "x");
    }
    check_device_array(c, a.src_info, slots * 4, 4, "src_info");
    check_device_array(c, a.layout_range, static_cast<size_t>(local) * c.nranks * 2 * 4, 4, "layout_range");
    if (!capture.capturing() && !c.ll_set_captured[a.buffer_set]) {
      check_combine_against_dispatch(
          c, a,
          {span_of(a.src_info, slots * 4), span_of(a.layout_range, static_cast<size_t>(local) * c.nranks * 2 * 4)});
    }
    const int64_t w_stride = a.weights_row_stride != 0 ? a.weights_row_stride : a.num_topk;
    DEEPEP_REQUIRE(w_stride >= a.num_topk, "weights_row_stride %lld is below num_topk %d",
                   static_cast<long long>(w_stride), a.num_topk);
    check_device_array(c, a.topk_weights, matrix_bytes(a.num_tokens, a.num_topk, w_stride, 4), 4, "topk_weights");
    const size_t out_bytes = static_cast<size_t>(a.num_tokens) * a.hidden * 2;
    check_device_array(c, a.out, out_bytes, 16, "out");
    const ByteSpan written[] = {span_of(a.out, out_bytes), checked_wait_stats(c, a.stats_wait_ns)};
    launch_low_latency_combine(c, a, stream);
    refusal.launched();
    note_phase(c, true, a.buffer_set, a.phase, capture.capturing());
    if (!capture.capturing() && a.phase != deepepLowLatencySend)
      c.ll_dispatch_book.note_written(written, std::size(written));
  });
}

DEEPEP_API deepepResult_t deepepLowLatencyRefuseCall(deepepComm_t comm, int combine, int buffer_set,
                                                     deepepLowLatencyPhase_t phase, struct CUstream_st* stream) {
  return guarded_call(__func__, [&] {
    const deepepComm& c = *checked_comm(comm);
    DeviceGuard guard(c.device);  // first: the checks below call the runtime
    require_low_latency(c);
    check_set_and_phase(buffer_set, phase);
    check_flag(combine, "combine");
    require_not_capturing(stream, "a refusal");
    // Out of order it would take the place of the Send still due, as the calls' own refusals would (check_phase_order).
    check_phase_order(c, combine != 0, buffer_set, phase, false);
    refuse(c, combine != 0, buffer_set, phase, stream);
  });
}

DEEPEP_API deepepResult_t deepepLowLatencyGetCombineBuffer(deepepComm_t comm, int buffer_set, int hidden,
                                                           int num_experts, void** buffer) {
  return guarded_call(__func__, [&] {
    DEEPEP_REQUIRE(buffer != nullptr, "buffer is NULL");
    *buffer = nullptr;
    const deepepComm& c = *checked_comm(comm);
    require_low_latency(c);
    check_set_and_phase(buffer_set, deepepLowLatencySendRecv);
    const int local = check_experts(c, num_experts);
    check_hidden(c, hidden, 8, "(16-byte rows)");
    if (combine_buffer_bytes(c, local, hidden) > c.ll_area.receive_bytes) {
      fail_too_small(c, "the combine buffer", combine_buffer_bytes(c, local, hidden), c.ll_area.receive_bytes);
    }
    *buffer = low_latency_combine_buffer(c, buffer_set);
  });
}

}  // extern "C"
