// Low-latency dispatch and combine over NVLink stores (all ranks in one NVLink domain).
//
// Protocol. Every low-latency operation (a dispatch or a combine) runs on one of two buffer sets and carries a
// sequence number `seq`, per set, kept on the device (LowLatencyState) so that replayed CUDA graphs advance it.
// Every rank makes the same operations in the same order, so all ranks agree on seq without talking about it.
//   Dispatch, send side: block b owns a contiguous range of tokens. It counts, per expert, the tokens before its
//   range that name the expert (the first slot naming it); a token's position under an expert is that count, so the
//   layout is deterministic and no slot is claimed by atomics. For each of its tokens it reads and casts (FP8) the
//   row once and stores it with 16-byte stores straight into slot [e_loc][this rank][position] of every named
//   expert's rank. The blocks add up the rows per expert; the last block to finish publishes (seq << 32) | rows
//   with a system-scope release into every expert's dispatch flag [e_loc][this rank] on its rank.
//   Dispatch, receive side: every block acquires every (local expert, source) flag, lays the experts' rows end to
//   end (per expert, source rank ascending) and copies its even share of them into recv_x / recv_scales /
//   recv_src_info; block b also writes the counts and ranges of local experts b, b + G, ...
//   Combine, send side: the blocks share the rows of all local experts evenly; each row goes back to its source
//   rank, into that rank's combine row [token][slot] (from recv_src_info). The last block to finish releases every
//   (expert, source) combine flag.
//   Combine, receive side: block b owns tokens b, b + G, ...; it acquires the flags of the token's experts and sums
//   weight * row over the slots in ascending order in float32 (separately rounded products and sums).
// Reuse of a set: before a rank writes into a peer's set for operation seq, it waits until that peer acknowledged
// the operations that last read the same bytes: for a dispatch (receive slots) the previous operation on the set,
// for a combine (combine rows) the previous combine on the set. The last block of each operation's final kernel
// writes seq into every peer's ack word. Send-only (hook) kernels change no state; the receive kernel completes
// the operation. Every wait is bounded by the timeout and records rank, phase and peer on expiry.
// Masked ranks (deepepCommLowLatencyMaskRank, or a peer whose wait timed out) are never waited for or written to; the
// slots naming their experts are skipped like -1 slots, so the other ranks' operations complete without them.
// Transport: writes to a peer in `Area::direct` are NVLink stores; to any other peer (outside the NVLink domain, or
// every peer with DEEPEP_LL_TRANSPORT_NVSHMEM) they are NVSHMEM puts of rows staged in this rank's symmetric buffer
// (dispatch: the set's send rows; combine: the set's combine buffer), completed with a quiet before the flag, and
// flags and acknowledgements are NVSHMEM signals. Every wait reads this rank's own buffer either way, with acquire
// loads: enough over NVLink (also when NVSHMEM drives it) and over GPUDirect RDMA that orders its writes; transports
// that need NVSHMEM's own wait to make data visible at the target are not handled yet.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>
#include <cub/block/block_scan.cuh>

#include "async_error.hpp"
#include "comm.hpp"
#include "cuda_utils.hpp"
#include "device_utils.cuh"
#include "error.hpp"
#include "lowlatency.hpp"

namespace deepep {

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr uint32_t kSlotShift = 16;  // src_info = token | slot << 16

// Rank-local part of the area (never written by peers).
struct LowLatencyState {
  uint32_t seq[kLowLatencySets];                // last completed operation on each set
  uint32_t last_combine[kLowLatencySets];       // seq of the last completed combine on each set
  uint32_t finished[kLowLatencySets];           // blocks of the running final kernel that are done
  uint32_t send_done[kLowLatencySets];          // blocks of the running dispatch send that are done
  uint32_t combine_send_done[kLowLatencySets];  // blocks of the running combine send that are done
};

size_t align_up(size_t value, size_t alignment) { return (value + alignment - 1) / alignment * alignment; }

constexpr size_t kStateBytes = 256;
static_assert(sizeof(LowLatencyState) <= kStateBytes, "low-latency state outgrew its reservation");

enum : int { kSend = 1, kRecv = 2 };

// Everything a kernel needs to find the area on every rank. Peers in `direct` are written with NVLink stores; the
// others (nullptr there) through NVSHMEM, which names a peer's object by the address of the same object in this
// rank's own buffer (the symmetric heap). Reads are always of this rank's own buffer.
struct Area {
  void* const* direct;  // [nranks]: NVLink-mapped base of every rank's buffer, nullptr for peers reached by NVSHMEM
  size_t offset;        // of the low-latency area in every buffer
  size_t ack_offset;
  size_t dispatch_flags_offset;
  size_t combine_flags_offset;
  size_t control_bytes;
  size_t set_bytes;
  size_t combine_rows_offset;
  size_t send_rows_offset;
  int rank;
  int nranks;
  int set;
  AsyncErrorRecord* error;
  uint64_t timeout_ns;
  uint32_t* mask;     // [nranks], this rank's: 1 for a rank masked out (never waited for, never written to)
  int64_t* timeline;  // diagnostic [block][DEEPEP_LL_TIMELINE_MARKS] marks, or nullptr

  // Addresses in this rank's own area (also the symmetric addresses of the same objects on every peer).
  __device__ __forceinline__ uint8_t* mine() const { return static_cast<uint8_t*>(direct[rank]) + offset; }
  __device__ __forceinline__ LowLatencyState* state() const { return reinterpret_cast<LowLatencyState*>(mine()); }
  __device__ __forceinline__ uint64_t* ack(int source) const {
    return reinterpret_cast<uint64_t*>(mine() + ack_offset) + set * nranks + source;
  }
  __device__ __forceinline__ uint64_t* dispatch_flag(int local_expert, int source) const {
    return reinterpret_cast<uint64_t*>(mine() + dispatch_flags_offset) +
           (static_cast<size_t>(set) * DEEPEP_MAX_LOCAL_EXPERTS + local_expert) * nranks + source;
  }
  __device__ __forceinline__ uint64_t* combine_flag(int expert) const {
    return reinterpret_cast<uint64_t*>(mine() + combine_flags_offset) +
           static_cast<size_t>(set) * DEEPEP_MAX_LOCAL_EXPERTS * nranks + expert;
  }
  __device__ __forceinline__ uint8_t* set_base() const {
    return mine() + control_bytes + static_cast<size_t>(set) * set_bytes;
  }
  // Where `owner` keeps the object this rank keeps at `ours`, for NVLink stores; nullptr when NVSHMEM reaches it.
  template <typename T>
  __device__ __forceinline__ T* at(int owner, T* ours) const {
    uint8_t* base = static_cast<uint8_t*>(direct[owner]);
    if (base == nullptr) return nullptr;
    return reinterpret_cast<T*>(base + (reinterpret_cast<uint8_t*>(ours) - static_cast<uint8_t*>(direct[rank])));
  }
};

// Sets `owner`'s copy of the flag this rank keeps at `ours`, after everything this thread (and, through the barriers
// and fences before it, its block) wrote before: a system-scope release store over NVLink, or an NVSHMEM signal
// (atomic, unlike a put of the word) after a system fence; the callers complete their NVSHMEM data puts first.
__device__ __forceinline__ void signal(const Area& a, int owner, uint64_t* ours, uint64_t value) {
  if (uint64_t* there = a.at(owner, ours)) {
    store_release_sys(there, value);
  } else {
    __threadfence_system();
    nvshmemx_signal_op(ours, value, NVSHMEM_SIGNAL_SET, owner);
  }
}

// Completes this block's NVSHMEM puts before the block says its rows are there. One quiet completes everything this
// PE posted, and over NVLink it is a system fence, which (after the barrier) covers the stores of every warp. It is
// not bounded by the timeout: over a network transport a quiet towards a dead peer may wait for NVSHMEM's own
// transport timeout.
__device__ __forceinline__ void complete_puts(bool any) {
  __syncthreads();
  if (any && threadIdx.x == 0) nvshmem_quiet();
}

// Timeline marks (diagnostic; see deepepCommLowLatencyTimeline).
enum : int {
  kMarkStart = 0,
  kMarkAcks = 1,
  kMarkCounted = 2,
  kMarkStored = 3,
  kMarkPublished = 4,
  kMarkFlagsSeen = 5,
  kMarkWritten = 6,
  kMarkEnd = 7
};

// Thread 0 notes when its block reached `mark` (the block's earlier work is behind a barrier at every call site).
__device__ __forceinline__ void timeline_mark(const Area& a, int mark) {
  if (a.timeline != nullptr && threadIdx.x == 0) {
    a.timeline[blockIdx.x * DEEPEP_LL_TIMELINE_MARKS + mark] = static_cast<int64_t>(global_timer_ns());
  }
}

// Clears the block's marks of the previous kernel and notes the start.
__device__ __forceinline__ void timeline_start(const Area& a) {
  if (a.timeline != nullptr && threadIdx.x == 0) {
    for (int m = 1; m < DEEPEP_LL_TIMELINE_MARKS; ++m) a.timeline[blockIdx.x * DEEPEP_LL_TIMELINE_MARKS + m] = 0;
  }
  timeline_mark(a, kMarkStart);
}

__device__ __forceinline__ uint64_t tagged(uint32_t seq, uint32_t value) {
  return (static_cast<uint64_t>(seq) << 32) | value;
}

// The rows of the local experts laid end to end, so that the blocks can share them out evenly whatever their experts
// (144 experts on 132 blocks, one each, would leave 12 blocks twice the work of the others). Every block computes
// expert_end[l] = rows of experts 0..l from rows_of(l) and gets the total.
constexpr int kExpertsPerThread = (DEEPEP_MAX_LOCAL_EXPERTS + kThreads - 1) / kThreads;
template <class RowsOf>
__device__ int32_t lay_out_experts(int experts, RowsOf rows_of, int32_t* expert_end) {
  using Scan = cub::BlockScan<int32_t, kThreads>;
  __shared__ typename Scan::TempStorage scan;
  int32_t rows[kExpertsPerThread];
#pragma unroll
  for (int i = 0; i < kExpertsPerThread; ++i) {
    const int local = threadIdx.x * kExpertsPerThread + i;
    rows[i] = local < experts ? rows_of(local) : 0;
  }
  Scan(scan).InclusiveSum(rows, rows);
#pragma unroll
  for (int i = 0; i < kExpertsPerThread; ++i) {
    const int local = threadIdx.x * kExpertsPerThread + i;
    if (local < experts) expert_end[local] = rows[i];
  }
  __syncthreads();
  return experts > 0 ? expert_end[experts - 1] : 0;
}

// The local expert that row g of the laid-out rows belongs to (the first l with expert_end[l] > g).
__device__ __forceinline__ int expert_of_row(const int32_t* expert_end, int experts, int64_t g) {
  int lo = 0, hi = experts - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (expert_end[mid] > g) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// Rows a block handles per batch, and the 16-byte loads each thread keeps in flight while copying them.
constexpr int kRowsPerBatch = 64;
constexpr int kCopyInFlight = 8;

// Copies a batch of `rows` rows of `vectors` 16-byte vectors with the whole block, several loads in flight per
// thread (a warp per row would leave most warps idle and each row latency-bound): row r goes from src[r] to dst[r],
// and is skipped when dst[r] is nullptr. Both tables are in shared memory. kReadOnly as in load16.
template <bool kReadOnly>
__device__ __forceinline__ void copy_rows(const int4* const* src, int4* const* dst, int rows, int vectors) {
  const int items = rows * vectors;
  for (int first = threadIdx.x; first < items; first += kThreads * kCopyInFlight) {
    int4 v[kCopyInFlight];
#pragma unroll
    for (int u = 0; u < kCopyInFlight; ++u) {
      const int item = first + u * kThreads;
      if (item < items) v[u] = load16<kReadOnly>(src[item / vectors] + item % vectors);
    }
#pragma unroll
    for (int u = 0; u < kCopyInFlight; ++u) {
      const int item = first + u * kThreads;
      if (item < items && dst[item / vectors] != nullptr) dst[item / vectors][item % vectors] = v[u];
    }
  }
}

// This block's share [first, end) of `total` rows.
__device__ __forceinline__ void block_share(int64_t total, int64_t* first, int64_t* end) {
  const int64_t per_block = (total + gridDim.x - 1) / gridDim.x;
  *first = min(total, static_cast<int64_t>(blockIdx.x) * per_block);
  *end = min(total, *first + per_block);
}

// Whether rank `r` is masked out of low-latency calls (set by the host, or by a timeout waiting for it).
__device__ __forceinline__ bool is_masked(const Area& a, int r) {
  return *reinterpret_cast<volatile const uint32_t*>(a.mask + r) != 0;
}

// A wait for rank `r` timed out (the error is recorded): mask it, so that the survivors' later calls go on without it.
// A rank never masks itself (its own flags come late only when something else failed).
__device__ __forceinline__ void mask_after_timeout(const Area& a, int r) {
  if (r != a.rank) atomicExch(a.mask + r, 1u);
}

// Whether ack value `v` says the peer finished operation `needed` (or a later one), modulo 2^32.
__device__ __forceinline__ bool acked(uint64_t v, uint32_t needed) {
  return static_cast<int32_t>(static_cast<uint32_t>(v) - needed) >= 0;
}

// Waits (warp 0 of the block) until every peer that is not masked finished operation `needed` on the set. Acks are
// written by the peers into this rank's area, so the loads stay local. A peer whose ack does not come in time is
// masked (the timeout is recorded): the block goes on without writing to it, so the survivors' operation completes.
__device__ void wait_peer_acks(const Area& a, uint32_t needed, uint64_t deadline, Phase phase) {
  if (threadIdx.x < 32) {
    for (int d = threadIdx.x; d < a.nranks; d += 32) {
      if (d == a.rank || is_masked(a, d)) continue;
      if (!wait_flag(a.ack(d), [&](uint64_t v) { return acked(v, needed); }, deadline, a.error, a.rank, phase, d)) {
        mask_after_timeout(a, d);
      }
    }
  }
  __syncthreads();
}

// End of an operation's final kernel: the last block records the operation as complete and acknowledges it to
// every peer (release: our reads of the set happen before a peer's next writes into it).
__device__ void finish_operation(const Area& a, uint32_t seq, bool combine) {
  __syncthreads();
  if (threadIdx.x == 0) {
    LowLatencyState* state = a.state();
    __threadfence_system();
    const uint32_t done = atomicAdd(&state->finished[a.set], 1u);
    if (done == gridDim.x - 1) {
      __threadfence_system();  // the other blocks' work before their increments is ordered before the acks
      state->finished[a.set] = 0;
      state->seq[a.set] = seq;
      if (combine) state->last_combine[a.set] = seq;
      for (int d = 0; d < a.nranks; ++d) {
        if (d != a.rank && !is_masked(a, d)) signal(a, d, a.ack(a.rank), seq);
      }
      __threadfence();
    }
  }
}

// Whether this block is the last of the grid to get here; `done` counts the blocks and goes back to zero for the
// next kernel. Each block's barrier and system fence order its stores before its increment, and the last block's
// fence orders all of them before whatever it writes next (the flags that say the rows are there).
__device__ bool last_block_to_finish(uint32_t* done) {
  __shared__ int last;
  if (threadIdx.x == 0) {
    __threadfence_system();
    last = atomicAdd(done, 1u) == gridDim.x - 1;
    if (last) {
      __threadfence_system();
      *done = 0;
    }
  }
  __syncthreads();
  return last;
}

// ---------------------------------------------------------------------------------------------------------------
// FP8 cast of one row, per 128-channel block: each lane holds 16 consecutive channels, 8 lanes a block.

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

__device__ __forceinline__ float pow2_ceil(float scale) {
  // scale is a positive normal float: 2^ceil(log2(scale)) is scale itself when its mantissa is 0, else the next
  // power of two.
  const uint32_t bits = __float_as_uint(scale);
  const uint32_t exponent = bits & 0x7f800000u;
  return __uint_as_float((bits & 0x007fffffu) ? exponent + 0x00800000u : exponent);
}

// Slot k of a token is the first slot naming its expert (a later slot naming the same expert is delivered once).
template <typename Index>
__device__ __forceinline__ bool first_slot(const Index* ids, int k, int64_t expert) {
  for (int j = 0; j < k; ++j) {
    if (static_cast<int64_t>(ids[j]) == expert) return false;
  }
  return true;
}

// Casts 16 consecutive channels (this thread's part of an 8-thread, 128-channel group; every lane of the warp takes
// part in the shuffles) to e4m3 with the group's scale.
__device__ __forceinline__ int4 cast_16_fp8(const uint16_t* __restrict__ src, bool valid, bool round_scale,
                                            float* scale_out) {
  int4 raw[2] = {make_int4(0, 0, 0, 0), make_int4(0, 0, 0, 0)};
  if (valid) {
    raw[0] = __ldg(reinterpret_cast<const int4*>(src));
    raw[1] = __ldg(reinterpret_cast<const int4*>(src) + 1);
  }
  const uint32_t* words = reinterpret_cast<const uint32_t*>(raw);
  float v[16];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    v[2 * i] = bf16_bits_to_float(words[i] & 0xffffu);
    v[2 * i + 1] = bf16_bits_to_float(words[i] >> 16);
  }
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(v[i]));
  // max is exact and order-free: the 8 threads of the group agree whatever the reduction order.
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
  amax = fmaxf(amax, 1e-4f);
  float scale = __fdiv_rn(amax, 448.0f);
  if (round_scale) scale = pow2_ceil(scale);
  *scale_out = scale;
  // v / scale rounded to float32, except that a channel below scale * 2^-11 gives a signed zero straight away: its
  // quotient, at most 2^-11 after rounding, is under half e4m3's smallest subnormal (2^-9) and rounds to zero anyway.
  // IEEE division takes a slow path (a hundred-odd instructions, for the whole warp) for tiny dividends, which made
  // rows with many tiny channels cast several times slower; the divisions left have dividends >= 2^-34.
  const float tiny = scale * 0x1p-11f;  // exact: scale >= 1e-4 / 448 > 2^-23
  auto quotient = [&](float x) {
    const bool zero = fabsf(x) < tiny;
    const float q = __fdiv_rn(zero ? scale : x, scale);
    return zero ? copysignf(0.0f, x) : q;
  };
  uint32_t packed[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_fp8x2_storage_t lo =
        __nv_cvt_float2_to_fp8x2(make_float2(quotient(v[4 * i]), quotient(v[4 * i + 1])), __NV_SATFINITE, __NV_E4M3);
    const __nv_fp8x2_storage_t hi = __nv_cvt_float2_to_fp8x2(
        make_float2(quotient(v[4 * i + 2]), quotient(v[4 * i + 3])), __NV_SATFINITE, __NV_E4M3);
    packed[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  return make_int4(static_cast<int>(packed[0]), static_cast<int>(packed[1]), static_cast<int>(packed[2]),
                   static_cast<int>(packed[3]));
}

// ---------------------------------------------------------------------------------------------------------------
// Dispatch.

struct DispatchParams {
  Area area;
  const uint16_t* x;  // BF16 bits
  int64_t x_stride;
  const void* topk_idx;
  int64_t topk_stride;
  int64_t num_tokens;
  int num_topk;
  int num_experts;
  int experts_per_rank;
  int hidden;
  int64_t max_tokens;  // T
  bool fp8;
  bool round_scale;
  bool ue8m0;
  LowLatencyRow row;
  uint8_t* recv_x;
  void* recv_scales;
  int32_t* recv_count;
  int32_t* recv_src_info;
  int32_t* recv_layout_range;
  bool scales_token_contiguous;
  void* stats_recv_count;  // optional, [experts_per_rank] int64 or int32
  bool stats_recv_count_int32;
  int64_t* stats_wait_ns;  // optional, [nranks]
  uint32_t* send_counts;   // [num_experts] rows this rank sends to each expert, summed over blocks (rank-local)
};

template <typename Index>
__device__ void dispatch_send(const DispatchParams& p, uint32_t seq, uint64_t deadline) {
  const Area& a = p.area;
  extern __shared__ int32_t tokens_before[];      // [num_experts]: earlier tokens naming each expert
  __shared__ uint8_t* slot_row[DEEPEP_MAX_TOPK];  // where slot k of the current token is stored; nullptr: not stored
  __shared__ uint8_t* slot_put[DEEPEP_MAX_TOPK];  // or the slot's symmetric address, for an NVSHMEM put
  __shared__ int slot_rank[DEEPEP_MAX_TOPK];
  const Index* topk = static_cast<const Index*>(p.topk_idx);
  wait_peer_acks(a, seq - 1u, deadline, Phase::kLowLatencyDispatch);
  timeline_mark(a, kMarkAcks);

  // This block's tokens: a contiguous range, so one count over the tokens before it gives every position.
  const int64_t per_block = (p.num_tokens + gridDim.x - 1) / gridDim.x;
  const int64_t first = min(p.num_tokens, static_cast<int64_t>(blockIdx.x) * per_block);
  const int64_t end = min(p.num_tokens, first + per_block);
  for (int e = threadIdx.x; e < p.num_experts; e += kThreads) tokens_before[e] = 0;
  // The ids of the earlier tokens go through shared memory a chunk at a time: consecutive threads load consecutive
  // ids (one load each, coalesced), then each id is counted if it is its token's first slot naming the expert.
  constexpr int kStagedIds = 2048;
  __shared__ int32_t staged[kStagedIds];  // ids of the chunk's tokens, -1 for -1 and out-of-range slots
  const int64_t chunk_tokens = kStagedIds / p.num_topk;
  for (int64_t t0 = 0; t0 < (first < end ? first : 0); t0 += chunk_tokens) {
    const int n = static_cast<int>(min(chunk_tokens, first - t0)) * p.num_topk;
    __syncthreads();  // zeroed counts, or the previous chunk counted
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const int64_t e = static_cast<int64_t>(topk[(t0 + i / p.num_topk) * p.topk_stride + i % p.num_topk]);
      staged[i] = e >= 0 && e < p.num_experts ? static_cast<int32_t>(e) : -1;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const int32_t e = staged[i];
      const int k = i % p.num_topk;
      bool first_naming = e >= 0;
      for (int j = 1; j <= k && first_naming; ++j) first_naming = staged[i - j] != e;
      if (first_naming) atomicAdd(&tokens_before[e], 1);
    }
  }
  __syncthreads();
  timeline_mark(a, kMarkCounted);

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  bool block_puts = false;  // whether this block sent anything through NVSHMEM
  for (int64_t t = first; t < end; ++t) {
    const Index* ids = topk + t * p.topk_stride;
    bool puts = false;
    if (threadIdx.x < p.num_topk) {
      const int k = threadIdx.x;
      const int64_t e = static_cast<int64_t>(ids[k]);
      uint8_t* row = nullptr;
      uint8_t* put = nullptr;
      if (e < -1 || e >= p.num_experts) {
        record_async_error(a.error, deepepInvalidArgument, a.rank, Phase::kLowLatencyDispatch, -1, t * p.num_topk + k,
                           e);
      } else if (e >= 0 && first_slot(ids, k, e) && !is_masked(a, static_cast<int>(e) / p.experts_per_rank)) {
        // The first slots of one token name distinct experts: thread k alone touches tokens_before[e] here. (The
        // positions under a masked rank's experts are never used: nothing goes there.)
        const int position = tokens_before[e]++;
        const int dest = static_cast<int>(e) / p.experts_per_rank;
        const int local = static_cast<int>(e) % p.experts_per_rank;
        uint8_t* ours = a.set_base() +
                        ((static_cast<size_t>(local) * a.nranks + a.rank) * p.max_tokens + position) * p.row.row_bytes;
        const int32_t meta = static_cast<int32_t>(t) | (k << kSlotShift);
        row = a.at(dest, ours);
        if (row != nullptr) {
          *reinterpret_cast<int32_t*>(row + p.row.meta_offset) = meta;
        } else {
          put = ours;
          nvshmem_int32_p(reinterpret_cast<int32_t*>(ours + p.row.meta_offset), meta, dest);
        }
        slot_rank[k] = dest;
        atomicAdd(&p.send_counts[e], 1u);
      }
      slot_row[k] = row;
      slot_put[k] = put;
      puts = put != nullptr;
    }
    puts = __syncthreads_or(puts);
    block_puts |= puts;
    // The row is read and cast once, then stored into every slot that names an expert, and into this token's
    // staging row when a slot goes through NVSHMEM (puts read symmetric memory, which the caller's x is not).
    uint8_t* stage = puts ? a.set_base() + a.send_rows_offset + static_cast<size_t>(t) * p.row.row_bytes : nullptr;
    const uint16_t* src = p.x + t * p.x_stride;
    if (p.fp8) {
      for (int chunk = 0; chunk < p.hidden; chunk += kThreads * 16) {
        const int c = chunk + threadIdx.x * 16;
        const bool valid = c < p.hidden;  // whole 8-thread groups are valid or not (hidden % 128 == 0)
        float scale;
        const int4 packed = cast_16_fp8(src + c, valid, p.round_scale, &scale);
        if (valid) {
          for (int k = 0; k < p.num_topk; ++k) {
            uint8_t* row = slot_row[k];
            if (row == nullptr) continue;
            *reinterpret_cast<int4*>(row + c) = packed;
            if ((lane & 7) == 0) reinterpret_cast<float*>(row + p.row.scales_offset)[c / 128] = scale;
          }
          if (stage != nullptr) {
            *reinterpret_cast<int4*>(stage + c) = packed;
            if ((lane & 7) == 0) reinterpret_cast<float*>(stage + p.row.scales_offset)[c / 128] = scale;
          }
        }
      }
    } else {
      for (int c = threadIdx.x * 8; c < p.hidden; c += kThreads * 8) {
        const int4 v = __ldg(reinterpret_cast<const int4*>(src + c));
        for (int k = 0; k < p.num_topk; ++k) {
          uint8_t* row = slot_row[k];
          if (row != nullptr) *reinterpret_cast<int4*>(row + 2 * static_cast<size_t>(c)) = v;
        }
        if (stage != nullptr) *reinterpret_cast<int4*>(stage + 2 * static_cast<size_t>(c)) = v;
      }
    }
    __syncthreads();  // the staging row is complete
    if (puts) {
      for (int k = warp; k < p.num_topk; k += kWarps) {
        // Payload and scales; the metadata went with its own put above.
        if (slot_put[k] != nullptr) nvshmemx_putmem_nbi_warp(slot_put[k], stage, p.row.meta_offset, slot_rank[k]);
      }
      __syncthreads();  // slot_put is rewritten for the next token
    }
  }
  complete_puts(block_puts);

  // The last block to finish publishes every expert's row count, after all blocks' rows.
  timeline_mark(a, kMarkStored);
  if (!last_block_to_finish(&a.state()->send_done[a.set])) return;
  for (int e = threadIdx.x; e < p.num_experts; e += kThreads) {
    const uint32_t rows = atomicExch(&p.send_counts[e], 0u);  // reset for the set's next dispatch
    const int dest = e / p.experts_per_rank;
    if (!is_masked(a, dest)) signal(a, dest, a.dispatch_flag(e % p.experts_per_rank, a.rank), tagged(seq, rows));
  }
  __syncthreads();
  timeline_mark(a, kMarkPublished);
}

// Rows source `s` sent to local expert `local` in operation `seq`, read after the block waited for every flag: 0 for a
// masked source (a wait that timed out masked it) and for a count past T (recorded as an error when waited for).
__device__ __forceinline__ int32_t received_rows(const DispatchParams& p, int local, int s, uint32_t seq) {
  if (is_masked(p.area, s)) return 0;
  const uint64_t v = *reinterpret_cast<const volatile uint64_t*>(p.area.dispatch_flag(local, s));
  const uint32_t rows = static_cast<uint32_t>(v);
  return static_cast<uint32_t>(v >> 32) == seq && rows <= p.max_tokens ? static_cast<int32_t>(rows) : 0;
}

__device__ void dispatch_recv(const DispatchParams& p, uint32_t seq, uint64_t deadline) {
  const Area& a = p.area;
  __shared__ int32_t expert_end[DEEPEP_MAX_LOCAL_EXPERTS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int experts = p.experts_per_rank;
  const int64_t rows_per_expert = static_cast<int64_t>(a.nranks) * p.max_tokens;
  const int num_scales = p.hidden / 128;
  const int num_words = (num_scales + 3) / 4;
  // Expert `local`'s outputs other than its rows (counts, ranges, statistics) are written by one block.
  auto owns = [&](int local) { return local % static_cast<int>(gridDim.x) == static_cast<int>(blockIdx.x); };

  // Every block waits for every (expert, source) flag: the rows are then shared out evenly, whatever their experts.
  // The counts it saw stay in shared memory when they fit (E <= kCachedCounts), so that laying out the rows and
  // finding each row's source take no further round trips to memory.
  constexpr int kCachedCounts = 2048;
  __shared__ int32_t cached[kCachedCounts];  // [local expert][source] rows, as this block's wait saw them
  const bool cache = experts * a.nranks <= kCachedCounts;
  for (int i = threadIdx.x; i < experts * a.nranks; i += kThreads) {
    const int local = i / a.nranks, s = i % a.nranks;
    int32_t rows = 0;
    if (!is_masked(a, s)) {  // a masked source sends nothing and is not waited for
      const uint64_t wait_start = p.stats_wait_ns != nullptr ? global_timer_ns() : 0;
      uint64_t seen = 0;
      const bool ok = wait_flag(
          a.dispatch_flag(local, s), [&](uint64_t v) { return static_cast<uint32_t>(v >> 32) == seq; }, deadline,
          a.error, a.rank, Phase::kLowLatencyDispatch, s, &seen);
      if (!ok) mask_after_timeout(a, s);
      const bool fits = static_cast<uint32_t>(seen) <= p.max_tokens;
      if (ok && fits) rows = static_cast<int32_t>(static_cast<uint32_t>(seen));
      if (owns(local)) {
        if (p.stats_wait_ns != nullptr) {
          atomicAdd(reinterpret_cast<unsigned long long*>(p.stats_wait_ns + s),
                    static_cast<unsigned long long>(global_timer_ns() - wait_start));
        }
        if (ok && !fits) {
          // A peer with a different T (or a corrupted flag): its rows are dropped, never written out of bounds.
          record_async_error(a.error, deepepInvalidArgument, a.rank, Phase::kLowLatencyDispatch, s, local,
                             static_cast<uint32_t>(seen));
        }
      }
    }
    if (cache) cached[i] = rows;
  }
  auto rows_from = [&](int local, int s) {
    return cache ? cached[local * a.nranks + s] : received_rows(p, local, s, seq);
  };
  __syncthreads();
  timeline_mark(a, kMarkFlagsSeen);

  const int32_t total = lay_out_experts(
      experts,
      [&](int local) {
        int32_t rows = 0;
        for (int s = 0; s < a.nranks; ++s) rows += rows_from(local, s);
        return rows;
      },
      expert_end);

  // Counts, per-source ranges and statistics of the experts this block owns, and -1 past their rows.
  for (int local = blockIdx.x + threadIdx.x * gridDim.x; local < experts; local += kThreads * gridDim.x) {
    int32_t offset = 0;
    for (int s = 0; s < a.nranks; ++s) {
      const int32_t rows = rows_from(local, s);
      p.recv_layout_range[(static_cast<size_t>(local) * a.nranks + s) * 2] = offset;
      p.recv_layout_range[(static_cast<size_t>(local) * a.nranks + s) * 2 + 1] = rows;
      offset += rows;
    }
    p.recv_count[local] = offset;
    if (p.stats_recv_count != nullptr) {  // one block owns each expert: no atomics needed
      if (p.stats_recv_count_int32) {
        static_cast<int32_t*>(p.stats_recv_count)[local] += offset;
      } else {
        static_cast<int64_t*>(p.stats_recv_count)[local] += offset;
      }
    }
  }
  for (int local = blockIdx.x; local < experts; local += gridDim.x) {
    const int32_t rows = expert_end[local] - (local > 0 ? expert_end[local - 1] : 0);
    int32_t* src_info = p.recv_src_info + local * rows_per_expert;
    for (int64_t j = rows + threadIdx.x; j < rows_per_expert; j += kThreads) src_info[j] = -1;
  }

  // This block's share of the rows, a batch at a time: the block copies the payloads, then a warp per row writes
  // its scales and source.
  __shared__ const int4* batch_row[kRowsPerBatch];  // the row in the receive slots
  __shared__ int4* batch_payload[kRowsPerBatch];    // where its payload goes in recv_x
  __shared__ int64_t batch_out[kRowsPerBatch];      // its output row
  __shared__ int64_t batch_j[kRowsPerBatch];        // its position under its expert
  __shared__ int batch_expert[kRowsPerBatch];
  const int vectors = static_cast<int>(p.row.payload_bytes / 16);  // rows are 16-byte multiples (validated)
  int64_t first, end;
  block_share(total, &first, &end);
  for (int64_t batch = first; batch < end; batch += kRowsPerBatch) {
    const int rows = static_cast<int>(min(static_cast<int64_t>(kRowsPerBatch), end - batch));
    if (threadIdx.x < rows) {
      const int64_t g = batch + threadIdx.x;
      const int local = expert_of_row(expert_end, experts, g);
      const int64_t j = g - (local > 0 ? expert_end[local - 1] : 0);
      // Source of row j: rows are ordered by source rank.
      int s = 0;
      int64_t before = 0;  // rows of the sources ahead of s
      for (; s < a.nranks - 1; ++s) {
        const int32_t from_s = rows_from(local, s);
        if (j < before + from_s) break;
        before += from_s;
      }
      batch_row[threadIdx.x] = reinterpret_cast<const int4*>(
          a.set_base() + ((static_cast<size_t>(local) * a.nranks + s) * p.max_tokens + (j - before)) * p.row.row_bytes);
      batch_out[threadIdx.x] = local * rows_per_expert + j;
      batch_payload[threadIdx.x] =
          reinterpret_cast<int4*>(p.recv_x + (local * rows_per_expert + j) * static_cast<int64_t>(p.row.payload_bytes));
      batch_j[threadIdx.x] = j;
      batch_expert[threadIdx.x] = local;
    }
    __syncthreads();
    // Peers wrote these bytes during the kernel: plain loads after the acquire (never the read-only cache).
    copy_rows<false>(batch_row, batch_payload, rows, vectors);
    for (int r = warp; r < rows; r += kWarps) {
      const uint8_t* row = reinterpret_cast<const uint8_t*>(batch_row[r]);
      const int64_t out_row = batch_out[r], j = batch_j[r];
      const int local = batch_expert[r];
      // Element of scale column c of this row in recv_scales (`columns` per row).
      auto scale_at = [&](int c, int columns) {
        return p.scales_token_contiguous ? (static_cast<int64_t>(local) * columns + c) * rows_per_expert + j
                                         : out_row * columns + c;
      };
      if (p.fp8) {
        const float* scales = reinterpret_cast<const float*>(row + p.row.scales_offset);
        if (p.ue8m0) {
          int32_t* out = static_cast<int32_t*>(p.recv_scales);
          for (int w = lane; w < num_words; w += 32) {
            uint32_t word = 0;
            for (int i = 0; i < 4; ++i) {
              const int b = 4 * w + i;
              if (b < num_scales) word |= ((__float_as_uint(scales[b]) >> 23) & 0xffu) << (8 * i);
            }
            out[scale_at(w, num_words)] = static_cast<int32_t>(word);
          }
        } else {
          float* out = static_cast<float*>(p.recv_scales);
          for (int b = lane; b < num_scales; b += 32) out[scale_at(b, num_scales)] = scales[b];
        }
      }
      if (lane == 0) p.recv_src_info[out_row] = *reinterpret_cast<const int32_t*>(row + p.row.meta_offset);
    }
    __syncthreads();  // the batch's rows are rewritten by the next batch
  }
  __syncthreads();
  timeline_mark(a, kMarkWritten);
}

template <typename Index>
__global__ void __launch_bounds__(kThreads, 1) dispatch_kernel(DispatchParams p, int phases) {
  const uint32_t seq = p.area.state()->seq[p.area.set] + 1u;
  timeline_start(p.area);
  // Each phase's waits get the whole timeout: a receive after a send that waited out a dead peer's acknowledgement
  // must still wait for the live ranks.
  if (phases & kSend) dispatch_send<Index>(p, seq, global_timer_ns() + p.area.timeout_ns);
  if (phases & kRecv) {
    dispatch_recv(p, seq, global_timer_ns() + p.area.timeout_ns);
    finish_operation(p.area, seq, false);
  }
  timeline_mark(p.area, kMarkEnd);
}

// ---------------------------------------------------------------------------------------------------------------
// Combine.

struct CombineParams {
  Area area;
  const uint16_t* x;  // [E_loc, R*T, H] BF16 bits
  const int32_t* src_info;
  const int32_t* layout_range;
  const void* topk_idx;
  int64_t topk_stride;
  const float* weights;
  int64_t weights_stride;
  int64_t num_tokens;
  int num_topk;
  int num_experts;
  int experts_per_rank;
  int hidden;
  int64_t max_tokens;
  uint16_t* out;
  bool x_symmetric;  // x is this set's combine buffer (zero-copy): NVSHMEM puts may read it in place
};

// Combine row [token][slot] in this rank's own area (a source rank's copy is where its token's slot arrives).
__device__ __forceinline__ uint8_t* combine_row(const CombineParams& p, int64_t token, int slot) {
  return p.area.set_base() + p.area.combine_rows_offset +
         (static_cast<size_t>(token) * p.num_topk + slot) * static_cast<size_t>(p.hidden) * 2;
}

// Rows of local expert `local` this rank holds (never past the expert's rows, whatever the ranges say).
__device__ __forceinline__ int32_t expert_rows(const CombineParams& p, int local) {
  const int32_t* range = p.layout_range + static_cast<size_t>(local) * p.area.nranks * 2;
  int32_t total = 0;
  for (int s = 0; s < p.area.nranks; ++s) total = max(total, range[2 * s] + range[2 * s + 1]);
  return min(total, static_cast<int32_t>(p.area.nranks * p.max_tokens));
}

__device__ void combine_send(const CombineParams& p, uint32_t seq, uint32_t previous_combine, uint64_t deadline) {
  __shared__ int32_t expert_end[DEEPEP_MAX_LOCAL_EXPERTS];
  __shared__ const int4* source[kRowsPerBatch];  // each row of the batch in x
  __shared__ int4* destination[kRowsPerBatch];   // its combine row on its source rank, for stores; nullptr: none
  __shared__ uint8_t* put_to[kRowsPerBatch];     // or that row's symmetric address, for an NVSHMEM put
  __shared__ int4* put_from[kRowsPerBatch];      // the row in this set's combine buffer (symmetric), for the put
  __shared__ int4* stage_to[kRowsPerBatch];      // put_from when x must be copied there first; nullptr otherwise
  __shared__ int source_rank[kRowsPerBatch];
  const Area& a = p.area;
  const int64_t rows_per_expert = static_cast<int64_t>(a.nranks) * p.max_tokens;
  const int vectors = p.hidden / 8;  // 16-byte vectors per row
  const int warp = threadIdx.x / 32;
  bool block_puts = false;  // whether this block sent anything through NVSHMEM
  wait_peer_acks(a, previous_combine, deadline, Phase::kLowLatencyCombine);
  timeline_mark(a, kMarkAcks);

  const int32_t total =
      lay_out_experts(p.experts_per_rank, [&](int local) { return expert_rows(p, local); }, expert_end);
  int64_t first, end;
  block_share(total, &first, &end);
  for (int64_t batch = first; batch < end; batch += kRowsPerBatch) {
    const int rows = static_cast<int>(min(static_cast<int64_t>(kRowsPerBatch), end - batch));
    if (threadIdx.x < rows) {
      const int64_t g = batch + threadIdx.x;
      const int local = expert_of_row(expert_end, p.experts_per_rank, g);
      const int64_t j = g - (local > 0 ? expert_end[local - 1] : 0);
      const int32_t* range = p.layout_range + static_cast<size_t>(local) * a.nranks * 2;
      // Source rank of row j: the last s whose range starts at or before j.
      int s = 0;
      for (int r = 0; r < a.nranks; ++r) {
        if (range[2 * r + 1] > 0 && range[2 * r] <= j) s = r;
      }
      const int32_t info = p.src_info[local * rows_per_expert + j];
      const int64_t token = info & ((1 << kSlotShift) - 1);
      const int slot = info >> kSlotShift;
      uint8_t* row = nullptr;
      uint8_t* put = nullptr;
      if (info < 0 || token >= p.max_tokens || slot >= p.num_topk) {
        record_async_error(a.error, deepepInvalidArgument, a.rank, Phase::kLowLatencyCombine, s,
                           local * rows_per_expert + j, info);
      } else if (!is_masked(a, s)) {
        row = a.at(s, combine_row(p, token, slot));
        if (row == nullptr) put = combine_row(p, token, slot);
      }
      const size_t element = (local * rows_per_expert + j) * p.hidden;  // of the row in x and in the combine buffer
      source[threadIdx.x] = reinterpret_cast<const int4*>(p.x + element);
      destination[threadIdx.x] = reinterpret_cast<int4*>(row);
      put_to[threadIdx.x] = put;
      put_from[threadIdx.x] = reinterpret_cast<int4*>(reinterpret_cast<uint16_t*>(a.set_base()) + element);
      stage_to[threadIdx.x] = put != nullptr && !p.x_symmetric ? put_from[threadIdx.x] : nullptr;
      source_rank[threadIdx.x] = s;
    }
    const bool puts = __syncthreads_or(threadIdx.x < rows && put_to[threadIdx.x] != nullptr);
    block_puts |= puts;
    copy_rows<true>(source, destination, rows, vectors);
    // A row put through NVSHMEM is read from symmetric memory: the combine buffer, where x is copied first unless it
    // is already there (zero-copy).
    if (puts && !p.x_symmetric) copy_rows<true>(source, stage_to, rows, vectors);
    __syncthreads();  // the batch's rows are in the combine buffer
    if (puts) {
      for (int r = warp; r < rows; r += kWarps) {
        if (put_to[r] != nullptr) nvshmemx_putmem_nbi_warp(put_to[r], put_from[r], p.hidden * 2, source_rank[r]);
      }
      __syncthreads();  // the batch's tables are rewritten by the next batch
    }
  }
  complete_puts(block_puts);
  timeline_mark(a, kMarkStored);

  // The last block to finish says every expert's rows are there, to every source.
  if (!last_block_to_finish(&a.state()->combine_send_done[a.set])) return;
  for (int i = threadIdx.x; i < p.experts_per_rank * a.nranks; i += kThreads) {
    const int local = i / a.nranks, s = i % a.nranks;
    if (!is_masked(a, s)) signal(a, s, a.combine_flag(a.rank * p.experts_per_rank + local), seq);
  }
  __syncthreads();
  timeline_mark(a, kMarkPublished);
}

template <typename Index>
__device__ void combine_recv(const CombineParams& p, uint32_t seq, uint64_t deadline) {
  const Area& a = p.area;
  __shared__ int source_slot[DEEPEP_MAX_TOPK];  // slot whose row holds slot k's data; -1: skip
  __shared__ float weight[DEEPEP_MAX_TOPK];
  const Index* topk = static_cast<const Index*>(p.topk_idx);
  const int vectors = p.hidden / 8;

  for (int64_t t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    if (threadIdx.x < p.num_topk) {
      const int k = threadIdx.x;
      const Index* ids = topk + t * p.topk_stride;
      const int64_t e = static_cast<int64_t>(ids[k]);
      int from = -1;
      // Slots naming an expert of a masked rank are skipped, like -1 slots.
      if (e >= 0 && e < p.num_experts && !is_masked(a, static_cast<int>(e / p.experts_per_rank))) {
        from = k;
        for (int j = 0; j < k; ++j) {
          if (static_cast<int64_t>(ids[j]) == e) {
            from = j;
            break;
          }
        }
        const int owner = static_cast<int>(e / p.experts_per_rank);
        if (from == k &&
            !wait_flag(
                a.combine_flag(static_cast<int>(e)), [&](uint64_t v) { return static_cast<uint32_t>(v) == seq; },
                deadline, a.error, a.rank, Phase::kLowLatencyCombine, owner)) {
          mask_after_timeout(a, owner);
          from = -1;
        }
      } else if (e < -1 || e >= p.num_experts) {
        record_async_error(a.error, deepepInvalidArgument, a.rank, Phase::kLowLatencyCombine, -1, t * p.num_topk + k,
                           e);
      }
      source_slot[k] = from;
      weight[k] = p.weights[t * p.weights_stride + k];
    }
    __syncthreads();
    timeline_mark(a, kMarkFlagsSeen);
    // A duplicate slot whose first slot timed out must be skipped too.
    for (int v = threadIdx.x; v < vectors; v += kThreads) {
      float acc[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
      // Loads of up to kInFlight slots are issued before their sums, which stay in ascending slot order.
      constexpr int kInFlight = 8;
      for (int k0 = 0; k0 < p.num_topk; k0 += kInFlight) {
        int4 raw[kInFlight];
#pragma unroll
        for (int u = 0; u < kInFlight; ++u) {
          const int k = k0 + u;
          const int from = k < p.num_topk ? source_slot[k] : -1;
          // Written by peers during the kernel: a plain load after the acquire.
          if (from >= 0 && source_slot[from] >= 0) {
            raw[u] = *reinterpret_cast<const int4*>(combine_row(p, t, from) + static_cast<size_t>(v) * 16);
          }
        }
#pragma unroll
        for (int u = 0; u < kInFlight; ++u) {
          const int k = k0 + u;
          const int from = k < p.num_topk ? source_slot[k] : -1;
          if (from < 0 || source_slot[from] < 0) continue;
          const uint32_t* words = reinterpret_cast<const uint32_t*>(&raw[u]);
          const float w = weight[k];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            acc[2 * i] = __fadd_rn(acc[2 * i], __fmul_rn(w, bf16_bits_to_float(words[i] & 0xffffu)));
            acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], __fmul_rn(w, bf16_bits_to_float(words[i] >> 16)));
          }
        }
      }
      uint32_t packed[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * i]));
        const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * i + 1]));
        packed[i] = lo | (hi << 16);
      }
      *reinterpret_cast<int4*>(p.out + t * p.hidden + static_cast<int64_t>(v) * 8) =
          make_int4(static_cast<int>(packed[0]), static_cast<int>(packed[1]), static_cast<int>(packed[2]),
                    static_cast<int>(packed[3]));
    }
    __syncthreads();  // shared slots are reused by the next token
    timeline_mark(a, kMarkWritten);
  }
}

template <typename Index>
__global__ void __launch_bounds__(kThreads, 1) combine_kernel(CombineParams p, int phases) {
  const LowLatencyState* state = p.area.state();
  const uint32_t seq = state->seq[p.area.set] + 1u;
  const uint32_t previous_combine = state->last_combine[p.area.set];
  timeline_start(p.area);
  if (phases & kSend) combine_send(p, seq, previous_combine, global_timer_ns() + p.area.timeout_ns);
  if (phases & kRecv) {
    combine_recv<Index>(p, seq, global_timer_ns() + p.area.timeout_ns);
    finish_operation(p.area, seq, true);
  }
  timeline_mark(p.area, kMarkEnd);
}

Area make_area(const deepepComm& comm, int set) {
  const LowLatencyArea& l = comm.ll_area;
  Area a;
  a.direct = comm.ll_direct_device;
  a.offset = comm.ll_offset;
  a.ack_offset = l.ack_offset;
  a.dispatch_flags_offset = l.dispatch_flags_offset;
  a.combine_flags_offset = l.combine_flags_offset;
  a.control_bytes = l.control_bytes;
  a.set_bytes = l.set_bytes;
  a.combine_rows_offset = l.combine_rows_offset;
  a.send_rows_offset = l.send_rows_offset;
  a.rank = comm.rank;
  a.nranks = comm.nranks;
  a.set = set;
  a.error = comm.async_error_device;
  a.timeout_ns = static_cast<uint64_t>(comm.timeout_seconds * 1e9);
  a.timeline = comm.ll_timeline_device;
  a.mask = low_latency_mask(comm);
  return a;
}

int phase_bits(deepepLowLatencyPhase_t phase) {
  switch (phase) {
    case deepepLowLatencySendRecv:
      return kSend | kRecv;
    case deepepLowLatencySend:
      return kSend;
    case deepepLowLatencyRecv:
      return kRecv;
  }
  fail(deepepInvalidArgument, "phase is %d; it must be a deepepLowLatencyPhase_t", static_cast<int>(phase));
}

}  // namespace

LowLatencyRow low_latency_row(int hidden, bool fp8) {
  LowLatencyRow row;
  const size_t h = static_cast<size_t>(hidden);
  row.payload_bytes = fp8 ? h : 2 * h;
  row.scales_offset = align_up(row.payload_bytes, 16);
  row.meta_offset = row.scales_offset + (fp8 ? align_up(h / 128 * 4, 16) : 0);
  row.row_bytes = row.meta_offset + 16;
  return row;
}

LowLatencyArea low_latency_area(const deepepConfig& config, int nranks) {
  LowLatencyArea l;
  if (config.low_latency_max_tokens <= 0) return l;
  DEEPEP_REQUIRE(config.num_experts % nranks == 0,
                 "config->num_experts (%d) is not divisible by the number of ranks (%d); the low-latency area is "
                 "sized for num_experts / nranks experts per rank",
                 config.num_experts, nranks);
  DEEPEP_REQUIRE(config.num_experts / nranks <= DEEPEP_MAX_LOCAL_EXPERTS,
                 "config->num_experts / nranks is %d; at most %d experts per rank are supported",
                 config.num_experts / nranks, DEEPEP_MAX_LOCAL_EXPERTS);
  l.max_tokens = config.low_latency_max_tokens;
  l.max_hidden = config.hidden;
  l.max_topk = config.num_topk;
  l.max_local_experts = config.num_experts / nranks;
  const size_t R = static_cast<size_t>(nranks);
  l.ack_offset = kStateBytes;
  l.dispatch_flags_offset = align_up(l.ack_offset + kLowLatencySets * R * 8, 256);
  l.combine_flags_offset = l.dispatch_flags_offset + kLowLatencySets * R * DEEPEP_MAX_LOCAL_EXPERTS * 8;
  l.send_counts_offset = l.combine_flags_offset + kLowLatencySets * R * DEEPEP_MAX_LOCAL_EXPERTS * 8;
  l.mask_offset = l.send_counts_offset + kLowLatencySets * R * DEEPEP_MAX_LOCAL_EXPERTS * 4;
  l.control_bytes = align_up(l.mask_offset + R * 4, 4096);
  const size_t row = std::max(low_latency_row(config.hidden, false).row_bytes,
                              config.hidden % 128 == 0 ? low_latency_row(config.hidden, true).row_bytes : 0);
  const long double receive = static_cast<long double>(l.max_local_experts) * R * l.max_tokens * row;
  const long double combine = static_cast<long double>(l.max_tokens) * l.max_topk * config.hidden * 2;
  if (receive + combine > static_cast<long double>(size_t(1) << 46)) {
    fail(deepepInvalidArgument,
         "the low-latency area (T %d, hidden %d, num_topk %d, num_experts %d, %d ranks) needs %.3Le bytes per set, "
         "more than any GPU holds",
         config.low_latency_max_tokens, config.hidden, config.num_topk, config.num_experts, nranks, receive + combine);
  }
  l.receive_bytes = align_up(static_cast<size_t>(receive), 4096);
  l.combine_rows_offset = l.receive_bytes;
  l.combine_rows_bytes = align_up(static_cast<size_t>(combine), 4096);
  l.send_rows_offset = l.combine_rows_offset + l.combine_rows_bytes;
  l.send_rows_bytes = align_up(static_cast<size_t>(l.max_tokens) * row, 4096);
  l.set_bytes = l.receive_bytes + l.combine_rows_bytes + l.send_rows_bytes;
  l.total_bytes = l.control_bytes + kLowLatencySets * l.set_bytes;
  return l;
}

std::vector<void*> low_latency_direct_table(const deepepComm& comm, int transport) {
  std::vector<void*> direct(comm.peer_buffers);
  for (int r = 0; r < comm.nranks; ++r) {
    if (r != comm.rank && transport == DEEPEP_LL_TRANSPORT_NVSHMEM) direct[r] = nullptr;
  }
  return direct;
}

uint32_t* low_latency_mask(const deepepComm& comm) {
  return reinterpret_cast<uint32_t*>(static_cast<uint8_t*>(comm.buffer) + comm.ll_offset + comm.ll_area.mask_offset);
}

void set_low_latency_mask(const deepepComm& comm, int rank, bool masked) {
  DEEPEP_CUDA_CHECK(cudaDeviceSynchronize());  // kernels read the mask, and a timeout writes it
  uint32_t* mask = low_latency_mask(comm) + rank;
  uint32_t was = 0;
  DEEPEP_CUDA_CHECK(cudaMemcpy(&was, mask, sizeof(was), cudaMemcpyDeviceToHost));
  if (was != 0 && !masked) {
    // The rank sent no acknowledgements while masked (and this rank waited for none): take its acknowledgements as
    // up to date, or the next call would wait for acknowledgements of operations the rank made without this one.
    uint8_t* area = static_cast<uint8_t*>(comm.buffer) + comm.ll_offset;
    LowLatencyState state;
    DEEPEP_CUDA_CHECK(cudaMemcpy(&state, area, sizeof(state), cudaMemcpyDeviceToHost));
    for (int set = 0; set < kLowLatencySets; ++set) {
      const uint64_t acked = state.seq[set];
      auto* ack = reinterpret_cast<uint64_t*>(area + comm.ll_area.ack_offset) + set * comm.nranks + rank;
      DEEPEP_CUDA_CHECK(cudaMemcpy(ack, &acked, sizeof(acked), cudaMemcpyHostToDevice));
    }
  }
  const uint32_t value = masked ? 1u : 0u;
  DEEPEP_CUDA_CHECK(cudaMemcpy(mask, &value, sizeof(value), cudaMemcpyHostToDevice));
}

void* low_latency_combine_buffer(const deepepComm& comm, int buffer_set) {
  return static_cast<uint8_t*>(comm.buffer) + comm.ll_offset + comm.ll_area.control_bytes +
         static_cast<size_t>(buffer_set) * comm.ll_area.set_bytes;
}

// Launches the kernel of one call. A call with both phases is one cooperative launch: all its blocks are resident
// at once, so blocks waiting to receive can never keep a block that still has to send (to this rank or to a peer)
// off the SMs while other streams' kernels take SMs. A hooked phase is an ordinary launch.
template <typename Params>
void launch_call(void (*kernel)(Params, int), const Params& params, deepepLowLatencyPhase_t phase, int blocks,
                 size_t shared, cudaStream_t stream) {
  const int phases = phase_bits(phase);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  cudaLaunchAttribute cooperative = {};
  cooperative.id = cudaLaunchAttributeCooperative;
  cooperative.val.cooperative = 1;
  if (phases == (kSend | kRecv)) {
    config.attrs = &cooperative;
    config.numAttrs = 1;
  }
  DEEPEP_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, params, phases));
}

void launch_low_latency_dispatch(const deepepComm& comm, const deepepLowLatencyDispatchArgs& args,
                                 cudaStream_t stream) {
  DispatchParams p;
  p.area = make_area(comm, args.buffer_set);
  p.x = static_cast<const uint16_t*>(args.x);
  p.x_stride = args.x_row_stride != 0 ? args.x_row_stride : args.hidden;
  p.topk_idx = args.topk_idx;
  p.topk_stride = args.topk_row_stride != 0 ? args.topk_row_stride : args.num_topk;
  p.num_tokens = args.num_tokens;
  p.num_topk = args.num_topk;
  p.num_experts = args.num_experts;
  p.experts_per_rank = args.num_experts / comm.nranks;
  p.hidden = args.hidden;
  p.max_tokens = comm.ll_area.max_tokens;
  p.fp8 = args.use_fp8 != 0;
  p.round_scale = args.round_scale != 0;
  p.ue8m0 = args.use_ue8m0 != 0;
  p.row = low_latency_row(args.hidden, p.fp8);
  p.recv_x = static_cast<uint8_t*>(args.recv_x);
  p.recv_scales = args.recv_scales;
  p.recv_count = args.recv_count;
  p.recv_src_info = args.recv_src_info;
  p.recv_layout_range = args.recv_layout_range;
  p.scales_token_contiguous = args.scales_token_contiguous != 0;
  p.stats_recv_count = args.stats_recv_count;
  p.stats_recv_count_int32 = args.stats_recv_count_type == deepepInt32;
  p.stats_wait_ns = args.stats_wait_ns;
  p.send_counts = reinterpret_cast<uint32_t*>(static_cast<uint8_t*>(comm.buffer) + comm.ll_offset +
                                              comm.ll_area.send_counts_offset) +
                  static_cast<size_t>(args.buffer_set) * comm.nranks * DEEPEP_MAX_LOCAL_EXPERTS;
  const int blocks = std::max(1, comm.num_sms);
  auto* kernel = args.topk_type == deepepInt64 ? dispatch_kernel<int64_t> : dispatch_kernel<int32_t>;
  const size_t shared = static_cast<size_t>(args.num_experts) * sizeof(int32_t);  // the send's per-expert counts
  allow_dynamic_shared_memory(reinterpret_cast<const void*>(kernel), shared, comm.device,
                              "low-latency dispatch (4 bytes per expert)");
  launch_call(kernel, p, args.phase, blocks, args.phase == deepepLowLatencyRecv ? 0 : shared, stream);
}

void launch_low_latency_combine(const deepepComm& comm, const deepepLowLatencyCombineArgs& args, cudaStream_t stream) {
  CombineParams p;
  p.area = make_area(comm, args.buffer_set);
  p.x = static_cast<const uint16_t*>(args.zero_copy ? low_latency_combine_buffer(comm, args.buffer_set) : args.x);
  p.x_symmetric = args.zero_copy != 0;
  p.src_info = args.src_info;
  p.layout_range = args.layout_range;
  p.topk_idx = args.topk_idx;
  p.topk_stride = args.topk_row_stride != 0 ? args.topk_row_stride : args.num_topk;
  p.weights = args.topk_weights;
  p.weights_stride = args.weights_row_stride != 0 ? args.weights_row_stride : args.num_topk;
  p.num_tokens = args.num_tokens;
  p.num_topk = args.num_topk;
  p.num_experts = args.num_experts;
  p.experts_per_rank = args.num_experts / comm.nranks;
  p.hidden = args.hidden;
  p.max_tokens = comm.ll_area.max_tokens;
  p.out = static_cast<uint16_t*>(args.out);
  const int blocks = std::max(1, comm.num_sms);
  launch_call(args.topk_type == deepepInt64 ? combine_kernel<int64_t> : combine_kernel<int32_t>, p, args.phase, blocks,
              0, stream);
}

}  // namespace deepep
