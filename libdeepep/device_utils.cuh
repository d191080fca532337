// Device helpers shared by the communication kernels: system-scope acquire/release on flags, bounded spin waits,
// and vectorised row copies.
#pragma once

#include <cstdint>

#include "async_error.hpp"

namespace deepep {

// Flags that cross GPUs are 64-bit words read with acquire and written with release at system scope: the data a
// peer wrote before its release store is visible after our acquire load that sees the flag. (One exception, for a
// word that orders no data: store_ack_after_local_use.)
__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* address) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
  return value;
}

__device__ __forceinline__ void store_release_sys(uint64_t* address, uint64_t value) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
}

// An acknowledgement that this GPU is done with memory of its own that a peer writes into next (over NVLink): the
// block's earlier accesses are made complete at GPU scope, then the word goes out with a plain system-scope store.
// For callers whose block wrote nothing to any peer since its last system-scope release, and whose memory in question
// lives on this GPU. Every access to that memory, this GPU's and the peers' (whose earlier writes their own releases
// completed before this GPU acquired them), meets in this GPU's L2, so ordering this block's at GPU scope before the
// word leaves puts them before any write the peer makes once it sees the word. A load whose value the block never
// uses may still be in flight (copy_rows loads rows it then skips); whatever it returns is dropped. The PTX memory
// model does not pair a GPU-scope fence with a reader on another GPU: this rests on where the memory lives. A
// system-scope release here cost 0.8-0.9 us of every low-latency dispatch on 2 x H200 (docs/performance.md).
__device__ __forceinline__ void store_ack_after_local_use(uint64_t* address, uint64_t value) {
  asm volatile("fence.acq_rel.gpu;" ::: "memory");
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
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

// Where a copy's source comes from, which decides how it is loaded. kPeerWritten: a peer wrote it during the kernel,
// so it is read with plain loads after the acquire that made it visible (never through the non-coherent path).
// kInput: a caller input, constant during the kernel: the non-coherent path. kInputOnce: a caller input read once in
// long runs (a combine's expert outputs): the non-coherent path without taking L1 lines, L2 fetching 256 bytes per
// miss; measured on 2 x H200 (docs/tuning.md) a high-throughput combine 1.5 % and a low-latency one up to 4 % faster,
// the dispatches' pushes no faster (FP8 at N = 512 slower), so those stay kInput.
enum class Source { kPeerWritten, kInput, kInputOnce };

template <Source kSource>
__device__ __forceinline__ int4 load16(const int4* p) {
  if constexpr (kSource == Source::kInput) return __ldg(p);
  if constexpr (kSource == Source::kInputOnce) {
    int4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
  }
  return *p;
}

// Copies `bytes` from src with one warp to every destination that some lane holds (lane i holds the address of
// destination i in `lane_dst`, or nullptr): each piece of the source is loaded once and stored to all destinations,
// so a row bound for several places costs one read. 16-byte vectors when every address and the size allow it, in
// rounds of kUnroll loads in flight per lane; the last, partial round loads all its vectors at once when
// kTailAtOnce, one per lane at a time otherwise. 4-byte words or single bytes when the addresses are not 16-byte
// aligned. `kSource` as in load16.
template <Source kSource, int kUnroll = 4, bool kTailAtOnce = false>
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
    // Loop bounds depend on the warp's first vector only, so that every lane takes part in every shuffle.
    size_t base = 0;
    for (; base + kUnroll * 32 <= n; base += kUnroll * 32) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = load16<kSource>(in + base + u * 32 + lane);
      for (uint32_t left = holders; left != 0; left &= left - 1) {
        int4* out = reinterpret_cast<int4*>(destination(left)) + base + lane;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) out[u * 32] = v[u];
      }
    }
    if constexpr (kTailAtOnce) {
      if (base < n) {  // fewer than kUnroll * 32 vectors left
        int4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const size_t i = base + u * 32 + lane;
          v[u] = i < n ? load16<kSource>(in + i) : int4{};
        }
        for (uint32_t left = holders; left != 0; left &= left - 1) {
          int4* out = reinterpret_cast<int4*>(destination(left)) + base + lane;
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (base + u * 32 + lane < n) out[u * 32] = v[u];
          }
        }
      }
    } else {
      for (; base < n; base += 32) {
        const size_t i = base + lane;
        const int4 v = i < n ? load16<kSource>(in + i) : int4{};
        for (uint32_t left = holders; left != 0; left &= left - 1) {
          int4* out = reinterpret_cast<int4*>(destination(left));
          if (i < n) out[i] = v;
        }
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

// Copies `bytes` from src to dst with one warp (every lane passes the same arguments); the template arguments as in
// warp_copy_to_each.
template <Source kSource, int kUnroll = 4, bool kTailAtOnce = false>
__device__ __forceinline__ void warp_copy(void* dst, const void* src, size_t bytes, int lane) {
  warp_copy_to_each<kSource, kUnroll, kTailAtOnce>(lane == 0 ? dst : nullptr, src, bytes, lane);
}

// Programmatic dependent launch (sm_90): a kernel launched early (launch_kernel, cuda_utils.hpp) may start while
// the kernel before it on the stream still runs, once that one allowed it (or finished); it must call
// wait_for_previous_grid before it touches anything the previous kernel writes, and everything that kernel wrote is
// visible after it. Without the launch attribute the wait returns at once.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_next_grid_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Block-scope release / acquire of a shared-memory counter: one warp hands finished work to another of its block.
// Every lane of the handing warp adds with release semantics, so that each lane's own stores are ordered before the
// count the other warp acquires (a release sequence of additions), without relying on a warp barrier for it.
__device__ __forceinline__ void add_release_block(uint32_t* address, uint32_t value) {
  asm volatile(
      "red.release.cta.shared.add.u32 [%0], %1;" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(address))),
      "r"(value)
      : "memory");
}

__device__ __forceinline__ uint32_t load_acquire_block(const uint32_t* address) {
  uint32_t value;
  asm volatile("ld.acquire.cta.shared.u32 %0, [%1];"
               : "=r"(value)
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(address)))
               : "memory");
  return value;
}

// Named barrier `id` for a group of `threads` threads (whole warps, any of the block's warps; a warp-specialised
// group).
__device__ __forceinline__ void group_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace deepep
