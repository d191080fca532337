/*
 * libdeepep: expert-parallel communication for Mixture-of-Experts models.
 *
 * The whole C ABI. C99- and C++17-clean and self-contained: it needs no CUDA header. Streams and events are taken
 * as `struct CUstream_st*` / `struct CUevent_st*`, the types behind both `cudaStream_t` and `CUstream`.
 *
 * Conventions
 *  - Every call returns a deepepResult_t; results are passed out through pointers. Treat unknown codes as errors.
 *  - deepepGetErrorString() gives static text for a code; deepepGetLastErrorMessage() says, per calling thread,
 *    what the last failing call on that thread found wrong.
 *  - Structs that cross the ABI start with `size_t struct_size`; fill them with their *Init function (or the
 *    DEEPEP_*_INIT initialiser) so that fields added later take their defaults.
 *  - The stream is the last parameter of every stream-ordered call.
 *  - Calls on one communicator (and its handles) must not run concurrently from several host threads.
 *
 * Limits of this release
 *  - One communicator per process at a time (NVSHMEM is initialised once per process). A second
 *    deepepCommInitRank while one is alive returns deepepInvalidUsage.
 *  - 1 <= nranks <= DEEPEP_MAX_RANKS; 1 <= num_topk <= DEEPEP_MAX_TOPK; num_experts divisible by nranks with at
 *    most DEEPEP_MAX_LOCAL_EXPERTS per rank.
 */
#ifndef DEEPEP_DEEPEP_H_
#define DEEPEP_DEEPEP_H_

#include <stddef.h>
#include <stdint.h>

#include "deepep/version.h"

#if defined(__GNUC__) || defined(__clang__)
#define DEEPEP_API __attribute__((visibility("default")))
#else
#define DEEPEP_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* The CUDA stream and event types (cudaStream_t == CUstream == struct CUstream_st*), declared without CUDA headers. */
struct CUstream_st;
struct CUevent_st;

#define DEEPEP_UNIQUE_ID_BYTES 128
#define DEEPEP_MAX_RANKS 1024
#define DEEPEP_MAX_TOPK 32
#define DEEPEP_MAX_LOCAL_EXPERTS 1024

/* Result codes. Values are fixed forever; new codes are only appended. */
typedef enum {
  deepepSuccess = 0,
  deepepInvalidArgument = 1, /* a bad pointer, size, shape, dtype or value: the message names it */
  deepepInvalidUsage = 2,    /* a call in the wrong state (e.g. a second communicator in one process) */
  deepepCudaError = 3,       /* the CUDA runtime failed: the message gives CUDA's text */
  deepepNvshmemError = 4,    /* NVSHMEM failed to initialise, allocate or finalise */
  deepepOutOfMemory = 5,     /* host or device memory could not be allocated */
  deepepTimeout = 6,         /* a wait passed the configured timeout: the message names the stalled peer */
  deepepNoDevice = 7,        /* no usable CUDA device or driver in this process */
  deepepNotSupported = 8,    /* valid but not supported by this build or device */
  deepepInternalError = 9,   /* a bug in libdeepep: please report it with the message */
  deepepBufferTooSmall = 10, /* the communication buffer is too small: the message gives the size needed */
  deepepRemoteError = 11     /* a peer reported a failure during a collective */
} deepepResult_t;

/* Element types of arrays that cross the ABI. Values are fixed forever. */
typedef enum {
  deepepInt32 = 0,
  deepepInt64 = 1,
  deepepFloat32 = 2,
  deepepBFloat16 = 3,
  deepepFloat8E4M3 = 4,
  deepepUInt8 = 5 /* also used for boolean masks: one byte per element, 0 or 1 */
} deepepDataType_t;

/* The bootstrap handle, made by one rank with deepepGetUniqueId and sent to the others by any means. */
typedef struct {
  char internal[DEEPEP_UNIQUE_ID_BYTES];
} deepepUniqueId;

/* Opaque communicator. */
typedef struct deepepComm* deepepComm_t;

/*
 * Communicator configuration. Initialise with deepepConfigInit (or DEEPEP_CONFIG_INIT), then change fields.
 * Buffers are sized from `buffer_bytes`, or, when it is 0, from the workload description that follows it.
 */
typedef struct {
  size_t struct_size;         /* sizeof(deepepConfig) of the caller's header: keeps the ABI extensible */
  int device;                 /* CUDA device ordinal for this rank; -1: the calling thread's current device */
  int allow_nvlink_multicast; /* 0 (default): NVLink multicast (NVLS) stays off; 1: NVSHMEM may use it */
  double timeout_seconds;     /* bound on every host and device wait (setup included); > 0; default 100 */
  size_t buffer_bytes;        /* communication buffer per rank in bytes; 0: size it from the workload below */
  int max_tokens_per_rank;    /* workload: most tokens any rank passes to one call (default 4096) */
  int hidden;                 /* workload: hidden size H in elements (default 7168) */
  int num_topk;               /* workload: experts chosen per token K (default 8) */
  int num_experts;            /* workload: experts in total E (default 256) */
} deepepConfig;

/* Plain-brace initialiser with the defaults, valid in C and C++. Keep in field order. */
#define DEEPEP_CONFIG_INIT {sizeof(deepepConfig), -1, 0, 100.0, 0, 4096, 7168, 8, 256}

/* ---------------------------------------------------------------------------------------------------------------- */
/* Errors and version. Local, thread-safe, never fail for valid pointers.                                            */

/* Static text for a result code; unknown values give "unknown deepep result code". Never NULL. */
DEEPEP_API const char* deepepGetErrorString(deepepResult_t result);

/* What the last failing call on the calling thread found wrong, in words ("" if none failed). Valid until the
 * next failing call on the same thread. Never NULL. */
DEEPEP_API const char* deepepGetLastErrorMessage(void);

/* [out] version: DEEPEP_VERSION_MAJOR * 10000 + DEEPEP_VERSION_MINOR * 100 + DEEPEP_VERSION_PATCH of the loaded
 * library (compare with DEEPEP_VERSION of the header you compiled against). */
DEEPEP_API deepepResult_t deepepGetVersion(int* version);

/* [out] config: filled with the defaults and struct_size = sizeof(deepepConfig). */
DEEPEP_API deepepResult_t deepepConfigInit(deepepConfig* config);

/* ---------------------------------------------------------------------------------------------------------------- */
/* Communicator. */

/* Makes a bootstrap id. Call on one rank and send the bytes to all others. Blocking, local; needs no GPU.
 * The id holds the address on which the job's bootstrap will listen; treat it as a secret of the job.
 * [out] id */
DEEPEP_API deepepResult_t deepepGetUniqueId(deepepUniqueId* id);

/* Creates the communicator of rank `rank` among `nranks`. Blocking and collective: every rank calls it with the
 * same id and nranks. Works on config->device and leaves the calling thread's current device as it was. Sets
 * NVSHMEM_DISABLE_NVLS=1 in the process environment unless config->allow_nvlink_multicast. Initialises NVSHMEM (NVLink
 * multicast off unless asked), allocates the communication buffer on the symmetric heap, maps NVLink peers. Every wait
 * is bounded by config->timeout_seconds: if a peer never arrives, deepepTimeout is returned (NVSHMEM's setup thread is
 * then left behind, and the process should exit). Not graph-capturable. [out] comm; [in] nranks, id, rank; [in] config:
 * NULL for the defaults. */
DEEPEP_API deepepResult_t deepepCommInitRank(deepepComm_t* comm, int nranks, const deepepUniqueId* id, int rank,
                                             const deepepConfig* config);

/* Destroys a communicator; NULL is accepted and does nothing. Blocking and collective (frees the symmetric heap
 * and finalises NVSHMEM); bounded by the communicator's timeout. Waits for the communicator's own stream. */
DEEPEP_API deepepResult_t deepepCommDestroy(deepepComm_t comm);

/* Local queries. */
DEEPEP_API deepepResult_t deepepCommRank(deepepComm_t comm, int* rank);
DEEPEP_API deepepResult_t deepepCommSize(deepepComm_t comm, int* nranks);
/* Ranks reachable by NVLink loads and stores from this one, this rank included (ranks are grouped into NVLink
 * domains of consecutive ranks). */
DEEPEP_API deepepResult_t deepepCommRanksPerNvlDomain(deepepComm_t comm, int* ranks_per_domain);
DEEPEP_API deepepResult_t deepepCommDevice(deepepComm_t comm, int* device);
/* Bytes of the communication buffer this rank holds. */
DEEPEP_API deepepResult_t deepepCommBufferBytes(deepepComm_t comm, size_t* bytes);
/* The communicator's own stream (used by asynchronous calls). Do not destroy it. */
DEEPEP_API deepepResult_t deepepCommGetStream(deepepComm_t comm, struct CUstream_st** stream);

/* Asynchronous faults: a stream-ordered call that finds a problem on the device (a timeout, an out-of-range
 * expert id) records it in a host-visible flag and returns. This query reads the flag without waiting:
 * [out] async_error is deepepSuccess when nothing was recorded; otherwise the code, and
 * deepepGetLastErrorMessage() describes it (rank, phase, peer or index). Local, non-blocking. */
DEEPEP_API deepepResult_t deepepCommGetAsyncError(deepepComm_t comm, deepepResult_t* async_error);
/* Clears the flag. Local; call after the stream that raised it has finished. */
DEEPEP_API deepepResult_t deepepCommClearAsyncError(deepepComm_t comm);

/* Bytes of communication buffer per rank that `config`'s workload needs on `nranks` ranks (what buffer_bytes = 0
 * allocates). Local, needs no GPU. [in] config (NULL: defaults), nranks; [out] bytes */
DEEPEP_API deepepResult_t deepepGetBufferSizeHint(const deepepConfig* config, int nranks, size_t* bytes);

/* ---------------------------------------------------------------------------------------------------------------- */
/* Dispatch layout. */

/* From the router's choices compute, on the device:
 *   num_tokens_per_rank   [nranks] int32: tokens with at least one expert on each rank (counted once per rank);
 *   num_tokens_per_expert [num_experts] int32: tokens per expert;
 *   is_token_in_rank      [num_tokens, nranks] uint8 (0/1), rows contiguous.
 * topk_idx [num_tokens, num_topk] of type deepepInt64 or deepepInt32 with rows `topk_row_stride` elements apart
 * (>= num_topk) and entries in [-1, num_experts); -1 means "no expert". An entry outside that range is ignored and
 * recorded as deepepInvalidArgument in the asynchronous-error flag (never a wild write).
 * num_experts must be divisible by nranks (expert e lives on rank e / (num_experts / nranks)).
 * All arrays are device memory of the communicator's device. num_tokens may be 0.
 * Stream-ordered, local (no communication), capturable in a CUDA graph. */
DEEPEP_API deepepResult_t deepepGetDispatchLayout(deepepComm_t comm, const void* topk_idx, deepepDataType_t topk_type,
                                                  int64_t num_tokens, int num_topk, int64_t topk_row_stride,
                                                  int num_experts, int32_t* num_tokens_per_rank,
                                                  int32_t* num_tokens_per_expert, uint8_t* is_token_in_rank,
                                                  struct CUstream_st* stream);

/* ---------------------------------------------------------------------------------------------------------------- */
/* High-throughput (HT) dispatch and combine inside one NVLink domain.
 *
 * A dispatch sends token t to every rank d with is_token_in_rank[t, d], once; rank d receives M rows grouped by
 * source rank ascending, then by source token index ascending. A combine is the inverse: each rank returns the rows
 * it received (in the same order) and every source sums, in float32 and rank order, the rows of each of its tokens.
 * The routing of a dispatch lives in a handle, which combine and later *cached* dispatches (same routing, new
 * data) reuse.
 *
 * Flows (all collective: every rank of the communicator makes the same calls in the same order):
 *  - exact size: deepepDispatchNotify (exchanges counts, blocks until the receive counts are known; read them with
 *    deepepHandleGetNumRecvTokens / deepepHandleGetRecvTokensPerExpert), allocate outputs of that many rows, then
 *    deepepDispatch with the handle;
 *  - cached: deepepDispatch with a handle a previous dispatch filled (no host synchronisation, graph-capturable);
 *  - worst case: deepepDispatch with num_worst_tokens > 0 and the routing in the arguments: outputs have
 *    num_worst_tokens rows, rows past the real count get recv_topk_idx -1 and zero weights; no host
 *    synchronisation, graph-capturable. More rows than num_worst_tokens is an error (asynchronous, with the count),
 *    never silent truncation;
 *  - deepepCombine with a filled handle: no host synchronisation, graph-capturable.
 * All ranks must use the same num_sms in calls that share a handle; all arrays are device memory of the
 * communicator's device; stream-ordered calls may finish with an asynchronous error (deepepCommGetAsyncError). */

typedef struct deepepHandle* deepepHandle_t;

/* Creates an empty handle for dispatches of up to config->max_tokens_per_rank tokens on `comm`. Local, blocking
 * (may allocate device memory; not capturable). Destroy accepts NULL and does not wait: the storage is kept with an
 * event of its last use and reused by a later handle once that work is done. A handle used inside a stream capture
 * is the exception: its destroy waits for the device (a replay may use it at any time), so keep such handles for
 * the graph's lifetime. */
DEEPEP_API deepepResult_t deepepHandleCreate(deepepComm_t comm, deepepHandle_t* handle);
DEEPEP_API deepepResult_t deepepHandleDestroy(deepepHandle_t handle);
/* Rows this rank receives under the handle's routing. Known on the host after deepepDispatchNotify; after a
 * worst-case dispatch it is only on the device, and this returns deepepInvalidUsage. */
DEEPEP_API deepepResult_t deepepHandleGetNumRecvTokens(deepepHandle_t handle, int64_t* num_recv_tokens);
/* [out] counts [num_local_experts] (host memory): rows received per local expert, each rounded up to the
 * expert_alignment of the notify call. Same availability as deepepHandleGetNumRecvTokens. */
DEEPEP_API deepepResult_t deepepHandleGetRecvTokensPerExpert(deepepHandle_t handle, int32_t* counts,
                                                             int num_local_experts);
/* Tokens of this rank the handle's routing covers (the N of its dispatch). */
DEEPEP_API deepepResult_t deepepHandleGetNumTokens(deepepHandle_t handle, int64_t* num_tokens);

/* Arguments of deepepDispatchNotify and deepepDispatch. Initialise with deepepDispatchArgsInit. Row strides are in
 * elements; 0 means "contiguous rows". */
typedef struct {
  size_t struct_size;
  /* Routing (read by deepepDispatchNotify and by worst-case dispatches; ignored by cached dispatches). */
  int64_t num_tokens;   /* N of this rank, <= config max_tokens_per_rank */
  const void* topk_idx; /* [N, num_topk] deepepInt64 or deepepInt32, entries in [-1, num_experts) */
  deepepDataType_t topk_type;
  int num_topk; /* K in [1, DEEPEP_MAX_TOPK] */
  int64_t topk_row_stride;
  int num_experts;          /* E, divisible by the number of ranks */
  int expert_alignment;     /* receive counts per local expert are rounded up to this (>= 1) */
  int64_t num_worst_tokens; /* > 0: worst-case mode with outputs of this many rows */
  int num_sms;              /* blocks (one per SM) the kernel uses; 0: default for the rank count */
  /* Payload (deepepDispatch). */
  const void* x; /* [N, hidden] deepepBFloat16 or deepepFloat8E4M3 */
  deepepDataType_t x_type;
  int hidden; /* BF16: multiple of 8; FP8: multiple of 128 */
  int64_t x_row_stride;
  const void* x_scales;         /* FP8 only: [N, num_scales] float32 (num_scales = hidden / 128) or UE8M0-packed
                                   int32 (num_scales = ceil(hidden / 512)); NULL for BF16 */
  deepepDataType_t scales_type; /* deepepFloat32 or deepepInt32 */
  int num_scales;
  int64_t scales_row_stride;
  const float* topk_weights; /* optional [N, num_topk]; travels with the token */
  int64_t weights_row_stride;
  /* Outputs of deepepDispatch, rows = num_recv_tokens (or num_worst_tokens). Optional ones may be NULL. */
  void* recv_x;                        /* [rows, hidden] of x_type, contiguous */
  void* recv_scales;                   /* [rows, num_scales] of scales_type, contiguous (FP8 only) */
  int64_t* recv_topk_idx;              /* optional [rows, num_topk]: receiver-local expert ids, -1 elsewhere */
  float* recv_topk_weights;            /* optional [rows, num_topk]: 0 where the expert is elsewhere */
  int32_t* recv_src_idx;               /* optional [rows]: source token index of each row (-1 in padding rows) */
  int32_t* num_recv_tokens_per_expert; /* optional [num_experts / nranks]: aligned receive counts */
  int64_t num_recv_rows;               /* rows the outputs hold (checked against what arrives) */
} deepepDispatchArgs;

DEEPEP_API deepepResult_t deepepDispatchArgsInit(deepepDispatchArgs* args);

/* Fills `handle` with the routing of args (topk_idx, num_tokens, num_experts, expert_alignment, num_sms) and
 * exchanges counts with every rank. Collective; blocks the host until the counts are known (bounded by the
 * timeout); not capturable. */
DEEPEP_API deepepResult_t deepepDispatchNotify(deepepComm_t comm, const deepepDispatchArgs* args, deepepHandle_t handle,
                                               struct CUstream_st* stream);

/* Moves the payload under the handle's routing (cached) or, with num_worst_tokens > 0, under the routing in args
 * (which it records in the handle). Collective, stream-ordered, no host synchronisation, capturable. */
DEEPEP_API deepepResult_t deepepDispatch(deepepComm_t comm, const deepepDispatchArgs* args, deepepHandle_t handle,
                                         struct CUstream_st* stream);

/* Arguments of deepepCombine. Initialise with deepepCombineArgsInit. */
typedef struct {
  size_t struct_size;
  const void* x; /* [rows, hidden] deepepBFloat16 in the handle's receive order */
  int hidden;
  int64_t num_rows; /* rows of x: the handle's receive count, or the worst-case row count */
  int64_t x_row_stride;
  const float* topk_weights; /* optional [rows, num_topk] in receive order */
  int num_topk;
  int64_t weights_row_stride;
  const void* bias[2]; /* optional [N, hidden] BF16 each, added after the sum in order */
  int64_t bias_row_stride[2];
  void* out;               /* [N, hidden] BF16, contiguous */
  float* out_topk_weights; /* [N, num_topk] float32, required when topk_weights is given */
} deepepCombineArgs;

DEEPEP_API deepepResult_t deepepCombineArgsInit(deepepCombineArgs* args);

/* out[t] = bf16(sum over ranks d that received t, ascending, of float(x_d[row of t]) + bias0 + bias1), all sums in
 * float32. Collective, stream-ordered, no host synchronisation, capturable. */
DEEPEP_API deepepResult_t deepepCombine(deepepComm_t comm, const deepepCombineArgs* args, deepepHandle_t handle,
                                        struct CUstream_st* stream);

/* Diagnostic: the SM-driven NVLink push bandwidth this rank reaches into the next rank's buffer (rank + 1 modulo
 * nranks; its own buffer on one rank) with `num_sms` blocks of 16-byte stores, `bytes` per pass (clamped to the
 * buffer), median of `iterations` passes. [out] gb_per_s. Blocking. Every rank calls it at the same time (it
 * overwrites peers' receive regions, so no dispatch or combine may be in flight anywhere). */
DEEPEP_API deepepResult_t deepepCommMeasurePushBandwidth(deepepComm_t comm, int num_sms, size_t bytes, int iterations,
                                                         double* gb_per_s, struct CUstream_st* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DEEPEP_DEEPEP_H_ */
