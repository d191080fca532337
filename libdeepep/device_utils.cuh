// Device helpers shared by the communication kernels: system-scope acquire/release on flags, bounded spin waits,
// and vectorised row copies.
#pragma once

#include <cstdint>

#include "async_error.hpp"

namespace deepep {

// Flags that cross GPUs are 64-bit words read with acquire and written with release at system scope: the data a
// peer wrote before its release store is visible after our acquire load that sees the flag.
__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* address) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
  return value;
}

__device__ __forceinline__ void store_release_sys(uint64_t* address, uint64_t value) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  return ns;
}

// Spins until `ready(load_acquire_sys(flag))` or the deadline passes. On expiry records a timeout naming the peer
// and returns false (never traps: the kernel winds down and the host reports the error).
template <class Ready>
__device__ __forceinline__ bool wait_flag(const uint64_t* flag, Ready ready, uint64_t deadline_ns,
                                          AsyncErrorRecord* error, int rank, Phase phase, int peer,
                                          uint64_t* seen = nullptr) {
  uint64_t value = load_acquire_sys(flag);
  while (!ready(value)) {
    if (global_timer_ns() > deadline_ns) {
      record_async_error(error, deepepTimeout, rank, phase, peer, 0, 0);
      return false;
    }
    __nanosleep(32);
    value = load_acquire_sys(flag);
  }
  if (seen != nullptr) *seen = value;
  return true;
}

// Copies `bytes` from src with one warp to every destination that some lane holds (lane i holds the address of
// destination i in `lane_dst`, or nullptr): each piece of the source is loaded once and stored to all destinations,
// so a row bound for several places costs one read. 16-byte vectors with several loads in flight when every address
// and the size allow it, 4-byte words or single bytes otherwise. kReadOnly sources (caller inputs, constant during
// the kernel) go through the non-coherent cache; data a peer wrote during the kernel must not, so it is read with
// plain loads after the acquire that made it visible.
template <bool kReadOnly>
__device__ __forceinline__ int4 load16(const int4* p) {
  if constexpr (kReadOnly) return __ldg(p);
  return *p;
}

template <bool kReadOnly>
__device__ __forceinline__ void warp_copy_to_each(void* lane_dst, const void* src, size_t bytes, int lane) {
  const uint32_t holders = __ballot_sync(0xffffffffu, lane_dst != nullptr);
  if (holders == 0) return;
  const uintptr_t s = reinterpret_cast<uintptr_t>(src);
  const uintptr_t mine = reinterpret_cast<uintptr_t>(lane_dst);
  auto destination = [&](uint32_t remaining) {  // the first destination left, the same in every lane
    return __shfl_sync(0xffffffffu, static_cast<unsigned long long>(mine), __ffs(remaining) - 1);
  };
  const bool vectors = __all_sync(0xffffffffu, ((mine | s | bytes) & 15) == 0);
  if (vectors) {
    const int4* in = static_cast<const int4*>(src);
    const size_t n = bytes / 16;
    constexpr int kUnroll = 4;
    // Loop bounds depend on the warp's first vector only, so that every lane takes part in every shuffle.
    size_t base = 0;
    for (; base + kUnroll * 32 <= n; base += kUnroll * 32) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = load16<kReadOnly>(in + base + u * 32 + lane);
      for (uint32_t left = holders; left != 0; left &= left - 1) {
        int4* out = reinterpret_cast<int4*>(destination(left)) + base + lane;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) out[u * 32] = v[u];
      }
    }
    for (; base < n; base += 32) {
      const size_t i = base + lane;
      const int4 v = i < n ? load16<kReadOnly>(in + i) : int4{};
      for (uint32_t left = holders; left != 0; left &= left - 1) {
        int4* out = reinterpret_cast<int4*>(destination(left));
        if (i < n) out[i] = v;
      }
    }
    return;
  }
  const bool words = __all_sync(0xffffffffu, ((mine | s | bytes) & 3) == 0);
  for (uint32_t left = holders; left != 0; left &= left - 1) {
    const uintptr_t d = destination(left);
    if (words) {
      for (size_t i = lane; i < bytes / 4; i += 32)
        reinterpret_cast<uint32_t*>(d)[i] = static_cast<const uint32_t*>(src)[i];
    } else {
      for (size_t i = lane; i < bytes; i += 32) reinterpret_cast<uint8_t*>(d)[i] = static_cast<const uint8_t*>(src)[i];
    }
  }
}

// Copies `bytes` from src to dst with one warp (every lane passes the same arguments).
template <bool kReadOnly>
__device__ __forceinline__ void warp_copy(void* dst, const void* src, size_t bytes, int lane) {
  warp_copy_to_each<kReadOnly>(lane == 0 ? dst : nullptr, src, bytes, lane);
}

// Bulk copies through the TMA unit (sm_90): lane 0 of a warp moves a row through shared memory in pieces of
// kBulkPieceBytes (global -> shared, then shared -> every destination), so the copy costs the warp a few
// instructions per piece instead of a load and a store per 16 bytes, and the pieces' stores fly without holding
// registers. Two buffers per warp: the next piece loads while the current one is stored. Addresses must be 16-byte
// aligned and sizes multiples of 16 (bulk_copy_fits says whether a copy qualifies).
constexpr uint32_t kBulkPieceBytes = 4096;
constexpr size_t kBulkBytesPerWarp = 2 * kBulkPieceBytes;

struct BulkPipe {
  uint8_t* buffers;        // [2][kBulkPieceBytes] of shared memory, 128-byte aligned
  uint64_t* landed;        // [2] mbarriers: buffer i's piece has arrived
  uint32_t loaded = 0;     // pieces loaded so far (kept the same in every lane)
  uint32_t committed = 0;  // store groups committed so far (the same in every lane)
};

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Lane 0 initialises the pipe's barriers; the whole warp calls it.
__device__ __forceinline__ void bulk_pipe_init(BulkPipe& pipe, int lane) {
  if (lane == 0) {
    for (int i = 0; i < 2; ++i)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(&pipe.landed[i])) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");  // visible to the TMA unit
  }
  __syncwarp();
}

// Orders this thread's generic memory accesses with its bulk copies (the async proxy) on global memory, both ways.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.global;" ::: "memory"); }

// Whether a copy of `bytes` from src to every lane's destination may go through bulk_copy_to_each.
__device__ __forceinline__ bool bulk_copy_fits(const void* lane_dst, const void* src, size_t bytes) {
  const uintptr_t bits = reinterpret_cast<uintptr_t>(lane_dst) | reinterpret_cast<uintptr_t>(src) | bytes;
  return __all_sync(0xffffffffu, (bits & 15) == 0);
}

// Waits until at most kPending of this thread's newest store groups still read shared memory (.read) or are not yet
// complete, their writes visible to this thread (otherwise).
template <int kPending>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kPending) : "memory");
}
template <int kPending>
__device__ __forceinline__ void bulk_wait_complete() {
  asm volatile("cp.async.bulk.wait_group %0;" ::"n"(kPending) : "memory");
}

// Lane 0: waits until the stores of all but the newest `pending` groups are complete (all of them past 8, which is
// only ever more than needed), then orders them, written by the async proxy, before this thread's later generic
// accesses (the release that publishes them).
__device__ __forceinline__ void bulk_wait_complete_allowing(uint32_t pending) {
  switch (pending) {
    case 0:
      bulk_wait_complete<0>();
      break;
    case 1:
      bulk_wait_complete<1>();
      break;
    case 2:
      bulk_wait_complete<2>();
      break;
    case 3:
      bulk_wait_complete<3>();
      break;
    case 4:
      bulk_wait_complete<4>();
      break;
    case 5:
      bulk_wait_complete<5>();
      break;
    case 6:
      bulk_wait_complete<6>();
      break;
    case 7:
      bulk_wait_complete<7>();
      break;
    default:
      bulk_wait_complete<8>();
      break;
  }
  asm volatile("fence.proxy.async.global;" ::: "memory");
}

// Like warp_copy_to_each (lane i holds destination i or nullptr), through the TMA unit. The whole warp calls it; lane
// 0 issues. The stores are complete only after a later bulk_wait_complete by lane 0.
__device__ __forceinline__ void bulk_copy_to_each(BulkPipe& pipe, void* lane_dst, const void* src, size_t bytes,
                                                  int lane) {
  const uint32_t holders = __ballot_sync(0xffffffffu, lane_dst != nullptr);
  if (holders == 0 || bytes == 0) return;
  const unsigned long long mine = reinterpret_cast<unsigned long long>(lane_dst);
  const uint8_t* from = static_cast<const uint8_t*>(src);
  const uint32_t pieces = static_cast<uint32_t>((bytes + kBulkPieceBytes - 1) / kBulkPieceBytes);
  auto piece_bytes = [&](uint32_t piece) {
    return static_cast<uint32_t>(min(static_cast<size_t>(kBulkPieceBytes), bytes - piece * size_t{kBulkPieceBytes}));
  };
  auto load = [&](uint32_t piece) {  // lane 0: into the buffer of pipe.loaded, once no store reads it any more
    const uint32_t buffer = pipe.loaded % 2;
    const uint32_t barrier = shared_address(&pipe.landed[buffer]);
    bulk_wait_read<0>();
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(barrier), "r"(piece_bytes(piece))
                 : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     shared_address(pipe.buffers + buffer * kBulkPieceBytes)),
                 "l"(from + piece * size_t{kBulkPieceBytes}), "r"(piece_bytes(piece)), "r"(barrier)
                 : "memory");
  };
  if (lane == 0) load(0);
  ++pipe.loaded;
  for (uint32_t piece = 0; piece < pieces; ++piece) {
    const uint32_t index = pipe.loaded - 1;  // this piece's load
    if (piece + 1 < pieces) {
      if (lane == 0) load(piece + 1);
      ++pipe.loaded;
    }
    const uint32_t buffer = index % 2;
    if (lane == 0) {
      const uint32_t barrier = shared_address(&pipe.landed[buffer]), parity = (index / 2) % 2;
      uint32_t landed = 0;
      do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}"
                     : "=r"(landed)
                     : "r"(barrier), "r"(parity)
                     : "memory");
      } while (!landed);
    }
    for (uint32_t left = holders; left != 0; left &= left - 1) {
      const unsigned long long dst = __shfl_sync(0xffffffffu, mine, __ffs(left) - 1);
      if (lane == 0) {
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(
                         dst + piece * static_cast<unsigned long long>(kBulkPieceBytes)),
                     "r"(shared_address(pipe.buffers + buffer * kBulkPieceBytes)), "r"(piece_bytes(piece))
                     : "memory");
      }
    }
    if (lane == 0) asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    ++pipe.committed;
  }
  __syncwarp();
}

// Named barrier among the first `threads` threads of the block (a warp-specialised group).
__device__ __forceinline__ void group_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace deepep
