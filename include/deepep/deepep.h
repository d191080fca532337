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
 *  - Structs that cross the ABI start with `size_t struct_size`; fill them with their *Init function, passing
 *    sizeof the struct (`deepepDispatchArgsInit(&args, sizeof(args))`), or with DEEPEP_CONFIG_INIT, then set fields.
 *    The size is that of the caller's header, so that a program built against an older header runs with a newer
 *    library: the *Init functions write only that many bytes, and the library reads a caller's struct only up to its
 *    struct_size, fields past it taking their defaults. A library older than the header zeroes the fields it does not
 *    know, and refuses a struct that sets any of them (deepepNotSupported) rather than ignore the setting. Later
 *    fields are only ever appended (or take the place of a `reserved` field, which must stay 0), with 0 as their
 *    default (a struct from DEEPEP_CONFIG_INIT or an *Init function of a newer header then runs with an older library
 *    unless the caller sets the new field), and only within one soname: libdeepep.so.0.2 for every 0.2.x, then one
 *    per major version from 1.0 on.
 *  - The stream is the last parameter of every stream-ordered call.
 *  - Array pointers are checked before anything is launched: host memory and memory of another device are
 *    refused with deepepInvalidArgument. Inside a stream capture, memory CUDA does not know is accepted unchecked:
 *    the capture's own allocations (cudaMallocAsync in it) are not mapped until the graph is instantiated, and no
 *    CUDA query tells them from host memory then (CUDA 13 on an H200, 2026-12-01).
 *  - Calls may come from any host thread, with any context current or none: each makes its communicator's device
 *    (its primary context, the CUDA runtime's, to which streams and memory passed must belong) current for the call
 *    and leaves the calling thread's context as it found it.
 *  - Calls on one communicator (and its handles) must not run concurrently from several host threads.
 *  - deepepGetUniqueId and deepepCommInitRank set NVSHMEM's environment variables (setenv), which C does not make
 *    safe against other threads reading the environment at the same time: make them before starting threads that
 *    call getenv, or while none does.
 *
 * Limits of this release
 *  - One communicator per process (NVSHMEM is initialised once per process, and NVSHMEM documents initialising
 *    it again after nvshmem_finalize as undefined). A second deepepCommInitRank returns deepepInvalidUsage: while
 *    one is alive, being created or being destroyed, and after one was destroyed or a setup failed or timed out
 *    with NVSHMEM started, and while another user of NVSHMEM in the process (another library, through the same
 *    NVSHMEM library) has it initialised: that rank refuses at once, and ranks whose processes have no such user
 *    wait for it in NVSHMEM's initialisation until their timeout.
 *    A setup that fails before NVSHMEM starts (a bad argument) may be retried.
 *  - 1 <= nranks <= DEEPEP_MAX_RANKS; 1 <= num_topk <= DEEPEP_MAX_TOPK; num_experts divisible by nranks with at
 *    most DEEPEP_MAX_LOCAL_EXPERTS per rank; hidden at most DEEPEP_MAX_HIDDEN, and at most DEEPEP_LL_MAX_HIDDEN in a
 *    config with a low-latency area.
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
#define DEEPEP_LL_MAX_TOKENS 1024 /* most tokens per rank of one low-latency call (config low_latency_max_tokens) */
/* Most channels per row (hidden) of any call or config: the kernels' row arithmetic stays within 32 bits. */
#define DEEPEP_MAX_HIDDEN 1048576
/* Most channels per row of a low-latency area (config hidden with low_latency_max_tokens > 0): the flag words that
 * let ranks check they agree on the row layout name hidden / 8 in 13 bits. */
#define DEEPEP_LL_MAX_HIDDEN 65528

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
 * Communicator configuration. Initialise with deepepConfigInit(&config, sizeof(config)) or DEEPEP_CONFIG_INIT, then
 * change fields. Buffers are sized from `buffer_bytes`, or, when it is 0, from the workload description that follows
 * it.
 */
typedef struct {
  size_t struct_size;         /* sizeof(deepepConfig) of the caller's header: keeps the ABI extensible */
  int device;                 /* CUDA device ordinal for this rank; -1: the calling thread's current device */
  int allow_nvlink_multicast; /* 0 (default): NVLink multicast (NVLS) stays off; 1: NVSHMEM may use it (unless the
                                 environment has NVSHMEM_DISABLE_NVLS=1, as pydeepep.spawn's workers and a process
                                 that made the id without it set do: deepepGetUniqueId) */
  double timeout_seconds;     /* bound on every host and device wait (setup included; a low-latency send completing
                                 NVSHMEM puts to a peer outside the NVLink domain waits as long as NVSHMEM's
                                 transport does); in (0, 86400]; default 100 */
  size_t buffer_bytes;        /* communication buffer per rank in bytes; 0: size it from the workload below */
  int max_tokens_per_rank;    /* workload: most tokens any rank passes to one call (default 4096) */
  int hidden;                 /* workload: hidden size H in elements (default 7168) */
  int num_topk;               /* workload: experts chosen per token K (default 8) */
  int num_experts;            /* workload: experts in total E (default 256) */
  /* Low-latency area. 0 (default): none is reserved and low-latency calls are refused. 1..DEEPEP_LL_MAX_TOKENS: T,
   * the most tokens per rank of one low-latency call; two buffer sets are reserved on top of buffer_bytes, sized
   * from T and from hidden, num_topk and num_experts above (the largest H and K the low-latency calls may use; their
   * E may be larger while the combine buffer fits, see deepepLowLatencyCombineArgs). */
  int low_latency_max_tokens;
  /* How low-latency calls reach peers: DEEPEP_LL_TRANSPORT_AUTO (default) stores through NVLink to peers in this
   * rank's NVLink domain and uses NVSHMEM puts and signals for the others; DEEPEP_LL_TRANSPORT_NVSHMEM uses NVSHMEM
   * for every peer, so that path can be run (and tested) on one machine. Every rank must pass the same value. */
  int low_latency_transport;
  /* 0 (default) or 1: zero-copy high-throughput dispatch. With 1, a dispatch area sized from the workload above
   * (nranks * max_tokens_per_rank rows of hidden BF16 elements, with room for FP8 scales and metadata) is reserved on
   * top of the rest, and every high-throughput dispatch on the communicator receives its rows there: the peers
   * write each row's payload straight into it, so nothing is copied out after the rows land. recv_x must then be
   * the area's start (deepepCommGetDispatchArea): rows in receive order, contiguous, hidden elements each. They stay
   * valid until this rank's next high-throughput dispatch starts on the device (work ordered before that dispatch
   * reads them safely) and while the communicator lives. Every rank must pass the same value. */
  int zero_copy_dispatch;
  int reserved; /* 0: room for a later field (the struct would otherwise end in padding that no initialiser sets) */
} deepepConfig;

#define DEEPEP_LL_TRANSPORT_AUTO 0
#define DEEPEP_LL_TRANSPORT_NVSHMEM 1

/* Plain-brace initialiser with the defaults, valid in C and C++. Keep in field order. */
#define DEEPEP_CONFIG_INIT \
  {sizeof(deepepConfig), -1, 0, 100.0, 0, 4096, 7168, 8, 256, 0, DEEPEP_LL_TRANSPORT_AUTO, 0, 0}

/* ---------------------------------------------------------------------------------------------------------------- */
/* Errors and version. Local, thread-safe. The first three never fail for valid pointers; deepepConfigInit          */
/* also refuses a struct_size that no deepepConfig has (deepepInvalidArgument).                                     */

/* Static text for a result code; unknown values give "unknown deepep result code". Never NULL. */
DEEPEP_API const char* deepepGetErrorString(deepepResult_t result);

/* What the last failing call on the calling thread found wrong, in words ("" if none failed). Valid until the
 * next failing call on the same thread, or the next deepepCommGetAsyncError there that finds an error (it puts the
 * error's description here). Never NULL. */
DEEPEP_API const char* deepepGetLastErrorMessage(void);

/* [out] version: DEEPEP_VERSION_MAJOR * 10000 + DEEPEP_VERSION_MINOR * 100 + DEEPEP_VERSION_PATCH of the loaded
 * library (compare with DEEPEP_VERSION of the header you compiled against). */
DEEPEP_API deepepResult_t deepepGetVersion(int* version);

/* [out] config: the defaults over struct_size bytes (pass sizeof(deepepConfig)), struct_size set to it. */
DEEPEP_API deepepResult_t deepepConfigInit(deepepConfig* config, size_t struct_size);

/* ---------------------------------------------------------------------------------------------------------------- */
/* Communicator. */

/* Makes a bootstrap id. Call on one rank and send the bytes to all others. Blocking, local; needs no GPU.
 * The id holds the address on which the job's bootstrap will listen; treat it as a secret of the job.
 * NVSHMEM reads its environment once, at the process's first NVSHMEM call, which this is in the process that makes the
 * id: it sets NVSHMEM_DISABLE_NVLS=1 and NVSHMEM_DISABLE_LOCAL_ONLY_PROXY=1 first, unless already set (see
 * deepepCommInitRank), and NVSHMEM variables set after it do not count in this process.
 * [out] id */
DEEPEP_API deepepResult_t deepepGetUniqueId(deepepUniqueId* id);

/* Creates the communicator of rank `rank` among `nranks`. Blocking and collective: every rank calls it with the
 * same id and nranks. Works on config->device and leaves the calling thread's current device as it was. Sets
 * NVSHMEM_DISABLE_NVLS=1 in the process environment unless config->allow_nvlink_multicast; unless already set,
 * NVSHMEM_DISABLE_LOCAL_ONLY_PROXY=1 (no NVSHMEM proxy thread polling a CPU core where no remote transport needs it)
 * and, when the buffer comes within 128 MiB of NVSHMEM's default 1 GiB symmetric heap, NVSHMEM_SYMMETRIC_SIZE (the
 * buffer's size plus 256 MiB). These count only in a process where NVSHMEM has not read its environment yet, not in
 * one that made the id (deepepGetUniqueId), where multicast is thus off unless NVSHMEM_DISABLE_NVLS=0 was set before
 * that call. Initialises NVSHMEM (NVLink multicast off unless asked), allocates the communication buffer on the
 * symmetric heap, maps NVLink peers. Every wait is bounded by config->timeout_seconds: if a peer never arrives,
 * deepepTimeout is returned (NVSHMEM's setup thread is then left behind, and the process should exit: a later
 * deepepCommInitRank in it returns deepepInvalidUsage, as after any setup that failed with NVSHMEM started and not
 * finalised). The ranks must pass the same buffer_bytes, workload fields, low_latency_max_tokens, low_latency_transport
 * and zero_copy_dispatch: ranks whose buffer layouts, max_tokens_per_rank or low-latency transports differ all get
 * deepepInvalidArgument, which describes both (workload fields that size nothing, with buffer_bytes given, are not
 * compared). A step that fails on some ranks only, once the buffer is allocated and mapped, fails the call on every
 * rank (the others get deepepRemoteError), so that no rank keeps a communicator missing a peer; a rank failing inside
 * NVSHMEM's own initialisation or the buffer's allocation leaves the others waiting until their timeout. Not
 * graph-capturable. [out] comm; [in] nranks, id, rank; [in] config: NULL for the defaults. */
DEEPEP_API deepepResult_t deepepCommInitRank(deepepComm_t* comm, int nranks, const deepepUniqueId* id, int rank,
                                             const deepepConfig* config);

/* Destroys a communicator; NULL is accepted and does nothing. Blocking and collective (frees the symmetric heap
 * and finalises NVSHMEM). Waits for the device (so for calls of this communicator still running on the callers'
 * streams, and for any other work queued on it: work of another library that never ends holds it), then for every rank
 * to reach this call, at most the communicator's timeout. Do not call it while a stream of the device captures a CUDA
 * graph: a device-wide wait conflicts with the capture, which CUDA may then invalidate, and the destroy then waits for
 * its own stream only. If a rank does not arrive (it may be dead), this rank's resources are freed and NVSHMEM's
 * collective teardown, which would wait for it forever, is skipped: the result is deepepTimeout, or deepepSuccess when
 * an earlier call already reported a timeout or masked a rank. A rank that stopped waiting tells the ranks that arrive
 * after it, which then skip the teardown at once too. After any destroy, NVSHMEM cannot start again in the process: a
 * later deepepCommInitRank returns deepepInvalidUsage. A CUDA error of this rank's part of the meeting is returned
 * (deepepCudaError), the teardown skipped as for a missing rank. The ranks meet through their NVLink-mapped buffers:
 * with a rank outside this rank's NVLink domain, or more than 64 ranks, they do not, and a rank that does not arrive
 * makes NVSHMEM's teardown wait instead, up to the same timeout (deepepTimeout, with NVSHMEM's thread left behind). */
DEEPEP_API deepepResult_t deepepCommDestroy(deepepComm_t comm);

/* Local queries. */
DEEPEP_API deepepResult_t deepepCommRank(deepepComm_t comm, int* rank);
DEEPEP_API deepepResult_t deepepCommSize(deepepComm_t comm, int* nranks);
/* Ranks reachable by NVLink loads and stores from this one, this rank included (ranks are grouped into NVLink
 * domains of consecutive ranks). */
DEEPEP_API deepepResult_t deepepCommRanksPerNvlDomain(deepepComm_t comm, int* ranks_per_domain);
DEEPEP_API deepepResult_t deepepCommDevice(deepepComm_t comm, int* device);
/* Bytes of the communication buffer this rank holds (high-throughput part, low-latency area, dispatch area). */
DEEPEP_API deepepResult_t deepepCommBufferBytes(deepepComm_t comm, size_t* bytes);
/* [out] area, bytes: this rank's zero-copy dispatch area (config zero_copy_dispatch), where its high-throughput
 * dispatches receive their rows (pass it as recv_x); NULL and 0 on a communicator without one. */
DEEPEP_API deepepResult_t deepepCommGetDispatchArea(deepepComm_t comm, void** area, size_t* bytes);
/* The communicator's own stream (the library's setup and teardown work runs on it; calls run on the stream they are
 * given). Do not destroy it. */
DEEPEP_API deepepResult_t deepepCommGetStream(deepepComm_t comm, struct CUstream_st** stream);

/* Asynchronous faults: a stream-ordered call that finds a problem on the device (a timeout, an out-of-range
 * expert id) records it in a host-visible flag and returns. The first fault stays until it is cleared (later ones are
 * not recorded), and while one is recorded the calls whose host waits for counts (deepepDispatchNotify, a
 * deepepDispatch with report_recv_counts) refuse with deepepInvalidUsage (the other ranks finish that call with
 * deepepRemoteError, which they record in turn): clear it first, on every rank that has one. This query reads the flag
 * without waiting: [out] async_error is deepepSuccess when nothing was recorded; otherwise the code, and
 * deepepGetLastErrorMessage() describes it (rank, phase, peer or index). Local, non-blocking. */
DEEPEP_API deepepResult_t deepepCommGetAsyncError(deepepComm_t comm, deepepResult_t* async_error);
/* Clears the flag. Local; call after the stream that raised it has finished. */
DEEPEP_API deepepResult_t deepepCommClearAsyncError(deepepComm_t comm);

/* Bytes of communication buffer per rank that `config` needs on `nranks` ranks: the high-throughput part (buffer_bytes,
 * or what the workload needs when it is 0), plus the low-latency area when low_latency_max_tokens > 0, plus the
 * zero-copy dispatch area when zero_copy_dispatch is 1 (what deepepCommBufferBytes then reports). Local, needs no
 * GPU. [in] config (NULL: defaults), nranks; [out] bytes */
DEEPEP_API deepepResult_t deepepGetBufferSizeHint(const deepepConfig* config, int nranks, size_t* bytes);

/* ---------------------------------------------------------------------------------------------------------------- */
/* Dispatch layout. */

/* From the router's choices compute, on the device:
 *   num_tokens_per_rank   [nranks] int32: tokens with at least one expert on each rank (counted once per rank);
 *   num_tokens_per_expert [num_experts] int32: tokens per expert;
 *   is_token_in_rank      [num_tokens, nranks] uint8 (0/1), rows contiguous.
 * topk_idx [num_tokens, num_topk] of type deepepInt64 or deepepInt32 with rows `topk_row_stride` elements apart
 * (>= num_topk; 0: num_topk, contiguous rows) and entries in [-1, num_experts); -1 means "no expert". An entry outside
 * that range is ignored and recorded as deepepInvalidArgument in the asynchronous-error flag (never a wild write).
 * num_experts must be divisible by nranks (expert e lives on rank e / (num_experts / nranks)).
 * All arrays are device memory of the communicator's device. num_tokens may be 0; the counts are int32, so num_tokens
 * and num_tokens * num_topk (an expert's count reaches it) must be at most 2^31 - 1 (deepepInvalidArgument).
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
 * data) reuse. Every rank passes its handle of the same dispatch: a rank that reads rows from a peer that passed one
 * of another dispatch leaves that peer's rows out and records deepepInvalidArgument ("passed the handle of another
 * dispatch", or where the handles' routings agree "sent fewer rows than this rank's handle expects").
 *
 * Flows (all collective: every rank of the communicator makes the same calls in the same order, and its calls are
 * stream-ordered: one stream, or ordered by events):
 *  - exact size: deepepDispatchNotify (exchanges counts, blocks until the receive counts are known; read them with
 *    deepepHandleGetNumRecvTokens / deepepHandleGetRecvTokensPerExpert), allocate outputs of that many rows, then
 *    deepepDispatch with the handle;
 *  - cached: deepepDispatch with a handle a previous dispatch filled (no host synchronisation, graph-capturable);
 *  - worst case: deepepDispatch with num_worst_tokens > 0 and the routing in the arguments: outputs have
 *    num_worst_tokens rows, rows past the real count get recv_topk_idx -1 and zero weights; no host
 *    synchronisation, graph-capturable. More rows than num_worst_tokens is an error (asynchronous, with the count),
 *    never silent truncation;
 *  - bounded: a worst-case dispatch with report_recv_counts set, then deepepHandleWaitRecvCounts, which returns as
 *    soon as the kernel has exchanged the counts (the rows are still moving) and makes them readable like after
 *    deepepDispatchNotify: the caller gets the exact count without a second kernel or an idle GPU, for outputs
 *    sized by a bound (num_worst_tokens) instead of the count;
 *  - deepepCombine with a filled handle: no host synchronisation, graph-capturable.
 * All ranks must use the same num_sms in calls that share a handle; all arrays are device memory of the
 * communicator's device; stream-ordered calls may finish with an asynchronous error (deepepCommGetAsyncError).
 * Arguments are checked on each rank before anything is launched. A rank that refuses a call (a bad argument
 * there, or a buffer too small for that rank's own N, which an explicit buffer_bytes below the workload's needs can
 * give) still launches its side of it (deepepRefuseCall), so that the other ranks finish the same call at once with
 * deepepRemoteError naming that rank, and all stay in step for the next calls; only a refusal inside a stream capture
 * launches nothing. A buffer sized from the workload (buffer_bytes 0) holds every call within that workload. */

typedef struct deepepHandle* deepepHandle_t;

/* Creates an empty handle for dispatches of up to config->max_tokens_per_rank tokens on `comm`. Local, blocking
 * (may allocate device memory; not capturable). A handle is an opaque value, not an address, and no later handle gets
 * the value of a destroyed one: a call given a destroyed handle (a second destroy included) is deepepInvalidUsage,
 * whatever was created since. Destroy accepts NULL and does not wait: the storage is kept with an
 * event of its last use and reused by a later handle once that work is done. The exceptions wait: a handle used
 * inside a stream capture (a replay may use it at any time: keep such handles for the graph's lifetime) or destroyed
 * after its communicator waits for the device, and a destroy that finds 8 destroyed handles' storage still parked
 * waits for the oldest one's last use. These waits have no bound of their own: work of another library queued before
 * them that never ends holds them.
 *
 * Handles and CUDA graphs: a captured call sets the handle's host view (its routing's tokens, experts, num_sms and
 * receive counts) once, when it is captured, while every replay reads the handle's routing on the device and, where
 * the capture routed the handle, writes it again. So that the two never part, these are refused with
 * deepepInvalidUsage, before anything is launched or the handle changes (a refusal like any other: outside a capture
 * the other ranks finish the call at once; inside one it launches nothing):
 *  - a call that routes the handle (deepepDispatchNotify, a worst-case or bounded deepepDispatch) once a capture other
 *    than the current one used it (outside a capture: once any capture used it), since that graph's replays read the
 *    routing: route another handle for the new routing;
 *  - any deepepDispatch or deepepCombine with the handle outside the capture whose worst-case dispatch routed it,
 *    since each replay of that graph routes it again under the caller's view: use another handle outside that graph
 *    (or in another one).
 * Calls within one capture stay allowed (a graph of several layers may route one handle several times), and a handle
 * routed outside every capture serves cached dispatches and combines inside any number of captures and outside them
 * alike, as long as nothing routes it again. */
DEEPEP_API deepepResult_t deepepHandleCreate(deepepComm_t comm, deepepHandle_t* handle);
DEEPEP_API deepepResult_t deepepHandleDestroy(deepepHandle_t handle);
/* Rows this rank receives under the handle's routing. Known on the host after deepepDispatchNotify or
 * deepepHandleWaitRecvCounts; after any other worst-case dispatch it is only on the device, and this returns
 * deepepInvalidUsage. */
DEEPEP_API deepepResult_t deepepHandleGetNumRecvTokens(deepepHandle_t handle, int64_t* num_recv_tokens);
/* [out] counts [num_local_experts] (host memory; num_local_experts must be the routing's num_experts / nranks):
 * rows received per local expert, each rounded up to the expert_alignment of the call that routed the handle
 * (deepepDispatchNotify, or the bounded dispatch). Same availability as deepepHandleGetNumRecvTokens. */
DEEPEP_API deepepResult_t deepepHandleGetRecvTokensPerExpert(deepepHandle_t handle, int32_t* counts,
                                                             int num_local_experts);
/* Tokens of this rank the handle's routing covers (the N of its dispatch). */
DEEPEP_API deepepResult_t deepepHandleGetNumTokens(deepepHandle_t handle, int64_t* num_tokens);

/* Arguments of deepepDispatchNotify and deepepDispatch. Initialise with deepepDispatchArgsInit. Row strides are in
 * elements; 0 means "contiguous rows". */
typedef struct {
  size_t struct_size;
  /* Routing, read by deepepDispatchNotify and by worst-case dispatches. A cached dispatch takes num_experts,
   * expert_alignment and num_sms from its handle and ignores them here; num_tokens must be the handle's, and topk_idx
   * (with its type and stride) travels with the tokens when num_topk > 0, as recv_topk_idx needs (every rank with the
   * same num_topk, 0 to send none; a rank with no tokens may pass NULL ids). */
  int64_t num_tokens;   /* N of this rank, <= config max_tokens_per_rank */
  const void* topk_idx; /* [N, num_topk] deepepInt64 or deepepInt32, entries in [-1, num_experts) */
  deepepDataType_t topk_type;
  int num_topk; /* K in [1, DEEPEP_MAX_TOPK] */
  int64_t topk_row_stride;
  int num_experts;          /* E, divisible by the number of ranks */
  int expert_alignment;     /* receive counts per local expert are rounded up to this: >= 1, and the most an expert can
                             * receive (nranks * max_tokens_per_rank * num_topk) rounded up to it must fit int32 */
  int64_t num_worst_tokens; /* > 0: worst-case mode with outputs of this many rows */
  int num_sms; /* blocks (one per SM), 1..min(160, the device's SMs); 0: 24 up to 2 ranks, else 32, at most the SMs
                * (ranks on devices of different SM counts pass the same num_sms: see above) */
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
  void* recv_x;                        /* [rows, hidden] of x_type, contiguous; the dispatch area's start on a
                                          communicator with zero_copy_dispatch (deepepCommGetDispatchArea) */
  void* recv_scales;                   /* [rows, num_scales] of scales_type, contiguous (FP8 only) */
  int64_t* recv_topk_idx;              /* optional [rows, num_topk]: receiver-local expert ids, -1 elsewhere */
  float* recv_topk_weights;            /* optional [rows, num_topk]: 0 where the expert is elsewhere */
  int32_t* recv_src_idx;               /* optional [rows]: source token index of each row (-1 in padding rows) */
  int32_t* num_recv_tokens_per_expert; /* optional [num_experts / nranks]: aligned receive counts */
  int64_t num_recv_rows;               /* rows the outputs hold (checked against what arrives) */
  /* Worst-case mode only, not capturable: the kernel also leaves the receive counts for the host as soon as it
   * has them; collect them with deepepHandleWaitRecvCounts before the next dispatch that reports counts on the
   * communicator. A bound that always holds: nranks * max_tokens_per_rank (a source sends a token to a rank at
   * most once). */
  int report_recv_counts;
  int reserved; /* 0: room for a later field (the struct would otherwise end in padding that no initialiser sets) */
} deepepDispatchArgs;

/* [out] args: the defaults over struct_size bytes (pass sizeof(deepepDispatchArgs)); see Conventions above. The
 * defaults: topk_type deepepInt64, x_type deepepBFloat16, scales_type deepepFloat32, expert_alignment 1, every other
 * field 0 or NULL. */
DEEPEP_API deepepResult_t deepepDispatchArgsInit(deepepDispatchArgs* args, size_t struct_size);

/* Fills `handle` with the routing of args (topk_idx, num_tokens, num_experts, expert_alignment, num_sms) and
 * exchanges counts with every rank. Collective; blocks the host until the counts are known (bounded by the
 * timeout); not capturable (refused with deepepInvalidUsage inside a stream capture, launching nothing). It returns
 * as soon as its kernel has the counts (the kernel then finishes on the stream), and reports its own outcome: an
 * expert id out of range in its routing fails it on every rank (deepepInvalidArgument here, deepepRemoteError on the
 * peers, whose count messages say so), while
 * a fault that earlier work on the stream records as it waits does not (query it with deepepCommGetAsyncError),
 * unless this call fails too or is held up past the timeout: the first recorded fault, which may be that earlier one,
 * is then the one returned. */
DEEPEP_API deepepResult_t deepepDispatchNotify(deepepComm_t comm, const deepepDispatchArgs* args, deepepHandle_t handle,
                                               struct CUstream_st* stream);

/* Moves the payload under the handle's routing (cached) or, with num_worst_tokens > 0, under the routing in args
 * (which it records in the handle). Collective, stream-ordered, no host synchronisation, capturable (a handle a
 * capture used follows "Handles and CUDA graphs" above). */
DEEPEP_API deepepResult_t deepepDispatch(deepepComm_t comm, const deepepDispatchArgs* args, deepepHandle_t handle,
                                         struct CUstream_st* stream);

/* After a worst-case deepepDispatch with report_recv_counts: blocks the host until that dispatch's kernel has the
 * receive counts (bounded by the timeout; its rows may still be moving), then makes them readable with
 * deepepHandleGetNumRecvTokens / deepepHandleGetRecvTokensPerExpert. One wait per such dispatch (a second one, one
 * after the handle got another routing, or one after its communicator was destroyed, is deepepInvalidUsage).
 * deepepBufferTooSmall when more rows arrive than the outputs hold (the counts then stay unreadable, and the message
 * alone gives the row count); deepepInvalidUsage when another dispatch reporting
 * counts on the communicator overwrote them before or while this call read them. As for deepepDispatchNotify, an id out
 * of range in that dispatch's routing fails it on every rank: this wait returns deepepInvalidArgument, the peers' waits
 * deepepRemoteError (the first recorded fault, which may be an earlier one, is the one returned); a fault that earlier
 * work or the rows record does not fail it. (A worst-case dispatch without report_recv_counts records such an id on its
 * rank and moves the other rows, so that the combine every rank makes after it completes.) */
DEEPEP_API deepepResult_t deepepHandleWaitRecvCounts(deepepHandle_t handle);

/* Arguments of deepepCombine. Initialise with deepepCombineArgsInit. x, bias[i] and out start on 16-byte boundaries,
 * and their row strides (in elements) are multiples of 8. Every rank passes the same hidden and num_topk: they lay out
 * the rows the ranks exchange, and a peer whose layout differs has its rows left out (deepepInvalidArgument recorded).
 * num_topk is 0 without weights; with them it is set on every rank, also on one without rows (num_rows 0), which may
 * pass topk_weights NULL. */
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
  float* out_topk_weights; /* [N, num_topk] float32, required when num_topk > 0 (N > 0): per slot, the sum in
                              float32 and rank order of the weights the ranks that got the token received (a slot's
                              weight, 0 on ranks that do not hold its expert) */
} deepepCombineArgs;

/* [out] args: the defaults over struct_size bytes (pass sizeof(deepepCombineArgs)): every field 0 or NULL. */
DEEPEP_API deepepResult_t deepepCombineArgsInit(deepepCombineArgs* args, size_t struct_size);

/* out[t] = bf16(sum over ranks d that received t, ascending, of float(x_d[row of t]) + bias0 + bias1), all sums in
 * float32. Collective, stream-ordered, no host synchronisation, capturable. */
DEEPEP_API deepepResult_t deepepCombine(deepepComm_t comm, const deepepCombineArgs* args, deepepHandle_t handle,
                                        struct CUstream_st* stream);

/* The collective high-throughput calls, as deepepRefuseCall names them. */
typedef enum {
  deepepCallDispatchNotify = 0,    /* deepepDispatchNotify */
  deepepCallDispatch = 1,          /* a deepepDispatch of any kind: cached, after deepepDispatchNotify, worst-case */
  deepepCallWorstCaseDispatch = 2, /* the same as deepepCallDispatch (peers finish whichever kind they made) */
  deepepCallCombine = 3,           /* deepepCombine */
} deepepCall_t;

/* Takes part in `call` without its data: for a caller that refuses its own input (a language binding checking
 * arrays, say) where the other ranks make the call. Launches on `stream` what lets every other rank finish the same
 * call at once with deepepRemoteError naming this rank (instead of waiting for it until the timeout) and keeps the
 * ranks in step for the next calls; reads no input, writes no output. `handle`: the handle the call would use, or
 * NULL; a dispatch or a combine runs on its block count where it holds a routing, else on `num_sms` (as in
 * deepepDispatchArgs; the default one where it is no valid count), which must then be the peers' block count for a
 * cached dispatch or a combine to finish at once. deepepDispatch, deepepDispatchNotify and deepepCombine do this
 * themselves when they refuse their arguments (deepepDispatch and deepepCombine also when `args` is NULL; where
 * they refuse the handle itself, a destroyed one say, on the default block count, so peers running another one wait
 * for this rank until their timeout). A refused
 * dispatch lets the peers finish a cached or a worst-case dispatch, whichever they made; a peer's handle keeps a true
 * routing for its combine only where `handle` here holds the same routing (otherwise route it again first). Where
 * the peers go on to the refused dispatch's combine, refuse it too (deepepCallCombine, with the dispatch's handle
 * where it was a cached one, else NULL and the dispatch's num_sms); after a refused worst-case dispatch their combine
 * (and a cached dispatch on its handle) moves no rows and records that the handle's dispatch failed. The refused call
 * counts as made: do not retry it. Stream-ordered; not capturable. */
DEEPEP_API deepepResult_t deepepRefuseCall(deepepComm_t comm, deepepCall_t call, deepepHandle_t handle, int num_sms,
                                           struct CUstream_st* stream);

/* Diagnostic: the SM-driven NVLink push bandwidth this rank reaches into the next rank's buffer (rank + 1 modulo
 * nranks; its own buffer on one rank) with `num_sms` blocks of 16-byte stores, `bytes` per pass (clamped to one
 * rank's receive region, about (high-throughput bytes - 1 MiB) / nranks; the figure is of the clamped size), median of
 * `iterations` passes (1 to 10000; `bytes` at least 16). [out] gb_per_s. Blocking. Every rank calls it at the same time
 * (it overwrites peers' receive regions, so no dispatch or combine may be in flight anywhere). */
DEEPEP_API deepepResult_t deepepCommMeasurePushBandwidth(deepepComm_t comm, int num_sms, size_t bytes, int iterations,
                                                         double* gb_per_s, struct CUstream_st* stream);

/* ---------------------------------------------------------------------------------------------------------------- */
/* Low-latency (LL) dispatch and combine, for decoding.
 *
 * Fixed worst-case shapes, no host synchronisation, capturable in a CUDA graph (sequence numbers live on the device,
 * so a replayed graph advances them), deterministic. T = config low_latency_max_tokens, E_loc = num_experts / R.
 *
 * Dispatch: every valid (token, expert) pair of every rank is delivered to the expert's rank (a token with two
 * experts on one rank arrives twice). Local expert e receives into recv_x[e] ([R*T, H] rows) recv_count[e] rows,
 * grouped by source rank ascending, then by source token index ascending; rows past recv_count[e] are left as they
 * were (recv_src_info holds -1 there). Payload: BF16 rows unchanged, or FP8 e4m3 cast inside the kernel per token
 * and per 128 channels (amax floored at 1e-4, scale = amax / 448, optionally rounded up to a power of two, q =
 * saturate(x / scale) with IEEE division and round-to-nearest-even), with float32 scales or UE8M0-packed scales
 * (exponent bytes, four 128-channel blocks per int32, block 4j+i in bits 8i..8i+7; needs round_scale).
 * A top-k slot naming an expert already named by an earlier slot of the same token is delivered once (combine then
 * counts that row once per slot).
 *
 * Combine: out[t] = bf16(sum over slots k ascending with topk_idx[t, k] != -1 of topk_weights[t, k] * y), where y is
 * the row of (this rank, token t) under expert topk_idx[t, k] in the x of that expert's rank, the product and the
 * sum each rounded to float32 (no fused multiply-add), and one rounding to BF16 at the end.
 *
 * Buffer sets and lifetimes. The low-latency area holds two buffer sets; each call names one (`buffer_set`, 0 or 1).
 * Use set (i % 2) for the i-th dispatch and the dispatch's set for its combine: then a dispatch's results (its
 * recv_src_info / recv_layout_range, which combine reads, and data waiting for a Recv phase) stay valid until the
 * dispatch after next starts (dispatch i + 2, which reuses the set), unless a later call writes outputs over them.
 * The library checks each combine against its set's dispatch, refusing it (its side launched without data, as for any
 * refusal, below) where no dispatch on the set wrote routing on this rank (none was made, or this rank refused it),
 * where num_tokens, num_topk or num_experts differ from the dispatch's, and, for a Send or SendRecv, where src_info or
 * layout_range is a routing array of the other set's dispatch and not of its own, or where an output of a later call
 * (a dispatch's outputs and statistics, a combine's out) covers the routing arrays given. Arrays are told by the device
 * memory they cover, in the order of the calls. As with the phases (below), only eager calls count: the writes of calls
 * a stream capture records are not seen, and a combine on a set a capture has used is not checked. The routing arrays
 * to give are the ones the dispatch wrote, not copies (a copy at an address where the other set's routing lay may be
 * taken for it). The combine buffer of
 * deepepLowLatencyGetCombineBuffer expires sooner: once this rank's combine on the set has received, the peers' next
 * dispatch on the set may write into it. The outputs written into caller arrays are the caller's and never expire.
 *
 * Phases (the receive hook). phase deepepLowLatencySendRecv does everything (one cooperative kernel: its blocks run at
 * once, on the stream). deepepLowLatencySend issues the stores to the peers, publishes them and returns: nothing stays
 * on the SMs while the data travels; a later call with the same arguments and deepepLowLatencyRecv waits for the peers'
 * data and finishes the outputs. Between the Send and the Recv of one operation, only calls on the other buffer set may
 * run, and every Send must be followed by its Recv before its set is used again. The library keeps track: a Send or
 * SendRecv on a set whose Recv is due, a Recv on a set where no Send of its kind is due, return
 * deepepInvalidUsage before anything is launched (a call this rank did not make: it is no refusal, since one would
 * take the set's place in the sequence or announce a Send that never went out). Eager calls only: once a stream
 * capture has recorded a call on a set, the set is not checked any more (its graphs send and receive there whenever
 * they are launched).
 *
 * Ordering rules. Every low-latency call is collective: all ranks make the same calls (kind, phase, buffer_set,
 * num_experts, hidden, num_topk, use_fp8) in the same order, and calls on one communicator are stream-ordered (one
 * stream, or ordered by events). High-throughput and low-latency calls use separate regions and separate sequence
 * numbers: they may be interleaved freely under the same collective-order rule, with no reset between them. A
 * low-latency call that times out masks the rank it waited for and its sequence numbers stay in step, so the
 * survivors may go on (deepepCommLowLatencyMaskRank); after a high-throughput timeout, destroy the communicator.
 *
 * Transport: peers in this rank's NVLink domain get NVLink stores, the others NVSHMEM puts and signals (every peer
 * with config low_latency_transport = DEEPEP_LL_TRANSPORT_NVSHMEM). All arrays are device memory of the
 * communicator's device.
 * Arguments are checked before anything is launched; the calls may finish with an asynchronous error
 * (deepepCommGetAsyncError): a timeout naming the rank, phase and peer, or an out-of-range expert id. A rank that
 * refuses a call (a bad argument there alone) still launches its side of it, moving no data, once args passes its
 * struct checks (not NULL, a struct_size and fields this library takes) and buffer_set, phase and the phase order
 * check out (deepepLowLatencyRefuseCall), so that the other ranks finish the same call at once, leave that rank out
 * (as a masked one) and record deepepRemoteError naming it (except in a combine of no tokens, which reads no peer's
 * flags, and so records nothing); the refused call counts as made on every rank. A call
 * refused before those checks pass launches nothing: the peers wait for it up to the timeout, and then mask this rank.
 * A refused Send completes its operation on this rank: call no Recv for it. Inside a stream capture a refusal
 * launches nothing (the capture is invalid anyway). */

typedef enum {
  deepepLowLatencySendRecv = 0, /* send, wait for the peers, finish the outputs */
  deepepLowLatencySend = 1,     /* send and return (no SM waits while the data travels) */
  deepepLowLatencyRecv = 2      /* after a Send with the same arguments: wait for the peers and finish the outputs */
} deepepLowLatencyPhase_t;

/* Arguments of deepepLowLatencyDispatch. Initialise with deepepLowLatencyDispatchArgsInit. Row strides are in
 * elements; 0 means contiguous rows. Outputs are contiguous. */
typedef struct {
  size_t struct_size;
  int buffer_set; /* 0 or 1: see "Buffer sets and lifetimes" */
  deepepLowLatencyPhase_t phase;
  /* Inputs. */
  int64_t num_tokens;   /* N of this rank, in [0, T] */
  const void* x;        /* [N, hidden] deepepBFloat16 */
  int hidden;           /* H: a multiple of 128 with use_fp8, of 8 without; at most config hidden */
  int64_t x_row_stride; /* elements; rows must start on 16-byte boundaries */
  const void* topk_idx; /* [N, num_topk] deepepInt64 or deepepInt32, entries in [-1, num_experts) */
  deepepDataType_t topk_type;
  int num_topk; /* K in [1, DEEPEP_MAX_TOPK], at most config num_topk */
  int64_t topk_row_stride;
  int num_experts; /* E: divisible by R, E / R <= DEEPEP_MAX_LOCAL_EXPERTS (the combine needs more: see there) */
  int use_fp8;     /* 1: FP8 e4m3 output with scales (default); 0: BF16 output */
  int round_scale; /* FP8: 1 rounds every scale up to a power of two */
  int use_ue8m0;   /* FP8: 1 packs the scales as UE8M0 (needs round_scale) */
  /* Outputs (rows: R*T per local expert). */
  void* recv_x;                /* [E_loc, R*T, hidden] deepepFloat8E4M3 (use_fp8) or deepepBFloat16 */
  void* recv_scales;           /* use_fp8: [E_loc, R*T, hidden / 128] float32, or with use_ue8m0 [E_loc, R*T,
                                  ceil(hidden / 512)] int32; NULL without use_fp8 */
  int32_t* recv_count;         /* [E_loc]: rows received per local expert */
  int32_t* recv_src_info;      /* [E_loc, R*T]: source token index | (source top-k slot << 16); -1 past the count */
  int32_t* recv_layout_range;  /* [E_loc, R, 2]: (first row, rows) that each source rank's tokens occupy */
  int scales_token_contiguous; /* 1: recv_scales is stored [E_loc, columns, R*T] instead (the row index varies
                                  fastest, the layout DeepEP returns); 0 (default): [E_loc, R*T, columns] */
  /* Optional load statistics, cumulative over calls (the caller zeroes them when it wants; NULL: not kept). Recv
   * and SendRecv add to them, atomically: calls on both buffer sets may share them, also on two streams (read them
   * after the receives of both). */
  void* stats_recv_count;                 /* [E_loc]: rows received per local expert */
  deepepDataType_t stats_recv_count_type; /* deepepInt64 (default) or deepepInt32 */
  int64_t* stats_wait_ns; /* [R]: nanoseconds this rank's receive spent waiting for each source rank's tokens (a
                             late or overloaded source stands out) */
} deepepLowLatencyDispatchArgs;

/* [out] args: the defaults over struct_size bytes (pass sizeof(deepepLowLatencyDispatchArgs)): phase
 * deepepLowLatencySendRecv, topk_type and stats_recv_count_type deepepInt64, use_fp8 1, every other field 0 or
 * NULL. */
DEEPEP_API deepepResult_t deepepLowLatencyDispatchArgsInit(deepepLowLatencyDispatchArgs* args, size_t struct_size);

/* Low-latency dispatch (see above). Collective, stream-ordered, no host synchronisation, capturable in a CUDA graph
 * (every phase). Send writes none of the outputs; Recv and SendRecv write all of them. */
DEEPEP_API deepepResult_t deepepLowLatencyDispatch(deepepComm_t comm, const deepepLowLatencyDispatchArgs* args,
                                                   struct CUstream_st* stream);

/* Arguments of deepepLowLatencyCombine. Initialise with deepepLowLatencyCombineArgsInit. */
typedef struct {
  size_t struct_size;
  int buffer_set; /* the buffer_set of the dispatch whose layout x follows */
  deepepLowLatencyPhase_t phase;
  const void* x; /* [E_loc, R*T, hidden] deepepBFloat16 expert outputs in the dispatch's layout; NULL with zero_copy */
  int zero_copy; /* 1: the expert outputs are already in the set's combine buffer (deepepLowLatencyGetCombineBuffer) */
  int hidden;    /* multiple of 8, at most config hidden */
  /* E, as for the dispatch. The combine buffer [E / R, R*T, hidden] deepepBFloat16, which every combine uses (zero-copy
   * rows, and the rows put through NVSHMEM), must fit in what the config sized (config num_experts / R experts of R*T
   * rows of config hidden); otherwise deepepBufferTooSmall. */
  int num_experts;
  /* From the dispatch: */
  const int32_t* src_info;     /* its recv_src_info */
  const int32_t* layout_range; /* its recv_layout_range */
  /* The routing of this rank's tokens (as given to the dispatch): */
  int64_t num_tokens;
  const void* topk_idx;
  deepepDataType_t topk_type;
  int num_topk; /* the dispatch's num_topk */
  int64_t topk_row_stride;
  const float* topk_weights; /* [N, num_topk] float32 */
  int64_t weights_row_stride;
  void* out; /* [N, hidden] deepepBFloat16, contiguous; written by Recv and SendRecv */
  /* Optional wait statistics, cumulative over calls as the dispatch's (NULL: not kept; since 0.2.2). Recv and SendRecv
   * add to it, atomically, when this rank has tokens (with none it waits for no rows). */
  int64_t* stats_wait_ns; /* [R]: nanoseconds this rank's receive spent waiting for each source rank's rows */
} deepepLowLatencyCombineArgs;

/* [out] args: the defaults over struct_size bytes (pass sizeof(deepepLowLatencyCombineArgs)): phase
 * deepepLowLatencySendRecv, topk_type deepepInt64, every other field 0 or NULL. */
DEEPEP_API deepepResult_t deepepLowLatencyCombineArgsInit(deepepLowLatencyCombineArgs* args, size_t struct_size);

/* Low-latency combine (see above). Collective, stream-ordered, no host synchronisation, capturable in a CUDA graph
 * (every phase). Send reads x (or the combine buffer) and the dispatch's recv_src_info / recv_layout_range; Recv reads
 * topk_idx and topk_weights and writes out. */
DEEPEP_API deepepResult_t deepepLowLatencyCombine(deepepComm_t comm, const deepepLowLatencyCombineArgs* args,
                                                  struct CUstream_st* stream);

/* This rank's side of a low-latency call that it refuses on its own (a check of its own, outside this library, failed):
 * launches on `stream`, for the dispatch (combine = 0) or combine (combine = 1) on `buffer_set` in `phase` that the
 * other ranks make, a kernel that moves no data but goes through the call's protocol, so that they finish it at once
 * (asynchronous deepepRemoteError naming this rank; its tokens, or its experts' rows, left out; a refused Recv only
 * completes the operation here, the peers having this rank's data from its Send) and the ranks' sequence numbers stay
 * in step. A refused Send completes the whole operation here: call no Recv for it. After a refused dispatch the other
 * ranks make its combine: refuse that too (combine = 1, same buffer_set).
 * deepepLowLatencyDispatch and deepepLowLatencyCombine do this themselves for arguments they refuse. Collective in
 * the sense above (in place of the refused call); not capturable (a capture would record it, not run it). The phase
 * order is checked as for the calls: a refusal of a Send or SendRecv on a set whose Recv is due, or of a Recv where no
 * Send of its kind is due, returns deepepInvalidUsage and launches nothing. */
DEEPEP_API deepepResult_t deepepLowLatencyRefuseCall(deepepComm_t comm, int combine, int buffer_set,
                                                     deepepLowLatencyPhase_t phase, struct CUstream_st* stream);

/* The combine buffer of `buffer_set`: [num_experts / R, R*T, hidden] deepepBFloat16 in device memory of this rank,
 * contiguous. Write expert outputs there (after the set's dispatch finished its Recv) and combine with zero_copy = 1.
 * It shares memory with the set's receive area: it is valid from the end of the set's dispatch until this rank's
 * combine on the set has received (the peers' next dispatch on the set may then write into it, before this rank's
 * own). Local, non-blocking. [out] buffer */
DEEPEP_API deepepResult_t deepepLowLatencyGetCombineBuffer(deepepComm_t comm, int buffer_set, int hidden,
                                                           int num_experts, void** buffer);

/* Masking a rank out of low-latency calls (for serving that goes on when a rank dies). A masked rank is never waited
 * for and never written to: this rank's tokens routed to its experts are not delivered (as if their top-k slots were
 * -1, in dispatch and combine alike), and nothing is received from it. A low-latency call that times out waiting for a
 * rank masks it on its own (the call still reports the timeout; each phase of a call waits at most the timeout). Every
 * surviving rank must mask the same ranks: with more than two ranks, gather deepepCommLowLatencyMaskedRanks from the
 * survivors (outside this library) and mask the union everywhere before the next call, then clear the asynchronous
 * error. Taking a rank back (masked = 0) takes its acknowledgements as current: do it only while no rank has a
 * low-latency call in flight, on every rank, followed by a host barrier before the next call (while an eager Send's
 * receive is due on this rank it is refused with deepepInvalidUsage). The combine of a dispatch sent while a rank was
 * masked (which sent it nothing and laid out none of its tokens) leaves it out, on both sides, also when it was taken
 * back in between. Masking assumes the masked rank has stopped: one that was only late, by more than the timeout, and
 * then resumes, may still store the rows of its late call into the survivors' current buffer set (it saw their
 * acknowledgements before they masked it) and corrupt one of their later results unreported, so stop a timed-out rank's
 * process rather than let it go on. Masking does not apply to high-throughput calls. Blocking (synchronises the device
 * first, without a bound of its own: work of another library on the device that never ends, such as a collective
 * waiting for the dead rank, holds it, so stop such work first); not capturable.
 * [in] rank: any rank but this one to mask (taking this rank back does nothing); masked: 1 to mask, 0 to take back. */
DEEPEP_API deepepResult_t deepepCommLowLatencyMaskRank(deepepComm_t comm, int rank, int masked);

/* The low-latency mask of this rank: masked[r] is 1 for a masked rank, else 0. Blocking (synchronises the device
 * first, as deepepCommLowLatencyMaskRank does). [out] masked [nranks] */
DEEPEP_API deepepResult_t deepepCommLowLatencyMaskedRanks(deepepComm_t comm, int* masked);

/* Diagnostic: when the environment variable DEEPEP_LL_TIMELINE=1 is set at communicator creation, every low-latency
 * kernel records per block the %globaltimer nanoseconds at DEEPEP_LL_TIMELINE_MARKS points of its work: 0 start,
 * 1 peers' acknowledgements seen, 2 dispatch: the tokens' expert ids sent, 3 rows stored, 4 the block's arrival flags
 * published, 5 receive: peers' flags seen, 6 receive: outputs written, 7 end; 0 where
 * a block did not pass a point. Fills `marks` [num_blocks][DEEPEP_LL_TIMELINE_MARKS] with those of the last
 * low-latency kernel launched (after the caller synchronised with it). Blocking. [in] capacity_blocks: the rows
 * `marks` holds, at least the low-latency grid's blocks (the SM count is enough; deepepInvalidArgument otherwise).
 * [out] marks, num_blocks. Returns deepepInvalidUsage when the timeline is off. */
#define DEEPEP_LL_TIMELINE_MARKS 8
DEEPEP_API deepepResult_t deepepCommLowLatencyTimeline(deepepComm_t comm, int64_t* marks, int capacity_blocks,
                                                       int* num_blocks);

/* Diagnostic: the fixed cost of a low-latency call with nothing to move. Every rank runs [in] `iterations` (1 to
 * 10000) kernels back to back, launched as the low-latency kernels are and on as many blocks, in which each block
 * releases a flag to every peer and waits for every peer block's flag: one round of the per-block flags that every
 * low-latency kernel exchanges, replayed from a CUDA graph. [out] us: microseconds per kernel, the median of 5
 * passes. Blocking: waits for `stream`, then runs on a stream of its own. Every rank calls it at the same time (each
 * call counts, a refused one too: the ranks number their measurements alike); needs a low-latency area, every rank
 * reachable over NVLink and none masked; not capturable. Refused with the communicator's asynchronous error when one
 * is recorded, before or during the measurement (a peer that did not come within the timeout records deepepTimeout;
 * deepepCommClearAsyncError clears it). */
DEEPEP_API deepepResult_t deepepCommMeasureFlagRound(deepepComm_t comm, int iterations, double* us,
                                                     struct CUstream_st* stream);

/* T of the low-latency calls (config low_latency_max_tokens; 0 when the communicator has no low-latency area).
 * Local. */
DEEPEP_API deepepResult_t deepepCommLowLatencyMaxTokens(deepepComm_t comm, int* max_tokens);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DEEPEP_DEEPEP_H_ */
