// High-throughput dispatch and combine over NVLink (all ranks in one NVLink domain).
//
// Every rank's communication buffer holds a control region (flags and counts that peers write) and one receive
// region per source rank. A dispatch is one collective operation with sequence number `seq` (kept on the device so
// that replayed CUDA graphs advance it):
//   1. wait until every destination acknowledged the previous operation (its regions may be reused);
//   2. every block derives the receive offsets (rows ordered by source rank, then source token) from the counts in
//      the handle; a worst-case dispatch, whose handle has none yet, gets them here: block 0 sends each destination
//      its token count (and per-expert counts) and every block waits for the counts of all sources;
//   3. block b's send warps tell block b of each destination its range (with the row layout and totals, which the
//      destination checks), then push the rows of block b's token range straight into each destination's region
//      for this source (rows to this rank go straight to the output), publishing progress after every chunk;
//   4. block b's receive warps (joined by its send warps once they are done) copy what block b of every source
//      published into the outputs (and first, when block b has few tokens, its rows to this rank, which its send
//      warps then leave to them);
//   5. the last block to finish acknowledges the operation to every source.
// A combine runs the same protocol backwards: each rank pushes the rows it received back to their sources, and the
// sources add them up per token in rank order (float32, deterministic). Every wait is bounded by the timeout.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "async_error.hpp"
#include "comm.hpp"
#include "cuda_utils.hpp"
#include "device_utils.cuh"
#include "handle.hpp"
#include "intranode.hpp"
#include "layout.hpp"

namespace deepep {

namespace {

struct alignas(16) CountMessage {
  uint64_t flag;                              // seq of the operation the message belongs to
  int32_t tokens;                             // rows the source sends to this rank
  int32_t num_blocks;                         // the source's block count (must match: block b talks to block b)
  int32_t experts_per_rank;                   // the source's E / R (must match: expert counts are indexed by it)
  int32_t experts[DEEPEP_MAX_LOCAL_EXPERTS];  // the source's tokens per expert of this rank
};

// What block b of a source tells block b of each destination before pushing rows: its range, and what the
// destination checks before reading any row (the rows' layout, the source's block count and its total for this
// rank, which must equal what this rank's handle or count exchange says).
struct alignas(16) RangeMessage {
  uint64_t flag;
  int32_t start;       // first row (in the source's receive-order numbering) block b sends here
  int32_t count;       // rows block b sends here
  int64_t row_layout;  // the source's row_layout_word
  int32_t tokens;      // rows the source sends here in all
  int32_t num_blocks;  // the source's block count
  uint32_t routing;    // the operation that routed the source's handle (routing_pair)
};

// What a rank that refused a call (bad input found on its host, deepepRefuseCall) sends where its part would be read
// first, so that the other ranks finish the same call at once with deepepRemoteError naming it: a count message's
// experts_per_rank (notify, worst-case dispatch), a range message's row_layout (cached dispatch), a combine's layout
// word (its progress says every row is there and refused).
constexpr int32_t kRefusedExpertsPerRank = -1;
constexpr int64_t kRefusedRowLayout = -1;

// What a destination tells each source when its dispatch starts on a communicator with a zero-copy dispatch area:
// where that source's rows start in the area and how many rows the area takes for this call. Sources write into a
// destination's area only after this message, so a dispatch's outputs stay valid until that rank's next dispatch
// starts, whatever its peers do meanwhile. A rank that cannot take rows (it refused the call, or failed before it
// knew where they go) sends limit 0: no rows come.
struct alignas(16) ReadyMessage {
  uint64_t flag;  // seq of the dispatch
  int64_t first_row;
  int64_t limit;  // rows past it are not written
};

struct ControlRegion {
  CountMessage notify[kMaxNvlRanks];
  CountMessage counts[kMaxNvlRanks];
  RangeMessage ranges[kMaxNvlRanks][kMaxBlocks];
  uint64_t progress[kMaxNvlRanks][kMaxBlocks];          // (seq << 32) | rows of block b's dispatch range done
  uint64_t combine_progress[kMaxNvlRanks][kMaxBlocks];  // the same for combine (kRowsRefused: rows not pushed)
  uint64_t combine_layout[kMaxNvlRanks][kMaxBlocks];    // the source's combine_layout_word, before its first release
  uint32_t combine_routing[kMaxNvlRanks][kMaxBlocks];   // the operation that routed the source's handle, the same way
  uint64_t ack[kMaxNvlRanks];                           // last seq each destination finished consuming
  // Each destination's zero-copy dispatch area, per dispatch, in the slot of its seq's parity: a cached dispatch sends
  // its message before it waits for the acknowledgements, so a destination that finished the previous operation
  // without waiting for this rank (it refused it) may send the next message while this rank has yet to read that
  // operation's. It cannot run further ahead: the operation after waits for this rank's acknowledgement.
  ReadyMessage ready[2][kMaxNvlRanks];
};
static_assert(sizeof(ControlRegion) <= kArrivalOffset, "control region outgrew its reservation");

// A handle's routing is named by the sequence number of the collective operation that routed it (its count exchange,
// or the worst-case dispatch that made it), which every rank's handle of that dispatch holds alike: ranks compare it
// before reading each other's rows, so that a cached dispatch or a combine with the handles of different dispatches on
// different ranks is an error, not rows summed or copied for the wrong tokens. The record's value holds the peer's and
// this rank's (kDetailPeerRouting).
__device__ __forceinline__ int64_t routing_pair(uint32_t theirs, uint32_t mine) {
  return static_cast<int64_t>(static_cast<uint64_t>(theirs) << 32 | mine);
}

constexpr int kDispatchWarps = 24;
// Dispatch warps that push rows; the others copy received rows out, and the pushers join them once done. Large rows
// went fastest with half the warps pushing, small rows with two thirds (2 x H200, N = 4096, 24 SMs: H = 7168 BF16,
// 14 KB rows, 219 us with 12 pushers against 249 with 16; FP8, 7 KB rows, 128 us with 16 against 140 with 12). Blocks
// with a lone publisher take 14 for large rows where that gives each pusher a long run (dispatch_push_warps).
constexpr int kDispatchPushWarpsLargeRows = 12;
constexpr int kDispatchPushWarpsLargeRowsLonePublisher = 14;
constexpr int kDispatchPushWarpsSmallRows = 16;
// A zero-copy dispatch's receiving warps copy no payloads. Its large rows on grids of 15 to kZeroCopySpreadMaxBlocks
// blocks went fastest with about kZeroCopyPushingWarps pushing warps in the whole grid, fewer than the usual 12 per
// block, or 14 with a lone publisher (2 x H200, same runs, BF16, H = 7168, N = 4096 / 16384, the usual count against
// the best: 16 blocks 194.9 / 737.8 us against 189.9 / 704.1 with 11, 22 blocks 215.0 / 812.9 against 196.8 / 729.8
// with 8, 24 blocks 213.4 / 824.8 against 197.6 / 731.3 with 7, 26 blocks 214.1 / 821.0 against 202.0 / 758.1 with
// 7; with too few it was slower again: 24 blocks 212.5 / 802.6 with 6, 20 blocks 221.7 / 842.6 with 7, and 8 blocks
// 336.7 / 1290.1 with 12 against 324.2 / 1245.6 with 14). Why is not known. On 28 blocks 7 and 12 took as long
// (212.6 / 808.4 against 212.1 / 809.0), and on 32 and 48 blocks 12 stayed fastest (206.3 / 780.9 and 192.6 / 720.4
// against 221.1 / 819.7 and 203.9 / 767.1 with 7), so larger grids keep 12, and so do blocks whose fewer pushers would
// have short runs (N = 512 on 24 blocks: 38.5 us with 7 against 34.5 with 12).
constexpr int kZeroCopyPushingWarps = 176;
constexpr int kZeroCopySpreadMaxBlocks = 26;
constexpr size_t kDispatchLargeRowBytes = 10240;
__host__ __device__ constexpr bool large_dispatch_rows(size_t row_bytes) { return row_bytes > kDispatchLargeRowBytes; }
// Combine warps push rows back to their sources, the others reduce (the pushers join them once done): 8 of 24 push
// on grids with the barrier, 9 with a lone publisher (2 x H200, same run, N = 4096: on 16 SMs 251 us with 9 against
// 270 with 8, 256 with 10, 307 with 12; on 24 SMs 8 stays fastest, 209 against 244 with 9).
constexpr int kCombineWarps = 24;
constexpr int kCombinePushWarps = 8;
constexpr int kCombinePushWarpsLonePublisher = 9;
// Grids with the barrier whose blocks have a few dozen rows each (of the received rows, x's: more than
// kCombineFewRowsMin, at most kCombineFewRowsMax) finish sooner with more warps reducing: 5 pushers. Measured on 2 x
// H200, 24 SMs, same run, each build twice, N = 256 / 512 / 1024 / 2048 (about 21 / 43 / 85 / 171 rows per block):
// 31.2-31.3 / 43.2-43.3 / 69.7-69.8 / 122.1-122.5 us with 5 against 30.5 / 45.8-46.5 / 75.8-76.3 / 122.7-123.1 with 8
// (another run: 12 pushers 43.4 / 78.1 / 143.6 at N = 512 / 1024 / 2048, 5 pushers 127.3 at N = 2048).
constexpr int kCombinePushWarpsFewRows = 5;
constexpr int64_t kCombineFewRowsMin = 32;
constexpr int64_t kCombineFewRowsMax = 96;
// Rows each pushing warp sends between two progress releases: larger chunks mean fewer barriers and flags, smaller
// ones let the receivers start sooner. Measured at N = 4096, H = 7168, 24 SMs on 2 ranks (1 / 2 / 4 / 8): dispatch
// 268 / 246 / 262 / 309 us, combine 327 / 359 / 381 / 400 us (with a system fence per chunk, since dropped). A
// dispatch of large rows takes 3 where each pushing warp has at least kDispatchLongRunTokens tokens (2 x H200, same
// runs, BF16: N = 4096 on 16 SMs, 22 tokens per warp, 254-260 us against 263-268 with 2; N = 16384 on 16 SMs 992
// against 1026, on 24 SMs 787 against 781; with 15 per warp, N = 4096 on 24 SMs, 225-226 against 215-219). Small rows
// keep 2 (FP8, N = 16384: 577 / 461 us on 16 / 24 SMs with 3, 568 / 440 with 2). A block of at most 2 tokens per warp
// takes 1, and so does the last chunk's worth of a block's small rows (2 x H200, same run, each build twice, FP8 at N =
// 4096: 135.7-135.8 / 116.0-116.5 us on 16 / 24 SMs against 137.9 / 117.1-117.4; BF16 0.6 us slower with it, so large
// rows keep their chunks to the end; two chunks' worth measured no better).
constexpr int kDispatchTokensPerWarpPerChunk = 2;
constexpr int kDispatchTokensPerWarpPerChunkLongRuns = 3;
constexpr int64_t kDispatchLongRunTokens = 18;
constexpr int kCombineRowsPerWarpPerChunk = 1;
// With at most this many blocks, a dispatch of more than one chunk per block and a combine hand each finished chunk
// to a lone publisher warp instead of meeting it at a barrier: the pushers never wait for one another. Measured (2 x
// H200, same run, N = 4096, cached BF16 / FP8 dispatch, combine): 243.6 / 141.2 / 268.9 us on 16 SMs against 259.8 /
// 152.0 / 293.2 with the barrier; on 24 SMs slower, 236.7 / 137.9 / 243.1 against 216.8 / 123.8 / 218.7 (N = 16384:
// 875 / 521 / 901 against 783 / 447 / 770), so larger grids keep the barrier (docs/tuning.md).
constexpr int kLonePublisherMaxBlocks = 16;

// Pushing warps of a dispatch of `num_tokens` tokens on `blocks` blocks. Large rows with a lone publisher go fastest
// with 14 where each of them still has a long run (2 x H200, same runs, BF16, N = 4096: 240 us on 16 SMs against 248
// with 12, 242 with 16, 245 with 13; 460 against 466 on 8 SMs), but not with a few tokens each (N = 512 on 16 SMs:
// 44.9 us against 41.6). FP8 rows measured no faster with 14 on 16 SMs (144.0 against 144.4 us) and slower with 18-20.
int dispatch_push_warps(size_t row_bytes, int64_t num_tokens, int blocks, bool zero_copy) {
  if (!large_dispatch_rows(row_bytes)) return kDispatchPushWarpsSmallRows;
  const int64_t per_block = (num_tokens + blocks - 1) / blocks;
  auto long_runs_with = [&](int warps) { return (per_block + warps - 1) / warps >= kDispatchLongRunTokens; };
  if (zero_copy && blocks <= kZeroCopySpreadMaxBlocks) {
    const int spread = (kZeroCopyPushingWarps + blocks / 2) / blocks;
    if (spread <= kDispatchPushWarpsLargeRows && long_runs_with(spread)) return spread;
  }
  return blocks <= kLonePublisherMaxBlocks && long_runs_with(kDispatchPushWarpsLargeRowsLonePublisher)
             ? kDispatchPushWarpsLargeRowsLonePublisher
             : kDispatchPushWarpsLargeRows;
}
constexpr int kVectorsInFlight = 4;
// In a combine's progress count: the source could not push the rows (recorded there), so they are not read here.
constexpr uint32_t kRowsRefused = 1u << 31;
// In a combine's progress count: the source's last release for this block, so no more rows come. A source with none
// for this rank releases it too, at the end, so that a rank whose handle expects rows the source's does not send (the
// handles of different dispatches) finds out at once instead of at the timeout. Counts stay below it: with two ranks
// or more, max_tokens_per_rank < 2^30 (comm.cu).
constexpr uint32_t kRowsFinal = 1u << 30;
constexpr uint32_t kRowsCount = kRowsFinal - 1;
// A combine's progress when the source has no rows for this rank to push and says so at once (a refused call, a
// handle whose worst-case dispatch failed): every row it could wait for is there, refused, and no more come.
constexpr uint32_t kAllRowsRefused = kRowsRefused | kRowsFinal | kRowsCount;
static_assert(kCombinePushWarps < kCombineWarps && kCombinePushWarpsLonePublisher < kCombineWarps &&
                  kCombinePushWarpsFewRows < kCombineWarps,
              "a combine block needs a warp after its pushing warps to publish");
// Combine's reduction stages its loads in shared memory: kReduceGroup addend rows per step, kReduceStages steps in
// flight per warp.
constexpr int kReduceGroup = 2;
constexpr int kReduceStages = 2;
constexpr int kReduceStageVectorsPerWarp = kReduceStages * kReduceGroup * kVectorsInFlight * 32;
constexpr size_t kReduceStageBytes = sizeof(int4) * kReduceStageVectorsPerWarp * kCombineWarps;

__device__ __forceinline__ int4* stage_slot(int4* stage, int step_stage, int group, int u, int lane) {
  return stage + ((step_stage * kReduceGroup + group) * kVectorsInFlight + u) * 32 + lane;
}

// cp.async of 16 bytes (through L2 only: data peers wrote during the kernel is read after an acquire).
__device__ __forceinline__ void copy16_async(int4* shared_dst, const int4* global_src) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(global_src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}  // combine: 16-byte loads each lane keeps in flight per row

// Diagnostics (environment variable DEEPEP_DIAG_SKIP, a sum of these bits): leave one stage out so that timing the
// others shows where the time goes. Results are wrong while any bit is set; the protocol still runs in full.
constexpr int kDiagSkipLocalRows = 1;   // dispatch: rows to this rank (whichever warps copy them); combine: reduction
constexpr int kDiagSkipCopyOut = 2;     // dispatch: receive warps' copy into the outputs
constexpr int kDiagSkipRemotePush = 4;  // dispatch and combine: payload stores into peers' regions

__device__ __forceinline__ ControlRegion* control_of(void* const* peers, int rank) {
  return static_cast<ControlRegion*>(peers[rank]);
}

// Region of `source` in `owner`'s buffer.
__device__ __forceinline__ uint8_t* region_of(void* const* peers, int owner, int source, size_t region_bytes) {
  return static_cast<uint8_t*>(peers[owner]) + kControlBytes + static_cast<size_t>(source) * region_bytes;
}

__device__ __forceinline__ uint64_t tagged(uint32_t seq, uint32_t value) {
  return (static_cast<uint64_t>(seq) << 32) | value;
}

struct Protocol {
  void* const* peers;
  int rank;
  int nranks;
  uint32_t* op_state;  // [0]: last finished seq, [1]: blocks finished in the running operation
  AsyncErrorRecord* error;
  uint64_t timeout_ns;
};

// Step 1: before writing anything a destination reads, make sure it consumed the previous operation.
__device__ bool wait_acks(const Protocol& p, uint32_t seq, uint64_t deadline, Phase phase) {
  ControlRegion* mine = control_of(p.peers, p.rank);
  bool ok = true;
  const int lane = threadIdx.x % 32;
  for (int d = lane; d < p.nranks; d += 32) {
    if (d == p.rank) continue;
    // Acknowledged at least seq - 1, compared modulo 2^32 so that the sequence may wrap around.
    ok &= wait_flag(
        &mine->ack[d], [&](uint64_t v) { return static_cast<int32_t>(static_cast<uint32_t>(v) - (seq - 1u)) >= 0; },
        deadline, p.error, p.rank, phase, d);
  }
  return __all_sync(0xffffffffu, ok);
}

// Step 5: the last block to finish acknowledges `seq` to every source and advances the sequence. The blocks count
// themselves with a GPU-scope acquire-release add, and the last one's system-scope releases carry every block's reads
// of the regions to the sources (release and acquire are cumulative along that chain), so no block needs a
// system-scope fence of its own: with two of them here, a dispatch of no tokens took 10.5 us, without them 8.3.
__device__ void finish_operation(const Protocol& p, uint32_t seq) {
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t finished;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(finished) : "l"(p.op_state + 1) : "memory");
    if (finished == gridDim.x - 1) {
      for (int s = 0; s < p.nranks; ++s) {
        if (s != p.rank) store_release_sys(&control_of(p.peers, s)->ack[p.rank], seq);
      }
      p.op_state[1] = 0;
      p.op_state[0] = seq;
      __threadfence();
    }
  }
}

// The lone publisher's wait: until each of the first `pushers` warps has handed over at least `chunks` chunks (each
// of a warp's 32 lanes adds 1 per chunk). Every lane acquires every counter, so that any lane's later release is
// ordered after all of them. Pushers never wait, so this ends unless one stopped; the deadline bounds it all the same.
__device__ bool wait_pushers(const uint32_t* chunks_pushed, int pushers, uint32_t chunks, uint64_t deadline,
                             const Protocol& p, Phase phase, int lane) {
  bool fine = true;
  for (int w = 0; w < pushers && fine; ++w) {
    while (load_acquire_block(&chunks_pushed[w]) < 32u * chunks) {
      if (global_timer_ns() > deadline) {
        if (lane == 0) record_async_error(p.error, deepepTimeout, p.rank, phase, p.rank, 0, 0);
        fine = false;
        break;
      }
      __nanosleep(32);
    }
  }
  return __all_sync(0xffffffffu, fine);
}

// Zero-copy: tells `source` where its rows start in this rank's dispatch area and how many rows it takes.
__device__ __forceinline__ void send_ready(const Protocol& p, int source, uint32_t seq, int64_t first_row,
                                           int64_t limit) {
  ReadyMessage* message = &control_of(p.peers, source)->ready[seq & 1][p.rank];
  message->first_row = first_row;
  message->limit = limit;
  store_release_sys(&message->flag, seq);
}

// Tells `rank`'s combine block b that this rank pushes it no rows for operation `seq`: every row it could wait for is
// there, refused (a refused call, a handle whose worst-case dispatch failed), so it reads none and waits for none.
__device__ __forceinline__ void release_all_rows_refused(const Protocol& p, int rank, int b, uint32_t seq) {
  ControlRegion* peer = control_of(p.peers, rank);
  peer->combine_layout[p.rank][b] = static_cast<uint64_t>(kRefusedRowLayout);
  store_release_sys(&peer->combine_progress[p.rank][b], tagged(seq, kAllRowsRefused));
}

// Tells `rank`'s dispatch block b that this rank moves it no rows for operation `seq` (a refused call, a cached
// dispatch on a handle whose worst-case dispatch failed), with the handle's range where it has one (`send_ranges` and
// `send_counts` not null), so that the peer's record of it (kept for the combine) stays true.
__device__ __forceinline__ void send_refused_range(const Protocol& p, int rank, int b, uint32_t seq,
                                                   const int32_t* send_ranges, const int32_t* send_counts) {
  RangeMessage* message = &control_of(p.peers, rank)->ranges[p.rank][b];
  const int32_t* range = send_ranges + (static_cast<size_t>(rank) * kMaxBlocks + b) * 2;
  message->start = send_ranges != nullptr ? range[0] : 0;
  message->count = send_ranges != nullptr ? range[1] : 0;
  message->row_layout = kRefusedRowLayout;
  message->tokens = send_counts != nullptr ? send_counts[rank] : 0;
  message->num_blocks = gridDim.x;
  store_release_sys(&message->flag, seq);
}

// This rank's side of a call it refused (deepepRefuseCall): once the peers acknowledged the previous operation (the
// messages below overwrite what they read in it), it tells every peer where that call's kernel looks first, then
// finishes the operation like any other, reading no input and writing no output, so that the ranks stay in step.
// A refused dispatch sends what both of its kinds look for first (a cached dispatch each block's range, a worst-case
// one the counts), so that the peers finish whichever kind they made: the refusal may be of the very arguments that
// tell the kinds apart. Dispatch and combine run on the peers' block count (block b talks to block b), notify on one.
__global__ void refused_kernel(Protocol p, deepepCall_t call, const int32_t* send_ranges, const int32_t* send_counts) {
  wait_for_previous_grid();
  const uint32_t seq = p.op_state[0] + 1;
  const uint64_t deadline = global_timer_ns() + p.timeout_ns;
  const int b = blockIdx.x;
  const bool dispatch = call == deepepCallDispatch || call == deepepCallWorstCaseDispatch;
  const Phase phase = call == deepepCallDispatchNotify ? Phase::kDispatchNotify
                      : call == deepepCallCombine      ? Phase::kCombine
                                                       : Phase::kDispatch;
  if (threadIdx.x < 32 && wait_acks(p, seq, deadline, phase)) {
    for (int d = threadIdx.x; d < p.nranks; d += 32) {
      if (d == p.rank) continue;
      ControlRegion* peer = control_of(p.peers, d);
      if (call == deepepCallDispatchNotify || (dispatch && b == 0)) {
        if (dispatch) send_ready(p, d, seq, 0, 0);  // sources on a communicator with a dispatch area wait for it
        CountMessage* message = dispatch ? &peer->counts[p.rank] : &peer->notify[p.rank];
        message->tokens = 0;
        message->num_blocks = gridDim.x;
        message->experts_per_rank = kRefusedExpertsPerRank;
        store_release_sys(&message->flag, seq);
      }
      if (dispatch) {
        send_refused_range(p, d, b, seq, send_ranges, send_counts);
      } else if (call == deepepCallCombine) {
        release_all_rows_refused(p, d, b, seq);
      }
    }
  }
  finish_operation(p, seq);
}

// ---------------------------------------------------------------------------------------------------------------
// Routing: send positions, per-destination counts, per-expert counts and per-block ranges. Two kernels over tiles of
// kRoutingTile tokens (one thread per token): the first counts, the second turns counts into positions.

template <typename Index>
__device__ __forceinline__ uint32_t rank_mask(const Index* ids, int num_topk, int num_experts, int experts_per_rank,
                                              int32_t* expert_counts, AsyncErrorRecord* error, int rank, int64_t token,
                                              bool* skipped) {
  uint32_t mask = 0;
  for (int k = 0; k < num_topk; ++k) {
    const int64_t e = static_cast<int64_t>(ids[k]);
    if (e == -1) continue;
    if (e < -1 || e >= num_experts) {
      record_async_error(error, deepepInvalidArgument, rank, Phase::kRouting, -1, token * num_topk + k, e);
      *skipped = true;
      continue;
    }
    atomicAdd(&expert_counts[e], 1);
    mask |= 1u << (static_cast<int>(e) / experts_per_rank);
  }
  return mask;
}

struct RoutingParams {
  const void* topk_idx;
  bool topk_int64;
  int64_t num_tokens;
  int num_topk;
  int64_t stride;
  int num_experts;
  int nranks;
  int num_blocks;  // of the dispatch: one send range per (destination, block)
  int num_tiles;
  int32_t* send_pos;     // [N, R]; the first kernel leaves each token's rank mask in column 0
  int32_t* send_counts;  // [R]
  int32_t* expert_counts;
  int32_t* send_ranges;  // [R][kMaxBlocks][2]
  int32_t* tile_counts;  // [tiles, R]
  uint32_t* ticket;      // tiles finished in the second kernel (the last one resets it)
  int32_t* faults;       // set to 1 when an id out of range was skipped (cleared before the first kernel)
  AsyncErrorRecord* error;
  int rank;
};

// Kernel 1: each token's rank mask, per-expert counts (shared histogram, then one global add per expert and
// tile), and each tile's token count per destination.
template <typename Index>
__global__ void __launch_bounds__(kRoutingTile) routing_count_kernel(RoutingParams q) {
  allow_next_grid_launch();  // kernel 2 waits for all of this one before it reads anything
  if (blockIdx.x == 0 && threadIdx.x == 0) *q.ticket = 0;  // kernel 2 runs after this one (same stream)
  extern __shared__ int32_t histogram[];                   // [num_experts]
  __shared__ int32_t tile_count[kMaxNvlRanks];
  __shared__ bool skipped;  // an id out of range in this tile
  for (int e = threadIdx.x; e < q.num_experts; e += blockDim.x) histogram[e] = 0;
  if (threadIdx.x < kMaxNvlRanks) tile_count[threadIdx.x] = 0;
  if (threadIdx.x == 0) skipped = false;
  __syncthreads();
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRoutingTile + threadIdx.x;
  uint32_t mask = 0;
  if (t < q.num_tokens) {
    mask = rank_mask(static_cast<const Index*>(q.topk_idx) + t * q.stride, q.num_topk, q.num_experts,
                     q.num_experts / q.nranks, histogram, q.error, q.rank, t, &skipped);
    q.send_pos[t * q.nranks] = static_cast<int32_t>(mask);
  }
  for (int d = 0; d < q.nranks; ++d) {
    const int in_warp = __popc(__ballot_sync(0xffffffffu, (mask >> d) & 1u));
    if (threadIdx.x % 32 == 0 && in_warp > 0) atomicAdd(&tile_count[d], in_warp);
  }
  __syncthreads();
  wait_for_previous_grid();  // the clearing of the per-expert counts and the fault flag (launch_prepare_routing)
  if (threadIdx.x == 0 && skipped) *q.faults = 1;
  for (int e = threadIdx.x; e < q.num_experts; e += blockDim.x)
    if (histogram[e] != 0) atomicAdd(&q.expert_counts[e], histogram[e]);
  if (threadIdx.x < q.nranks) q.tile_counts[blockIdx.x * q.nranks + threadIdx.x] = tile_count[threadIdx.x];
}

// Kernel 2: positions (the tile's offset per destination plus the token's rank among the tile's tokens to it), and
// the start of each dispatch block's range: the position the block's first token would take. The last tile to
// finish derives the totals and the range lengths.
__global__ void __launch_bounds__(kRoutingTile) routing_position_kernel(RoutingParams q) {
  __shared__ int32_t base[kMaxNvlRanks];
  __shared__ int32_t warp_prefix[kRoutingTile / 32][kMaxNvlRanks];
  __shared__ bool last;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  wait_for_previous_grid();  // kernel 1's counts
  allow_next_grid_launch();  // the notify or dispatch kernel after this one waits for all of it
  if (threadIdx.x < q.nranks) {
    int32_t sum = 0;
    for (int tile = 0; tile < static_cast<int>(blockIdx.x); ++tile) sum += q.tile_counts[tile * q.nranks + threadIdx.x];
    base[threadIdx.x] = sum;
  }
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRoutingTile + threadIdx.x;
  const uint32_t mask = t < q.num_tokens ? static_cast<uint32_t>(q.send_pos[t * q.nranks]) : 0u;
  const uint32_t lanes_below = (1u << lane) - 1u;
  int32_t in_warp[kMaxNvlRanks];
  for (int d = 0; d < q.nranks; ++d) {
    const uint32_t ballot = __ballot_sync(0xffffffffu, (mask >> d) & 1u);
    in_warp[d] = __popc(ballot & lanes_below);
    if (lane == 0) warp_prefix[warp][d] = __popc(ballot);
  }
  __syncthreads();
  const int64_t per_block = (q.num_tokens + q.num_blocks - 1) / q.num_blocks;
  const bool block_start = t < q.num_tokens && per_block > 0 && t % per_block == 0;
  for (int d = 0; d < q.nranks; ++d) {
    int32_t position = base[d] + in_warp[d];
    for (int w = 0; w < warp; ++w) position += warp_prefix[w][d];
    if (t < q.num_tokens) q.send_pos[t * q.nranks + d] = (mask >> d) & 1u ? position : -1;
    // Positions grow with the token index, so a block's rows to d are one contiguous run starting here.
    if (block_start) q.send_ranges[(static_cast<size_t>(d) * kMaxBlocks + t / per_block) * 2] = position;
  }
  __syncthreads();  // every thread's writes are issued before the ticket is taken
  if (threadIdx.x == 0) {
    // Releases this tile's positions and range starts; the last tile acquires every other tile's with it. One
    // acquire-release add instead of a fence on each side of a relaxed one: this tail is the kernel's critical path
    // when there are few tokens.
    uint32_t finished;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(finished) : "l"(q.ticket) : "memory");
    last = finished == static_cast<uint32_t>(q.num_tiles - 1);
  }
  __syncthreads();
  if (!last) return;
  // The totals and every range in one round of loads: the starts the tiles wrote are loaded with the tile counts
  // (a block whose token range starts past the end starts at the total; each length is the next start minus this
  // one).
  constexpr int kPairsPerThread = (kMaxNvlRanks * kMaxBlocks + kRoutingTile - 1) / kRoutingTile;
  const int pairs = q.nranks * q.num_blocks;
  auto has_start = [&](int block) { return per_block > 0 && static_cast<int64_t>(block) * per_block < q.num_tokens; };
  int32_t start[kPairsPerThread], next[kPairsPerThread];
#pragma unroll
  for (int i = 0; i < kPairsPerThread; ++i) {
    const int pair = threadIdx.x + i * kRoutingTile, d = pair / q.num_blocks, block = pair % q.num_blocks;
    start[i] = next[i] = -1;
    if (pair >= pairs) continue;
    const int32_t* range = q.send_ranges + (static_cast<size_t>(d) * kMaxBlocks + block) * 2;
    if (has_start(block)) start[i] = range[0];
    if (block + 1 < q.num_blocks && has_start(block + 1)) next[i] = range[2];
  }
  if (threadIdx.x < q.nranks) {
    int32_t sum = 0;
    for (int tile = 0; tile < q.num_tiles; ++tile) sum += q.tile_counts[tile * q.nranks + threadIdx.x];
    base[threadIdx.x] = sum;  // the totals from here on
    q.send_counts[threadIdx.x] = sum;
  }
  if (threadIdx.x == 0) *q.ticket = 0;
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kPairsPerThread; ++i) {
    const int pair = threadIdx.x + i * kRoutingTile, d = pair / q.num_blocks, block = pair % q.num_blocks;
    if (pair >= pairs) break;
    int32_t* range = q.send_ranges + (static_cast<size_t>(d) * kMaxBlocks + block) * 2;
    const int32_t first = start[i] >= 0 ? start[i] : base[d];
    range[0] = first;
    range[1] = (next[i] >= 0 ? next[i] : base[d]) - first;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Notify: count exchange for exact-size outputs (one block).

// Tells a host waiting in mapped memory that the counts before it are there: the ticket is stored last, after a system
// fence (cumulative over the block's stores when a barrier came before it), so that the host, which reads the ticket
// with acquire, reads the counts it guards.
__device__ __forceinline__ void store_host_ticket(uint64_t* where, uint64_t ticket) {
  __threadfence_system();
  *reinterpret_cast<volatile uint64_t*>(where) = ticket;
}

__global__ void notify_kernel(Protocol p, const int32_t* send_counts, const int32_t* expert_counts,
                              int experts_per_rank, int expert_alignment, int num_blocks, int32_t* recv_counts,
                              int32_t* recv_expert_counts, int64_t* num_recv_device, HandleHostInfo* host,
                              uint64_t ticket, const int32_t* routing_faults, uint32_t* routing_op) {
  wait_for_previous_grid();  // the routing
  const uint32_t seq = p.op_state[0] + 1;
  const uint64_t deadline = global_timer_ns() + p.timeout_ns;
  if (threadIdx.x == 0) *routing_op = seq;
  // A routing that skipped ids out of range (recorded) fails this call, and the count message says so to every rank,
  // as a refused call's does, so that every rank's notify fails with it and none goes on to a dispatch alone.
  const bool skipped_ids = *routing_faults != 0;
  __shared__ bool ok;
  __shared__ bool agreed;  // this rank's routing took every id, and every source sent its counts laid out as its own
  if (threadIdx.x == 0) {
    ok = true;
    agreed = !skipped_ids;
  }
  __syncthreads();
  if (threadIdx.x < 32 && !wait_acks(p, seq, deadline, Phase::kDispatchNotify) && threadIdx.x == 0) ok = false;
  __syncthreads();
  for (int d = 0; d < p.nranks && ok; ++d) {
    CountMessage* message = &control_of(p.peers, d)->notify[p.rank];
    for (int i = threadIdx.x; i < experts_per_rank && !skipped_ids; i += blockDim.x)
      message->experts[i] = expert_counts[d * experts_per_rank + i];
    if (threadIdx.x == 0) {
      message->tokens = skipped_ids ? 0 : send_counts[d];
      message->num_blocks = num_blocks;
      message->experts_per_rank = skipped_ids ? kRefusedExpertsPerRank : experts_per_rank;
    }
  }
  __syncthreads();
  // The release is cumulative: it orders the whole block's message stores, which the barrier ordered before it (no
  // system fence of its own needed, as for the dispatch's progress).
  if (ok && threadIdx.x < p.nranks) store_release_sys(&control_of(p.peers, threadIdx.x)->notify[p.rank].flag, seq);
  ControlRegion* mine = control_of(p.peers, p.rank);
  if (ok && threadIdx.x < p.nranks) {
    if (!wait_flag(
            &mine->notify[threadIdx.x].flag, [&](uint64_t v) { return v == seq; }, deadline, p.error, p.rank,
            Phase::kDispatchNotify, threadIdx.x))
      ok = false;
  }
  __syncthreads();
  if (ok) {
    for (int i = threadIdx.x; i < experts_per_rank; i += blockDim.x) {
      int64_t sum = 0;
      for (int s = 0; s < p.nranks; ++s) {
        if (mine->notify[s].experts_per_rank != kRefusedExpertsPerRank) sum += mine->notify[s].experts[i];
      }
      recv_expert_counts[i] = static_cast<int32_t>(sum);
      host->recv_tokens_per_expert[i] = static_cast<int32_t>(align_up(sum, expert_alignment));
    }
    if (threadIdx.x == 0) {
      int64_t total = 0;
      for (int s = 0; s < p.nranks; ++s) {
        recv_counts[s] = mine->notify[s].tokens;
        total += mine->notify[s].tokens;
        if (mine->notify[s].experts_per_rank == kRefusedExpertsPerRank) {
          record_async_error(p.error, deepepRemoteError, p.rank, Phase::kDispatchNotify, s, kDetailPeerRefused, 0);
          agreed = false;
          continue;
        }
        if (mine->notify[s].num_blocks != num_blocks) {
          record_async_error(p.error, deepepInvalidArgument, p.rank, Phase::kDispatchNotify, s,
                             mine->notify[s].num_blocks, num_blocks);
          agreed = false;
        }
        // Ranks that disagree on the expert count (a collective parameter) are told so, never silently miscounted.
        if (mine->notify[s].experts_per_rank != experts_per_rank) {
          record_async_error(p.error, deepepInvalidArgument, p.rank, Phase::kDispatchNotify, s,
                             mine->notify[s].experts_per_rank, experts_per_rank);
          agreed = false;
        }
      }
      *num_recv_device = total;
      host->num_recv_tokens = total;
    }
  }
  // The host waits for the ticket, not for the kernel's end: it has the counts before this kernel's acknowledgements,
  // and a fault earlier work records meanwhile does not pass for this call's.
  __syncthreads();
  if (ok && agreed && threadIdx.x == 0) store_host_ticket(&host->ticket, ticket);
  finish_operation(p, seq);
}

// ---------------------------------------------------------------------------------------------------------------
// Dispatch.

struct DispatchParams {
  Protocol p;
  size_t region_bytes;
  DispatchRowLayout layout;
  // Routing (from the handle).
  const int32_t* send_pos;
  const int32_t* send_counts;
  const int32_t* expert_counts;
  const int32_t* send_ranges;
  int32_t* recv_ranges;
  int32_t* recv_counts;         // read, or written by a worst-case dispatch
  int64_t* num_recv_device;     // written by a worst-case dispatch
  int32_t* recv_expert_counts;  // rows for each local expert, unaligned: read, or written by a worst-case dispatch
  int64_t num_tokens;
  int experts_per_rank;
  int expert_alignment;
  // Payload.
  const uint8_t* x;
  int64_t x_stride_bytes;
  const uint8_t* scales;
  int64_t scales_stride_bytes;
  const void* topk_idx;
  bool topk_int64;
  int64_t topk_stride;
  const float* weights;
  int64_t weights_stride;
  // Outputs.
  uint8_t* recv_x;
  uint8_t* recv_scales;
  int64_t* recv_topk_idx;
  float* recv_weights;
  int32_t* recv_src_idx;
  int32_t* recv_per_expert;
  int64_t out_rows;
  bool worst_case;
  HandleHostInfo* report;         // a worst-case dispatch reporting its counts: where the host waits for them (mapped)
  uint64_t report_ticket;         // stored there once the counts are, unless this call's routing skipped ids (recorded)
  const int32_t* routing_faults;  // with report: 1 when this call's routing skipped ids out of range (recorded)
  int32_t* dispatch_failed;       // a worst-case dispatch's: set when its counts step fails (deepepHandle)
  uint32_t* routing_op;           // deepepHandle's: read, or written by a worst-case dispatch (its own seq)
  // Zero-copy receive (dispatch_kernel<true>: a communicator with a dispatch area, recv_x is this rank's area): the
  // peers write payloads straight into recv_x and each row's scales and metadata (the part of a region's row after
  // its payload) into the area's side rows, which the receiving warps read as they would a region's row.
  size_t area_offset;   // of the dispatch area in every rank's buffer
  size_t side_offset;   // of the side rows in the area
  size_t side_bytes;    // one side row: the row_bytes - scales_offset bytes of a region's row that follow the payload
  int64_t area_rows;    // rows the area holds in this call's layout
  int push_warps;       // warps 0 .. push_warps - 1 push rows, the others copy received rows out
  bool lone_publisher;  // progress is released by warp push_warps, which the pushers hand their chunks (see above)
  int diag;             // kDiag* bits: stages left out to time the others (never set in normal use)
};

// A dispatch row's layout in one word, for ranks to compare: payload bytes | scale bytes << 32 | top-k << 48. Rows
// of equal size can still be laid out differently (each part is padded to 16 bytes: top-k 2 and 3 give the same
// size, and so do a BF16 payload and an FP8 one with scales).
__device__ __forceinline__ int64_t row_layout_word(const DispatchRowLayout& L) {
  return static_cast<int64_t>(L.payload_bytes) | static_cast<int64_t>(L.scale_bytes) << 32 |
         static_cast<int64_t>(L.num_topk) << 48;
}

// Whether source s's range message matches this rank: rows laid out otherwise would be misread, a handle of another
// routing (the source's or this rank's) sends rows this rank's handle does not describe, a total other than this
// rank's count for the source would put rows into another source's outputs, and a block count other than this rank's
// would pair blocks wrongly. A mismatch is recorded when `record` (one lane per block).
__device__ __forceinline__ bool range_accepted(const Protocol& p, const RangeMessage& message, int s, int64_t layout,
                                               uint32_t routing, int64_t tokens, bool record) {
  if (message.row_layout == kRefusedRowLayout) {
    if (record) record_async_error(p.error, deepepRemoteError, p.rank, Phase::kDispatch, s, kDetailPeerRefused, 0);
    return false;
  }
  if (message.row_layout == layout && message.routing != routing) {
    if (record)
      record_async_error(p.error, deepepInvalidArgument, p.rank, Phase::kDispatch, s, kDetailPeerRouting,
                         routing_pair(message.routing, routing));
    return false;
  }
  int64_t got = 0, expected = 0;
  if (message.row_layout != layout) {
    got = message.row_layout, expected = layout;
  } else if (message.tokens != tokens) {
    got = message.tokens, expected = tokens;
  } else if (message.num_blocks != static_cast<int>(gridDim.x)) {
    got = message.num_blocks, expected = gridDim.x;
  } else {
    return true;
  }
  if (record) record_async_error(p.error, deepepInvalidArgument, p.rank, Phase::kDispatch, s, got, expected);
  return false;
}

// A 64-bit id past int32 names no expert: -1, not its low half, which could name one (a cached dispatch does not
// check the ids it carries).
__device__ __forceinline__ int32_t topk_entry(const DispatchParams& q, int64_t token, int k) {
  if (!q.topk_int64) return static_cast<const int32_t*>(q.topk_idx)[token * q.topk_stride + k];
  const int64_t id = static_cast<const int64_t*>(q.topk_idx)[token * q.topk_stride + k];
  return id == static_cast<int32_t>(id) ? static_cast<int32_t>(id) : -1;
}

// One token's routing as a push warp holds it: lane k slot k's id and weight, lane d the token's position at rank d
// (-1 / 0 where none, and for token -1).
struct TokenRouting {
  int32_t id;
  float weight;
  int32_t pos;
};

__device__ __forceinline__ TokenRouting load_token_routing(const DispatchParams& q, int64_t t, int lane) {
  TokenRouting r{-1, 0.f, -1};
  if (t < 0) return r;
  if (lane < q.layout.num_topk) {
    if (q.topk_idx != nullptr) r.id = topk_entry(q, t, lane);
    if (q.weights != nullptr) r.weight = q.weights[t * q.weights_stride + lane];
  }
  if (lane < q.p.nranks) r.pos = q.send_pos[t * q.p.nranks + lane];
  return r;
}

// Writes row `out_row` of the metadata outputs. Lane k (< num_topk, at most 32) holds slot k's global expert id and
// weight, so the slots are written in parallel and no lane keeps all of them.
__device__ __forceinline__ void write_meta(const DispatchParams& q, int64_t out_row, int32_t src_token, int32_t id,
                                           float weight, int lane) {
  const int num_topk = q.layout.num_topk;
  if (lane < num_topk) {
    const int first_local = q.p.rank * q.experts_per_rank;
    const bool here = id >= first_local && id < first_local + q.experts_per_rank;
    if (q.recv_topk_idx != nullptr) q.recv_topk_idx[out_row * num_topk + lane] = here ? id - first_local : -1;
    if (q.recv_weights != nullptr) q.recv_weights[out_row * num_topk + lane] = here ? weight : 0.f;
  }
  if (lane == 0 && q.recv_src_idx != nullptr) q.recv_src_idx[out_row] = src_token;
}

// Copies a row's payload (unless `skip_payload`, a diagnostic) and its scales (when `scales`) into output row
// `out_row` with one warp; `kSource` as in load16. The copy-out of received rows (kPeerWritten) loads a row's last,
// partial round at once, with 6 loads in flight per lane for small rows and 4 for large ones. 2 x H200, same run, each
// build twice, N = 4096, cached FP8 at 16 / 24 SMs: 137.8-138.3 / 118.9-119.2 us against 143.0-143.7 / 123.0; BF16
// (7 whole rounds of 4, no tail) and N = 512 unchanged. Large rows with 6 in flight lost time (another run: BF16
// 246.8-251.8 / 219.2-222.1 against 240.2-240.6 / 218.7-219.1), and 8 in flight spilled registers.
template <Source kSource>
__device__ __forceinline__ void copy_to_output_row(const DispatchParams& q, int64_t out_row, const uint8_t* payload,
                                                   const uint8_t* scales, bool skip_payload, int lane) {
  const DispatchRowLayout& L = q.layout;
  uint8_t* payload_out = q.recv_x + out_row * L.payload_bytes;
  if (!skip_payload) {
    if constexpr (kSource != Source::kPeerWritten) {
      warp_copy<kSource>(payload_out, payload, L.payload_bytes, lane);
    } else if (large_dispatch_rows(L.row_bytes)) {
      warp_copy<kSource, 4, true>(payload_out, payload, L.payload_bytes, lane);
    } else {
      warp_copy<kSource, 6, true>(payload_out, payload, L.payload_bytes, lane);
    }
  }
  if (scales != nullptr) warp_copy<kSource>(q.recv_scales + out_row * L.scale_bytes, scales, L.scale_bytes, lane);
}

// kZeroCopy: the communicator has a dispatch area (see DispatchParams), as a template argument so that the usual path
// keeps its registers.
template <bool kZeroCopy>
__global__ void __launch_bounds__(kDispatchWarps * 32) dispatch_kernel(DispatchParams q) {
  wait_for_previous_grid();  // the routing, or whatever ran before on the stream
  const Protocol& p = q.p;
  const uint32_t seq = p.op_state[0] + 1;
  const uint64_t deadline = global_timer_ns() + p.timeout_ns;
  const int b = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int R = p.nranks;
  ControlRegion* mine = control_of(p.peers, p.rank);

  __shared__ int64_t offsets[kMaxNvlRanks + 1];
  __shared__ int32_t rows_done[kMaxNvlRanks];
  // Receive side: next row of each source's range to copy out (for this rank, with few tokens, the next of the
  // block's tokens).
  __shared__ int32_t rows_claimed[kMaxNvlRanks];
  __shared__ uint32_t chunks_pushed[kDispatchWarps];  // with a lone publisher: chunks each pushing warp handed over
  __shared__ bool ok;
  if (threadIdx.x == 0) ok = true;
  if (threadIdx.x < kMaxNvlRanks) rows_done[threadIdx.x] = rows_claimed[threadIdx.x] = 0;
  if (threadIdx.x < kDispatchWarps) chunks_pushed[threadIdx.x] = 0;
  __syncthreads();
  // A cached dispatch on a handle whose worst-case dispatch failed moves no rows, as its combine does (combine_kernel):
  // the handle's receive counts are not those of its routing. It says so again (an error cleared since is not lost),
  // and tells the peers as a refused call does, so that their dispatch ends at once.
  const int32_t handle_failed = q.worst_case ? 0 : *q.dispatch_failed;

  if (kZeroCopy && !q.worst_case && b == 0 && warp == 1 && lane < R && lane != p.rank) {
    // Zero-copy: tell each source where its rows go in this rank's area at once (the work before this kernel is done
    // with the area), from the handle's counts, instead of after the acknowledgements (below), which would put one
    // more trip between the ranks ahead of the first push.
    int64_t first_row = 0;
    for (int s = 0; s < lane; ++s) first_row += q.recv_counts[s];
    send_ready(p, lane, seq, first_row, handle_failed != 0 ? 0 : min(q.out_rows, q.area_rows));
  }
  // Steps 1-2. A worst-case dispatch learns the counts from the other ranks here; any other dispatch has them in
  // the handle already (from its count exchange or from the worst-case dispatch that made it), so its pushers start
  // as soon as the destinations acknowledged the previous operation.
  bool fine = true;  // warp 0's: the destinations acknowledged the previous operation
  const bool sends_counts = q.worst_case && b == 0;
  const uint32_t routed_by = q.worst_case ? seq : *q.routing_op;
  if (q.worst_case && b == 0 && threadIdx.x == 0) *q.routing_op = seq;
  if (warp == 0) {
    fine = wait_acks(p, seq, deadline, Phase::kDispatch);
    if (handle_failed != 0 && fine && lane < R && lane != p.rank)
      send_refused_range(p, lane, b, seq, q.send_ranges, q.send_counts);
    if (sends_counts && fine) {
      // A reporting dispatch whose routing skipped ids out of range (recorded) refuses the call in the count message,
      // as a refused call does: its host's wait fails, so every rank's fails with it, and none goes on to a combine
      // this rank never makes. A plain worst-case dispatch (no host wait: every rank goes on to the combine) moves
      // the rest of the rows instead, so that the combine after it completes.
      const bool skipped_ids = q.report != nullptr && *q.routing_faults != 0;
      for (int d = 0; d < R; ++d) {
        CountMessage* message = &control_of(p.peers, d)->counts[p.rank];
        for (int i = lane; i < q.experts_per_rank && !skipped_ids; i += 32)
          message->experts[i] = q.expert_counts[d * q.experts_per_rank + i];
        if (lane == 0) {
          message->tokens = skipped_ids ? 0 : q.send_counts[d];
          message->num_blocks = gridDim.x;
          message->experts_per_rank = skipped_ids ? kRefusedExpertsPerRank : q.experts_per_rank;
        }
      }
    }
  }
  // The whole block meets here so that every lane's message stores come before each lane's (cumulative) release,
  // which the memory model promises for bar.sync. (A barrier of warp 0 alone, bar.sync 2, 32, did the same, but
  // racecheck then reported hazards across the block barrier below, on one H200; docs/reliability.md.)
  if (sends_counts) __syncthreads();
  if (warp == 0) {
    if (sends_counts && fine && lane < R) store_release_sys(&control_of(p.peers, lane)->counts[p.rank].flag, seq);
    if (lane == 0) {
      // One lane acquires every source's counts, then reads them (its own acquires order its reads).
      for (int s = 0; s < R && fine && q.worst_case; ++s)
        fine = wait_flag(
            &mine->counts[s].flag, [&](uint64_t v) { return v == seq; }, deadline, p.error, p.rank, Phase::kDispatch,
            s);
      ok = fine && handle_failed == 0;
      if (handle_failed != 0 && b == 0)
        record_async_error(p.error, handle_failed > 0 ? deepepRemoteError : deepepInvalidArgument, p.rank,
                           Phase::kDispatch, handle_failed > 0 ? handle_failed - 1 : -1, kDetailDispatchFailed, 0);
      int refusing = -1;  // the first source that refused the call
      int64_t total = 0;
      for (int s = 0; s < R; ++s) {
        offsets[s] = total;
        if (!fine || handle_failed != 0) continue;
        if (q.worst_case && mine->counts[s].experts_per_rank == kRefusedExpertsPerRank) {
          // The source refused the call: so does every rank (no rows move), and all of them finish it.
          record_async_error(p.error, deepepRemoteError, p.rank, Phase::kDispatch, s, kDetailPeerRefused, 0);
          ok = false;
          if (refusing < 0) refusing = s;
          continue;
        }
        total += q.worst_case ? mine->counts[s].tokens : q.recv_counts[s];
        if (!q.worst_case) {
          // The handle's count of this rank's own rows must be what this rank sends itself (it is not, after a
          // failed exchange): the rows would land at the wrong place, so say so.
          if (s == p.rank && q.recv_counts[s] != q.send_counts[s])
            record_async_error(p.error, deepepInvalidArgument, p.rank, Phase::kDispatch, s, q.recv_counts[s],
                               q.send_counts[s]);
          continue;
        }
        if (mine->counts[s].num_blocks != static_cast<int>(gridDim.x)) {
          record_async_error(p.error, deepepInvalidArgument, p.rank, Phase::kDispatch, s, mine->counts[s].num_blocks,
                             gridDim.x);
          ok = false;
        }
        // Ranks that disagree on the expert count would index each other's per-expert counts wrongly: refuse.
        if (mine->counts[s].experts_per_rank != q.experts_per_rank) {
          record_async_error(p.error, deepepInvalidArgument, p.rank, Phase::kDispatch, s,
                             mine->counts[s].experts_per_rank, q.experts_per_rank);
          ok = false;
        }
      }
      offsets[R] = total;
      // No rank moves rows or writes receive ranges now: the combine of this routing is told (deepepHandle).
      if (q.worst_case && !ok) atomicCAS(q.dispatch_failed, 0, refusing >= 0 ? refusing + 1 : -1);
      if (ok && total > q.out_rows) {
        // More rows arrive than the outputs hold: report the count, write nothing past the end.
        record_async_error(p.error, deepepBufferTooSmall, p.rank, Phase::kDispatch, -1, total, q.out_rows);
      }
    }
  }
  __syncthreads();
  const int64_t total_rows = offsets[R];
  if (kZeroCopy && q.worst_case && b == 0 && threadIdx.x < R && threadIdx.x != p.rank) {
    // A worst-case dispatch's ready messages, once it has the counts (sent even when this rank failed, with limit 0,
    // so that no source waits in vain).
    send_ready(p, threadIdx.x, seq, offsets[threadIdx.x], ok ? min(q.out_rows, q.area_rows) : 0);
  }

  if (ok && b == 0) {
    // The receive counts go into the handle (for later cached dispatches and combines), and the per-expert counts
    // into the output when asked for. A report to the host is a seqlock: its ticket is cleared before the counts
    // change and set after them, so that a host copying another dispatch's counts meanwhile sees the ticket move.
    if (q.report != nullptr) {
      if (threadIdx.x == 0) {
        *reinterpret_cast<volatile uint64_t*>(&q.report->ticket) = 0;
        __threadfence_system();
      }
      __syncthreads();
    }
    if (q.worst_case && threadIdx.x < R) q.recv_counts[threadIdx.x] = mine->counts[threadIdx.x].tokens;
    if (q.worst_case && threadIdx.x == 0) *q.num_recv_device = total_rows;
    for (int i = threadIdx.x; i < q.experts_per_rank; i += blockDim.x) {
      int64_t sum = 0;
      if (q.worst_case) {
        for (int s = 0; s < R; ++s) sum += mine->counts[s].experts[i];
        q.recv_expert_counts[i] = static_cast<int32_t>(sum);
      } else {
        sum = q.recv_expert_counts[i];
      }
      const int32_t aligned = static_cast<int32_t>(align_up(sum, q.expert_alignment));
      if (q.recv_per_expert != nullptr) q.recv_per_expert[i] = aligned;
      if (q.report != nullptr) q.report->recv_tokens_per_expert[i] = aligned;
    }
    if (q.report != nullptr) {
      // The host waits for the ticket, stored last: the counts are out while the rows still move.
      if (threadIdx.x == 0) q.report->num_recv_tokens = total_rows;
      __syncthreads();
      if (threadIdx.x == 0 && *q.routing_faults == 0) store_host_ticket(&q.report->ticket, q.report_ticket);
    }
  }
  // Padding rows (a worst-case output, or a cached call into worst-case sized outputs): no token, -1 ids, zero
  // weights.
  if (ok && total_rows < q.out_rows) {
    const int num_topk = q.layout.num_topk;
    for (int64_t row = total_rows + static_cast<int64_t>(b) * blockDim.x + threadIdx.x; row < q.out_rows;
         row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      if (q.recv_src_idx != nullptr) q.recv_src_idx[row] = -1;
      for (int k = 0; k < num_topk; ++k) {
        if (q.recv_topk_idx != nullptr) q.recv_topk_idx[row * num_topk + k] = -1;
        if (q.recv_weights != nullptr) q.recv_weights[row * num_topk + k] = 0.f;
      }
    }
  }

  const DispatchRowLayout& L = q.layout;
  const int push_warps = q.push_warps;
  // This block's tokens. With few of them (one chunk's worth at the usual size), the pushing warps release progress
  // after every token per warp, and the receiving warps, idle until the peers' rows come, copy the rows to this rank
  // so that the pushing warps reach the peers sooner; with many, the receiving warps have copy-out enough.
  const int64_t per_block = (q.num_tokens + gridDim.x - 1) / gridDim.x;
  const int64_t t0 = min(q.num_tokens, b * per_block), t1 = min(q.num_tokens, t0 + per_block);
  const int64_t tokens_per_warp = (per_block + push_warps - 1) / push_warps;
  // The pushing warps also write the rows to this rank, each row loaded once for all its destinations, unless the
  // block has few tokens. Zero-copy dispatches too: with the receiving warps copying them instead (they have no
  // payloads to copy out), 2 x H200, same run, N = 4096, BF16 / FP8 took 205.3 / 119.5 us on 16 SMs and 216.5 /
  // 127.1 on 24 against 195.7 / 120.5 and 215.6 / 117.4.
  const bool receivers_copy_own_rows = tokens_per_warp <= kDispatchTokensPerWarpPerChunk;
  const bool long_runs = large_dispatch_rows(L.row_bytes) && tokens_per_warp >= kDispatchLongRunTokens;
  const int tokens_per_warp_per_chunk = receivers_copy_own_rows ? 1
                                        : long_runs             ? kDispatchTokensPerWarpPerChunkLongRuns
                                                                : kDispatchTokensPerWarpPerChunk;
  const bool lone_publisher = q.lone_publisher && !receivers_copy_own_rows;
  // With small rows the block's last chunk's worth of tokens goes in chunks of one token per pushing warp, so that
  // the rows of the last release, which the receiver copies out after everything else, are fewer.
  const int64_t tail_tokens =
      large_dispatch_rows(L.row_bytes) ? 0 : static_cast<int64_t>(push_warps) * tokens_per_warp_per_chunk;
  auto chunk_end = [&](int64_t c0) {
    return min(t1, c0 + push_warps * (t1 - c0 <= tail_tokens ? 1 : tokens_per_warp_per_chunk));
  };
  if (ok && warp < push_warps) {
    // Step 3: send warps.
    if (warp == 0 && lane < R && lane != p.rank) {
      const int32_t* range = q.send_ranges + (static_cast<size_t>(lane) * kMaxBlocks + b) * 2;
      RangeMessage* message = &control_of(p.peers, lane)->ranges[p.rank][b];
      message->start = range[0];
      message->count = range[1];
      message->row_layout = row_layout_word(L);
      message->tokens = q.send_counts[lane];
      message->num_blocks = gridDim.x;
      message->routing = routed_by;
      store_release_sys(&message->flag, seq);
    }
    // Zero-copy: lane d learns where this source's rows start in rank d's area and how many it takes.
    int32_t area_first_row = 0, area_limit = 0;  // 32 bits (the host keeps areas below 2^31 rows): registers
    if (kZeroCopy && lane < R && lane != p.rank &&
        wait_flag(
            &mine->ready[seq & 1][lane].flag, [&](uint64_t v) { return v == seq; }, deadline, p.error, p.rank,
            Phase::kDispatch, lane)) {
      const ReadyMessage& message = mine->ready[seq & 1][lane];
      // The rows this rank's own layout fits in the area as well: a destination that lays rows out otherwise (an
      // error its receive reports) must not lead this rank to write past the area. A start outside [0, limit] (from a
      // handle whose counts a failed exchange left) takes no rows.
      const int64_t first_row = message.first_row, limit = min(message.limit, q.area_rows);
      if (first_row >= 0 && first_row <= limit) {
        area_first_row = static_cast<int32_t>(first_row);
        area_limit = static_cast<int32_t>(limit);  // area_rows < 2^31 (dispatch_area_layout)
      }
    }
    // A warp's tokens are warp, warp + push_warps, ... of the block's range. Lane k loads slot k's id and weight,
    // and lane d the token's position at rank d, for the warp's next token while the current one's row moves, so
    // that no row waits for a round of loads of its own.
    TokenRouting next = load_token_routing(q, t0 + warp < t1 ? t0 + warp : -1, lane);
    for (int64_t c0 = t0, c1; c0 < t1; c0 = c1) {
      c1 = chunk_end(c0);
      for (int64_t t = c0 + warp; t < c1; t += push_warps) {
        const uint8_t* x_row = q.x + t * q.x_stride_bytes;
        const uint8_t* scale_row = q.scales != nullptr ? q.scales + t * q.scales_stride_bytes : nullptr;
        const TokenRouting current = next;
        next = load_token_routing(q, t + push_warps < t1 ? t + push_warps : -1, lane);
        const int32_t my_id = current.id, my_pos = current.pos;
        const float my_weight = current.weight;
        // Lane d holds where the token's row goes at rank d: the output row for this rank (unless the receiving
        // warps copy those), the row in this source's region at a peer. Each piece of the row is then loaded once and
        // stored to every destination. An output row past out_rows (a worst-case dispatch with more rows than its
        // outputs) is not written.
        int64_t my_out_row = lane == p.rank && my_pos >= 0 && !receivers_copy_own_rows ? offsets[lane] + my_pos : -1;
        if (my_out_row >= q.out_rows) my_out_row = -1;
        // The row's place at rank `lane`: its payload, and its scales and metadata (`my_side`, laid out as the part
        // of a region's row after the payload).
        uint8_t *my_row = nullptr, *my_side = nullptr;
        if (lane < R && my_pos >= 0 && lane != p.rank) {
          if (!kZeroCopy) {
            my_row = region_of(p.peers, lane, p.rank, q.region_bytes) + static_cast<size_t>(my_pos) * L.row_bytes;
            my_side = my_row + L.scales_offset;
          } else if (area_first_row + my_pos < area_limit) {
            uint8_t* area = static_cast<uint8_t*>(p.peers[lane]) + q.area_offset;
            const size_t row = static_cast<size_t>(area_first_row + my_pos);
            my_row = area + row * L.payload_bytes;
            my_side = area + q.side_offset + row * q.side_bytes;
          }
        }
        // Zero-copy: the ranks the token goes to, whether or not its row fits there (one that does not still counts
        // in the progress, for which the destination waits before it finds the row past its outputs).
        const uint32_t dest_mask = kZeroCopy ? __ballot_sync(0xffffffffu, lane < R && my_pos >= 0) : 0u;
        uint8_t* payload_dst = my_row;
        if (q.diag & kDiagSkipRemotePush) payload_dst = nullptr;
        if (my_out_row >= 0 && !(q.diag & kDiagSkipLocalRows)) payload_dst = q.recv_x + my_out_row * L.payload_bytes;
        warp_copy_to_each<Source::kInput>(payload_dst, x_row, L.payload_bytes, lane);
        if (scale_row != nullptr) {
          uint8_t* scales_dst = my_side;
          if (my_out_row >= 0) scales_dst = q.recv_scales + my_out_row * L.scale_bytes;
          warp_copy_to_each<Source::kInput>(scales_dst, scale_row, L.scale_bytes, lane);
        }
        for (int d = 0; d < R; ++d) {
          if (d == p.rank) {
            const int64_t out_row = __shfl_sync(0xffffffffu, my_out_row, d);
            if (out_row >= 0) write_meta(q, out_row, static_cast<int32_t>(t), my_id, my_weight, lane);
            continue;
          }
          uint8_t* side =
              reinterpret_cast<uint8_t*>(__shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(my_side), d));
          if (side == nullptr && !((dest_mask >> d) & 1u)) continue;
          if (side != nullptr) {
            int32_t* meta = reinterpret_cast<int32_t*>(side + (L.meta_offset - L.scales_offset));
            if (lane == 0) meta[0] = static_cast<int32_t>(t);
            if (lane < L.num_topk) {
              meta[1 + lane] = my_id;
              reinterpret_cast<float*>(meta + 1 + L.num_topk)[lane] = my_weight;
            }
          }
          __syncwarp();
          if (lane == 0 && !lone_publisher) atomicAdd(&rows_done[d], 1);
        }
      }
      if (lone_publisher) {
        // Hand the chunk to the publisher (below) and go on: each lane's release orders its own stores.
        add_release_block(&chunks_pushed[warp], 1);
        continue;
      }
      // Publish progress: after a barrier of the senders, one lane per destination releases the new row count at
      // system scope. The release is cumulative: it orders every store the barrier ordered before it, the other
      // warps' rows included, so the senders need no fence of their own. The count is read between two barriers:
      // after this chunk's increments, before the next chunk's.
      group_barrier(1, push_warps * 32);
      const uint32_t done = warp == 0 && lane < R ? static_cast<uint32_t>(rows_done[lane]) : 0;
      group_barrier(1, push_warps * 32);
      if (warp == 0 && lane < R && lane != p.rank) {
        store_release_sys(&control_of(p.peers, lane)->progress[p.rank][b], tagged(seq, done));
      }
    }
  } else if (ok && lone_publisher && warp == push_warps) {
    // Step 3, the lone publisher: once every pushing warp has handed over a chunk, lane d releases to rank d the rows
    // to it among the block's tokens up to the chunk's end (positions follow token order, so those are the first rows
    // of the range). The release is cumulative over what the pushers' releases ordered, so no pusher fences or waits
    // for another; only this warp waits for the system-scope releases.
    uint32_t rows = 0, published = 0;  // lane d: rows to rank d so far, and the count last released
    uint32_t chunks = 0;
    for (int64_t c0 = t0, c1; c0 < t1; c0 = c1) {
      c1 = chunk_end(c0);
      for (int64_t piece = c0; piece < c1; piece += 32) {
        const int64_t t = piece + lane;
        for (int d = 0; d < R; ++d) {
          const uint32_t n = __popc(__ballot_sync(0xffffffffu, t < c1 && q.send_pos[t * R + d] >= 0));
          if (lane == d) rows += n;
        }
      }
      if (!wait_pushers(chunks_pushed, push_warps, ++chunks, deadline, p, Phase::kDispatch, lane)) break;
      if (lane < R && lane != p.rank && rows != published) {
        store_release_sys(&control_of(p.peers, lane)->progress[p.rank][b], tagged(seq, rows));
        published = rows;
      }
    }
  }
  if (ok) {
    // Step 4: the receive warps copy what block b of each source published into the outputs (and, with few tokens,
    // the block's rows to this rank first: they need no wait); the send warps join them once their own rows are out.
    // Warps claim rows one at a time, so the copy-out speeds up as senders finish (with few tokens it would
    // otherwise start only after the single chunk and run on a third of the warps).
    for (int step = 0; step < R; ++step) {
      const int s = (p.rank + step) % R;
      int32_t start, count;
      bool accepted = true;
      bool same_routing = true;  // the range describes this handle's routing: the combine may push by it
      if (s == p.rank) {
        const int32_t* range = q.send_ranges + (static_cast<size_t>(s) * kMaxBlocks + b) * 2;
        start = range[0];
        count = range[1];
      } else {
        // Waits are made warp-uniform (every lane acquires; the warp goes on only if all did), so that the warp's
        // shuffles below always see all 32 lanes.
        if (!__all_sync(0xffffffffu, wait_flag(
                                         &mine->ranges[s][b].flag, [&](uint64_t v) { return v == seq; }, deadline,
                                         p.error, p.rank, Phase::kDispatch, s)))
          break;
        const RangeMessage& message = mine->ranges[s][b];
        start = message.start;
        count = message.count;
        accepted = range_accepted(p, message, s, row_layout_word(L), routed_by, offsets[s + 1] - offsets[s],
                                  warp == push_warps && lane == 0);
        same_routing = message.row_layout == kRefusedRowLayout || message.routing == routed_by;
      }
      // Kept for the combine even when refused, so that it stays in step; not a range of another routing (the peer
      // passed the handle of another dispatch), which would spoil this handle for the combine made with the right one.
      if (warp == push_warps && lane == 0 && same_routing) {
        int32_t* out = q.recv_ranges + (static_cast<size_t>(s) * kMaxBlocks + b) * 2;
        out[0] = start;
        out[1] = count;
      }
      if (s == p.rank && receivers_copy_own_rows) {
        // The block's tokens, one per claim; a token's row goes to output row offsets[rank] + its position here.
        for (;;) {
          int32_t i = lane == 0 ? atomicAdd(&rows_claimed[s], 1) : 0;
          i = __shfl_sync(0xffffffffu, i, 0);
          const int64_t t = t0 + i;
          if (t >= t1) break;
          const TokenRouting routing = load_token_routing(q, t, lane);
          const int32_t pos = __shfl_sync(0xffffffffu, routing.pos, s);
          const int64_t out_row = offsets[s] + pos;
          if (pos < 0 || out_row >= q.out_rows) continue;  // past out_rows: a worst-case output too small
          copy_to_output_row<Source::kInput>(q, out_row, q.x + t * q.x_stride_bytes,
                                             q.scales != nullptr ? q.scales + t * q.scales_stride_bytes : nullptr,
                                             q.diag & kDiagSkipLocalRows, lane);
          write_meta(q, out_row, static_cast<int32_t>(t), routing.id, routing.weight, lane);
        }
      }
      if (s == p.rank || !accepted) continue;  // otherwise the send warps wrote the rows to this rank
      // Each received row's part after its payload (scales and metadata), and the payload where it is not in place.
      const uint8_t* sides = kZeroCopy ? q.recv_x + q.side_offset + static_cast<size_t>(offsets[s]) * q.side_bytes
                                       : region_of(p.peers, p.rank, s, q.region_bytes) + L.scales_offset;
      const size_t side_stride = kZeroCopy ? q.side_bytes : L.row_bytes;
      uint32_t available = 0;
      bool alive = true;
      while (alive) {
        int32_t i = lane == 0 ? atomicAdd(&rows_claimed[s], 1) : 0;
        i = __shfl_sync(0xffffffffu, i, 0);
        if (i >= count) break;
        if (available <= static_cast<uint32_t>(i)) {
          uint64_t seen = 0;
          alive = __all_sync(0xffffffffu, wait_flag(
                                              &mine->progress[s][b],
                                              [&](uint64_t v) {
                                                return (v >> 32) == seq && (v & 0xffffffffu) > static_cast<uint64_t>(i);
                                              },
                                              deadline, p.error, p.rank, Phase::kDispatch, s, &seen));
          if (!alive) break;
          available = __reduce_min_sync(0xffffffffu, static_cast<uint32_t>(seen & 0xffffffffu));  // all lanes saw it
        }
        const int64_t j = start + i;
        const int64_t out_row = offsets[s] + j;
        if (out_row >= q.out_rows) continue;
        const uint8_t* side = sides + static_cast<size_t>(j) * side_stride;
        // The row's metadata is loaded before its payload is copied, so that its round trip overlaps the copy's.
        const int32_t* meta = reinterpret_cast<const int32_t*>(side + (L.meta_offset - L.scales_offset));
        const int32_t src_token = meta[0];
        const int32_t id = lane < L.num_topk ? meta[1 + lane] : -1;
        const float weight = lane < L.num_topk ? reinterpret_cast<const float*>(meta + 1 + L.num_topk)[lane] : 0.f;
        copy_to_output_row<Source::kPeerWritten>(q, out_row, kZeroCopy ? nullptr : side - L.scales_offset,
                                                 q.recv_scales != nullptr ? side : nullptr,
                                                 kZeroCopy || (q.diag & kDiagSkipCopyOut), lane);
        write_meta(q, out_row, src_token, id, weight, lane);
      }
      if (!alive) break;
    }
  }
  finish_operation(p, seq);
}

// ---------------------------------------------------------------------------------------------------------------
// Combine.

struct CombineParams {
  Protocol p;
  size_t region_bytes;
  size_t row_bytes;
  int64_t num_rows;  // rows of x: pushing never reads past them
  int hidden;
  int num_topk;
  const int32_t* send_pos;
  const int32_t* send_ranges;
  const int32_t* recv_ranges;
  const int32_t* recv_counts;
  const int32_t* dispatch_failed;  // deepepHandle's: the worst-case dispatch that routed the handle failed
  const uint32_t* routing_op;      // deepepHandle's: the operation that routed it (routing_pair)
  int64_t num_tokens;
  const uint8_t* x;
  int64_t x_stride_bytes;
  const float* weights;
  int64_t weights_stride;
  const uint8_t* bias0;
  int64_t bias0_stride_bytes;
  const uint8_t* bias1;
  int64_t bias1_stride_bytes;
  __nv_bfloat16* out;
  float* out_weights;
  bool lone_publisher;  // as in DispatchParams
  int diag;             // kDiag* bits, as in DispatchParams
};

__device__ __forceinline__ void add_bf16x8(float* acc, int4 packed) {
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&packed);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    acc[2 * i] = __fadd_rn(acc[2 * i], f.x);
    acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], f.y);
  }
}

// A combine row's layout in one word (hidden | top-k << 32), for ranks to compare: a rank reading rows laid out
// otherwise would sum them at the wrong stride.
__device__ __forceinline__ uint64_t combine_layout_word(const CombineParams& q) {
  return static_cast<uint64_t>(q.hidden) | static_cast<uint64_t>(q.num_topk) << 32;
}

// Whether this rank can push the `count` rows of source `s` that start at `start` (in the source's receive order):
// they must be in x (a worst-case handle whose dispatch overflowed, or too few rows passed, leaves some out) and fit
// the source's region. The pushers record why not.
__device__ __forceinline__ bool combine_pushable(const CombineParams& q, const int64_t* offsets, int s, int32_t start,
                                                 int32_t count) {
  return offsets[s] + start + count <= q.num_rows && static_cast<size_t>(start + count) * q.row_bytes <= q.region_bytes;
}

// kPushWarps: the warps that push (kCombinePushWarpsLonePublisher with q.lone_publisher, else kCombinePushWarpsFewRows
// or kCombinePushWarps: launch_combine).
template <int kPushWarps>
__global__ void __launch_bounds__(kCombineWarps * 32) combine_kernel(CombineParams q) {
  const Protocol& p = q.p;
  const uint32_t seq = p.op_state[0] + 1;
  const uint64_t deadline = global_timer_ns() + p.timeout_ns;
  const int b = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int R = p.nranks;
  ControlRegion* mine = control_of(p.peers, p.rank);
  const size_t payload_bytes = static_cast<size_t>(q.hidden) * 2;
  const size_t weights_offset = (payload_bytes + 15) / 16 * 16;

  __shared__ int64_t offsets[kMaxNvlRanks + 1];
  __shared__ int32_t tokens_claimed;              // reduction: tokens of the block's range taken by a warp so far
  __shared__ uint32_t chunks_pushed[kPushWarps];  // with a lone publisher: chunks each pushing warp handed over
  __shared__ bool ok;
  if (threadIdx.x < kPushWarps) chunks_pushed[threadIdx.x] = 0;
  if (threadIdx.x == 0) {
    tokens_claimed = 0;
    int64_t total = 0;
    for (int s = 0; s < R; ++s) {
      offsets[s] = total;
      total += q.recv_counts[s];
    }
    offsets[R] = total;
  }
  if (warp == 0) {
    const bool fine = wait_acks(p, seq, deadline, Phase::kCombine);
    const int32_t failed = *q.dispatch_failed;
    if (lane == 0) {
      // After a worst-case dispatch that a rank refused or the ranks disagreed on (which every rank sees alike) no
      // rank has rows of it to push or receive ranges to push them by: every rank's combine of it, and of a cached
      // dispatch on the handle, moves nothing and waits for no rows until a routing clears the word (a refusing rank,
      // which has no handle, makes its combine as a refusal). A timeout sets it on the ranks that saw one only: these
      // tell their peers (below) that no rows come, as a refusal does, so that the peers' combine ends at once too. So
      // that an error cleared since is not lost, it is recorded again.
      if (failed != 0 && b == 0)
        record_async_error(p.error, failed > 0 ? deepepRemoteError : deepepInvalidArgument, p.rank, Phase::kCombine,
                           failed > 0 ? failed - 1 : -1, kDetailDispatchFailed, 0);
      ok = fine && failed == 0;
    }
    if (fine && failed != 0 && lane < R && lane != p.rank) release_all_rows_refused(p, lane, b, seq);
  }
  __syncthreads();

  const int chunk_rows = kPushWarps * kCombineRowsPerWarpPerChunk;
  // After every chunk the pushing warps and the publisher (the first reducing warp) meet at a barrier; the publisher
  // then releases the progress to the sources while the pushers go on with the next chunk, so that no pusher waits
  // for a system-scope release. The release is cumulative: it orders every store the barrier ordered before it. A
  // lone publisher (q.lone_publisher) meets no one: each pusher hands it its chunks through shared memory.
  const int chunk_meeting = (kPushWarps + 1) * 32;
  if (ok && warp < kPushWarps) {
    // Push the rows received from each source back to it, in chunks; the publisher releases the progress.
    int32_t start[kMaxNvlRanks], count[kMaxNvlRanks];
    int32_t longest = 0;
    for (int s = 0; s < R; ++s) {
      const int32_t* range = q.recv_ranges + (static_cast<size_t>(s) * kMaxBlocks + b) * 2;
      start[s] = range[0];
      count[s] = s == p.rank ? 0 : range[1];
      longest = max(longest, count[s]);
    }
    // Rows that are not in x or that do not fit the source's region are not pushed: the fault is recorded, and the
    // publisher still releases them, marked refused, so that no rank waits forever or reads them.
    bool pushable[kMaxNvlRanks];
    for (int s = 0; s < R; ++s) {
      const bool in_x = offsets[s] + start[s] + count[s] <= q.num_rows;
      pushable[s] = combine_pushable(q, offsets, s, start[s], count[s]);
      if (!pushable[s] && warp == 0 && lane == 0)
        record_async_error(p.error, deepepBufferTooSmall, p.rank, Phase::kCombine, s,
                           in_x ? static_cast<int64_t>(start[s] + count[s]) * static_cast<int64_t>(q.row_bytes)
                                : offsets[s] + start[s] + count[s],
                           in_x ? static_cast<int64_t>(q.region_bytes) : q.num_rows);
    }
    for (int c0 = 0; c0 < longest; c0 += chunk_rows) {
      for (int s = 0; s < R; ++s) {
        if (s == p.rank || !pushable[s]) continue;
        uint8_t* region = region_of(p.peers, s, p.rank, q.region_bytes);
        for (int i = c0 + warp; i < min(count[s], c0 + chunk_rows); i += kPushWarps) {
          const int64_t j = start[s] + i;
          const int64_t in_row = offsets[s] + j;
          uint8_t* row = region + static_cast<size_t>(j) * q.row_bytes;
          if (!(q.diag & kDiagSkipRemotePush))
            warp_copy<Source::kInputOnce>(row, q.x + in_row * q.x_stride_bytes, payload_bytes, lane);
          if (q.weights != nullptr) {
            for (int k = lane; k < q.num_topk; k += 32)
              reinterpret_cast<float*>(row + weights_offset)[k] = q.weights[in_row * q.weights_stride + k];
          }
        }
      }
      if (q.lone_publisher) {
        add_release_block(&chunks_pushed[warp], 1);  // each lane's release orders its own stores
      } else {
        group_barrier(1, chunk_meeting);
      }
    }
  } else if (ok && warp == kPushWarps) {
    // Publisher: after each chunk lane d releases to rank d how many of its rows are back, the last time marked
    // final. Rows that could not be pushed (recorded above) are released all the same, marked refused, so that no
    // rank waits forever. The layout and routing words go first (the releases order them).
    int32_t count = 0;
    uint32_t refused = 0;
    const bool peer_lane = lane < R && lane != p.rank;
    auto describe_rows = [&] {
      control_of(p.peers, lane)->combine_layout[p.rank][b] = combine_layout_word(q);
      control_of(p.peers, lane)->combine_routing[p.rank][b] = *q.routing_op;
    };
    if (peer_lane) {
      const int32_t* range = q.recv_ranges + (static_cast<size_t>(lane) * kMaxBlocks + b) * 2;
      count = range[1];
      refused = combine_pushable(q, offsets, lane, range[0], count) ? 0u : kRowsRefused;
      if (count > 0) describe_rows();
    }
    const int32_t longest = __reduce_max_sync(0xffffffffu, count);
    uint32_t chunks = 0;
    for (int c0 = 0; c0 < longest; c0 += chunk_rows) {
      if (!q.lone_publisher) {
        group_barrier(1, chunk_meeting);
      } else if (!wait_pushers(chunks_pushed, kPushWarps, ++chunks, deadline, p, Phase::kCombine, lane)) {
        break;
      }
      if (count > c0) {
        const uint32_t done = static_cast<uint32_t>(min(count, c0 + chunk_rows));
        const uint32_t final = static_cast<int32_t>(done) == count ? kRowsFinal : 0u;
        store_release_sys(&control_of(p.peers, lane)->combine_progress[p.rank][b], tagged(seq, done | refused | final));
      }
    }
    // After the rows, off their path: the peers that get none from this block are told so too.
    if (peer_lane && count == 0) {
      describe_rows();
      store_release_sys(&control_of(p.peers, lane)->combine_progress[p.rank][b], tagged(seq, kRowsFinal));
    }
  }
  if (ok) {
    // Reduce the tokens of block b: for each, the rows of the ranks that got it, in rank order. Warps claim tokens
    // one at a time; the push warps join when their rows are out.
    extern __shared__ int4 reduce_stages[];  // [warps][kReduceStages][kReduceGroup][kVectorsInFlight][32]
    int4* stage = reduce_stages + static_cast<size_t>(warp) * kReduceStageVectorsPerWarp;
    const int64_t per_block = (q.num_tokens + gridDim.x - 1) / gridDim.x;
    const int64_t t0 = min(q.num_tokens, b * per_block), t1 = min(q.num_tokens, t0 + per_block);
    int32_t range_start[kMaxNvlRanks];
    uint32_t available[kMaxNvlRanks];
    bool skipped[kMaxNvlRanks];  // the source refused its rows, or lays them out otherwise: not read (recorded)
    for (int d = 0; d < R; ++d) {
      range_start[d] = q.send_ranges[(static_cast<size_t>(d) * kMaxBlocks + b) * 2];
      available[d] = 0;
      skipped[d] = false;
    }
    const uint32_t routed_by = *q.routing_op;
    bool alive = true;
    while (alive) {
      int32_t claimed = lane == 0 ? atomicAdd(&tokens_claimed, 1) : 0;
      const int64_t t = t0 + __shfl_sync(0xffffffffu, claimed, 0);
      if (t >= t1) break;
      const uint8_t* rows[kMaxNvlRanks];
      const float* row_weights[kMaxNvlRanks];
      const int32_t my_pos = lane < R ? q.send_pos[t * R + lane] : -1;  // lane d: the token's row at rank d
      for (int d = 0; d < R; ++d) {
        const int32_t j = __shfl_sync(0xffffffffu, my_pos, d);
        rows[d] = nullptr;
        row_weights[d] = nullptr;
        if (j < 0) continue;
        if (d == p.rank) {
          const int64_t in_row = offsets[d] + j;
          if (in_row >= q.num_rows) {  // fewer rows passed than the handle's routing has: never read past x
            if (lane == 0)
              record_async_error(p.error, deepepBufferTooSmall, p.rank, Phase::kCombine, d, in_row + 1, q.num_rows);
            continue;
          }
          rows[d] = q.x + in_row * q.x_stride_bytes;
          if (q.weights != nullptr) row_weights[d] = q.weights + in_row * q.weights_stride;
          continue;
        }
        if (skipped[d]) continue;
        const uint32_t needed = static_cast<uint32_t>(j - range_start[d]);
        if (available[d] <= needed) {
          uint64_t seen = 0;
          // Row `needed` is there, or the source's last release is (with fewer rows only on a handle mismatch).
          auto arrived = [&](uint64_t v) {
            return (v >> 32) == seq && ((v & kRowsCount) > needed || (v & kRowsFinal) != 0);
          };
          alive = __all_sync(0xffffffffu, wait_flag(&mine->combine_progress[d][b], arrived, deadline, p.error, p.rank,
                                                    Phase::kCombine, d, &seen));
          if (!alive) break;
          available[d] = __reduce_min_sync(0xffffffffu, static_cast<uint32_t>(seen) & kRowsCount);
          // Read after this lane's acquire of the progress, which the source released after writing the word.
          const uint64_t theirs = mine->combine_layout[d][b];
          const uint32_t their_routing = mine->combine_routing[d][b];
          const bool refused = __any_sync(0xffffffffu, (static_cast<uint32_t>(seen) & kRowsRefused) != 0);
          const bool other_layout = __any_sync(0xffffffffu, theirs != combine_layout_word(q));
          const bool other_routing = __any_sync(0xffffffffu, their_routing != routed_by);
          // The source's last release holds fewer rows than this rank's handle expects from it: the handles do not
          // match (a rank that refused the dispatch and then made the combine with some other handle, say).
          const bool too_few = available[d] <= needed;
          if (refused || other_layout || other_routing || too_few) {
            if (lane == 0) {
              // A refused call's word (refused_kernel) says so; otherwise the source could not push its rows.
              const bool call_refused = static_cast<int64_t>(theirs) == kRefusedRowLayout;
              if (refused || other_layout) {
                record_async_error(p.error, refused ? deepepRemoteError : deepepInvalidArgument, p.rank,
                                   Phase::kCombine, d, call_refused ? kDetailPeerRefused : static_cast<int64_t>(theirs),
                                   static_cast<int64_t>(combine_layout_word(q)));
              } else if (other_routing) {
                record_async_error(p.error, deepepInvalidArgument, p.rank, Phase::kCombine, d, kDetailPeerRouting,
                                   routing_pair(their_routing, routed_by));
              } else {
                record_async_error(p.error, deepepInvalidArgument, p.rank, Phase::kCombine, d, kDetailPeerFewerRows,
                                   needed + 1);
              }
            }
            skipped[d] = true;  // its later rows are not waited for either
            continue;
          }
        }
        rows[d] = region_of(p.peers, p.rank, d, q.region_bytes) + static_cast<size_t>(j) * q.row_bytes;
        // Remote rows carry weights whenever the operation has them, even if this rank had no rows to send.
        if (q.num_topk > 0) row_weights[d] = reinterpret_cast<const float*>(rows[d] + weights_offset);
      }
      if (!alive) break;
      // The rows to add, in rank order, then bias0, then bias1 (the order of the float32 additions per element).
      const uint8_t* addends[kMaxNvlRanks + 2];
      int num_addends = 0;
      for (int d = 0; d < R; ++d)
        if (rows[d] != nullptr) addends[num_addends++] = rows[d];
      if (q.bias0 != nullptr) addends[num_addends++] = q.bias0 + t * q.bias0_stride_bytes;
      if (q.bias1 != nullptr) addends[num_addends++] = q.bias1 + t * q.bias1_stride_bytes;
      // Each lane sums kVectorsInFlight 8-element vectors at a time. Its loads go through shared memory with cp.async
      // (no registers held while they fly), kReduceGroup addends per step and kReduceStages steps in flight, so
      // that several rows' loads overlap: the sum is latency-bound otherwise. A lane only ever reads the slots it
      // filled itself, so no synchronisation beyond its own wait is needed. Per element the additions stay in
      // rank order, then bias0, then bias1.
      const int vectors = q.diag & kDiagSkipLocalRows ? 0 : q.hidden / 8;
      const int groups = (num_addends + kReduceGroup - 1) / kReduceGroup;
      const int steps = (vectors + 32 * kVectorsInFlight - 1) / (32 * kVectorsInFlight) * groups;
      auto issue = [&](int step) {
        if (step < steps) {
          const int v0 = step / groups * 32 * kVectorsInFlight + lane, first = step % groups * kReduceGroup;
          for (int g = 0; g < kReduceGroup && first + g < num_addends; ++g) {
            const int4* row = reinterpret_cast<const int4*>(addends[first + g]);
#pragma unroll
            for (int u = 0; u < kVectorsInFlight; ++u) {
              const int v = v0 + u * 32;
              if (v < vectors) copy16_async(stage_slot(stage, step % kReduceStages, g, u, lane), row + v);
            }
          }
        }
        cp_async_commit();  // an empty group past the end keeps the count of groups in flight uniform
      };
      for (int step = 0; step < kReduceStages - 1; ++step) issue(step);
      float acc[kVectorsInFlight][8];
      for (int step = 0; step < steps; ++step) {
        issue(step + kReduceStages - 1);
        cp_async_wait<kReduceStages - 1>();  // this step's group has landed
        const int v0 = step / groups * 32 * kVectorsInFlight + lane, first = step % groups * kReduceGroup;
        if (first == 0) {
#pragma unroll
          for (int u = 0; u < kVectorsInFlight; ++u)
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[u][i] = 0.f;
        }
        for (int g = 0; g < kReduceGroup && first + g < num_addends; ++g) {
#pragma unroll
          for (int u = 0; u < kVectorsInFlight; ++u)
            if (v0 + u * 32 < vectors) add_bf16x8(acc[u], *stage_slot(stage, step % kReduceStages, g, u, lane));
        }
        if (first + kReduceGroup < num_addends) continue;  // more addends for these vectors
#pragma unroll
        for (int u = 0; u < kVectorsInFlight; ++u) {
          const int v = v0 + u * 32;
          if (v >= vectors) continue;
          int4 packed;
          __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
          for (int i = 0; i < 4; ++i) pairs[i] = __floats2bfloat162_rn(acc[u][2 * i], acc[u][2 * i + 1]);
          reinterpret_cast<int4*>(q.out + t * q.hidden)[v] = packed;
        }
      }
      cp_async_wait<0>();      // nothing of this token left in flight into the slots
      if (num_addends == 0) {  // a token no rank received and no bias: the sum is zero
        for (int v = lane; v < vectors; v += 32)
          reinterpret_cast<int4*>(q.out + t * q.hidden)[v] = make_int4(0, 0, 0, 0);
      }
      if (q.out_weights != nullptr) {
        for (int k = lane; k < q.num_topk; k += 32) {
          float acc = 0.f;
          for (int d = 0; d < R; ++d)
            if (row_weights[d] != nullptr) acc = __fadd_rn(acc, row_weights[d][k]);
          q.out_weights[t * q.num_topk + k] = acc;
        }
      }
    }
  }
  finish_operation(p, seq);
}

// Each thread keeps kPushUnroll 16-byte loads in flight: with one, latency rather than NVLink bounds the figure.
constexpr int kPushUnroll = 4;

__global__ void __launch_bounds__(512) push_kernel(int4* __restrict__ dst, const int4* __restrict__ src, size_t n) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t base = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; base < n;
       base += stride * kPushUnroll) {
    int4 v[kPushUnroll];
#pragma unroll
    for (int u = 0; u < kPushUnroll; ++u)
      if (base + u * stride < n) v[u] = __ldg(src + base + u * stride);
#pragma unroll
    for (int u = 0; u < kPushUnroll; ++u)
      if (base + u * stride < n) dst[base + u * stride] = v[u];
  }
}

Protocol protocol_of(const deepepComm& comm) {
  Protocol p;
  p.peers = comm.peer_buffers_device;
  p.rank = comm.rank;
  p.nranks = comm.nranks;
  p.op_state = comm.op_state_device;
  p.error = comm.async_error_device;
  p.timeout_ns = static_cast<uint64_t>(comm.timeout_seconds * 1e9);
  return p;
}

}  // namespace

DispatchRowLayout dispatch_row_layout(size_t payload_bytes, size_t scale_bytes, int num_topk) {
  DispatchRowLayout layout;
  layout.payload_bytes = payload_bytes;
  layout.scale_bytes = scale_bytes;
  layout.num_topk = num_topk;
  layout.scales_offset = align_up(payload_bytes, 16);
  layout.meta_offset = layout.scales_offset + align_up(scale_bytes, 16);
  layout.row_bytes = align_up(
      layout.meta_offset + align_up(sizeof(int32_t) * (1 + 2 * static_cast<size_t>(num_topk)), 16), kRowAlignment);
  return layout;
}

size_t combine_row_bytes(int hidden, int num_topk) {
  return align_up(
      align_up(static_cast<size_t>(hidden) * 2, 16) + align_up(sizeof(float) * static_cast<size_t>(num_topk), 16),
      kRowAlignment);
}

static size_t region_bytes_of(const deepepComm& comm) {
  return (comm.buffer_bytes - kControlBytes) / static_cast<size_t>(comm.nranks) / kRegionAlignment * kRegionAlignment;
}

DispatchAreaLayout dispatch_area_layout(const deepepComm& comm, const DispatchRowLayout& layout) {
  DispatchAreaLayout area;
  if (comm.dispatch_area_bytes == 0) return area;
  area.side_bytes = layout.row_bytes - layout.scales_offset;
  // At most 2^31 - 1 rows: the kernel keeps row numbers in the area in 32 bits.
  area.rows = static_cast<int64_t>(std::min<size_t>(
      (comm.dispatch_area_bytes - kDispatchAreaSlack) / (layout.payload_bytes + area.side_bytes), INT32_MAX));
  area.side_offset = align_up(static_cast<size_t>(area.rows) * layout.payload_bytes, kRowAlignment);
  return area;
}

int64_t region_capacity_rows(const deepepComm& comm, size_t row_bytes) {
  if (comm.buffer_bytes <= kControlBytes) return 0;
  return static_cast<int64_t>(region_bytes_of(comm) / row_bytes);
}

double measure_push_bandwidth(const deepepComm& comm, int num_sms, size_t bytes, int iterations, cudaStream_t stream) {
  const size_t region = region_bytes_of(comm);
  const size_t n = std::min(bytes, region) / 16;
  const int peer = (comm.rank + 1) % comm.nranks;
  auto* src = reinterpret_cast<const int4*>(static_cast<uint8_t*>(comm.buffer) + kControlBytes);
  // The peer's region for this rank: only this rank writes there, so concurrent measurements do not overlap.
  auto* dst = reinterpret_cast<int4*>(static_cast<uint8_t*>(comm.peer_buffers[peer]) + kControlBytes +
                                      static_cast<size_t>(comm.rank) * region);
  // The first two passes warm up.
  const float ms = median_event_ms(
      stream, 2, iterations, [&] { launch_kernel(push_kernel, num_sms, 512, 0, stream, false, false, dst, src, n); });
  return static_cast<double>(n * 16) / (ms * 1e-3) / 1e9;
}

int default_num_sms(int nranks) { return nranks <= 2 ? 24 : 32; }

int diag_bits() {
  static const int bits = [] {
    const char* value = std::getenv("DEEPEP_DIAG_SKIP");
    return value != nullptr ? std::max(0, std::atoi(value)) : 0;
  }();
  return bits;
}

void launch_prepare_routing(const deepepComm& comm, deepepHandle& handle, const deepepDispatchArgs& args, int num_sms,
                            cudaStream_t stream) {
  RoutingParams q = {};
  q.topk_idx = args.topk_idx;
  q.topk_int64 = args.topk_type == deepepInt64;
  q.num_tokens = args.num_tokens;
  q.num_topk = args.num_topk;
  q.stride = args.topk_row_stride;
  q.num_experts = args.num_experts;
  q.nranks = comm.nranks;
  q.num_blocks = num_sms;
  q.num_tiles = std::max<int>(1, static_cast<int>((args.num_tokens + kRoutingTile - 1) / kRoutingTile));
  q.send_pos = handle.send_pos;
  q.send_counts = handle.send_counts;
  q.expert_counts = handle.expert_counts;
  q.send_ranges = handle.send_ranges;
  q.tile_counts = handle.tile_counts;
  q.ticket = handle.routing_ticket;
  q.faults = handle.routing_faults;
  q.error = comm.async_error_device;
  q.rank = comm.rank;
  // Kernel 1 starts under the clearing (one H200, one rank, 24 SMs, same run: worst-case dispatch at N = 0 / 4096
  // 14.0 / 107.6 -> 11.7 / 105.2 us against a cudaMemsetAsync before it, with the count exchange's fence gone too).
  launch_clear_counts(handle.expert_counts, args.num_experts, handle.routing_faults, 2, stream);  // + dispatch_failed
  const size_t histogram_bytes = sizeof(int32_t) * args.num_experts;
  launch_kernel(q.topk_int64 ? routing_count_kernel<int64_t> : routing_count_kernel<int32_t>, q.num_tiles, kRoutingTile,
                histogram_bytes, stream, true, false, q);
  // Kernel 2, the notify and a worst-case dispatch launch early, each after the kernel before it (2 x H200, N = 4096,
  // 24 SMs, same run: worst-case dispatch 232.6 -> 222.6 us).
  launch_kernel(routing_position_kernel, q.num_tiles, kRoutingTile, 0, stream, true, false, q);
}

void launch_notify(const deepepComm& comm, deepepHandle& handle, int expert_alignment, uint64_t ticket,
                   cudaStream_t stream) {
  launch_kernel(notify_kernel, 1, 256, 0, stream, true, false, protocol_of(comm), handle.send_counts,
                handle.expert_counts, handle.num_experts / comm.nranks, expert_alignment, handle.num_sms,
                handle.recv_counts, handle.recv_expert_counts, handle.num_recv_device,
                static_cast<HandleHostInfo*>(comm.notify_host_device), ticket,
                static_cast<const int32_t*>(handle.routing_faults), handle.routing_op);
}

void launch_dispatch(const deepepComm& comm, deepepHandle& handle, const deepepDispatchArgs& args,
                     const DispatchRowLayout& layout, bool worst_case, uint64_t report_ticket, cudaStream_t stream) {
  const size_t element = args.x_type == deepepBFloat16 ? 2 : 1;
  DispatchParams q = {};
  q.p = protocol_of(comm);
  q.region_bytes = region_bytes_of(comm);
  q.layout = layout;
  q.send_pos = handle.send_pos;
  q.send_counts = handle.send_counts;
  q.expert_counts = handle.expert_counts;
  q.send_ranges = handle.send_ranges;
  q.recv_ranges = handle.recv_ranges;
  q.recv_counts = handle.recv_counts;
  q.num_recv_device = handle.num_recv_device;
  q.recv_expert_counts = handle.recv_expert_counts;
  q.num_tokens = handle.num_tokens;
  q.experts_per_rank = handle.num_experts / comm.nranks;
  q.expert_alignment = handle.expert_alignment;
  q.x = static_cast<const uint8_t*>(args.x);
  q.x_stride_bytes = (args.x_row_stride != 0 ? args.x_row_stride : args.hidden) * static_cast<int64_t>(element);
  q.scales = static_cast<const uint8_t*>(args.x_scales);
  q.scales_stride_bytes = (args.scales_row_stride != 0 ? args.scales_row_stride : args.num_scales) * int64_t(4);
  q.topk_idx = args.topk_idx;
  q.topk_int64 = args.topk_type == deepepInt64;
  q.topk_stride = args.topk_row_stride != 0 ? args.topk_row_stride : args.num_topk;
  q.weights = args.topk_weights;
  q.weights_stride = args.weights_row_stride != 0 ? args.weights_row_stride : args.num_topk;
  q.recv_x = static_cast<uint8_t*>(args.recv_x);
  q.recv_scales = static_cast<uint8_t*>(args.recv_scales);
  q.recv_topk_idx = args.recv_topk_idx;
  q.recv_weights = args.recv_topk_weights;
  q.recv_src_idx = args.recv_src_idx;
  q.recv_per_expert = args.num_recv_tokens_per_expert;
  q.out_rows = args.num_recv_rows;
  q.worst_case = worst_case;
  q.dispatch_failed = handle.dispatch_failed;
  q.routing_op = handle.routing_op;
  if (report_ticket != 0) {
    q.report = static_cast<HandleHostInfo*>(comm.report_host_device);
    q.report_ticket = report_ticket;
    q.routing_faults = handle.routing_faults;
  }
  const DispatchAreaLayout area = dispatch_area_layout(comm, layout);
  q.area_offset = comm.dispatch_area_offset;
  q.side_offset = area.side_offset;
  q.side_bytes = area.side_bytes;
  q.area_rows = area.rows;
  q.diag = diag_bits();
  q.lone_publisher = handle.num_sms <= kLonePublisherMaxBlocks;
  q.push_warps =
      dispatch_push_warps(q.layout.row_bytes, handle.num_tokens, handle.num_sms, comm.dispatch_area_bytes != 0);
  // A cached dispatch is not launched early: after another dispatch it measured 1-3 us slower so.
  launch_kernel(comm.dispatch_area_bytes != 0 ? dispatch_kernel<true> : dispatch_kernel<false>, handle.num_sms,
                kDispatchWarps * 32, 0, stream, worst_case, false, q);
}

void launch_combine(const deepepComm& comm, deepepHandle& handle, const deepepCombineArgs& args, cudaStream_t stream) {
  CombineParams q = {};
  q.p = protocol_of(comm);
  q.region_bytes = region_bytes_of(comm);
  q.row_bytes = combine_row_bytes(args.hidden, args.num_topk);  // num_topk is 0 without weights
  q.num_rows = args.num_rows;
  q.hidden = args.hidden;
  q.num_topk = args.num_topk;
  q.send_pos = handle.send_pos;
  q.send_ranges = handle.send_ranges;
  q.recv_ranges = handle.recv_ranges;
  q.recv_counts = handle.recv_counts;
  q.dispatch_failed = handle.dispatch_failed;
  q.routing_op = handle.routing_op;
  q.num_tokens = handle.num_tokens;
  q.x = static_cast<const uint8_t*>(args.x);
  q.x_stride_bytes = (args.x_row_stride != 0 ? args.x_row_stride : args.hidden) * int64_t(2);
  q.weights = args.topk_weights;
  q.weights_stride = args.weights_row_stride != 0 ? args.weights_row_stride : args.num_topk;
  q.bias0 = static_cast<const uint8_t*>(args.bias[0]);
  q.bias0_stride_bytes = (args.bias_row_stride[0] != 0 ? args.bias_row_stride[0] : args.hidden) * int64_t(2);
  q.bias1 = static_cast<const uint8_t*>(args.bias[1]);
  q.bias1_stride_bytes = (args.bias_row_stride[1] != 0 ? args.bias_row_stride[1] : args.hidden) * int64_t(2);
  q.out = static_cast<__nv_bfloat16*>(args.out);
  q.out_weights = args.out_topk_weights;
  q.lone_publisher = handle.num_sms <= kLonePublisherMaxBlocks;
  q.diag = diag_bits();
  const int64_t rows_per_block = (args.num_rows + handle.num_sms - 1) / handle.num_sms;
  const bool few_rows = rows_per_block > kCombineFewRowsMin && rows_per_block <= kCombineFewRowsMax;
  const auto kernel = q.lone_publisher ? combine_kernel<kCombinePushWarpsLonePublisher>
                      : few_rows       ? combine_kernel<kCombinePushWarpsFewRows>
                                       : combine_kernel<kCombinePushWarps>;
  allow_dynamic_shared_memory(reinterpret_cast<const void*>(kernel), kReduceStageBytes, comm.device,
                              "combine's reduction staging");
  // Through launch_kernel, whose status is the launch call's rather than any error an earlier call left pending on the
  // thread: a queued combine must not look refused (the caller would then launch its refusal as well).
  launch_kernel(kernel, handle.num_sms, kCombineWarps * 32, kReduceStageBytes, stream, false, false, q);
}

void launch_refused(const deepepComm& comm, const deepepHandle* handle, deepepCall_t call, int blocks,
                    cudaStream_t stream) {
  const bool routed = handle != nullptr && handle->routed;
  launch_kernel(refused_kernel, blocks, 32, 0, stream, false, false, protocol_of(comm), call,
                routed ? static_cast<const int32_t*>(handle->send_ranges) : nullptr,
                routed ? static_cast<const int32_t*>(handle->send_counts) : nullptr);
}

}  // namespace deepep
