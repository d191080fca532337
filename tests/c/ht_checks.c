/* High-throughput argument rules from C on one rank:
 * - an error the application left on the thread (a failed cudaMalloc) does not fail the library's next call, which
 *   reports its own launches' status only;
 * - a dispatch with num_topk > 0 and no topk_idx (some tokens) is refused with a message naming topk_idx: the row
 *   layout follows num_topk, which every rank must give alike;
 * - the same dispatch with num_topk = 0 moves the rows unchanged.
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
  void *d_x, *d_topk, *per_rank, *per_expert, *in_rank, *recv_x, *too_large = NULL;
  deepepUniqueId id;
  deepepConfig config;
  deepepComm_t comm;
  deepepHandle_t handle;
  deepepDispatchArgs args;
  deepepResult_t result;
  cudaStream_t stream;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count < 1) {
    printf("no GPU\n");
    return 3;
  }
  for (i = 0; i < N * K; ++i) topk[i] = (i * 3 + i / K) % E; /* every token names an expert: all rows arrive */
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
  args.num_topk = 0;
  result = deepepDispatch(comm, &args, handle, stream);
  expect("dispatch with num_topk 0 and no topk_idx", result == deepepSuccess, deepepGetErrorString(result));
  expect("stream finished", cudaStreamSynchronize(stream) == cudaSuccess, "");
  same = cudaMemcpy(got, recv_x, sizeof(got), cudaMemcpyDeviceToHost) == cudaSuccess && memcmp(got, x, sizeof(x)) == 0;
  expect("rows received unchanged", same, "");

  deepepHandleDestroy(handle);
  deepepCommDestroy(comm);
  return failures == 0 ? 0 : 1;
}
