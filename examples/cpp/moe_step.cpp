// moe_step.cpp: the communication of one Mixture-of-Experts layer from C++, in both modes, on every GPU of this
// machine. The parent makes the bootstrap id (it never starts CUDA) and forks one process per rank (rank r on
// visible GPU r % GPUs: more ranks than GPUs needs CUDA MPS). Each rank
//   - high-throughput: dispatches its tokens with an exact-size dispatch (notify, allocate, dispatch), lets its
//     "experts" hand their rows back unchanged, combines them, then dispatches new activations under the same
//     routing (a cached dispatch);
//   - low-latency: two decode steps with new routing each, on alternating buffer sets, BF16 rows;
// and checks every output on the host against the contract (receive order, float32 sums in a fixed order), from
// the inputs of every rank, which each rank regenerates from the same seeds.
//
// Build: see CMakeLists.txt in this folder. Run: ./moe_step [RANKS] (default: one rank per GPU).
// Prints "rank r/R: ... OK" lines; exit status 0 when every rank agrees with the host, 1 otherwise; with no GPU it
// says so and exits 0.
#include <cuda_runtime.h>
#include <deepep/deepep.h>
#include <dirent.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr int kTokens = 64;    // HT tokens per rank; also the LL area's T
constexpr int kLLTokens = 48;  // LL tokens per rank per step (at most T)
constexpr int kHidden = 512;   // BF16 elements per row
constexpr int kTopk = 4;       // experts chosen per token (some slots -1)
constexpr int kLocalExperts = 4;

// ---- failures: every libdeepep or CUDA call that fails throws with what went wrong ----

void check(deepepResult_t result, const char* what) {
  if (result != deepepSuccess)
    throw std::runtime_error(std::string(what) + ": " + deepepGetErrorString(result) + ": " +
                             deepepGetLastErrorMessage());
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

// A device array that frees itself, with host copies in and out ordered on the stream the work runs on (a plain
// cudaMemcpy from pageable memory may return before its data reached the device, and it is not ordered with a
// non-blocking stream).
template <class T>
class DeviceArray {
 public:
  DeviceArray(size_t count, cudaStream_t stream) : count_(count), stream_(stream) {
    check(cudaMalloc(reinterpret_cast<void**>(&data_), sizeof(T) * (count > 0 ? count : 1)), "cudaMalloc");
  }
  DeviceArray(const std::vector<T>& host, cudaStream_t stream) : DeviceArray(host.size(), stream) { upload(host); }
  ~DeviceArray() { cudaFree(data_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* get() const { return data_; }
  void upload(const std::vector<T>& host) {
    check(cudaMemcpyAsync(data_, host.data(), sizeof(T) * host.size(), cudaMemcpyHostToDevice, stream_),
          "cudaMemcpyAsync to device");
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");  // `host` may go away after this
  }
  std::vector<T> download() const {
    std::vector<T> host(count_);
    check(cudaMemcpyAsync(host.data(), data_, sizeof(T) * count_, cudaMemcpyDeviceToHost, stream_),
          "cudaMemcpyAsync to host");
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    return host;
  }

 private:
  T* data_ = nullptr;
  size_t count_;
  cudaStream_t stream_;
};

// ---- BF16 on the host (bits in uint16_t), as the device rounds: to nearest, ties to even ----

float from_bf16(uint16_t bits) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

uint16_t to_bf16(float value) {  // finite values only, as here
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  return static_cast<uint16_t>((word + 0x7fffu + ((word >> 16) & 1u)) >> 16);
}

// ---- every rank's inputs, from seeds: each rank can rebuild all of them ----

struct Inputs {
  std::vector<uint16_t> x;     // [N, H] BF16
  std::vector<int64_t> topk;   // [N, K], distinct experts or -1
  std::vector<float> weights;  // [N, K]
};

uint64_t next_random(uint64_t& state) {  // xorshift64*
  state ^= state >> 12;
  state ^= state << 25;
  state ^= state >> 27;
  return state * 0x2545F4914F6CDD1DULL;
}

Inputs make_inputs(int rank, int step, int num_tokens, int num_experts) {
  uint64_t state = 0x9E3779B97F4A7C15ULL ^ (static_cast<uint64_t>(rank + 1) << 20) ^ static_cast<uint64_t>(step + 1);
  Inputs in;
  in.x.resize(static_cast<size_t>(num_tokens) * kHidden);
  for (auto& v : in.x) v = to_bf16(static_cast<float>(next_random(state) % 4001) / 1000.0f - 2.0f);
  in.topk.assign(static_cast<size_t>(num_tokens) * kTopk, -1);
  in.weights.resize(in.topk.size());
  for (int t = 0; t < num_tokens; ++t) {
    int64_t* row = &in.topk[static_cast<size_t>(t) * kTopk];
    const int chosen = static_cast<int>(next_random(state) % (kTopk + 1));  // 0..K experts, the rest -1
    for (int k = 0; k < chosen; ++k) {
      bool fresh = false;
      while (!fresh) {
        row[k] = static_cast<int64_t>(next_random(state) % static_cast<uint64_t>(num_experts));
        fresh = true;
        for (int j = 0; j < k; ++j) fresh = fresh && row[j] != row[k];
      }
    }
    for (int k = 0; k < kTopk; ++k)
      in.weights[static_cast<size_t>(t) * kTopk + k] = static_cast<float>(next_random(state) % 1000) / 1000.0f;
  }
  return in;
}

int rank_of(int64_t expert) { return static_cast<int>(expert / kLocalExperts); }

bool reaches(const Inputs& in, int t, int rank) {
  for (int k = 0; k < kTopk; ++k) {
    const int64_t e = in.topk[static_cast<size_t>(t) * kTopk + k];
    if (e >= 0 && rank_of(e) == rank) return true;
  }
  return false;
}

bool same_row(const uint16_t* a, const uint16_t* b) { return std::memcmp(a, b, sizeof(uint16_t) * kHidden) == 0; }

// Throws with the first mismatch.
void expect(bool holds, const std::string& what) {
  if (!holds) throw std::runtime_error("MISMATCH: " + what);
}

// RAII owner of a handle (local: destroying one does not wait for its last use).
struct Handle {
  deepepHandle_t handle = nullptr;
  explicit Handle(deepepComm_t comm) { check(deepepHandleCreate(comm, &handle), "deepepHandleCreate"); }
  ~Handle() { deepepHandleDestroy(handle); }
};

void sync_and_check(deepepComm_t comm, cudaStream_t stream) {
  check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  deepepResult_t found = deepepSuccess;  // faults found on the device land here, not in the calls' results
  check(deepepCommGetAsyncError(comm, &found), "deepepCommGetAsyncError");
  check(found, "asynchronous error");
}

// ---- high-throughput: exact-size dispatch, combine, cached dispatch ----

void high_throughput(deepepComm_t comm, int rank, int nranks, cudaStream_t stream) {
  const int num_experts = kLocalExperts * nranks;
  std::vector<Inputs> all;
  for (int s = 0; s < nranks; ++s) all.push_back(make_inputs(s, 0, kTokens, num_experts));
  const Inputs& mine = all[rank];
  DeviceArray<uint16_t> x(mine.x, stream);
  DeviceArray<int64_t> topk(mine.topk, stream);
  DeviceArray<float> weights(mine.weights, stream);

  Handle handle(comm);
  deepepDispatchArgs args;
  check(deepepDispatchArgsInit(&args, sizeof(args)), "deepepDispatchArgsInit");
  args.num_tokens = kTokens;
  args.topk_idx = topk.get();
  args.topk_type = deepepInt64;
  args.num_topk = kTopk;
  args.num_experts = num_experts;
  args.x = x.get();
  args.x_type = deepepBFloat16;
  args.hidden = kHidden;
  args.topk_weights = weights.get();
  check(deepepDispatchNotify(comm, &args, handle.handle, stream), "deepepDispatchNotify");  // blocks for the counts
  int64_t rows = 0;
  check(deepepHandleGetNumRecvTokens(handle.handle, &rows), "deepepHandleGetNumRecvTokens");

  // What arrives, by the contract: every token that names an expert here, once, grouped by source rank, then by
  // source token index.
  std::vector<std::pair<int, int>> want;  // (source rank, token)
  for (int s = 0; s < nranks; ++s)
    for (int t = 0; t < kTokens; ++t)
      if (reaches(all[s], t, rank)) want.emplace_back(s, t);
  expect(rows == static_cast<int64_t>(want.size()), "receive count");

  DeviceArray<uint16_t> recv_x(static_cast<size_t>(rows) * kHidden, stream);
  DeviceArray<int64_t> recv_topk(static_cast<size_t>(rows) * kTopk, stream);
  DeviceArray<float> recv_weights(static_cast<size_t>(rows) * kTopk, stream);
  DeviceArray<int32_t> recv_src(rows, stream);
  args.recv_x = recv_x.get();
  args.recv_topk_idx = recv_topk.get();
  args.recv_topk_weights = recv_weights.get();
  args.recv_src_idx = recv_src.get();
  args.num_recv_rows = rows;
  check(deepepDispatch(comm, &args, handle.handle, stream), "deepepDispatch");

  // The "experts" return their rows unchanged: combine reads recv_x as their output, in the same order.
  DeviceArray<uint16_t> out(static_cast<size_t>(kTokens) * kHidden, stream);
  DeviceArray<float> out_weights(static_cast<size_t>(kTokens) * kTopk, stream);
  deepepCombineArgs combine;
  check(deepepCombineArgsInit(&combine, sizeof(combine)), "deepepCombineArgsInit");
  combine.x = recv_x.get();
  combine.hidden = kHidden;
  combine.num_rows = rows;
  combine.topk_weights = recv_weights.get();
  combine.num_topk = kTopk;
  combine.out = out.get();
  combine.out_topk_weights = out_weights.get();
  check(deepepCombine(comm, &combine, handle.handle, stream), "deepepCombine");
  sync_and_check(comm, stream);

  const auto got_x = recv_x.download();
  const auto got_topk = recv_topk.download();
  const auto got_weights = recv_weights.download();
  const auto got_src = recv_src.download();
  for (size_t i = 0; i < want.size(); ++i) {
    const Inputs& source = all[want[i].first];
    const int t = want[i].second;
    const std::string where = "received row " + std::to_string(i);
    expect(got_src[i] == t, where + ": source token");
    expect(same_row(&got_x[i * kHidden], &source.x[static_cast<size_t>(t) * kHidden]), where + ": payload");
    for (int k = 0; k < kTopk; ++k) {
      const int64_t e = source.topk[static_cast<size_t>(t) * kTopk + k];
      const bool here = e >= 0 && rank_of(e) == rank;  // receiver-local ids; -1 and weight 0 for experts elsewhere
      expect(got_topk[i * kTopk + k] == (here ? e % kLocalExperts : -1), where + ": top-k id");
      expect(got_weights[i * kTopk + k] == (here ? source.weights[static_cast<size_t>(t) * kTopk + k] : 0.0f),
             where + ": top-k weight");
    }
  }
  // Combine: out[t] sums, in float32 and rank order, the row of t from every rank that got it (each the same row
  // here), rounded once to BF16; the weights sum the same way (each slot nonzero on one rank at most).
  const auto got_out = out.download();
  const auto got_out_weights = out_weights.download();
  for (int t = 0; t < kTokens; ++t) {
    int copies = 0;
    for (int d = 0; d < nranks; ++d) copies += reaches(mine, t, d) ? 1 : 0;
    for (int h = 0; h < kHidden; ++h) {
      float sum = 0.0f;
      for (int c = 0; c < copies; ++c) sum += from_bf16(mine.x[static_cast<size_t>(t) * kHidden + h]);
      expect(got_out[static_cast<size_t>(t) * kHidden + h] == to_bf16(sum), "combined token " + std::to_string(t));
    }
    for (int k = 0; k < kTopk; ++k) {
      const size_t slot = static_cast<size_t>(t) * kTopk + k;
      expect(got_out_weights[slot] == (mine.topk[slot] >= 0 ? mine.weights[slot] : 0.0f), "combined weights");
    }
  }

  // Next step: new activations, the same routing: a cached dispatch (no count exchange, no host synchronisation).
  std::vector<Inputs> next;
  for (int s = 0; s < nranks; ++s) next.push_back(make_inputs(s, 1, kTokens, num_experts));
  x.upload(next[rank].x);
  check(deepepDispatch(comm, &args, handle.handle, stream), "cached deepepDispatch");
  sync_and_check(comm, stream);
  const auto again = recv_x.download();
  for (size_t i = 0; i < want.size(); ++i)
    expect(same_row(&again[i * kHidden], &next[want[i].first].x[static_cast<size_t>(want[i].second) * kHidden]),
           "cached dispatch row " + std::to_string(i));
  std::printf("rank %d/%d: high-throughput dispatch, combine and cached dispatch OK (%lld rows received)\n", rank,
              nranks, static_cast<long long>(rows));
}

// ---- low-latency: decode steps on alternating buffer sets ----

void low_latency(deepepComm_t comm, int rank, int nranks, cudaStream_t stream) {
  const int num_experts = kLocalExperts * nranks;
  const size_t slots = static_cast<size_t>(nranks) * kTokens;  // rows per local expert: R * T
  DeviceArray<uint16_t> recv_x(kLocalExperts * slots * kHidden, stream);
  DeviceArray<int32_t> recv_count(kLocalExperts, stream);
  DeviceArray<int32_t> src_info(kLocalExperts * slots, stream);
  DeviceArray<int32_t> layout_range(static_cast<size_t>(kLocalExperts) * nranks * 2, stream);
  DeviceArray<uint16_t> out(static_cast<size_t>(kLLTokens) * kHidden, stream);
  for (int step = 0; step < 2; ++step) {
    std::vector<Inputs> all;
    for (int s = 0; s < nranks; ++s) all.push_back(make_inputs(s, 10 + step, kLLTokens, num_experts));
    const Inputs& mine = all[rank];
    DeviceArray<uint16_t> x(mine.x, stream);
    DeviceArray<int64_t> topk(mine.topk, stream);
    DeviceArray<float> weights(mine.weights, stream);

    deepepLowLatencyDispatchArgs dispatch;
    check(deepepLowLatencyDispatchArgsInit(&dispatch, sizeof(dispatch)), "deepepLowLatencyDispatchArgsInit");
    dispatch.buffer_set = step % 2;  // dispatch i uses set i % 2; its combine the same set
    dispatch.num_tokens = kLLTokens;
    dispatch.x = x.get();
    dispatch.hidden = kHidden;
    dispatch.topk_idx = topk.get();
    dispatch.topk_type = deepepInt64;
    dispatch.num_topk = kTopk;
    dispatch.num_experts = num_experts;
    dispatch.use_fp8 = 0;  // BF16 rows, compared exactly below (1: e4m3 rows with scales cast in the kernel)
    dispatch.recv_x = recv_x.get();
    dispatch.recv_count = recv_count.get();
    dispatch.recv_src_info = src_info.get();
    dispatch.recv_layout_range = layout_range.get();
    check(deepepLowLatencyDispatch(comm, &dispatch, stream), "deepepLowLatencyDispatch");

    // The experts return their rows unchanged: the combine reads recv_x as their output, in the dispatch's layout.
    deepepLowLatencyCombineArgs combine;
    check(deepepLowLatencyCombineArgsInit(&combine, sizeof(combine)), "deepepLowLatencyCombineArgsInit");
    combine.buffer_set = dispatch.buffer_set;
    combine.x = recv_x.get();
    combine.hidden = kHidden;
    combine.num_experts = num_experts;
    combine.src_info = src_info.get();
    combine.layout_range = layout_range.get();
    combine.num_tokens = kLLTokens;
    combine.topk_idx = topk.get();
    combine.topk_type = deepepInt64;
    combine.num_topk = kTopk;
    combine.topk_weights = weights.get();
    combine.out = out.get();
    check(deepepLowLatencyCombine(comm, &combine, stream), "deepepLowLatencyCombine");
    sync_and_check(comm, stream);

    // Expert e receives a row per token naming it, grouped by source rank, then by source token index (a token's
    // experts are distinct here; one named twice would arrive once, for its first slot).
    const auto got_count = recv_count.download();
    const auto got_info = src_info.download();
    const auto got_range = layout_range.download();
    const auto got_x = recv_x.download();
    int received = 0;
    for (int e = 0; e < kLocalExperts; ++e) {
      const int64_t expert = static_cast<int64_t>(rank) * kLocalExperts + e;
      const std::string where = "step " + std::to_string(step) + ", local expert " + std::to_string(e);
      int row = 0;
      for (int s = 0; s < nranks; ++s) {
        const int first = row;
        for (int t = 0; t < kLLTokens; ++t) {
          for (int k = 0; k < kTopk; ++k) {
            if (all[s].topk[static_cast<size_t>(t) * kTopk + k] != expert) continue;
            const size_t slot = static_cast<size_t>(e) * slots + row;
            expect(got_info[slot] == (t | (k << 16)), where + ": source of row " + std::to_string(row));
            expect(same_row(&got_x[slot * kHidden], &all[s].x[static_cast<size_t>(t) * kHidden]),
                   where + ": payload of row " + std::to_string(row));
            ++row;
          }
        }
        const size_t range = (static_cast<size_t>(e) * nranks + s) * 2;
        expect(got_range[range] == first && got_range[range + 1] == row - first, where + ": range of a source");
      }
      expect(got_count[e] == row, where + ": count");
      received += row;
    }
    // Combine: out[t] = bf16(sum over valid slots k ascending of w[t, k] * x[t]), product and sum each in float32.
    const auto got_out = out.download();
    for (int t = 0; t < kLLTokens; ++t) {
      for (int h = 0; h < kHidden; ++h) {
        const float value = from_bf16(mine.x[static_cast<size_t>(t) * kHidden + h]);
        float sum = 0.0f;
        for (int k = 0; k < kTopk; ++k) {
          const size_t slot = static_cast<size_t>(t) * kTopk + k;
          if (mine.topk[slot] < 0) continue;
          const float product = mine.weights[slot] * value;  // built with -ffp-contract=off: no fused multiply-add
          sum = sum + product;
        }
        expect(got_out[static_cast<size_t>(t) * kHidden + h] == to_bf16(sum),
               "step " + std::to_string(step) + ": combined token " + std::to_string(t));
      }
    }
    std::printf("rank %d/%d: low-latency step %d (buffer set %d) dispatch and combine OK (%d rows received)\n", rank,
                nranks, step, dispatch.buffer_set, received);
  }
}

constexpr int kExitNoGpu = 2;  // a child's exit status when CUDA finds no usable GPU

// One rank; returns its exit status. A rank that fails exits without the collective destroy (which would wait for
// the others, busy elsewhere, until the timeout): the parent stops the other ranks.
int run_rank(int rank, int nranks, const deepepUniqueId& id) {
  // CUDA starts here, in the child, after the fork.
  int num_gpus = 0;
  const cudaError_t found = cudaGetDeviceCount(&num_gpus);
  if (found == cudaErrorNoDevice || found == cudaErrorInsufficientDriver) return kExitNoGpu;
  deepepComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  try {
    check(found, "cudaGetDeviceCount");
    const int device = rank % num_gpus;
    check(cudaSetDevice(device), "cudaSetDevice");
    deepepConfig config = DEEPEP_CONFIG_INIT;
    config.device = device;
    config.max_tokens_per_rank = kTokens;
    config.hidden = kHidden;
    config.num_topk = kTopk;
    config.num_experts = kLocalExperts * nranks;
    config.low_latency_max_tokens = kTokens;
    config.timeout_seconds = 60;
    check(deepepCommInitRank(&comm, nranks, &id, rank, &config), "deepepCommInitRank");
    check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    high_throughput(comm, rank, nranks, stream);
    low_latency(comm, rank, nranks, stream);
    check(deepepCommDestroy(comm), "deepepCommDestroy");  // collective: every rank gets here
    cudaStreamDestroy(stream);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d/%d: %s\n", rank, nranks, e.what());
    return 1;
  }
  return 0;
}

// The GPUs this process may use, found without starting CUDA (which a process must not do before it forks): the
// entries of CUDA_VISIBLE_DEVICES where it is set, else the driver's directory per GPU.
int visible_gpus() {
  if (const char* visible = std::getenv("CUDA_VISIBLE_DEVICES")) {
    int count = 0;
    for (const char* p = visible; *p != '\0'; ++p)
      if ((p == visible || p[-1] == ',') && *p != ',') ++count;
    return count;
  }
  DIR* dir = opendir("/proc/driver/nvidia/gpus");
  if (dir == nullptr) return 0;
  int count = 0;
  while (const dirent* entry = readdir(dir))
    if (entry->d_name[0] != '.') ++count;
  closedir(dir);
  return count;
}

}  // namespace

int main(int argc, char** argv) {
  const int num_gpus = visible_gpus();
  if (num_gpus == 0) {
    std::printf("no GPU here: nothing to run\n");
    return 0;
  }
  int nranks = std::min(num_gpus, 8);
  if (argc > 1) {
    char* end = nullptr;
    const long value = std::strtol(argv[1], &end, 10);
    if (*end != '\0' || value < 1 || value > 8) {
      std::fprintf(stderr, "RANKS must be an integer in [1, 8], not '%s'\n", argv[1]);
      return 1;
    }
    nranks = static_cast<int>(value);
  }
  deepepUniqueId id;  // needs no GPU; the children get it through fork (other launchers would send the 128 bytes)
  if (deepepGetUniqueId(&id) != deepepSuccess) {
    std::fprintf(stderr, "deepepGetUniqueId failed: %s\n", deepepGetLastErrorMessage());
    return 1;
  }
  std::fflush(stdout);
  const pid_t parent = getpid();
  std::vector<pid_t> children;
  bool failed = false;
  auto stop_children = [&] {
    for (pid_t child : children)
      if (child > 0) kill(child, SIGTERM);
  };
  for (int rank = 0; rank < nranks && !failed; ++rank) {
    const pid_t pid = fork();
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);  // a rank never outlives the parent (killed, say, by a test's timeout)
      if (getppid() != parent) std::_Exit(1);
      const int status = run_rank(rank, nranks, id);
      std::fflush(stdout);
      std::fflush(stderr);
      std::_Exit(status);
    }
    if (pid < 0) {
      std::perror("fork");
      failed = true;
    } else {
      children.push_back(pid);
    }
  }
  // A rank that fails leaves the others waiting in collectives until their timeout: stop them at once.
  if (failed) stop_children();
  int no_gpu = 0;
  for (size_t running = children.size(); running > 0; --running) {
    int status = 0;
    pid_t pid;
    while ((pid = wait(&status)) < 0 && errno == EINTR) {
    }
    if (pid < 0) break;
    for (pid_t& child : children)
      if (child == pid) child = 0;  // reaped: never signal its pid, which may be reused, again
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    no_gpu += code == kExitNoGpu ? 1 : 0;
    if (code != 0 && code != kExitNoGpu && !failed) {
      failed = true;
      stop_children();
    }
  }
  if (!failed && no_gpu == nranks) {
    std::printf("no GPU here (CUDA found none): nothing to run\n");
    return 0;
  }
  failed = failed || no_gpu > 0;
  std::printf("moe_step: %s\n", failed ? "FAILED" : "every rank OK");
  return failed ? 1 : 0;
}
