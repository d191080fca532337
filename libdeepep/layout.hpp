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

}  // namespace deepep
