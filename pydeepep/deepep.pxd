# Cython declarations of include/deepep/deepep.h (keep in step with the header).
from libc.stdint cimport int32_t, int64_t, uint8_t


cdef extern from "deepep/deepep.h" nogil:
    cdef struct CUstream_st
    cdef struct CUevent_st

    enum: DEEPEP_UNIQUE_ID_BYTES
    enum: DEEPEP_MAX_RANKS
    enum: DEEPEP_MAX_TOPK
    enum: DEEPEP_MAX_LOCAL_EXPERTS
    enum: DEEPEP_LL_MAX_TOKENS
    enum: DEEPEP_MAX_HIDDEN
    enum: DEEPEP_LL_MAX_HIDDEN
    enum: DEEPEP_LL_TIMELINE_MARKS
    enum: DEEPEP_LL_TRANSPORT_AUTO
    enum: DEEPEP_LL_TRANSPORT_NVSHMEM
    enum: DEEPEP_VERSION

    ctypedef enum deepepResult_t:
        deepepSuccess
        deepepInvalidArgument
        deepepInvalidUsage
        deepepCudaError
        deepepNvshmemError
        deepepOutOfMemory
        deepepTimeout
        deepepNoDevice
        deepepNotSupported
        deepepInternalError
        deepepBufferTooSmall
        deepepRemoteError

    ctypedef enum deepepDataType_t:
        deepepInt32
        deepepInt64
        deepepFloat32
        deepepBFloat16
        deepepFloat8E4M3
        deepepUInt8

    ctypedef struct deepepUniqueId:
        char internal[128]

    cdef struct deepepComm
    ctypedef deepepComm* deepepComm_t

    ctypedef struct deepepConfig:
        size_t struct_size
        int device
        int allow_nvlink_multicast
        double timeout_seconds
        size_t buffer_bytes
        int max_tokens_per_rank
        int hidden
        int num_topk
        int num_experts
        int low_latency_max_tokens
        int low_latency_transport
        int zero_copy_dispatch
        int reserved

    const char* deepepGetErrorString(deepepResult_t result)
    const char* deepepGetLastErrorMessage()
    deepepResult_t deepepGetVersion(int* version)
    deepepResult_t deepepConfigInit(deepepConfig* config, size_t struct_size)

    deepepResult_t deepepGetUniqueId(deepepUniqueId* id)
    deepepResult_t deepepCommInitRank(deepepComm_t* comm, int nranks, const deepepUniqueId* id, int rank,
                                      const deepepConfig* config)
    deepepResult_t deepepCommDestroy(deepepComm_t comm)
    deepepResult_t deepepCommRank(deepepComm_t comm, int* rank)
    deepepResult_t deepepCommSize(deepepComm_t comm, int* nranks)
    deepepResult_t deepepCommRanksPerNvlDomain(deepepComm_t comm, int* ranks_per_domain)
    deepepResult_t deepepCommDevice(deepepComm_t comm, int* device)
    deepepResult_t deepepCommBufferBytes(deepepComm_t comm, size_t* bytes)
    deepepResult_t deepepCommGetDispatchArea(deepepComm_t comm, void** area, size_t* bytes)
    deepepResult_t deepepCommGetStream(deepepComm_t comm, CUstream_st** stream)
    deepepResult_t deepepCommGetAsyncError(deepepComm_t comm, deepepResult_t* async_error)
    deepepResult_t deepepCommClearAsyncError(deepepComm_t comm)
    deepepResult_t deepepGetBufferSizeHint(const deepepConfig* config, int nranks, size_t* bytes)

    deepepResult_t deepepGetDispatchLayout(deepepComm_t comm, const void* topk_idx, deepepDataType_t topk_type,
                                           int64_t num_tokens, int num_topk, int64_t topk_row_stride,
                                           int num_experts, int32_t* num_tokens_per_rank,
                                           int32_t* num_tokens_per_expert, uint8_t* is_token_in_rank,
                                           CUstream_st* stream)

    cdef struct deepepHandle
    ctypedef deepepHandle* deepepHandle_t

    deepepResult_t deepepHandleCreate(deepepComm_t comm, deepepHandle_t* handle)
    deepepResult_t deepepHandleDestroy(deepepHandle_t handle)
    deepepResult_t deepepHandleGetNumRecvTokens(deepepHandle_t handle, int64_t* num_recv_tokens)
    deepepResult_t deepepHandleGetRecvTokensPerExpert(deepepHandle_t handle, int32_t* counts, int num_local_experts)
    deepepResult_t deepepHandleGetNumTokens(deepepHandle_t handle, int64_t* num_tokens)

    ctypedef struct deepepDispatchArgs:
        size_t struct_size
        int64_t num_tokens
        const void* topk_idx
        deepepDataType_t topk_type
        int num_topk
        int64_t topk_row_stride
        int num_experts
        int expert_alignment
        int64_t num_worst_tokens
        int num_sms
        const void* x
        deepepDataType_t x_type
        int hidden
        int64_t x_row_stride
        const void* x_scales
        deepepDataType_t scales_type
        int num_scales
        int64_t scales_row_stride
        const float* topk_weights
        int64_t weights_row_stride
        void* recv_x
        void* recv_scales
        int64_t* recv_topk_idx
        float* recv_topk_weights
        int32_t* recv_src_idx
        int32_t* num_recv_tokens_per_expert
        int64_t num_recv_rows
        int report_recv_counts
        int reserved

    deepepResult_t deepepDispatchArgsInit(deepepDispatchArgs* args, size_t struct_size)
    deepepResult_t deepepDispatchNotify(deepepComm_t comm, const deepepDispatchArgs* args, deepepHandle_t handle,
                                        CUstream_st* stream)
    deepepResult_t deepepDispatch(deepepComm_t comm, const deepepDispatchArgs* args, deepepHandle_t handle,
                                  CUstream_st* stream)
    deepepResult_t deepepHandleWaitRecvCounts(deepepHandle_t handle)

    ctypedef struct deepepCombineArgs:
        size_t struct_size
        const void* x
        int hidden
        int64_t num_rows
        int64_t x_row_stride
        const float* topk_weights
        int num_topk
        int64_t weights_row_stride
        const void* bias[2]
        int64_t bias_row_stride[2]
        void* out
        float* out_topk_weights

    deepepResult_t deepepCommMeasurePushBandwidth(deepepComm_t comm, int num_sms, size_t bytes, int iterations,
                                                  double* gb_per_s, CUstream_st* stream)
    deepepResult_t deepepCombineArgsInit(deepepCombineArgs* args, size_t struct_size)
    deepepResult_t deepepCombine(deepepComm_t comm, const deepepCombineArgs* args, deepepHandle_t handle,
                                 CUstream_st* stream)
    ctypedef enum deepepCall_t:
        deepepCallDispatchNotify
        deepepCallDispatch
        deepepCallWorstCaseDispatch
        deepepCallCombine
    deepepResult_t deepepRefuseCall(deepepComm_t comm, deepepCall_t call, deepepHandle_t handle, int num_sms,
                                    CUstream_st* stream)

    # Low-latency dispatch and combine.
    ctypedef enum deepepLowLatencyPhase_t:
        deepepLowLatencySendRecv
        deepepLowLatencySend
        deepepLowLatencyRecv

    ctypedef struct deepepLowLatencyDispatchArgs:
        size_t struct_size
        int buffer_set
        deepepLowLatencyPhase_t phase
        int64_t num_tokens
        const void* x
        int hidden
        int64_t x_row_stride
        const void* topk_idx
        deepepDataType_t topk_type
        int num_topk
        int64_t topk_row_stride
        int num_experts
        int use_fp8
        int round_scale
        int use_ue8m0
        void* recv_x
        void* recv_scales
        int32_t* recv_count
        int32_t* recv_src_info
        int32_t* recv_layout_range
        int scales_token_contiguous
        void* stats_recv_count
        deepepDataType_t stats_recv_count_type
        int64_t* stats_wait_ns

    deepepResult_t deepepCommLowLatencyMaskRank(deepepComm_t comm, int rank, int masked)
    deepepResult_t deepepCommLowLatencyMaskedRanks(deepepComm_t comm, int* masked)
    deepepResult_t deepepCommLowLatencyTimeline(deepepComm_t comm, int64_t* marks, int capacity_blocks,
                                                int* num_blocks)
    deepepResult_t deepepLowLatencyDispatchArgsInit(deepepLowLatencyDispatchArgs* args, size_t struct_size)
    deepepResult_t deepepLowLatencyDispatch(deepepComm_t comm, const deepepLowLatencyDispatchArgs* args,
                                            CUstream_st* stream)

    ctypedef struct deepepLowLatencyCombineArgs:
        size_t struct_size
        int buffer_set
        deepepLowLatencyPhase_t phase
        const void* x
        int zero_copy
        int hidden
        int num_experts
        const int32_t* src_info
        const int32_t* layout_range
        int64_t num_tokens
        const void* topk_idx
        deepepDataType_t topk_type
        int num_topk
        int64_t topk_row_stride
        const float* topk_weights
        int64_t weights_row_stride
        void* out
        int64_t* stats_wait_ns

    deepepResult_t deepepLowLatencyCombineArgsInit(deepepLowLatencyCombineArgs* args, size_t struct_size)
    deepepResult_t deepepLowLatencyRefuseCall(deepepComm_t comm, int combine, int buffer_set,
                                              deepepLowLatencyPhase_t phase, CUstream_st* stream)
    deepepResult_t deepepLowLatencyCombine(deepepComm_t comm, const deepepLowLatencyCombineArgs* args,
                                           CUstream_st* stream)
    deepepResult_t deepepLowLatencyGetCombineBuffer(deepepComm_t comm, int buffer_set, int hidden, int num_experts,
                                                    void** buffer)
    deepepResult_t deepepCommLowLatencyMaxTokens(deepepComm_t comm, int* max_tokens)
    deepepResult_t deepepCommMeasureFlagRound(deepepComm_t comm, int iterations, double* us, CUstream_st* stream)
