// layout_one_rank.cpp: libdeepep from C++ through its CMake package. Prints the library version, then, where a GPU
// exists, creates a one-rank communicator, computes a dispatch layout on the device and checks it on the host.
// Exit status: 0 when everything that could run agreed, 1 otherwise (no GPU is not a failure: it is reported).
#include <cuda_runtime.h>
#include <deepep/deepep.h>

#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

bool ok(deepepResult_t result, const char* what) {
  if (result == deepepSuccess) return true;
  std::fprintf(stderr, "%s failed: %s: %s\n", what, deepepGetErrorString(result), deepepGetLastErrorMessage());
  return false;
}

// RAII owner of a device allocation.
template <class T>
struct DeviceArray {
  T* data = nullptr;
  explicit DeviceArray(size_t count) { cudaMalloc(reinterpret_cast<void**>(&data), sizeof(T) * count); }
  ~DeviceArray() { cudaFree(data); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
};

}  // namespace

int main() {
  int version = 0;
  if (!ok(deepepGetVersion(&version), "deepepGetVersion")) return 1;
  std::printf("libdeepep %d.%d.%d (header %d)\n", version / 10000, version / 100 % 100, version % 100, DEEPEP_VERSION);

  deepepUniqueId id;
  if (!ok(deepepGetUniqueId(&id), "deepepGetUniqueId")) return 1;
  deepepConfig config = DEEPEP_CONFIG_INIT;
  config.device = 0;
  config.max_tokens_per_rank = 64;
  config.hidden = 256;
  deepepComm_t comm = nullptr;
  const deepepResult_t created = deepepCommInitRank(&comm, 1, &id, 0, &config);
  if (created == deepepNoDevice) {
    std::printf("no GPU here (%s): only the version check ran\n", deepepGetLastErrorMessage());
    return 0;
  }
  if (!ok(created, "deepepCommInitRank")) return 1;

  // Eight experts, two per token, some slots unused; with one rank every routed token lands on rank 0.
  const int num_tokens = 16, num_topk = 2, num_experts = 8;
  std::vector<int64_t> topk(num_tokens * num_topk);
  for (int t = 0; t < num_tokens; ++t) {
    topk[t * num_topk] = t % num_experts;
    topk[t * num_topk + 1] = t % 3 == 0 ? -1 : (t + 3) % num_experts;
  }
  DeviceArray<int64_t> topk_dev(topk.size());
  DeviceArray<int32_t> per_rank(1), per_expert(num_experts);
  DeviceArray<uint8_t> in_rank(num_tokens);
  cudaMemcpy(topk_dev.data, topk.data(), sizeof(int64_t) * topk.size(), cudaMemcpyHostToDevice);
  bool good = ok(deepepGetDispatchLayout(comm, topk_dev.data, deepepInt64, num_tokens, num_topk, num_topk, num_experts,
                                         per_rank.data, per_expert.data, in_rank.data, nullptr),
                 "deepepGetDispatchLayout");
  std::vector<int32_t> experts(num_experts);
  int32_t tokens_here = -1;
  cudaMemcpy(experts.data(), per_expert.data, sizeof(int32_t) * num_experts, cudaMemcpyDeviceToHost);
  cudaMemcpy(&tokens_here, per_rank.data, sizeof(int32_t), cudaMemcpyDeviceToHost);
  std::vector<int32_t> expected(num_experts, 0);
  for (int64_t e : topk)
    if (e >= 0) ++expected[e];
  good = good && tokens_here == num_tokens && experts == expected;
  std::printf("layout on one rank: %s (%d tokens on rank 0)\n", good ? "OK" : "WRONG", tokens_here);
  good = ok(deepepCommDestroy(comm), "deepepCommDestroy") && good;
  return good ? 0 : 1;
}
