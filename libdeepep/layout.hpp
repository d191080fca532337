#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "deepep/deepep.h"

struct deepepComm;

namespace deepep {

// Launches the dispatch-layout computation on `stream` (arguments already validated).
void launch_dispatch_layout(const deepepComm& comm, const void* topk_idx, deepepDataType_t topk_type,
                            int64_t num_tokens, int num_topk, int64_t topk_row_stride, int num_experts,
                            int32_t* num_tokens_per_rank, int32_t* num_tokens_per_expert, uint8_t* is_token_in_rank,
                            cudaStream_t stream);

// Zeroes a [na] and b [nb] (b may be null) in a kernel that lets the next kernel on `stream` launch at once: launch
// that one early (launch_kernel) and have it call wait_for_previous_grid before it adds to the arrays; it may read and
// write anything else before, since this kernel is a plain launch (keep it so). A cudaMemsetAsync instead is a node
// that the next kernel cannot start under.
void launch_clear_counts(int32_t* a, int64_t na, int32_t* b, int64_t nb, cudaStream_t stream);

}  // namespace deepep
