// Low-latency dispatch and combine over NVLink stores (all ranks in one NVLink domain).
//
// Protocol. Every low-latency operation (a dispatch or a combine) runs on one of two buffer sets and carries a
// sequence number `seq`, per set, kept on the device (LowLatencyState) so that replayed CUDA graphs advance it.
// Every rank makes the same operations in the same order, so all ranks agree on seq without talking about it.
//   Every rank runs the same number G of blocks (agreed at setup), and every block signals for itself: a flag is a
//   word per (rank, block), set with a system-scope release by that block once its own share is out, and a waiter
//   acquires all G words of each rank it waits for (G threads at once), so no block waits for the others to finish
//   before it signals.
//   Dispatch, send side: block b owns a contiguous range of tokens. It stores its tokens' expert ids into every rank
//   (ids [this rank][token][slot]), then reads and casts (FP8) each token's row once and stores it with 16-byte
//   stores into slot [this rank][token] of every rank holding any of the token's experts: once per rank, however
//   many of the rank's experts the token names. Then it publishes (seq << 32) | K << 16 | tokens into its dispatch
//   flag [this rank][b] on every rank.
//   Dispatch, receive side: every block acquires every source's flags and lays the sources' tokens end to end (source
//   rank ascending, then token); a token's row under a local expert is the number of earlier tokens naming the
//   expert, which every block counts from the ids, so the layout is deterministic and no slot is claimed by atomics.
//   Block b copies the rows of its even share of the tokens (a token's slot once per local expert it names) into
//   recv_x / recv_scales / recv_src_info, and writes the counts and ranges of local experts b, b + G, ...
//   Combine, send side: the blocks share the rows of all local experts evenly; each row goes back to its source
//   rank, into that rank's combine row [token][slot] (from recv_src_info). Then each block sets its combine flag
//   [this rank][b] on every rank.
//   Combine, receive side: block b owns tokens b, b + G, ...; it acquires the combine flags of every rank and sums
//   weight * row over each token's slots in ascending order in float32 (separately rounded products and sums).
// Reuse of a set: before a rank writes into a peer's set for operation seq, it waits until that peer acknowledged
// the operations that last read the same bytes: for a dispatch (receive slots) the previous operation on the set,
// for a combine (combine rows) the previous combine on the set. Each block of an operation's final kernel writes
// seq into its ack word [this rank][b] on every peer once it is done with the set. Send-only (hook) kernels change
// no state; the receive kernel completes the operation. Every wait is bounded by the timeout and records rank, phase
// and peer on expiry.
// Masked ranks (deepepCommLowLatencyMaskRank, or a peer whose wait timed out) are never waited for or written to (a
// block goes by the mask as it was when its kernel started, plus its own timeouts: see block_mask); the slots naming
// their experts are skipped like -1 slots, so the other ranks' operations complete without them. A combine also leaves
// out the ranks that were masked when its set's dispatch was sent (which sent them nothing and laid out none of their
// tokens), taken back since or not; one taken back still gets its acknowledgements, which its next call on the set
// waits for.
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

// Rank-local part of the area (never written by peers). Each block keeps its own copy of the sequence numbers and
// advances it when it finishes an operation, so that no block can read a number that another block of the same
// kernel already advanced.
struct LowLatencyState {
  uint32_t seq[kLowLatencySets][kMaxLowLatencyBlocks];           // last completed operation on each set
  uint32_t last_combine[kLowLatencySets][kMaxLowLatencyBlocks];  // seq of the last completed combine on each set
};

constexpr size_t kStateBytes = 4096;
static_assert(sizeof(LowLatencyState) <= kStateBytes, "low-latency state outgrew its reservation");

enum : int { kSend = 1, kRecv = 2 };

// The block's copy of Area::direct, read once when a kernel starts (PeerTablesLoad): the waits' acquires invalidate
// the SM's L1, so that reading the table from global memory after a wait put a round trip to L2 ahead of the first
// store into a peer.
__device__ __forceinline__ uint8_t** block_direct() {
  __shared__ uint8_t* bases[DEEPEP_MAX_RANKS];
  return bases;
}

// Everything a kernel needs to find the area on every rank. Peers in `direct` are written with NVLink stores; the
// others (nullptr there) through NVSHMEM, which names a peer's object by the address of the same object in this
// rank's own buffer (the symmetric heap). Reads are always of this rank's own buffer.
struct Area {
  void* const* direct;  // [nranks]: NVLink-mapped base of every rank's buffer, nullptr for peers reached by NVSHMEM
  // This rank's buffer (direct[rank]) as a kernel parameter: every address in the area is computed from it, and
  // reading it from `direct` put a dependent load (from L2 after an acquire) ahead of most steps' first loads.
  uint8_t* own;
  size_t offset;  // of the low-latency area in every buffer
  size_t ack_offset;
  size_t dispatch_flags_offset;
  size_t combine_flags_offset;
  size_t control_bytes;
  size_t set_bytes;
  size_t combine_rows_offset;
  size_t send_rows_offset;
  size_t ids_offset;
  size_t send_ids_offset;
  int rank;
  int nranks;
  int set;
  AsyncErrorRecord* error;
  uint64_t timeout_ns;
  uint32_t* mask;  // [nranks], this rank's: 1 for a rank masked out (never waited for, never written to)
  // [nranks], this rank's, of this set: 1 for a rank masked when the set's last dispatch was sent (left out of its
  // combine)
  uint32_t* dispatch_mask;
  int64_t* timeline;  // diagnostic [block][DEEPEP_LL_TIMELINE_MARKS] marks, or nullptr

  // Addresses in this rank's own area (also the symmetric addresses of the same objects on every peer).
  __device__ __forceinline__ uint8_t* mine() const { return own + offset; }
  __device__ __forceinline__ LowLatencyState* state() const { return reinterpret_cast<LowLatencyState*>(mine()); }
  // Word [set][rank][block] of one of the per-block flag arrays.
  __device__ __forceinline__ uint64_t* block_word(size_t array_offset, int rank_of_word, int block) const {
    return reinterpret_cast<uint64_t*>(mine() + array_offset) +
           (static_cast<size_t>(set) * nranks + rank_of_word) * kMaxLowLatencyBlocks + block;
  }
  __device__ __forceinline__ uint64_t* ack(int source, int block) const {
    return block_word(ack_offset, source, block);
  }
  __device__ __forceinline__ uint64_t* dispatch_flag(int source, int block) const {
    return block_word(dispatch_flags_offset, source, block);
  }
  __device__ __forceinline__ uint64_t* combine_flag(int source, int block) const {
    return block_word(combine_flags_offset, source, block);
  }
  __device__ __forceinline__ uint8_t* set_base() const {
    return mine() + control_bytes + static_cast<size_t>(set) * set_bytes;
  }
  // Where `owner` keeps the object this rank keeps at `ours`, for NVLink stores; nullptr when NVSHMEM reaches it
  // (from the block's copy of `direct`: every kernel that calls it begins with begin_operation).
  template <typename T>
  __device__ __forceinline__ T* at(int owner, T* ours) const {
    uint8_t* base = block_direct()[owner];
    if (base == nullptr) return nullptr;
    return reinterpret_cast<T*>(base + (reinterpret_cast<uint8_t*>(ours) - own));
  }
};

// Sets `owner`'s copy of the flag this rank keeps at `ours`, after everything this thread (and, through the barriers
// and fences before it, its block) wrote before: a system-scope release store over NVLink, or an NVSHMEM signal
// (atomic, unlike a put of the word) after an NVSHMEM fence; the callers complete their NVSHMEM data puts first.
// The fence is a system fence and also orders this signal after every earlier one to `owner`: a block that put no
// rows issues no quiet, so without it a network transport could deliver the signal of call s + 2 before the one of
// call s to the same word, and the older value would overwrite the newer (the receiver then waits until its timeout).
// Like complete_puts' quiet, it is not bounded by the timeout: over a network transport it may wait for a dead peer
// until NVSHMEM's own transport timeout.
__device__ __forceinline__ void signal(const Area& a, int owner, uint64_t* ours, uint64_t value) {
  if (uint64_t* there = a.at(owner, ours)) {
    store_release_sys(there, value);
  } else {
    nvshmem_fence();
    nvshmemx_signal_op(ours, value, NVSHMEM_SIGNAL_SET, owner);
  }
}

// Completes this block's NVSHMEM puts before the block says its rows are there (`any`: whether this thread's view
// of the block put anything; the threads' views are combined, so that every thread takes the same barriers even when
// they read the mask at different times). One quiet completes everything this PE posted, and over NVLink it is a
// system fence, which (after the barrier) covers the stores of every warp. It is not bounded by the timeout: over a
// network transport a quiet towards a dead peer may wait for NVSHMEM's own transport timeout. Ends with a barrier,
// after which any thread may signal.
__device__ __forceinline__ void complete_puts(bool any) {
  if (__syncthreads_or(any)) {
    if (threadIdx.x == 0) nvshmem_quiet();
    __syncthreads();
  }
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

// Copies 16-byte vectors [first_vector, first_vector + vectors) of a batch of `rows` rows with the whole block,
// several loads in flight per thread (a warp per row would leave most warps idle and each row latency-bound): row r
// goes from src[r] to dst[r], and is skipped when dst[r] is nullptr. Both tables are in shared memory. `kSource` as
// in load16.
template <Source kSource>
__device__ __forceinline__ void copy_rows(const int4* const* src, int4* const* dst, int rows, int first_vector,
                                          int vectors) {
  const int items = rows * vectors;
  if (items == 0) return;  // an empty slice (the same in every thread): nothing to divide by below
  // Item i is vector i % vectors of row i / vectors; each thread steps its (row, vector) on by kThreads items at a
  // time instead of dividing for every item.
  int row = threadIdx.x / vectors, vec = threadIdx.x % vectors;
  const int row_step = kThreads / vectors, vec_step = kThreads % vectors;
  for (int first = threadIdx.x; first < items; first += kThreads * kCopyInFlight) {
    int4 v[kCopyInFlight];
    int4* to[kCopyInFlight];
#pragma unroll
    for (int u = 0; u < kCopyInFlight; ++u) {
      to[u] = nullptr;
      if (first + u * kThreads < items) {
        v[u] = load16<kSource>(src[row] + first_vector + vec);
        if (dst[row] != nullptr) to[u] = dst[row] + first_vector + vec;
      }
      vec += vec_step;
      row += row_step;
      if (vec >= vectors) {
        vec -= vectors;
        ++row;
      }
    }
#pragma unroll
    for (int u = 0; u < kCopyInFlight; ++u) {
      if (to[u] != nullptr) *to[u] = v[u];
    }
  }
}

// Share `index` [first, end) of `total` items dealt out in `shares` even shares (empty for index >= shares).
__device__ __forceinline__ void share_of(int64_t total, int shares, int index, int64_t* first, int64_t* end) {
  const int64_t per_share = (total + shares - 1) / shares;
  *first = min(total, static_cast<int64_t>(index) * per_share);
  *end = min(total, *first + per_share);
}

// This block's share [first, end) of `total` rows.
__device__ __forceinline__ void block_share(int64_t total, int64_t* first, int64_t* end) {
  share_of(total, static_cast<int>(gridDim.x), static_cast<int>(blockIdx.x), first, end);
}

// How many blocks share each token when `tokens` are fewer than the blocks, each taking a slice of the token's rows:
// without it, one SM copies (dispatch receive) or sums (combine receive) all of a token's rows alone while most of the
// others idle, bound by what one SM moves (1.3-1.5 us of each at one token on one H200, 14 KB rows).
constexpr int kMaxTokenParts = 8;
__device__ __forceinline__ int token_parts(int64_t tokens) {
  const int blocks = static_cast<int>(gridDim.x);
  return tokens >= blocks ? 1 : min(kMaxTokenParts, blocks / static_cast<int>(max(tokens, int64_t{1})));
}

// The block's copy of the mask of ranks left out of low-latency calls (a.mask: set by the host between kernels, or by
// a timeout waiting for the rank), a byte per rank, read once when a kernel starts (PeerTablesLoad). Every step of a
// call checks the mask, and reading it from global memory each time put a dependent round trip to L2 on the critical
// path of each step: 1.3-1.5 us of a dispatch, 0.6-1.0 of a combine (2 x H200). During a kernel the mask changes only
// through timeouts: a block that times out waiting for a rank masks it in its own copy as well (mask_after_timeout),
// while a rank another block masked meanwhile stays in this block's copy until this block's own wait for it times out
// (it may be written to in between, which is harmless: the peer's buffers stay mapped).
__device__ __forceinline__ uint8_t* block_mask() {
  __shared__ uint8_t masked[DEEPEP_MAX_RANKS];
  return masked;
}

// What the block's copy of the mask holds for a rank: masked, or (in a combine) masked when the set's dispatch was
// sent.
enum : uint8_t { kRankMasked = 1, kRankOutOfDispatch = 2 };

// The block's copies of the mask and of Area::direct are read in two steps, so that the kernel's other first loads are
// in flight with them: PeerTablesLoad loads this thread's ranks r = threadIdx.x, threadIdx.x + kThreads, ... of the
// mask and of Area::direct, and keep() stores them into the copies, which are complete once the block has passed a
// barrier after that.
class PeerTablesLoad {
 public:
  // `combine`: whether the kernel is a combine's, which leaves out the ranks its set's dispatch left out too.
  __device__ __forceinline__ PeerTablesLoad(const Area& a, bool combine) : nranks_(a.nranks) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int r = static_cast<int>(threadIdx.x) + i * kThreads;
      // Both words loaded before either is tested, so that a combine's second load is in flight with the first.
      const uint32_t masked = r < nranks_ ? *reinterpret_cast<volatile const uint32_t*>(a.mask + r) : 0u;
      const uint32_t out_of_dispatch =
          r < nranks_ && combine ? *reinterpret_cast<volatile const uint32_t*>(a.dispatch_mask + r) : 0u;
      masked_[i] = masked != 0 ? kRankMasked : out_of_dispatch != 0 ? kRankOutOfDispatch : 0;
      direct_[i] = r < nranks_ ? static_cast<uint8_t*>(a.direct[r]) : nullptr;
    }
  }
  __device__ __forceinline__ void keep() const {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int r = static_cast<int>(threadIdx.x) + i * kThreads;
      if (r < nranks_) {
        block_mask()[r] = masked_[i];
        block_direct()[r] = direct_[i];
      }
    }
  }

 private:
  static constexpr int kPerThread = (DEEPEP_MAX_RANKS + kThreads - 1) / kThreads;
  int nranks_;
  uint8_t masked_[kPerThread];
  uint8_t* direct_[kPerThread];
};

// Whether rank `r` is left out of this call's rows and flags (the block's copy of the mask).
__device__ __forceinline__ bool is_masked(int r) { return block_mask()[r] != 0; }

// Whether rank `r` is masked itself, and so gets no acknowledgements (a rank only left out of the set's dispatch, and
// taken back since, gets them).
__device__ __forceinline__ bool is_masked_rank(int r) { return (block_mask()[r] & kRankMasked) != 0; }

// A dispatch keeps the ranks it leaves out for its set's combine (a later kernel, which sees these stores), so that
// they stay out of that combine even when taken back in between, and only they do: its send (or refusal) writes the
// mask it goes by, block 0's copy as its kernel started; its receive adds, in every block, the ranks masked since (by
// hand between a hook's send and receive, or by the block's own timeouts).
__device__ __forceinline__ void note_dispatch_mask(const Area& a) {
  for (int r = threadIdx.x; blockIdx.x == 0 && r < a.nranks; r += kThreads) a.dispatch_mask[r] = is_masked(r) ? 1u : 0u;
}
__device__ __forceinline__ void note_masked_since_dispatch_send(const Area& a) {
  for (int r = threadIdx.x; r < a.nranks; r += kThreads) {
    if (is_masked(r)) a.dispatch_mask[r] = 1u;
  }
}

// A wait for rank `r` timed out (the error is recorded): mask it, so that the survivors' later calls go on without it,
// and so that this block goes on without it now (the other threads see it after the next barrier). A rank never
// masks itself (its own flags come late only when something else failed).
__device__ __forceinline__ void mask_after_timeout(const Area& a, int r) {
  if (r != a.rank) {
    atomicExch(a.mask + r, 1u);
    block_mask()[r] = kRankMasked;
  }
}

// Whether ack value `v` says the peer finished operation `needed` (or a later one), modulo 2^32.
__device__ __forceinline__ bool acked(uint64_t v, uint32_t needed) {
  return static_cast<int32_t>(static_cast<uint32_t>(v) - needed) >= 0;
}

// Waits with the whole block until, for every rank s with wanted(s) that is not masked, the words word_of(s, b) of
// all G blocks b satisfy `ready` (every rank runs G blocks). The words are written by the ranks into this rank's
// area, so the loads stay local, and the block's threads wait for up to kThreads of them at once. A rank whose words
// do not all come in time is masked (the timeout is recorded), so that the block goes on without it; this rank never
// masks itself. `seen(s, word)` runs in the thread that saw one of rank s's words ready. Returns, in every thread,
// whether this rank's own words (when wanted) all came.
//
// A thread waits for one word after another. Up to kGroupedWaitMaxRanks ranks, each group of per_source threads
// waits for the words of one source only: a thread then sees a source's word as soon as that source has written it,
// not once another source's late word came before it in the thread's turn (the wait statistics time each source by
// when its words were seen); a thread then has about as many words as an even spread of the block's words over its
// threads gives it (at 132 blocks at most one more). With more ranks, groups of fewer than 4 threads would leave it up
// to twice as many, so the words are spread evenly (a thread's words may then be of several sources).
constexpr int kGroupedWaitMaxRanks = kThreads / 4;
template <class WordOf, class Wanted, class Ready, class Seen>
__device__ bool wait_all_blocks(const Area& a, WordOf word_of, Wanted wanted, Ready ready, uint64_t deadline,
                                Phase phase, Seen seen) {
  const int blocks = static_cast<int>(gridDim.x);
  bool own_came = true;
  auto wait_word = [&](int s, int b) {
    uint64_t word;
    if (wait_flag(word_of(s, b), ready, deadline, a.error, a.rank, phase, s, &word)) {
      seen(s, word);
    } else if (s == a.rank) {
      own_came = false;
    } else {
      mask_after_timeout(a, s);
    }
  };
  if (a.nranks <= kGroupedWaitMaxRanks) {
    const int per_source = kThreads / a.nranks;
    const int s = static_cast<int>(threadIdx.x) / per_source;  // past the last rank for the threads left over
    for (int b = static_cast<int>(threadIdx.x) % per_source; s < a.nranks && wanted(s) && b < blocks && !is_masked(s);
         b += per_source) {
      wait_word(s, b);
    }
  } else {
    for (int i = threadIdx.x; i < a.nranks * blocks; i += kThreads) {
      const int s = i / blocks;
      if (wanted(s) && !is_masked(s)) wait_word(s, i % blocks);
    }
  }
  return __syncthreads_and(own_came);
}

// Waits until every peer that is not masked finished operation `needed` on the set (all its blocks acknowledged it).
// A peer whose acknowledgements do not come in time is masked, so that the survivors' operation completes.
__device__ void wait_peer_acks(const Area& a, uint32_t needed, uint64_t deadline, Phase phase) {
  wait_all_blocks(
      a, [&](int d, int b) { return a.ack(d, b); }, [&](int d) { return d != a.rank; },
      [&](uint64_t v) { return acked(v, needed); }, deadline, phase, [](int, uint64_t) {});
}

// The optional per-source wait statistics of a receive (stats_wait_ns, int64 [R]), kept by block 0: for each source,
// the time from the start of the block's wait to the last of the source's flags it saw, added to totals[s]. `seen_at`
// is [R] shared memory; the caller synchronises the block after the constructor.
struct SourceWaitClock {
  int64_t* totals;  // null in the blocks that keep none, and when no statistics were asked for
  unsigned long long* seen_at;
  unsigned long long start;

  __device__ SourceWaitClock(int64_t* stats_wait_ns, unsigned long long* seen_at_shared, int nranks)
      : totals(blockIdx.x == 0 ? stats_wait_ns : nullptr),
        seen_at(seen_at_shared),
        start(totals != nullptr ? global_timer_ns() : 0) {
    for (int s = threadIdx.x; totals != nullptr && s < nranks; s += kThreads) seen_at[s] = start;
  }
  __device__ bool on() const { return totals != nullptr; }
  // A thread saw one of source s's flags.
  __device__ void saw(int s) const {
    if (on()) atomicMax(&seen_at[s], static_cast<unsigned long long>(global_timer_ns()));
  }
  // Source s's wait into the statistics (once per source, after the wait; not for a source left out).
  __device__ void add(int s) const {
    if (on()) atomicAdd(reinterpret_cast<unsigned long long*>(totals + s), seen_at[s] - start);
  }
};

// End of an operation's final kernel, in every block: the block records the operation as complete and acknowledges
// it to every peer, after the barrier, so that the block is done with the set before a peer writes into it again. The
// receive wrote nothing to the peers (the send's writes went out before its flags' releases), and the set is this
// rank's memory: an NVLink peer gets the acknowledgement without a system-scope release (store_ack_after_local_use);
// an NVSHMEM one as any flag.
__device__ void finish_operation(const Area& a, uint32_t seq, bool combine) {
  __syncthreads();
  if (threadIdx.x == 0) {
    a.state()->seq[a.set][blockIdx.x] = seq;
    if (combine) a.state()->last_combine[a.set][blockIdx.x] = seq;
  }
  for (int d = threadIdx.x; d < a.nranks; d += kThreads) {
    if (d == a.rank || is_masked_rank(d)) continue;
    if (uint64_t* there = a.at(d, a.ack(a.rank, blockIdx.x))) {
      store_ack_after_local_use(there, seq);
    } else {
      signal(a, d, a.ack(a.rank, blockIdx.x), seq);
    }
  }
}

// The opening of an operation's kernel, in every block: it waits for the kernel ahead of it (programmatic dependent
// launch), then loads the block's copies of the mask and of the peers' bases together with the block's sequence
// numbers, and notes the timeline's start. The copies are complete on return.
struct OperationStart {
  uint32_t seq;  // of this operation on the set
  // seq of the last completed combine on the set, or seq - 2 where that combine lies 2^30 or more operations back
  // (acknowledgements compare modulo 2^32, so one 2^31 back would look ahead and never be reached): the peers
  // acknowledged seq - 2, and so every operation before it, before this rank's operation seq - 1 could send.
  uint32_t previous_combine;
};
__device__ __forceinline__ OperationStart begin_operation(const Area& a, bool combine) {
  wait_for_previous_grid();
  const PeerTablesLoad tables(a, combine);
  const LowLatencyState* state = a.state();
  const uint32_t seq = state->seq[a.set][blockIdx.x] + 1u;
  const uint32_t last_combine = state->last_combine[a.set][blockIdx.x];
  const OperationStart start = {seq, seq - last_combine >= (1u << 30) ? seq - 2u : last_combine};
  timeline_start(a);
  tables.keep();
  __syncthreads();
  return start;
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

// The first of a token's slots naming the same id as slot k (k itself when no earlier slot does): a token naming an
// expert twice travels to it once.
template <typename Id>
__device__ __forceinline__ int first_slot_like(const Id* ids, int k) {
  for (int j = 0; j < k; ++j) {
    if (ids[j] == ids[k]) return j;
  }
  return k;
}

// 16 consecutive BF16 channels of a row (32 bytes; zeros past the row's `hidden` channels, counted from `c`).
struct RowPiece {
  int4 v[2];
};
__device__ __forceinline__ RowPiece load_piece(const uint16_t* __restrict__ row, int c, int hidden) {
  RowPiece piece = {{make_int4(0, 0, 0, 0), make_int4(0, 0, 0, 0)}};
  if (c < hidden) piece.v[0] = __ldg(reinterpret_cast<const int4*>(row + c));
  if (c + 8 < hidden) piece.v[1] = __ldg(reinterpret_cast<const int4*>(row + c) + 1);
  return piece;
}

// Casts 16 consecutive channels (this thread's part of an 8-thread, 128-channel group; every lane of the warp takes
// part in the shuffles) to e4m3 with the group's scale.
__device__ __forceinline__ int4 cast_16_fp8(const RowPiece& piece, bool round_scale, float* scale_out) {
  const uint32_t* words = reinterpret_cast<const uint32_t*>(piece.v);
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
};

// What a flag's low word carries besides the sequence number, so that a receiver finds a peer whose call laid the rows
// out otherwise, leaves that peer's rows out and reports it. The peer wrote them with its own layout, over slots of
// other sources too, so the error means this call's outputs on the receiver are not valid. A dispatch flag: the
// source's tokens | top-k << 11 | options << 17, where the options are hidden / 8 (13 bits: a low-latency area holds
// rows of at most DEEPEP_LL_MAX_HIDDEN) << 2 | round_scale << 1 | FP8 (a UE8M0 receiver packs the exponents of the
// scales as the source rounded them); the receiver compares all but the tokens. A combine flag: hidden / 8 | top-k <<
// 18, the layout of the rows the expert's rank wrote into the token owner's area.
constexpr uint32_t kFlagTopkShift = 11;
constexpr uint32_t kFlagLayoutShift = 17;
static_assert(DEEPEP_LL_MAX_TOKENS < (1 << kFlagTopkShift) &&
                  DEEPEP_MAX_TOPK < (1 << (kFlagLayoutShift - kFlagTopkShift)) &&
                  DEEPEP_LL_MAX_HIDDEN / 8 < (1u << (32 - 2 - kFlagLayoutShift)),
              "a dispatch flag's fields overlap or lose bits");
__device__ __forceinline__ uint32_t dispatch_flag_word(uint32_t tokens, int num_topk, int hidden, bool fp8,
                                                       bool round_scale) {
  const uint32_t layout = static_cast<uint32_t>(hidden / 8) << 2 | (round_scale ? 2u : 0u) | (fp8 ? 1u : 0u);
  return tokens | static_cast<uint32_t>(num_topk) << kFlagTopkShift | layout << kFlagLayoutShift;
}
__device__ __forceinline__ uint32_t combine_flag_word(int hidden, int num_topk) {
  static_assert(DEEPEP_MAX_HIDDEN / 8 < (1 << 18) && DEEPEP_MAX_TOPK < (1 << 14), "a combine flag's fields overlap");
  return static_cast<uint32_t>(hidden / 8) | static_cast<uint32_t>(num_topk) << 18;
}
// The flag word of a rank that refused the call (refused_kernel), in a dispatch and a combine alike: no word of a
// call has it (its token count, or its top-k, is past every limit), so receivers leave the rank out as for another
// layout, and report the refusal instead.
constexpr uint32_t kRefusedFlagWord = 0xffffffffu;
static_assert(DEEPEP_LL_MAX_TOKENS < ((1u << kFlagTopkShift) - 1) && DEEPEP_MAX_TOPK < (1u << 14) - 1,
              "a call's flag word can be the refused one");

// The rank holding expert `e` (rank r holds experts r * experts_per_rank onwards), or -1 for an id naming none (-1
// slots, ids out of range): one 32-bit division, which the id fits once it is in range.
__device__ __forceinline__ int rank_of_expert(int64_t e, int num_experts, int experts_per_rank) {
  if (e < 0 || e >= num_experts) return -1;
  return static_cast<int>(static_cast<uint32_t>(e) / static_cast<uint32_t>(experts_per_rank));
}

// Source `source`'s expert ids [T][K] int32 in this rank's own area (every rank keeps its own slab at the same offset
// on every rank).
__device__ __forceinline__ int32_t* source_ids(const DispatchParams& p, int source) {
  return reinterpret_cast<int32_t*>(p.area.set_base() + p.area.ids_offset) +
         static_cast<size_t>(source) * p.max_tokens * p.num_topk;
}

// The experts per rank that source `source` routed its tokens with, in this rank's own area (after the ids): a
// receiver whose own differ would take other rows for its experts than the source sent it (the flag's word has no
// room for it).
__device__ __forceinline__ int32_t* source_experts_per_rank(const DispatchParams& p, int source) {
  return source_ids(p, p.area.nranks) + source;
}

// The receive slot of token `token` of source `source` in this rank's own area.
__device__ __forceinline__ uint8_t* token_slot(const DispatchParams& p, int source, int64_t token) {
  return p.area.set_base() + (static_cast<size_t>(source) * p.max_tokens + token) * p.row.row_bytes;
}

// Send: every token goes once to each rank holding any of its experts, into the slot [this rank][token] there, and
// every token's ids go to every rank; the receivers work out, from the ids, which of their experts get which rows.
static_assert(DEEPEP_MAX_TOPK <= 32, "the send gives a token's slots to the lanes of one warp");
template <typename Index>
__device__ void dispatch_send(const DispatchParams& p, uint32_t seq, uint64_t deadline) {
  const Area& a = p.area;
  __shared__ uint8_t* slot_row[DEEPEP_MAX_TOPK];  // the token's slot on the rank slot k is the first to name; stores
  __shared__ uint8_t* slot_put[DEEPEP_MAX_TOPK];  // or that slot's symmetric address, for an NVSHMEM put
  __shared__ int slot_rank[DEEPEP_MAX_TOPK];
  const Index* topk = static_cast<const Index*>(p.topk_idx);
  const int K = p.num_topk;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  // This block's tokens: a contiguous range.
  int64_t first, end;
  block_share(p.num_tokens, &first, &end);
  const int64_t ids = (end - first) * K;
  // The thread's first id and the first piece of the block's first row are loaded before the wait for the peers'
  // acknowledgements (nothing goes to a peer before it), so that their latency overlaps the wait.
  const int64_t first_id =
      threadIdx.x < ids ? static_cast<int64_t>(topk[(first + threadIdx.x / K) * p.topk_stride + threadIdx.x % K]) : -1;
  const RowPiece first_piece = load_piece(p.x + first * p.x_stride, threadIdx.x * 16, first < end ? p.hidden : 0);
  wait_peer_acks(a, seq - 1u, deadline, Phase::kLowLatencyDispatch);
  timeline_mark(a, kMarkAcks);

  // The ids of the block's tokens, to every rank that is not masked (-1 for -1 and for ids out of range, which are
  // recorded as errors): stored into NVLink peers, staged in symmetric memory and put to the others.
  int32_t* ids_mine = source_ids(p, a.rank);
  int32_t* ids_staged = reinterpret_cast<int32_t*>(a.set_base() + a.send_ids_offset);
  bool block_puts = false;  // whether this block sends anything through NVSHMEM (the same in every thread)
  for (int d = 0; d < a.nranks && !block_puts; ++d) block_puts = a.at(d, ids_mine) == nullptr && !is_masked(d);
  block_puts = __syncthreads_or(block_puts);  // a timeout elsewhere may mask a rank while the threads read the mask
  for (int64_t i = threadIdx.x; i < ids; i += kThreads) {
    const int64_t at = first * K + i;  // token at / K, slot at % K
    const int64_t e = i == threadIdx.x ? first_id : static_cast<int64_t>(topk[(at / K) * p.topk_stride + at % K]);
    int32_t id = static_cast<int32_t>(e);
    if (e < -1 || e >= p.num_experts) {
      record_async_error(a.error, deepepInvalidArgument, a.rank, Phase::kLowLatencyDispatch, -1, at, e);
      id = -1;
    }
    for (int d = 0; d < a.nranks; ++d) {
      if (is_masked(d)) continue;
      if (int32_t* there = a.at(d, ids_mine + at)) *there = id;
    }
    if (block_puts) ids_staged[at] = id;
  }
  if (blockIdx.x == 0) {  // the receivers read it once every block's flag came
    int32_t* mine = source_experts_per_rank(p, a.rank);
    for (int d = threadIdx.x; d < a.nranks; d += kThreads) {
      if (is_masked(d)) continue;
      if (int32_t* there = a.at(d, mine)) {
        *there = p.experts_per_rank;
      } else {
        nvshmem_int_p(mine, p.experts_per_rank, d);  // completed with the block's puts, before its flag
      }
    }
  }
  __syncthreads();
  if (block_puts && ids > 0) {
    for (int d = warp; d < a.nranks; d += kWarps) {
      // The whole warp makes the put, or none of it: lane 0's reading of the mask decides.
      if (__shfl_sync(0xffffffffu, !is_masked(d) && a.at(d, ids_mine) == nullptr, 0)) {
        nvshmemx_putmem_nbi_warp(ids_mine + first * K, ids_staged + first * K, ids * sizeof(int32_t), d);
      }
    }
  }
  timeline_mark(a, kMarkCounted);

  for (int64_t t = first; t < end; ++t) {
    const Index* ids_of_t = topk + t * p.topk_stride;
    bool puts = false;
    if (warp == 0) {
      // Slot k (lane k) sends the token to its expert's rank when it is the first slot naming that rank: each slot
      // finds its rank once (ids past the range are -1 slots here), and the warp compares the ranks at once.
      const int k = lane;
      const int64_t e = k >= K ? -1 : t == first ? first_id : static_cast<int64_t>(ids_of_t[k]);
      const int dest = rank_of_expert(e, p.num_experts, p.experts_per_rank);
      const uint32_t same_dest = __match_any_sync(0xffffffffu, dest);  // by every lane: the mask names them all
      const bool first_naming = dest >= 0 && __ffs(same_dest) - 1 == k;
      uint8_t* row = nullptr;
      uint8_t* put = nullptr;
      if (first_naming && !is_masked(dest)) {
        uint8_t* ours = token_slot(p, a.rank, t);
        row = a.at(dest, ours);
        if (row == nullptr) put = ours;
        slot_rank[k] = dest;
      }
      if (k < K) {
        slot_row[k] = row;
        slot_put[k] = put;
      }
      puts = put != nullptr;
    }
    puts = __syncthreads_or(puts);
    block_puts |= puts;
    // The row is read and cast once, then stored into the token's slot on every rank it goes to, and into its
    // staging row when it goes anywhere through NVSHMEM (puts read symmetric memory, which the caller's x is not).
    uint8_t* stage = puts ? a.set_base() + a.send_rows_offset + static_cast<size_t>(t) * p.row.row_bytes : nullptr;
    const uint16_t* src = p.x + t * p.x_stride;
    for (int chunk = 0; chunk < p.hidden; chunk += kThreads * 16) {
      const int c = chunk + threadIdx.x * 16;
      const RowPiece piece = t == first && chunk == 0 ? first_piece : load_piece(src, c, p.hidden);
      if (p.fp8) {
        const bool valid = c < p.hidden;  // whole 8-thread groups are valid or not (hidden % 128 == 0)
        float scale;
        const int4 packed = cast_16_fp8(piece, p.round_scale, &scale);
        if (valid) {
          for (int k = 0; k < K; ++k) {
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
      } else {
        // Rows are 16-byte multiples (hidden % 8 == 0): each half of the piece is in the row or past it.
        for (int half = 0; half < 2; ++half) {
          const int ch = c + 8 * half;
          if (ch >= p.hidden) break;
          for (int k = 0; k < K; ++k) {
            uint8_t* row = slot_row[k];
            if (row != nullptr) *reinterpret_cast<int4*>(row + 2 * static_cast<size_t>(ch)) = piece.v[half];
          }
          if (stage != nullptr) *reinterpret_cast<int4*>(stage + 2 * static_cast<size_t>(ch)) = piece.v[half];
        }
      }
    }
    __syncthreads();  // the staging row is complete; slot_row is rewritten for the next token
    if (puts) {
      for (int k = warp; k < K; k += kWarps) {
        if (slot_put[k] != nullptr) nvshmemx_putmem_nbi_warp(slot_put[k], stage, p.row.row_bytes, slot_rank[k]);
      }
      __syncthreads();  // slot_put is rewritten for the next token
    }
  }
  complete_puts(block_puts);

  // This block's rows and ids are out: its flag on every rank says so, with this rank's token count.
  timeline_mark(a, kMarkStored);
  const uint32_t tokens = dispatch_flag_word(static_cast<uint32_t>(p.num_tokens), K, p.hidden, p.fp8, p.round_scale);
  for (int d = threadIdx.x; d < a.nranks; d += kThreads) {
    if (!is_masked(d)) signal(a, d, a.dispatch_flag(a.rank, blockIdx.x), tagged(seq, tokens));
  }
  __syncthreads();
  timeline_mark(a, kMarkPublished);
}

// Expert `local`'s outputs other than its rows, from its rows from each source (rows_from[R]): its count, each
// source's range of its rows, its statistics, and -1 as the source of every row past its count. Shared by `helpers`
// threads, this one being number `helper`.
__device__ __forceinline__ void write_expert_outputs(const DispatchParams& p, int R, int64_t rows_per_expert, int local,
                                                     const int32_t* rows_from, int helper, int helpers) {
  int32_t rows = 0;
  for (int s = 0; s < R; ++s) rows += rows_from[s];
  for (int s = helper; s < R; s += helpers) {
    int32_t offset = 0;
    for (int before_s = 0; before_s < s; ++before_s) offset += rows_from[before_s];
    p.recv_layout_range[(static_cast<size_t>(local) * R + s) * 2] = offset;
    p.recv_layout_range[(static_cast<size_t>(local) * R + s) * 2 + 1] = rows_from[s];
  }
  if (helper == 0) {
    p.recv_count[local] = rows;
    // One block owns each expert here, but the receive of the other buffer set may add to the same counters at the
    // same time (two micro-batches on two streams sharing them, as DeepEP code does): atomic adds.
    if (p.stats_recv_count != nullptr) {
      if (p.stats_recv_count_int32) {
        atomicAdd(static_cast<int32_t*>(p.stats_recv_count) + local, rows);
      } else {
        atomicAdd(reinterpret_cast<unsigned long long*>(static_cast<int64_t*>(p.stats_recv_count) + local),
                  static_cast<unsigned long long>(rows));
      }
    }
  }
  int32_t* src_info = p.recv_src_info + local * rows_per_expert;
  for (int64_t j = rows + helper; j < rows_per_expert; j += helpers) src_info[j] = -1;
}

// Stores scales 4w .. 4w + 3 of output row `out_row` (position j under local expert `local`, rows_per_expert rows per
// expert) into recv_scales: as UE8M0 word w or as float32, with each row's scales or each scale column contiguous, as
// the call asked.
__device__ __forceinline__ void store_four_scales(const DispatchParams& p, int64_t out_row, int local, int64_t j,
                                                  int64_t rows_per_expert, int num_scales, int num_words, int w,
                                                  const float* four) {
  // Element of scale column c of this row in recv_scales (`columns` per row).
  auto scale_at = [&](int c, int columns) {
    return p.scales_token_contiguous ? (static_cast<int64_t>(local) * columns + c) * rows_per_expert + j
                                     : out_row * columns + c;
  };
  if (p.ue8m0) {
    uint32_t word = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) word |= ((__float_as_uint(four[i]) >> 23) & 0xffu) << (8 * i);
    static_cast<int32_t*>(p.recv_scales)[scale_at(w, num_words)] = static_cast<int32_t>(word);
  } else {
    float* out = static_cast<float*>(p.recv_scales);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (4 * w + i < num_scales) out[scale_at(4 * w + i, num_scales)] = four[i];
    }
  }
}

// Dynamic shared memory of a dispatch receive on `blocks` blocks (see dispatch_recv): the int32 counts, the owned
// experts' table and the sources' flag words, then the uint64 times at which each source's flags were seen.
__host__ __device__ size_t dispatch_recv_counts_bytes(int local_experts, int nranks, int blocks) {
  const size_t owned = (static_cast<size_t>(local_experts) + blocks - 1) / blocks;
  return (2 * local_experts + owned * nranks + nranks + 1 + nranks + 1) / 2 * 2 * sizeof(int32_t);  // 8-byte aligned
}
size_t dispatch_recv_shared_bytes(int local_experts, int nranks, int blocks) {
  return dispatch_recv_counts_bytes(local_experts, nranks, blocks) + nranks * sizeof(uint64_t);
}

// Receive: the sources' tokens laid end to end (source rank ascending, then token) are shared out evenly over the
// blocks; a row's position under an expert is the number of earlier tokens naming the expert, which every block
// counts from the ids, so the layout is deterministic and needs no atomics across blocks.
__device__ void dispatch_recv(const DispatchParams& p, uint32_t seq, uint64_t deadline) {
  const Area& a = p.area;
  const int R = a.nranks, K = p.num_topk, experts = p.experts_per_rank;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int first_expert = a.rank * experts;
  const int64_t rows_per_expert = static_cast<int64_t>(R) * p.max_tokens;
  const int num_scales = p.hidden / 128;
  const int num_words = (num_scales + 3) / 4;
  // Expert `local`'s outputs other than its rows (counts, ranges, statistics) are written by one block, block
  // local % G, which owns its (local / G)-th entry of owned_rows.
  const int blocks = static_cast<int>(gridDim.x);
  const int owned_experts = (experts + blocks - 1) / blocks;
  extern __shared__ int32_t dynamic_shared[];  // dispatch_recv_shared_bytes
  int32_t* before = dynamic_shared;            // [experts]: rows of the tokens ahead of this block's
  int32_t* owned_rows = before + experts;      // [owned expert][source]: rows of the experts this block owns
  // [experts]: where an owned expert's counts start in owned_rows, -1 for the other experts (a division per expert
  // once, instead of one per id while counting)
  int32_t* owned_row_of = owned_rows + owned_experts * R;
  int32_t* token_start = owned_row_of + experts;  // [R + 1]: first token of each source
  // [R]: the low word of each source's flag, as the block saw it (every block of a source writes the same)
  auto* flag_word = reinterpret_cast<uint32_t*>(token_start + R + 1);
  // [R]: when this block last saw one of the source's flags (statistics, block 0)
  auto* seen_at = reinterpret_cast<unsigned long long*>(reinterpret_cast<uint8_t*>(dynamic_shared) +
                                                        dispatch_recv_counts_bytes(experts, R, blocks));
  for (int i = threadIdx.x; i < experts + owned_experts * R; i += kThreads) dynamic_shared[i] = 0;
  for (int local = threadIdx.x; local < experts; local += kThreads) {
    owned_row_of[local] = local % blocks == static_cast<int>(blockIdx.x) ? (local / blocks) * R : -1;
  }
  SourceWaitClock clock(p.stats_wait_ns, seen_at, R);
  __syncthreads();

  // Every block waits for the flags of every block of every source (a masked source sends nothing and is not waited
  // for): its token count, after the block's share of its rows and ids.
  const bool own_came = wait_all_blocks(
      a, [&](int s, int b) { return a.dispatch_flag(s, b); }, [](int) { return true; },
      [&](uint64_t v) { return static_cast<uint32_t>(v >> 32) == seq; }, deadline, Phase::kLowLatencyDispatch,
      [&](int s, uint64_t word) {
        flag_word[s] = static_cast<uint32_t>(word);
        clock.saw(s);
      });
  for (int s = threadIdx.x; s < R; s += kThreads) {
    int32_t tokens = 0;
    if (!is_masked(s) && (s != a.rank || own_came)) {
      // All of the source's words came (it would be masked otherwise), so flag_word[s] holds one.
      const uint32_t seen = flag_word[s];
      const uint32_t count = seen & ((1u << kFlagTopkShift) - 1);
      const int32_t experts_per_rank = *source_experts_per_rank(p, s);
      const bool same_experts = experts_per_rank == p.experts_per_rank;
      const bool fits = count <= p.max_tokens && seen == dispatch_flag_word(count, K, p.hidden, p.fp8, p.round_scale);
      if (fits && same_experts) tokens = static_cast<int32_t>(count);
      clock.add(s);
      if (blockIdx.x == 0) {
        if (seen == kRefusedFlagWord) {
          // The source refused the call on its host: it sent nothing.
          record_async_error(a.error, deepepRemoteError, a.rank, Phase::kLowLatencyDispatch, s, kDetailPeerRefused, 0);
        } else if (!fits) {
          // A peer with another T, top-k, hidden or FP8 options (or a corrupted flag): its tokens are dropped, never
          // read or written out of bounds; it wrote its rows with its own layout, so no output here is valid.
          record_async_error(a.error, deepepInvalidArgument, a.rank, Phase::kLowLatencyDispatch, s, kDetailPeerLayout,
                             seen);
        } else if (!same_experts) {
          // A source routing with another E sends tokens to ranks by its own split: this rank would take slots that
          // source never wrote for experts it did not mean, and miss tokens it meant for this rank's experts.
          record_async_error(a.error, deepepInvalidArgument, a.rank, Phase::kLowLatencyDispatch, s, kDetailPeerExperts,
                             experts_per_rank);
        }
      }
    }
    token_start[s + 1] = tokens;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    token_start[0] = 0;
    for (int s = 0; s < R; ++s) token_start[s + 1] += token_start[s];
  }
  __syncthreads();
  timeline_mark(a, kMarkFlagsSeen);
  const int64_t total = token_start[R];
  // The source of token f of the sources' tokens laid end to end: the last source starting at or before f (an empty
  // source starts where the next one does).
  auto source_of = [&](int64_t f) {
    int lo = 0, hi = R - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (token_start[mid] <= f) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    return lo;
  };
  // In the layout below the ids travel a group of whole tokens per warp: lane l holds slot l % K of token l / K of the
  // group (lanes past the group's last whole token hold none), so that a token's slots compare ids through shuffles.
  const int group_tokens = 32 / K;
  const int token_in_group = lane / K, slot = lane % K;
  // The id in lane `lane`'s slot of the group of tokens starting at `group_first` (-1 past `group_end`), and its
  // token's source: plain loads after the acquire, never the read-only cache.
  auto slot_id = [&](int64_t group_first, int64_t group_end, int* source) {
    const int64_t f = group_first + token_in_group;
    if (token_in_group >= group_tokens || f >= group_end) return -1;
    *source = source_of(f);
    return source_ids(p, *source)[(f - token_start[*source]) * K + slot];
  };
  // The local expert `id` names when this lane's slot is the first of its token's slots naming it, else -1 (a token
  // naming an expert twice travels to it once). Every lane of the warp calls it.
  auto first_local = [&](int32_t id) {
    bool first_naming = true;
    for (int j = 1; j < K; ++j) {
      const int32_t earlier = __shfl_up_sync(0xffffffffu, id, j);
      if (j <= slot && earlier == id) first_naming = false;
    }
    const int32_t local = id - first_expert;
    return id >= 0 && local >= 0 && local < experts && first_naming ? local : -1;
  };

  // The blocks share the tokens out; with fewer tokens than blocks, `parts` blocks take each token, every one of
  // them laying it out and copying its slice of the token's rows.
  const int parts = token_parts(total), part = static_cast<int>(blockIdx.x) % parts;
  int64_t first, end;
  share_of(total, blocks / parts, static_cast<int>(blockIdx.x) / parts, &first, &end);

  // Every block counts the rows each expert gets from the tokens ahead of its own (the positions of its rows) and,
  // per source, the rows of the experts it owns: a thread per token, eight of its ids loaded at a time. A token
  // naming an expert twice counts once; a bit per local expert (modulo 128) finds the slots that may repeat an
  // earlier one, which are then compared with the token's earlier ids.
  for (int64_t f = threadIdx.x; f < total; f += kThreads) {
    const int s = source_of(f);
    const int32_t* ids_of_f = source_ids(p, s) + (f - token_start[s]) * K;
    const bool ahead = f < first;
    uint64_t seen_low = 0, seen_high = 0;  // bits (local % 128) of the local experts named so far
    for (int k0 = 0; k0 < K; k0 += 8) {
      int32_t id[8];
#pragma unroll
      for (int q = 0; q < 8; q += 4) {
        const int k = k0 + q;
        if (K % 4 == 0 && k < K) {  // 16-byte aligned: the slab is, and so is every token's K ids
          const int4 v = *reinterpret_cast<const int4*>(ids_of_f + k);
          id[q] = v.x, id[q + 1] = v.y, id[q + 2] = v.z, id[q + 3] = v.w;
        } else {
#pragma unroll
          for (int u = 0; u < 4; ++u) id[q + u] = k + u < K ? ids_of_f[k + u] : -1;
        }
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int local = id[u] - first_expert;
        if (id[u] < 0 || local < 0 || local >= experts) continue;
        const uint64_t bit = uint64_t{1} << (local & 63);
        const bool high = (local & 64) != 0;
        if (((high ? seen_high : seen_low) & bit) != 0) {
          bool repeat = false;
          for (int j = 0; j < k0 + u && !repeat; ++j) repeat = ids_of_f[j] == id[u];
          if (repeat) continue;
        }
        seen_high |= high ? bit : 0;
        seen_low |= high ? 0 : bit;
        if (ahead) atomicAdd(&before[local], 1);
        const int owned_row = owned_row_of[local];
        if (owned_row >= 0) atomicAdd(&owned_rows[owned_row + s], 1);
      }
    }
  }
  __syncthreads();

  // The outputs of the experts this block owns other than their rows, written by the warps after the first while the
  // first lays out the block's first batch of tokens below.
  for (int local = blockIdx.x; warp > 0 && local < experts; local += blocks) {
    write_expert_outputs(p, R, rows_per_expert, local, owned_rows + owned_row_of[local], threadIdx.x - 32,
                         kThreads - 32);
  }

  // This block's tokens, a batch at a time: warp 0 gives each slot naming an expert here its row (a group of tokens
  // at a time, in token order, so the positions follow the tokens' order), the block copies the payloads (a token's
  // slot is read once per expert it names), then a warp per row writes its scales and source.
  __shared__ const int4* batch_row[kRowsPerBatch];  // the token's receive slot
  __shared__ int4* batch_payload[kRowsPerBatch];    // where the row's payload goes in recv_x
  __shared__ int64_t batch_out[kRowsPerBatch];      // its output row: local expert * rows_per_expert + position
  __shared__ int32_t batch_info[kRowsPerBatch];     // source token | slot << kSlotShift
  __shared__ int batch_rows;
  const int tokens_per_batch = max(1, kRowsPerBatch / K);
  const int vectors = static_cast<int>(p.row.payload_bytes / 16);  // rows are 16-byte multiples (validated)
  int64_t slice_begin, slice_end;                                  // this block's 16-byte vectors of each row
  share_of(vectors, parts, part, &slice_begin, &slice_end);
  const uint32_t lanes_below = (1u << lane) - 1u;
  for (int64_t f0 = first; f0 < end; f0 += tokens_per_batch) {
    const int64_t batch_end = min(static_cast<int64_t>(tokens_per_batch), end - f0) + f0;
    if (warp == 0) {
      int rows = 0;
      for (int64_t group_first = f0; group_first < batch_end; group_first += group_tokens) {
        int s = 0;
        const int local = first_local(slot_id(group_first, batch_end, &s));
        const bool naming = local >= 0;
        const uint32_t namers = __ballot_sync(0xffffffffu, naming);
        // The group's lanes naming the same expert are distinct tokens, in token order: each takes the next row,
        // and the expert's count moves past the last of them. One match per group in one warp (made by every lane:
        // the mask names them all) measured as fast as 31 shuffles, where the counting's many warps found it slow.
        const uint32_t same = __match_any_sync(0xffffffffu, local);
        const int earlier = naming ? __popc(same & lanes_below) : 0;
        const int64_t j = naming ? before[local] + earlier : 0;
        __syncwarp();
        if (naming) {
          atomicMax(&before[local], static_cast<int32_t>(j) + 1);
          const int r = rows + __popc(namers & lanes_below);
          const int64_t t = group_first + token_in_group - token_start[s];
          batch_row[r] = reinterpret_cast<const int4*>(token_slot(p, s, t));
          batch_out[r] = local * rows_per_expert + j;
          batch_payload[r] =
              reinterpret_cast<int4*>(p.recv_x + batch_out[r] * static_cast<int64_t>(p.row.payload_bytes));
          batch_info[r] = static_cast<int32_t>(t) | (slot << kSlotShift);
        }
        rows += __popc(namers);
        __syncwarp();
      }
      if (lane == 0) batch_rows = rows;
    }
    __syncthreads();
    const int rows = batch_rows;
    // A lane takes a row's scales four at a time (scales 4w .. 4w + 3, UE8M0 word w). The warp's first row's first
    // four are loaded before the payloads are copied, so that both loads are in flight together.
    auto load_scales = [&](int r, int w, float* four) {
      const float* scales =
          reinterpret_cast<const float*>(reinterpret_cast<const uint8_t*>(batch_row[r]) + p.row.scales_offset);
#pragma unroll
      for (int i = 0; i < 4; ++i) four[i] = 4 * w + i < num_scales ? scales[4 * w + i] : 0.0f;
    };
    // The first part of a token's blocks also writes its rows' scales and sources.
    float first_scales[4];
    if (p.fp8 && part == 0 && warp < rows) load_scales(warp, lane, first_scales);
    copy_rows<Source::kPeerWritten>(batch_row, batch_payload, rows, static_cast<int>(slice_begin),
                                    static_cast<int>(slice_end - slice_begin));
    for (int r = warp; part == 0 && r < rows; r += kWarps) {
      const int64_t out_row = batch_out[r], j = out_row % rows_per_expert;
      const int local = static_cast<int>(out_row / rows_per_expert);
      for (int w = lane; p.fp8 && w < num_words; w += 32) {
        float four[4];
        if (r == warp && w == lane) {
#pragma unroll
          for (int i = 0; i < 4; ++i) four[i] = first_scales[i];
        } else {
          load_scales(r, w, four);
        }
        store_four_scales(p, out_row, local, j, rows_per_expert, num_scales, num_words, w, four);
      }
      if (lane == 0) p.recv_src_info[out_row] = batch_info[r];
    }
    __syncthreads();  // the batch's tables are rewritten by the next batch
  }
  __syncthreads();
  timeline_mark(a, kMarkWritten);
}

template <typename Index>
__global__ void __launch_bounds__(kThreads, 1) dispatch_kernel(DispatchParams p, int phases) {
  const uint32_t seq = begin_operation(p.area, false).seq;
  if (phases & kSend) note_dispatch_mask(p.area);
  // Each phase's waits get the whole timeout: a receive after a send that waited out a dead peer's acknowledgement
  // must still wait for the live ranks.
  if (phases & kSend) dispatch_send<Index>(p, seq, global_timer_ns() + p.area.timeout_ns);
  if (phases & kRecv) {
    dispatch_recv(p, seq, global_timer_ns() + p.area.timeout_ns);
    note_masked_since_dispatch_send(p.area);
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
  bool x_symmetric;        // x is this set's combine buffer (zero-copy): NVSHMEM puts may read it in place
  int64_t* stats_wait_ns;  // optional, [nranks]
};

// Dynamic shared memory of a combine's receive: with wait statistics, block 0's [R] times at which it last saw one of
// each source's flags; none without (the kernel then uses what it did before the statistics).
__host__ __device__ constexpr size_t combine_recv_shared_bytes(bool stats, int nranks) {
  return stats ? static_cast<size_t>(nranks) * sizeof(unsigned long long) : 0;
}

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
      } else if (!is_masked(s)) {
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
    copy_rows<Source::kInputOnce>(source, destination, rows, 0, vectors);
    // A row put through NVSHMEM is read from symmetric memory: the combine buffer, where x is copied first unless it
    // is already there (zero-copy).
    if (puts && !p.x_symmetric) copy_rows<Source::kInputOnce>(source, stage_to, rows, 0, vectors);
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

  // This block's share of the rows is out: its flag on every rank says so, with the rows' layout.
  const uint64_t flag = tagged(seq, combine_flag_word(p.hidden, p.num_topk));
  for (int s = threadIdx.x; s < a.nranks; s += kThreads) {
    if (!is_masked(s)) signal(a, s, a.combine_flag(a.rank, blockIdx.x), flag);
  }
  __syncthreads();
  timeline_mark(a, kMarkPublished);
}

template <typename Index>
__device__ void combine_recv(const CombineParams& p, uint32_t seq, uint64_t deadline) {
  const Area& a = p.area;
  __shared__ bool usable[DEEPEP_MAX_TOPK];      // whether slot k's rank sent its rows
  __shared__ int source_slot[DEEPEP_MAX_TOPK];  // slot whose row holds slot k's data; -1: skip
  __shared__ float weight[DEEPEP_MAX_TOPK];
  __shared__ int64_t slot_expert[DEEPEP_MAX_TOPK];
  __shared__ bool laid_out_alike[DEEPEP_MAX_RANKS];  // whether a rank wrote its rows with this call's hidden and top-k
  __shared__ uint32_t flag_word[DEEPEP_MAX_RANKS];  // the low word of a rank's flag (every block of it writes the same)
  const Index* topk = static_cast<const Index*>(p.topk_idx);
  const int vectors = p.hidden / 8;
  // Slot threadIdx.x's expert and weight of token t (the block's first token's are loaded before the wait for the
  // flags, so that their latency overlaps it).
  auto load_slot = [&](int64_t t, int64_t* e, float* w) {
    if (threadIdx.x < p.num_topk && t < p.num_tokens) {
      *e = static_cast<int64_t>(topk[t * p.topk_stride + threadIdx.x]);
      *w = p.weights[t * p.weights_stride + threadIdx.x];
    }
  };
  // Block b sums tokens b, b + G, ... or, with fewer tokens than blocks, `parts` blocks take each token, every one of
  // them a slice of its channels.
  const int parts = token_parts(p.num_tokens), part = static_cast<int>(blockIdx.x) % parts;
  const int token_step = static_cast<int>(gridDim.x) / parts;
  const int64_t first_token = blockIdx.x < token_step * parts ? blockIdx.x / parts : p.num_tokens;
  int64_t first_e = -1;
  float first_w = 0.0f;
  load_slot(first_token, &first_e, &first_w);

  // A block with tokens waits for the flags of every block of every rank (the rows of a rank it does not wait for,
  // masked or timed out, are skipped like -1 slots). Block 0, which has tokens whenever any block has, keeps the
  // wait statistics: from the start of its wait to the last flag of each source it saw (nothing for a masked one).
  bool own_came = true;
  if (first_token < p.num_tokens) {
    extern __shared__ unsigned long long seen_at[];  // [R], with statistics (combine_recv_shared_bytes)
    SourceWaitClock clock(p.stats_wait_ns, seen_at, a.nranks);
    if (clock.on()) __syncthreads();  // the same in all of the block's threads
    own_came = wait_all_blocks(
        a, [&](int s, int b) { return a.combine_flag(s, b); }, [](int) { return true; },
        [&](uint64_t v) { return static_cast<uint32_t>(v >> 32) == seq; }, deadline, Phase::kLowLatencyCombine,
        [&](int s, uint64_t word) {
          flag_word[s] = static_cast<uint32_t>(word);
          clock.saw(s);
        });
    // Not for a rank left out (masked, timed out, or this rank's own words late), as in the dispatch.
    for (int s = threadIdx.x; clock.on() && s < a.nranks; s += kThreads) {
      if (!is_masked(s) && (s != a.rank || own_came)) clock.add(s);
    }
    // A rank whose words did not all come is masked (or is this rank, whose rows are then not used), and skipped
    // whatever its word says; every other rank's word is in flag_word.
    const uint32_t ours = combine_flag_word(p.hidden, p.num_topk);
    for (int s = threadIdx.x; s < a.nranks; s += kThreads) {
      const uint32_t theirs = flag_word[s];
      laid_out_alike[s] = is_masked(s) || (s == a.rank && !own_came) || theirs == ours;
      if (!laid_out_alike[s] && blockIdx.x == 0) {
        if (theirs == kRefusedFlagWord) {
          // The rank refused the call on its host: it sent no rows, and its experts' slots are left out of the sums.
          record_async_error(a.error, deepepRemoteError, a.rank, Phase::kLowLatencyCombine, s, kDetailPeerRefused, 0);
        } else {
          // Rows of another width or top-k: left out of the sums; written at the peer's offsets, over other ranks'
          // rows too, so that no output here is valid.
          record_async_error(a.error, deepepInvalidArgument, a.rank, Phase::kLowLatencyCombine, s, kDetailPeerLayout,
                             theirs);
        }
      }
    }
    __syncthreads();
  }
  timeline_mark(a, kMarkFlagsSeen);
  int64_t slice_begin, slice_end;  // this block's 16-byte vectors of each row
  share_of(vectors, parts, part, &slice_begin, &slice_end);
  for (int64_t t = first_token; t < p.num_tokens; t += token_step) {
    int64_t e = first_e;
    float w = first_w;
    if (t != first_token) load_slot(t, &e, &w);
    if (threadIdx.x < p.num_topk) {
      const int k = threadIdx.x;
      const int owner = rank_of_expert(e, p.num_experts, p.experts_per_rank);
      usable[k] = owner >= 0 && !is_masked(owner) && (owner != a.rank || own_came) && laid_out_alike[owner];
      if (e < -1 || e >= p.num_experts) {
        record_async_error(a.error, deepepInvalidArgument, a.rank, Phase::kLowLatencyCombine, -1, t * p.num_topk + k,
                           e);
      }
      weight[k] = w;
      slot_expert[k] = e;
    }
    // A slot naming an expert again reads its first slot's row, and follows that slot's decision: the threads read
    // the mask at different times, and another block's timeout may mask a rank in between.
    __syncthreads();
    if (threadIdx.x < p.num_topk) {
      const int first = first_slot_like(slot_expert, threadIdx.x);
      source_slot[threadIdx.x] = usable[first] ? first : -1;
    }
    __syncthreads();
    for (int v = static_cast<int>(slice_begin) + threadIdx.x; v < slice_end; v += kThreads) {
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
          if (from >= 0) {
            raw[u] = *reinterpret_cast<const int4*>(combine_row(p, t, from) + static_cast<size_t>(v) * 16);
          }
        }
#pragma unroll
        for (int u = 0; u < kInFlight; ++u) {
          const int k = k0 + u;
          const int from = k < p.num_topk ? source_slot[k] : -1;
          if (from < 0) continue;
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
  const OperationStart start = begin_operation(p.area, true);
  const uint32_t seq = start.seq;
  if (phases & kSend) combine_send(p, seq, start.previous_combine, global_timer_ns() + p.area.timeout_ns);
  if (phases & kRecv) {
    combine_recv<Index>(p, seq, global_timer_ns() + p.area.timeout_ns);
    finish_operation(p.area, seq, true);
  }
  timeline_mark(p.area, kMarkEnd);
}

// This rank's side of a low-latency call it refused on its host (deepepLowLatencyRefuseCall): it moves no data but
// goes through the call's protocol, so that the peers finish the call at once (they take kRefusedFlagWord as a
// refusal, leave this rank out and record deepepRemoteError) and the ranks' sequence numbers stay in step. Where the
// refused call sends, the kernel waits for the acknowledgements a send waits for (its flag overwrites the one the
// peers read last) and publishes the refused word; then it waits for the peers' flags, after which their writes into
// this rank's set are done, and completes the operation. A refused Send completes it too: no Recv will follow.
__global__ void __launch_bounds__(kThreads, 1) refused_kernel(Area area, int phases, bool combine) {
  const OperationStart start = begin_operation(area, combine);
  if (!combine && (phases & kSend)) note_dispatch_mask(area);
  const uint32_t seq = start.seq;
  const Phase phase = combine ? Phase::kLowLatencyCombine : Phase::kLowLatencyDispatch;
  auto flag = [&](int source, int block) {
    return combine ? area.combine_flag(source, block) : area.dispatch_flag(source, block);
  };
  if (phases & kSend) {
    wait_peer_acks(area, combine ? start.previous_combine : seq - 1u, global_timer_ns() + area.timeout_ns, phase);
    for (int d = threadIdx.x; d < area.nranks; d += kThreads) {
      if (d != area.rank && !is_masked(d)) signal(area, d, flag(area.rank, blockIdx.x), tagged(seq, kRefusedFlagWord));
    }
  }
  wait_all_blocks(
      area, flag, [&](int s) { return s != area.rank; },
      [&](uint64_t v) { return static_cast<uint32_t>(v >> 32) == seq; }, global_timer_ns() + area.timeout_ns, phase,
      [](int, uint64_t) {});
  if (!combine) note_masked_since_dispatch_send(area);
  finish_operation(area, seq, combine);
  timeline_mark(area, kMarkEnd);
}

Area make_area(const deepepComm& comm, int set) {
  const LowLatencyArea& l = comm.ll_area;
  Area a;
  a.direct = comm.ll_direct_device;
  a.own = static_cast<uint8_t*>(comm.buffer);
  a.offset = comm.ll_offset;
  a.ack_offset = l.ack_offset;
  a.dispatch_flags_offset = l.dispatch_flags_offset;
  a.combine_flags_offset = l.combine_flags_offset;
  a.control_bytes = l.control_bytes;
  a.set_bytes = l.set_bytes;
  a.combine_rows_offset = l.combine_rows_offset;
  a.send_rows_offset = l.send_rows_offset;
  a.ids_offset = l.ids_offset;
  a.send_ids_offset = l.send_ids_offset;
  a.rank = comm.rank;
  a.nranks = comm.nranks;
  a.set = set;
  a.error = comm.async_error_device;
  a.timeout_ns = static_cast<uint64_t>(comm.timeout_seconds * 1e9);
  a.timeline = comm.ll_timeline_device;
  a.mask = low_latency_mask(comm);
  a.dispatch_mask = low_latency_dispatch_mask(comm, set);
  return a;
}

// One round of per-block flags on the low-latency grid, nothing else (deepepCommMeasureFlagRound): block b releases
// its next round, tagged with the measurement's epoch, (epoch << 32) | round, into its word on every peer, then waits
// until every peer block's word here has reached that value. Zeros (setup) and earlier epochs are below it; a peer
// may be a round ahead, or in the next measurement already once it saw all of this one's words. `rounds` [blocks]
// counts each block's rounds (the kernels are replayed from a graph), with kRoundTimedOut once one of the block's
// waits timed out: the block's later kernels then wait no more.
constexpr uint32_t kRoundTimedOut = 1u << 31;
__global__ void __launch_bounds__(kThreads, 1)
    flag_round_kernel(void* const* buffers, size_t words_offset, int rank, int nranks, uint32_t epoch, uint32_t* rounds,
                      uint64_t timeout_ns, AsyncErrorRecord* error) {
  wait_for_previous_grid();
  const uint32_t previous = rounds[blockIdx.x];
  if (previous & kRoundTimedOut) return;  // the whole block
  const int blocks = static_cast<int>(gridDim.x);
  const uint32_t round = previous + 1u;
  const uint64_t value = static_cast<uint64_t>(epoch) << 32 | round;
  auto word = [&](int owner, int source, int block) {
    return reinterpret_cast<uint64_t*>(static_cast<uint8_t*>(buffers[owner]) + words_offset) +
           static_cast<size_t>(source) * kMaxLowLatencyBlocks + block;
  };
  for (int d = threadIdx.x; d < nranks; d += kThreads) {
    if (d != rank) store_release_sys(word(d, rank, blockIdx.x), value);
  }
  const uint64_t deadline = global_timer_ns() + timeout_ns;
  bool timed_out = false;
  for (int i = threadIdx.x; i < nranks * blocks && !timed_out; i += kThreads) {
    const int s = i / blocks;
    timed_out = s != rank && !wait_flag(
                                 word(rank, s, i % blocks), [&](uint64_t v) { return v >= value; }, deadline, error,
                                 rank, Phase::kMeasurement, s);
  }
  timed_out = __syncthreads_or(timed_out);  // and every thread has read rounds[blockIdx.x]
  if (threadIdx.x == 0) rounds[blockIdx.x] = round | (timed_out ? kRoundTimedOut : 0u);
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
  row.row_bytes = align_up(row.scales_offset + (fp8 ? align_up(h / 128 * 4, 16) : 0), kRowAlignment);
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
  const size_t block_words = kLowLatencySets * R * kMaxLowLatencyBlocks * sizeof(uint64_t);
  l.ack_offset = kStateBytes;
  l.dispatch_flags_offset = l.ack_offset + block_words;
  l.combine_flags_offset = l.dispatch_flags_offset + block_words;
  l.mask_offset = l.combine_flags_offset + block_words;
  l.dispatch_mask_offset = l.mask_offset + R * 4;
  l.round_words_offset = align_up(l.dispatch_mask_offset + kLowLatencySets * R * 4, sizeof(uint64_t));
  l.control_bytes = align_up(l.round_words_offset + R * kMaxLowLatencyBlocks * sizeof(uint64_t), 4096);
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
  const size_t ids = static_cast<size_t>(l.max_tokens) * l.max_topk * sizeof(int32_t);  // [T][K] of one rank
  l.ids_offset = l.send_rows_offset + l.send_rows_bytes;
  l.send_ids_offset = l.ids_offset + align_up(R * ids + R * sizeof(int32_t), 4096);
  l.set_bytes = l.send_ids_offset + align_up(ids, 4096);
  l.total_bytes = l.control_bytes + kLowLatencySets * l.set_bytes;
  return l;
}

int low_latency_blocks(int min_sm_count) { return std::max(1, std::min(min_sm_count, kMaxLowLatencyBlocks)); }

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

uint32_t* low_latency_dispatch_mask(const deepepComm& comm, int set) {
  return reinterpret_cast<uint32_t*>(static_cast<uint8_t*>(comm.buffer) + comm.ll_offset +
                                     comm.ll_area.dispatch_mask_offset) +
         static_cast<size_t>(set) * comm.nranks;
}

cudaError_t read_low_latency_mask(const deepepComm& comm, std::vector<uint32_t>* mask) {
  mask->assign(static_cast<size_t>(comm.nranks), 0);
  return cudaMemcpy(mask->data(), low_latency_mask(comm), mask->size() * sizeof(uint32_t), cudaMemcpyDeviceToHost);
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
      const std::vector<uint64_t> acked(kMaxLowLatencyBlocks, state.seq[set][0]);  // every block's is the same now
      auto* acks = reinterpret_cast<uint64_t*>(area + comm.ll_area.ack_offset) +
                   (static_cast<size_t>(set) * comm.nranks + rank) * kMaxLowLatencyBlocks;
      DEEPEP_CUDA_CHECK(cudaMemcpy(acks, acked.data(), acked.size() * sizeof(uint64_t), cudaMemcpyHostToDevice));
    }
  }
  const uint32_t value = masked ? 1u : 0u;
  DEEPEP_CUDA_CHECK(cudaMemcpy(mask, &value, sizeof(value), cudaMemcpyHostToDevice));
}

void* low_latency_combine_buffer(const deepepComm& comm, int buffer_set) {
  return static_cast<uint8_t*>(comm.buffer) + comm.ll_offset + comm.ll_area.control_bytes +
         static_cast<size_t>(buffer_set) * comm.ll_area.set_bytes;
}

double measure_flag_round(const deepepComm& comm, uint32_t epoch, int iterations, cudaStream_t stream) {
  // What the measurement makes, released on every path out (a capture left open on an error is ended first).
  struct Resources {
    uint32_t* rounds = nullptr;
    cudaStream_t own = nullptr;  // captured from (the caller's stream may be the legacy default stream)
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    ~Resources() {
      cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
      if (own != nullptr && cudaStreamIsCapturing(own, &capture) == cudaSuccess &&
          capture != cudaStreamCaptureStatusNone) {
        cudaGraph_t partial = nullptr;
        cudaStreamEndCapture(own, &partial);
        if (partial != nullptr) cudaGraphDestroy(partial);
      }
      if (exec != nullptr) cudaGraphExecDestroy(exec);
      if (graph != nullptr) cudaGraphDestroy(graph);
      if (rounds != nullptr) cudaFree(rounds);
      if (own != nullptr) cudaStreamDestroy(own);
    }
  } r;
  const size_t words_offset = comm.ll_offset + comm.ll_area.round_words_offset;
  const uint64_t timeout_ns = static_cast<uint64_t>(comm.timeout_seconds * 1e9);
  DEEPEP_CUDA_CHECK(cudaStreamSynchronize(stream));  // what the caller queued runs first
  DEEPEP_CUDA_CHECK(cudaStreamCreateWithFlags(&r.own, cudaStreamNonBlocking));
  DEEPEP_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&r.rounds), comm.ll_blocks * sizeof(uint32_t)));
  DEEPEP_CUDA_CHECK(cudaMemsetAsync(r.rounds, 0, comm.ll_blocks * sizeof(uint32_t), r.own));
  // The kernels are replayed from a graph, as the low-latency figures of pydeepep.bench are, so that no host launch
  // gap adds to them; each is launched as a low-latency call is (see launch_call).
  DEEPEP_CUDA_CHECK(cudaStreamBeginCapture(r.own, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < iterations; ++i) {
    launch_kernel(flag_round_kernel, comm.ll_blocks, kThreads, 0, r.own, true, true, comm.peer_buffers_device,
                  words_offset, comm.rank, comm.nranks, epoch, r.rounds, timeout_ns, comm.async_error_device);
  }
  DEEPEP_CUDA_CHECK(cudaStreamEndCapture(r.own, &r.graph));
  DEEPEP_CUDA_CHECK(cudaGraphInstantiate(&r.exec, r.graph, 0));
  const float ms = median_event_ms(r.own, 1, 5, [&] { DEEPEP_CUDA_CHECK(cudaGraphLaunch(r.exec, r.own)); });
  return ms * 1e3 / iterations;
}

// Launches the kernel of one call. A call with both phases is one cooperative launch: all its blocks are resident
// at once, so blocks waiting to receive can never keep a block that still has to send (to this rank or to a peer)
// off the SMs while other streams' kernels take SMs. A hooked phase is an ordinary launch.
template <typename Params>
void launch_call(void (*kernel)(Params, int), const Params& params, deepepLowLatencyPhase_t phase, int blocks,
                 size_t shared, cudaStream_t stream) {
  const int phases = phase_bits(phase);
  // Launched early (the kernels call wait_for_previous_grid first): the blocks take the SMs as the kernel ahead
  // releases them, instead of launching once it ended (2 x H200, same run: dispatch 16.3 -> 15.9 us at T = 1, 22.5
  // -> 22.0 at T = 128).
  launch_kernel(kernel, blocks, kThreads, shared, stream, true, phases == (kSend | kRecv), params, phases);
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
  const int blocks = comm.ll_blocks;
  auto* kernel = args.topk_type == deepepInt64 ? dispatch_kernel<int64_t> : dispatch_kernel<int32_t>;
  const size_t shared =
      args.phase == deepepLowLatencySend ? 0 : dispatch_recv_shared_bytes(p.experts_per_rank, comm.nranks, blocks);
  allow_dynamic_shared_memory(reinterpret_cast<const void*>(kernel), shared, comm.device,
                              "low-latency dispatch receive (counts per local expert and per owned expert and rank)");
  launch_call(kernel, p, args.phase, blocks, shared, stream);
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
  p.stats_wait_ns = args.stats_wait_ns;
  const int blocks = comm.ll_blocks;
  const size_t shared =
      args.phase == deepepLowLatencySend ? 0 : combine_recv_shared_bytes(p.stats_wait_ns != nullptr, comm.nranks);
  launch_call(args.topk_type == deepepInt64 ? combine_kernel<int64_t> : combine_kernel<int32_t>, p, args.phase, blocks,
              shared, stream);
}

void launch_low_latency_refusal(const deepepComm& comm, bool combine, int buffer_set, deepepLowLatencyPhase_t phase,
                                cudaStream_t stream) {
  // Launched as a hooked phase is: an ordinary launch, early (the kernel waits for the one ahead first).
  launch_kernel(refused_kernel, comm.ll_blocks, kThreads, 0, stream, true, false, make_area(comm, buffer_set),
                phase_bits(phase), combine);
}

}  // namespace deepep
