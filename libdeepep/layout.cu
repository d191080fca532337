// Dispatch layout: per-rank and per-expert token counts and the token-to-rank mask, from the router's top-k ids.
// Integer counts are accumulated with atomics, which commute, so the result is deterministic.
#include <algorithm>

#include "async_error.hpp"
#include "comm.hpp"
#include "cuda_utils.hpp"
#include "device_utils.cuh"
#include "layout.hpp"

namespace deepep {

namespace {

constexpr int kThreads = 256;
constexpr size_t kMaxSharedCounterBytes = 32 * 1024;

// A plain launch (it starts once everything before it on the stream is done): the kernel after it may read its own
// inputs before waiting for it. The fence makes that formal: a release fence before launch_dependents synchronises
// with the start of the dependent grid (PTX ISA, griddepcontrol).
__global__ void __launch_bounds__(kThreads) clear_counts_kernel(int32_t* a, int64_t na, int32_t* b, int64_t nb) {
  __threadfence();
  allow_next_grid_launch();
  for (int64_t i = threadIdx.x; i < na; i += blockDim.x) a[i] = 0;
  for (int64_t i = threadIdx.x; i < nb; i += blockDim.x) b[i] = 0;
}

template <typename Index>
__global__ void __launch_bounds__(kThreads)
    dispatch_layout_kernel(const Index* __restrict__ topk_idx, int64_t num_tokens, int num_topk, int64_t row_stride,
                           int num_experts, int experts_per_rank, int nranks, int32_t* __restrict__ per_rank,
                           int32_t* __restrict__ per_expert, uint8_t* __restrict__ in_rank, bool shared_counters,
                           AsyncErrorRecord* error, int my_rank) {
  // Counters are first gathered per block in shared memory (when they fit) so that global atomics are one per
  // (block, counter) instead of one per (token, slot). The global counters are cleared by the kernel before this one
  // (launch_clear_counts), which this one starts under.
  extern __shared__ int32_t block_counts[];
  int32_t* rank_counts = shared_counters ? block_counts : per_rank;
  int32_t* expert_counts = shared_counters ? block_counts + nranks : per_expert;
  if (shared_counters) {
    for (int i = threadIdx.x; i < nranks + num_experts; i += blockDim.x) block_counts[i] = 0;
    __syncthreads();
  } else {
    wait_for_previous_grid();
  }

  for (int64_t token = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; token < num_tokens;
       token += int64_t(gridDim.x) * blockDim.x) {
    const Index* ids = topk_idx + token * row_stride;
    uint8_t* row = in_rank + token * nranks;
    for (int r = 0; r < nranks; ++r) row[r] = 0;
    for (int k = 0; k < num_topk; ++k) {
      const int64_t expert = static_cast<int64_t>(ids[k]);
      if (expert == -1) continue;
      if (expert < -1 || expert >= num_experts) {
        record_async_error(error, deepepInvalidArgument, my_rank, Phase::kLayout, -1, token * num_topk + k, expert);
        continue;
      }
      atomicAdd(&expert_counts[expert], 1);
      const int rank = static_cast<int>(expert / experts_per_rank);
      // A token counts once per rank: skip a rank an earlier valid slot already reached.
      bool seen = false;
      for (int j = 0; j < k && !seen; ++j) {
        const int64_t other = static_cast<int64_t>(ids[j]);
        seen = other >= 0 && other < num_experts && other / experts_per_rank == rank;
      }
      if (!seen) {
        row[rank] = 1;
        atomicAdd(&rank_counts[rank], 1);
      }
    }
  }

  if (shared_counters) {
    __syncthreads();
    wait_for_previous_grid();
    for (int i = threadIdx.x; i < nranks; i += blockDim.x)
      if (rank_counts[i] != 0) atomicAdd(&per_rank[i], rank_counts[i]);
    for (int i = threadIdx.x; i < num_experts; i += blockDim.x)
      if (expert_counts[i] != 0) atomicAdd(&per_expert[i], expert_counts[i]);
  }
}

}  // namespace

void launch_dispatch_layout(const deepepComm& comm, const void* topk_idx, deepepDataType_t topk_type,
                            int64_t num_tokens, int num_topk, int64_t topk_row_stride, int num_experts,
                            int32_t* num_tokens_per_rank, int32_t* num_tokens_per_expert, uint8_t* is_token_in_rank,
                            cudaStream_t stream) {
  const int nranks = comm.nranks;
  // One H200, same run: 7.9-8.0 -> 6.4-6.5 us at N = 4096 against two cudaMemsetAsync before the kernel.
  launch_clear_counts(num_tokens_per_rank, nranks, num_tokens_per_expert, num_experts, stream);
  if (num_tokens == 0) return;

  const size_t counter_bytes = sizeof(int32_t) * (static_cast<size_t>(nranks) + num_experts);
  const bool shared_counters = counter_bytes <= kMaxSharedCounterBytes;
  int sm_count = 0;
  DEEPEP_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, comm.device));
  const int64_t blocks_needed = (num_tokens + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(std::min<int64_t>(blocks_needed, 2 * sm_count));
  const size_t shared_bytes = shared_counters ? counter_bytes : 0;
  const int experts_per_rank = num_experts / nranks;
  auto launch = [&](auto kernel, const auto* ids) {
    launch_kernel(kernel, blocks, kThreads, shared_bytes, stream, true, false, ids, num_tokens, num_topk,
                  topk_row_stride, num_experts, experts_per_rank, nranks, num_tokens_per_rank, num_tokens_per_expert,
                  is_token_in_rank, shared_counters, comm.async_error_device, comm.rank);
  };
  if (topk_type == deepepInt64) {
    launch(dispatch_layout_kernel<int64_t>, static_cast<const int64_t*>(topk_idx));
  } else {
    launch(dispatch_layout_kernel<int32_t>, static_cast<const int32_t*>(topk_idx));
  }
}

void launch_clear_counts(int32_t* a, int64_t na, int32_t* b, int64_t nb, cudaStream_t stream) {
  launch_kernel(clear_counts_kernel, 1, kThreads, 0, stream, false, false, a, na, b, nb);
}

}  // namespace deepep
