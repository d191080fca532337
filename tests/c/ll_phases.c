/* The low-latency phase rule kept by the library (deepep.h, "Phases"), from C on one rank: a Recv with no Send due,
 * a second Send on a set whose Recv is due and a Recv of the other kind return deepepInvalidUsage and launch nothing,
 * and so do refusals of such calls (deepepLowLatencyRefuseCall), while one in order is made; a call refused inside a
 * capture leaves its set checked; a Send captured in a graph is received by eager Recvs after each launch; the calls in
 * the right order succeed; a combine given a routing array of the other set's dispatch, routing arrays a later call
 * wrote over, other sizes than its dispatch's, or after its dispatch was refused here, is refused; the stream finishes
 * clean; taking this rank back does nothing, masking it is refused. Prints one line per step; exit status 0: as
 * expected, 1: not, 3: setup failed. */
#include <cuda_runtime.h>
#include <deepep/deepep.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define T 8
#define H 128
#define K 2
#define E 4

static int failures = 0;

static void expect(const char* step, deepepResult_t got, deepepResult_t want) {
  const int ok = got == want;
  printf("%s: %s (%s)%s%s\n", step, deepepGetErrorString(got), ok ? "as expected" : "UNEXPECTED",
         got != deepepSuccess ? ": " : "", got != deepepSuccess ? deepepGetLastErrorMessage() : "");
  failures += !ok;
}

int main(void) {
  deepepUniqueId id;
  deepepConfig config;
  deepepComm_t comm = NULL;
  cudaStream_t stream;
  int64_t topk[T * K];
  int64_t host_waits[1] = {0};
  float weights[T * K];
  void *x, *d_topk, *d_weights, *recv_x, *recv_count, *out;
  void *src_info[2], *layout[2]; /* the routing arrays of each buffer set's dispatch */
  deepepLowLatencyDispatchArgs d;
  deepepLowLatencyCombineArgs c;
  deepepResult_t async_error = deepepSuccess;
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  int i, set;
  for (i = 0; i < T * K; ++i) {
    topk[i] = (i * 3 + i / K) % E;
    weights[i] = 0.25f;
  }
  if (cudaSetDevice(0) != cudaSuccess || deepepGetUniqueId(&id) != deepepSuccess ||
      deepepConfigInit(&config, sizeof(config)) != deepepSuccess) {
    printf("setup failed\n");
    return 3;
  }
  config.device = 0;
  config.num_topk = K;
  config.num_experts = E;
  config.hidden = H;
  config.max_tokens_per_rank = T;
  config.low_latency_max_tokens = T;
  config.timeout_seconds = 30;
  if (deepepCommInitRank(&comm, 1, &id, 0, &config) != deepepSuccess) {
    printf("deepepCommInitRank failed: %s\n", deepepGetLastErrorMessage());
    return 3;
  }
  if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess ||
      cudaMalloc(&x, (size_t)T * H * 2) != cudaSuccess || cudaMalloc(&d_topk, sizeof(topk)) != cudaSuccess ||
      cudaMalloc(&d_weights, sizeof(weights)) != cudaSuccess ||
      cudaMalloc(&recv_x, (size_t)E * T * H * 2) != cudaSuccess || cudaMalloc(&recv_count, E * 4) != cudaSuccess ||
      cudaMalloc(&src_info[0], (size_t)E * T * 4) != cudaSuccess ||
      cudaMalloc(&src_info[1], (size_t)E * T * 4) != cudaSuccess ||
      cudaMalloc(&layout[0], (size_t)E * 2 * 4) != cudaSuccess ||
      cudaMalloc(&layout[1], (size_t)E * 2 * 4) != cudaSuccess || cudaMalloc(&out, (size_t)T * H * 2) != cudaSuccess ||
      cudaMemset(x, 0, (size_t)T * H * 2) != cudaSuccess ||
      cudaMemcpy(d_topk, topk, sizeof(topk), cudaMemcpyHostToDevice) != cudaSuccess ||
      cudaMemcpy(d_weights, weights, sizeof(weights), cudaMemcpyHostToDevice) != cudaSuccess) {
    printf("CUDA setup failed\n");
    return 3;
  }
  deepepLowLatencyDispatchArgsInit(&d, sizeof(d));
  d.num_tokens = T;
  d.x = x;
  d.hidden = H;
  d.topk_idx = d_topk;
  d.topk_type = deepepInt64;
  d.num_topk = K;
  d.num_experts = E;
  d.use_fp8 = 0;
  d.recv_x = recv_x;
  d.recv_count = recv_count;
  d.recv_src_info = src_info[0];
  d.recv_layout_range = layout[0];
  deepepLowLatencyCombineArgsInit(&c, sizeof(c));
  c.x = recv_x; /* the dispatched BF16 rows, as the experts' outputs */
  c.hidden = H;
  c.num_experts = E;
  c.src_info = src_info[0];
  c.layout_range = layout[0];
  c.num_tokens = T;
  c.topk_idx = d_topk;
  c.topk_type = deepepInt64;
  c.num_topk = K;
  c.topk_weights = d_weights;
  c.out = out;

  d.phase = deepepLowLatencyRecv;
  expect("dispatch Recv on set 0 with no Send made", deepepLowLatencyDispatch(comm, &d, stream), deepepInvalidUsage);
  expect("refusal of a dispatch Recv on set 0 with no Send made",
         deepepLowLatencyRefuseCall(comm, 0, 0, deepepLowLatencyRecv, stream), deepepInvalidUsage);
  expect("refusal of a dispatch SendRecv on set 0 in order (it counts as made)",
         deepepLowLatencyRefuseCall(comm, 0, 0, deepepLowLatencySendRecv, stream), deepepSuccess);
  d.phase = deepepLowLatencySend;
  expect("dispatch Send on set 0", deepepLowLatencyDispatch(comm, &d, stream), deepepSuccess);
  expect("dispatch Send on set 0 again, its Recv due", deepepLowLatencyDispatch(comm, &d, stream), deepepInvalidUsage);
  expect("refusal of a dispatch SendRecv on set 0, its Recv due",
         deepepLowLatencyRefuseCall(comm, 0, 0, deepepLowLatencySendRecv, stream), deepepInvalidUsage);
  expect("refusal of a combine Recv on set 0, a dispatch's Recv due",
         deepepLowLatencyRefuseCall(comm, 1, 0, deepepLowLatencyRecv, stream), deepepInvalidUsage);
  d.phase = deepepLowLatencySendRecv;
  expect("dispatch SendRecv on set 0, its Recv due", deepepLowLatencyDispatch(comm, &d, stream), deepepInvalidUsage);
  c.phase = deepepLowLatencyRecv;
  expect("combine Recv on set 0, a dispatch's Recv due", deepepLowLatencyCombine(comm, &c, stream), deepepInvalidUsage);
  d.buffer_set = 1;
  d.recv_src_info = src_info[1];
  d.recv_layout_range = layout[1];
  d.phase = deepepLowLatencySendRecv;
  expect("dispatch SendRecv on set 1 meanwhile", deepepLowLatencyDispatch(comm, &d, stream), deepepSuccess);
  d.buffer_set = 0;
  d.recv_src_info = src_info[0];
  d.recv_layout_range = layout[0];
  d.phase = deepepLowLatencyRecv;
  expect("dispatch Recv on set 0", deepepLowLatencyDispatch(comm, &d, stream), deepepSuccess);
  expect("dispatch Recv on set 0 again", deepepLowLatencyDispatch(comm, &d, stream), deepepInvalidUsage);
  /* A combine goes with its set's dispatch: set 0's last one wrote src_info[0] / layout[0], set 1's src_info[1] /
   * layout[1]. Each refusal still runs this rank's side of the call. */
  c.phase = deepepLowLatencySendRecv;
  c.src_info = src_info[1];
  expect("combine on set 0 given set 1's src_info", deepepLowLatencyCombine(comm, &c, stream), deepepInvalidUsage);
  c.buffer_set = 1;
  c.layout_range = layout[1];
  c.num_tokens = T - 1;
  expect("combine on set 1 with fewer tokens than its dispatch", deepepLowLatencyCombine(comm, &c, stream),
         deepepInvalidArgument);
  c.num_tokens = T;
  expect("combine on set 1", deepepLowLatencyCombine(comm, &c, stream), deepepSuccess);
  c.buffer_set = 0;
  c.src_info = src_info[0];
  c.layout_range = layout[0];
  expect("combine on set 0", deepepLowLatencyCombine(comm, &c, stream), deepepSuccess);
  d.phase = deepepLowLatencySendRecv;
  d.recv_layout_range = layout[1];
  expect("dispatch SendRecv on set 0 writing over set 1's recv_layout_range",
         deepepLowLatencyDispatch(comm, &d, stream), deepepSuccess);
  c.buffer_set = 1;
  c.src_info = src_info[1];
  c.layout_range = layout[1];
  expect("combine on set 1, its routing written over", deepepLowLatencyCombine(comm, &c, stream), deepepInvalidUsage);
  c.buffer_set = 0;
  c.src_info = src_info[0];
  expect("combine on set 0 given the arrays its dispatch wrote", deepepLowLatencyCombine(comm, &c, stream),
         deepepSuccess);
  /* A program built against a 0.2.0 or 0.2.1 header passes the struct without stats_wait_ns: nothing past its size is
   * read (a pointer there would fault on the device). A statistics array in host memory is refused. */
  c.struct_size = offsetof(deepepLowLatencyCombineArgs, stats_wait_ns);
  c.stats_wait_ns = (int64_t*)(uintptr_t)8;
  expect("combine on set 0 through a 0.2.1 header's struct", deepepLowLatencyCombine(comm, &c, stream), deepepSuccess);
  c.struct_size = sizeof(c);
  c.stats_wait_ns = host_waits;
  expect("combine on set 0 with stats_wait_ns in host memory", deepepLowLatencyCombine(comm, &c, stream),
         deepepInvalidArgument);
  c.stats_wait_ns = NULL;
  expect("refusal of a dispatch SendRecv on set 1",
         deepepLowLatencyRefuseCall(comm, 0, 1, deepepLowLatencySendRecv, stream), deepepSuccess);
  c.buffer_set = 1;
  c.src_info = src_info[1];
  expect("combine on set 1, its dispatch refused here", deepepLowLatencyCombine(comm, &c, stream), deepepInvalidUsage);
  d.recv_layout_range = layout[0];
  expect("dispatch SendRecv on set 0 with routing arrays of its own", deepepLowLatencyDispatch(comm, &d, stream),
         deepepSuccess);
  /* A dispatch refused inside a capture (hidden not a multiple of 8) records nothing: set 0 stays checked. */
  d.phase = deepepLowLatencySend;
  d.hidden = H - 4;
  if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed) != cudaSuccess) {
    printf("capture failed to start\n");
    return 3;
  }
  expect("dispatch Send on set 0 with a bad hidden, captured", deepepLowLatencyDispatch(comm, &d, stream),
         deepepInvalidArgument);
  graph = NULL;
  if (cudaStreamEndCapture(stream, &graph) == cudaSuccess && graph != NULL) cudaGraphDestroy(graph);
  cudaGetLastError();
  d.hidden = H;
  d.phase = deepepLowLatencyRecv;
  expect("dispatch Recv on set 0 after a refused capture, no Send made", deepepLowLatencyDispatch(comm, &d, stream),
         deepepInvalidUsage);
  /* A Send captured in a graph on set 1, the graph launched twice, each time received by an eager Recv: a set that a
   * capture used is not checked any more (the graph, not the call, sends). */
  d.buffer_set = 1;
  d.recv_src_info = src_info[1];
  d.recv_layout_range = layout[1];
  d.phase = deepepLowLatencySend;
  if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed) != cudaSuccess) {
    printf("capture failed to start\n");
    return 3;
  }
  expect("dispatch Send on set 1, captured", deepepLowLatencyDispatch(comm, &d, stream), deepepSuccess);
  if (cudaStreamEndCapture(stream, &graph) != cudaSuccess || cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) {
    printf("capture failed\n");
    return 3;
  }
  d.phase = deepepLowLatencyRecv;
  for (i = 0; i < 2; ++i) {
    if (cudaGraphLaunch(exec, stream) != cudaSuccess) {
      printf("graph launch failed\n");
      return 3;
    }
    expect("eager dispatch Recv on set 1 after the graph's Send", deepepLowLatencyDispatch(comm, &d, stream),
           deepepSuccess);
  }
  for (set = 0; set < 2; ++set) {
    c.buffer_set = set;
    c.src_info = src_info[set];
    c.layout_range = layout[set];
    c.phase = deepepLowLatencySend;
    expect("combine Send", deepepLowLatencyCombine(comm, &c, stream), deepepSuccess);
    c.phase = deepepLowLatencyRecv;
    expect("combine Recv", deepepLowLatencyCombine(comm, &c, stream), deepepSuccess);
  }
  expect("stream finished", cudaStreamSynchronize(stream) == cudaSuccess ? deepepSuccess : deepepCudaError,
         deepepSuccess);
  expect("no asynchronous error", deepepCommGetAsyncError(comm, &async_error), deepepSuccess);
  expect("asynchronous error state", async_error, deepepSuccess);
  expect("taking this rank back (never masked: nothing to do)", deepepCommLowLatencyMaskRank(comm, 0, 0),
         deepepSuccess);
  expect("masking this rank", deepepCommLowLatencyMaskRank(comm, 0, 1), deepepInvalidArgument);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  deepepCommDestroy(comm);
  return failures == 0 ? 0 : 1;
}
