/* A worker thread that never chose a device calls the library (the layout, twice on a stream of its own and once on
 * the legacy default stream) for a communicator on the last GPU: after every call the thread has no context current
 * again, and with two GPUs or more, GPU 0 got none (a device guard that restored "device 0" created GPU 0's primary
 * context). One rank. Prints what it saw; exit status 0: as expected, 1: not, 2: inconclusive (GPU 0 had a context
 * before the calls), 3: setup failed. */
#include <cuda.h>
#include <cuda_runtime.h>
#include <deepep/deepep.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>

#define NUM_TOKENS 64
#define NUM_TOPK 2
#define NUM_EXPERTS 8
#define NUM_CALLS 3

typedef CUresult (*GetCurrentFn)(CUcontext*);
typedef CUresult (*DeviceGetFn)(CUdevice*, int);
typedef CUresult (*PrimaryStateFn)(CUdevice, unsigned int*, int*);

static GetCurrentFn get_current;
static DeviceGetFn device_get;
static PrimaryStateFn primary_state;

struct Calls {
  deepepComm_t comm;
  cudaStream_t stream;
  void *topk_idx, *per_rank, *per_expert, *in_rank;
  deepepResult_t result[NUM_CALLS];
  CUcontext current_before, current_after[NUM_CALLS];
};

static void* entry_point(const char* name) {
  void* function = NULL;
  enum cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  if (cudaGetDriverEntryPointByVersion(name, &function, 7000, cudaEnableDefault, &found) != cudaSuccess ||
      found != cudaDriverEntryPointSuccess)
    return NULL;
  return function;
}

/* 1 when device 0's primary context exists, 0 when not, -1 when the driver cannot say. */
static int gpu0_has_context(void) {
  CUdevice device;
  unsigned int flags = 0;
  int active = 0;
  if (device_get(&device, 0) != CUDA_SUCCESS || primary_state(device, &flags, &active) != CUDA_SUCCESS) return -1;
  return active != 0;
}

static void* worker(void* arg) {
  struct Calls* calls = arg;
  int i;
  get_current(&calls->current_before);
  for (i = 0; i < NUM_CALLS; ++i) {
    cudaStream_t stream = i < NUM_CALLS - 1 ? calls->stream : NULL; /* the last on the legacy default stream */
    calls->result[i] = deepepGetDispatchLayout(calls->comm, calls->topk_idx, deepepInt64, NUM_TOKENS, NUM_TOPK, 0,
                                               NUM_EXPERTS, calls->per_rank, calls->per_expert, calls->in_rank, stream);
    get_current(&calls->current_after[i]);
  }
  return NULL;
}

int main(void) {
  int count = 0, device, before, after, i, worker_ok;
  int64_t topk_idx[NUM_TOKENS * NUM_TOPK];
  deepepUniqueId id;
  deepepConfig config;
  struct Calls calls = {0};
  pthread_t thread;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count < 1) {
    printf("no GPU\n");
    return 3;
  }
  get_current = (GetCurrentFn)entry_point("cuCtxGetCurrent");
  device_get = (DeviceGetFn)entry_point("cuDeviceGet");
  primary_state = (PrimaryStateFn)entry_point("cuDevicePrimaryCtxGetState");
  if (get_current == NULL || device_get == NULL || primary_state == NULL) {
    printf("the driver gave no entry points\n");
    return 3;
  }
  device = count - 1;
  for (i = 0; i < NUM_TOKENS * NUM_TOPK; ++i) topk_idx[i] = (i * 7 + i / NUM_TOPK) % NUM_EXPERTS;
  if (cudaSetDevice(device) != cudaSuccess || deepepGetUniqueId(&id) != deepepSuccess ||
      deepepConfigInit(&config, sizeof(config)) != deepepSuccess) {
    printf("setup failed: %s\n", deepepGetLastErrorMessage());
    return 3;
  }
  config.device = device;
  config.num_topk = NUM_TOPK;
  config.num_experts = NUM_EXPERTS;
  config.max_tokens_per_rank = NUM_TOKENS;
  config.timeout_seconds = 30;
  if (deepepCommInitRank(&calls.comm, 1, &id, 0, &config) != deepepSuccess) {
    printf("deepepCommInitRank failed: %s\n", deepepGetLastErrorMessage());
    return 3;
  }
  if (cudaStreamCreateWithFlags(&calls.stream, cudaStreamNonBlocking) != cudaSuccess ||
      cudaMalloc(&calls.topk_idx, sizeof(topk_idx)) != cudaSuccess ||
      cudaMalloc(&calls.per_rank, sizeof(int32_t)) != cudaSuccess ||
      cudaMalloc(&calls.per_expert, sizeof(int32_t) * NUM_EXPERTS) != cudaSuccess ||
      cudaMalloc(&calls.in_rank, NUM_TOKENS) != cudaSuccess ||
      cudaMemcpy(calls.topk_idx, topk_idx, sizeof(topk_idx), cudaMemcpyHostToDevice) != cudaSuccess) {
    printf("CUDA setup failed\n");
    return 3;
  }
  before = count > 1 ? gpu0_has_context() : 0;
  if (before < 0) {
    printf("the driver cannot say whether GPU 0 has a context\n");
    return 3;
  }
  if (pthread_create(&thread, NULL, worker, &calls) != 0 || pthread_join(thread, NULL) != 0) {
    printf("the worker thread failed to run\n");
    return 3;
  }
  after = count > 1 ? gpu0_has_context() : 0;
  if (cudaDeviceSynchronize() != cudaSuccess) printf("the layouts failed on the device\n");
  worker_ok = calls.current_before == NULL;
  printf("%d GPU(s), communicator on GPU %d; worker's context before the calls: %s\n", count, device,
         calls.current_before ? "some" : "none");
  for (i = 0; i < NUM_CALLS; ++i) {
    printf("call %d: %s; worker's context after it: %s\n", i, deepepGetErrorString(calls.result[i]),
           calls.current_after[i] ? "some" : "none");
    worker_ok = worker_ok && calls.result[i] == deepepSuccess && calls.current_after[i] == NULL;
  }
  if (count > 1) printf("GPU 0 context before: %d, after: %d\n", before, after);
  deepepCommDestroy(calls.comm);
  if (!worker_ok) return 1;
  /* The worker's side held; whether GPU 0 got a context can only be told where it had none before. */
  if (before != 0) return 2;
  return after == 0 ? 0 : 1;
}
