/* A worker thread that never chose a device calls the library for a communicator on the last GPU: afterwards the
 * thread has no context current again, and none appeared on GPU 0 (before the fix, the call's device guard restored
 * "device 0", which creates GPU 0's primary context). One rank; needs two GPUs. Prints what it saw; exit status 0: as
 * expected, 1: not, 2: inconclusive (GPU 0 already had a context before the call), 3: setup failed. */
#include <cuda.h>
#include <cuda_runtime.h>
#include <deepep/deepep.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>

#define NUM_TOKENS 64
#define NUM_TOPK 2
#define NUM_EXPERTS 8

typedef CUresult (*GetCurrentFn)(CUcontext*);
typedef CUresult (*DeviceGetFn)(CUdevice*, int);
typedef CUresult (*PrimaryStateFn)(CUdevice, unsigned int*, int*);

static GetCurrentFn get_current;
static DeviceGetFn device_get;
static PrimaryStateFn primary_state;

struct Call {
  deepepComm_t comm;
  cudaStream_t stream;
  void *topk_idx, *per_rank, *per_expert, *in_rank;
  deepepResult_t result;
  CUcontext current_before, current_after;
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
  struct Call* call = arg;
  get_current(&call->current_before);
  call->result = deepepGetDispatchLayout(call->comm, call->topk_idx, deepepInt64, NUM_TOKENS, NUM_TOPK, 0, NUM_EXPERTS,
                                         call->per_rank, call->per_expert, call->in_rank, call->stream);
  get_current(&call->current_after);
  return NULL;
}

int main(void) {
  int count = 0, device, before, after, i;
  int64_t topk_idx[NUM_TOKENS * NUM_TOPK];
  deepepUniqueId id;
  deepepConfig config;
  struct Call call = {0};
  pthread_t thread;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count < 2) {
    printf("needs 2 GPUs, found %d\n", count);
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
  if (deepepCommInitRank(&call.comm, 1, &id, 0, &config) != deepepSuccess) {
    printf("deepepCommInitRank failed: %s\n", deepepGetLastErrorMessage());
    return 3;
  }
  if (cudaStreamCreateWithFlags(&call.stream, cudaStreamNonBlocking) != cudaSuccess ||
      cudaMalloc(&call.topk_idx, sizeof(topk_idx)) != cudaSuccess ||
      cudaMalloc(&call.per_rank, sizeof(int32_t)) != cudaSuccess ||
      cudaMalloc(&call.per_expert, sizeof(int32_t) * NUM_EXPERTS) != cudaSuccess ||
      cudaMalloc(&call.in_rank, NUM_TOKENS) != cudaSuccess ||
      cudaMemcpy(call.topk_idx, topk_idx, sizeof(topk_idx), cudaMemcpyHostToDevice) != cudaSuccess) {
    printf("CUDA setup failed\n");
    return 3;
  }
  before = gpu0_has_context();
  if (pthread_create(&thread, NULL, worker, &call) != 0 || pthread_join(thread, NULL) != 0) {
    printf("the worker thread failed to run\n");
    return 3;
  }
  after = gpu0_has_context();
  if (cudaStreamSynchronize(call.stream) != cudaSuccess) printf("the layout's stream failed\n");
  printf("layout call: %s; worker's context before: %s, after: %s; GPU 0 context before: %d, after: %d\n",
         deepepGetErrorString(call.result), call.current_before ? "some" : "none", call.current_after ? "some" : "none",
         before, after);
  deepepCommDestroy(call.comm);
  if (before != 0) return 2;
  return call.result == deepepSuccess && call.current_before == NULL && call.current_after == NULL && after == 0 ? 0
                                                                                                                 : 1;
}
