/* High-throughput argument rules from C on one rank:
 * - an error the application left on the thread (a failed cudaMalloc) does not fail the library's next call, which
 *   reports its own launches' status only;
 * - a dispatch with num_topk > 0 and no topk_idx (some tokens) is refused with a message naming topk_idx: the row
 *   layout follows num_topk, which every rank must give alike;
 * - a cached dispatch with a negative num_topk is refused, and the same dispatch with num_topk = 0 moves the rows
 *   unchanged;
 * - a cached dispatch carries a 64-bit id past int32 as -1 (not its low half, a plausible expert) and the others as
 *   they are;
 * - a rank with no tokens may pass NULL ids with num_topk > 0 (notify and dispatch);
 * - a destroyed handle stays refused once another is created (which may get its memory), and a second destroy of it
 *   leaves the new handle alone.
 * Prints one line per step; exit status 0: as expected, 1: not, 3: setup failed. */
#include <cuda_runtime.h>
#include <deepep/deepep.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define N 16
#define H 128
#define K 2
#define E 8

static int failures = 0;

static void expect(const char* step, int ok, const char* detail) {
  printf("%s: %s%s%s\n", step, ok ? "as expected" : "UNEXPECTED", detail[0] ? ": " : "", detail);
  if (!ok) ++failures;
}

int main(void) {
  int count = 0, i, same;
  int64_t topk[N * K], rows = 0;
  uint16_t x[N * H], got[N * H];
  int64_t far_topk[N * K], got_topk[N * K];
  void *d_x, *d_topk, *d_far_topk, *per_rank, *per_expert, *in_rank, *recv_x, *recv_topk, *too_large = NULL;
  deepepUniqueId id;
  deepepConfig config;
  deepepComm_t comm;
  deepepHandle_t handle, stale;
  deepepDispatchArgs args;
  deepepResult_t result, async_error = deepepSuccess;
  cudaStream_t stream;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count < 1) {
    printf("no GPU\n");
    return 3;
  }
  for (i = 0; i < N * K; ++i) topk[i] = (i * 3 + i / K) % E; /* every token names an expert: all rows arrive */
  for (i = 0; i < N * K; ++i) far_topk[i] = topk[i];
  far_topk[0] = ((int64_t)1 << 32) + 3; /* its low half names expert 3 */
  for (i = 0; i < N * H; ++i) x[i] = (uint16_t)(0x3c00 + i % 977);
  if (cudaSetDevice(0) != cudaSuccess || deepepGetUniqueId(&id) != deepepSuccess ||
      deepepConfigInit(&config, sizeof(config)) != deepepSuccess) {
    printf("setup failed: %s\n", deepepGetLastErrorMessage());
    return 3;
  }
  config.device = 0;
  config.hidden = H;
  config.num_topk = K;
  config.num_experts = E;
  config.max_tokens_per_rank = N;
  config.timeout_seconds = 30;
  if (deepepCommInitRank(&comm, 1, &id, 0, &config) != deepepSuccess || deepepHandleCreate(comm, &handle)) {
    printf("communicator setup failed: %s\n", deepepGetLastErrorMessage());
    return 3;
  }
  if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess ||
      cudaMalloc(&d_x, sizeof(x)) != cudaSuccess || cudaMalloc(&d_topk, sizeof(topk)) != cudaSuccess ||
      cudaMalloc(&per_rank, 4) != cudaSuccess || cudaMalloc(&per_expert, 4 * E) != cudaSuccess ||
      cudaMalloc(&in_rank, N) != cudaSuccess || cudaMalloc(&recv_x, sizeof(x)) != cudaSuccess ||
      cudaMalloc(&d_far_topk, sizeof(far_topk)) != cudaSuccess ||
      cudaMalloc(&recv_topk, sizeof(got_topk)) != cudaSuccess ||
      cudaMemcpy(d_far_topk, far_topk, sizeof(far_topk), cudaMemcpyHostToDevice) != cudaSuccess ||
      cudaMemcpy(d_x, x, sizeof(x), cudaMemcpyHostToDevice) != cudaSuccess ||
      cudaMemcpy(d_topk, topk, sizeof(topk), cudaMemcpyHostToDevice) != cudaSuccess) {
    printf("CUDA setup failed\n");
    return 3;
  }

  /* The application's failure, left on the thread. */
  expect("the application's cudaMalloc of 2^62 bytes fails",
         cudaMalloc(&too_large, (size_t)1 << 62) == cudaErrorMemoryAllocation, "");
  result = deepepGetDispatchLayout(comm, d_topk, deepepInt64, N, K, 0, E, per_rank, per_expert, in_rank, stream);
  expect("layout after it", result == deepepSuccess, deepepGetErrorString(result));
  cudaGetLastError();

  deepepDispatchArgsInit(&args, sizeof(args));
  args.num_tokens = N;
  args.topk_idx = d_topk;
  args.topk_type = deepepInt64;
  args.num_topk = K;
  args.num_experts = E;
  args.x = d_x;
  args.x_type = deepepBFloat16;
  args.hidden = H;
  result = deepepDispatchNotify(comm, &args, handle, stream);
  expect("notify", result == deepepSuccess, deepepGetErrorString(result));
  deepepHandleGetNumRecvTokens(handle, &rows);
  expect("every row arrives", rows == N, "");
  args.recv_x = recv_x;
  args.num_recv_rows = rows;
  args.topk_idx = NULL;
  result = deepepDispatch(comm, &args, handle, stream);
  expect("dispatch with num_topk 2 and no topk_idx",
         result == deepepInvalidArgument && strstr(deepepGetLastErrorMessage(), "topk_idx is NULL") != NULL,
         deepepGetLastErrorMessage());
  args.num_topk = -3;
  result = deepepDispatch(comm, &args, handle, stream);
  expect("cached dispatch with num_topk -3",
         result == deepepInvalidArgument && strstr(deepepGetLastErrorMessage(), "num_topk is -3") != NULL,
         deepepGetLastErrorMessage());
  args.num_topk = 0;
  result = deepepDispatch(comm, &args, handle, stream);
  expect("dispatch with num_topk 0 and no topk_idx", result == deepepSuccess, deepepGetErrorString(result));
  expect("stream finished", cudaStreamSynchronize(stream) == cudaSuccess, "");
  same = cudaMemcpy(got, recv_x, sizeof(got), cudaMemcpyDeviceToHost) == cudaSuccess && memcmp(got, x, sizeof(x)) == 0;
  expect("rows received unchanged", same, "");

  /* One rank holds every expert: recv_topk_idx is the ids themselves, but for the one past int32. */
  args.topk_idx = d_far_topk;
  args.num_topk = K;
  args.recv_topk_idx = recv_topk;
  result = deepepDispatch(comm, &args, handle, stream);
  expect("cached dispatch carrying an id past int32", result == deepepSuccess, deepepGetErrorString(result));
  same = cudaStreamSynchronize(stream) == cudaSuccess &&
         cudaMemcpy(got_topk, recv_topk, sizeof(got_topk), cudaMemcpyDeviceToHost) == cudaSuccess;
  for (i = 0; i < N * K && same; ++i) same = got_topk[i] == (i == 0 ? -1 : topk[i]);
  expect("recv_topk_idx: -1 for it, the others as sent", same, "");

  /* No tokens: NULL ids with num_topk > 0. */
  args.num_tokens = 0;
  args.x = NULL;
  args.topk_idx = NULL;
  args.recv_x = NULL;
  args.recv_topk_idx = NULL;
  result = deepepDispatchNotify(comm, &args, handle, stream);
  expect("notify of no tokens, NULL ids, num_topk 2", result == deepepSuccess, deepepGetErrorString(result));
  rows = -1;
  deepepHandleGetNumRecvTokens(handle, &rows);
  args.num_recv_rows = rows;
  result = deepepDispatch(comm, &args, handle, stream);
  expect("dispatch of no tokens, NULL ids, num_topk 2", result == deepepSuccess && rows == 0,
         deepepGetErrorString(result));
  expect("stream finished again", cudaStreamSynchronize(stream) == cudaSuccess, "");
  result = deepepCommGetAsyncError(comm, &async_error);
  expect("no asynchronous error", result == deepepSuccess && async_error == deepepSuccess,
         deepepGetErrorString(async_error));

  /* The value of a destroyed handle names no later one. */
  stale = handle;
  result = deepepHandleDestroy(handle);
  expect("handle destroyed", result == deepepSuccess, deepepGetErrorString(result));
  result = deepepHandleCreate(comm, &handle);
  expect("another handle created", result == deepepSuccess && handle != stale, deepepGetErrorString(result));
  result = deepepHandleGetNumTokens(stale, &rows);
  expect("the destroyed handle asked for its tokens",
         result == deepepInvalidUsage && strstr(deepepGetLastErrorMessage(), "not a live handle") != NULL,
         deepepGetLastErrorMessage());
  result = deepepHandleDestroy(stale);
  expect("the destroyed handle destroyed again", result == deepepInvalidUsage, deepepGetLastErrorMessage());
  result = deepepHandleGetNumTokens(handle, &rows);
  expect("the new handle asked for its tokens (live, no routing yet)",
         result == deepepInvalidUsage && strstr(deepepGetLastErrorMessage(), "no routing yet") != NULL,
         deepepGetLastErrorMessage());

  deepepHandleDestroy(handle);
  deepepCommDestroy(comm);
  return failures == 0 ? 0 : 1;
}
