// The C ABI entry points: argument checks, then the runtime and kernels. Every entry point is wrapped in
// guarded_call so no exception crosses the boundary.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "comm.hpp"
#include "cuda_utils.hpp"
#include "deepep/deepep.h"
#include "error.hpp"
#include "layout.hpp"
#include "validation.hpp"

namespace deepep {
namespace {

template <class T>
void require_out(T* pointer, const char* name) {
  DEEPEP_REQUIRE(pointer != nullptr, "%s is NULL", name);
}

// A local query: validates the handle and the out pointer, then stores one field of the communicator.
template <class T, class Field>
deepepResult_t query(const char* function, deepepComm_t comm, T* out, const char* name, Field field) {
  return guarded_call(function, [&] {
    require_out(out, name);
    *out = field(*checked_comm(comm));
  });
}

size_t element_bytes(deepepDataType_t type) {
  switch (type) {
    case deepepInt32:
      return 4;
    case deepepInt64:
      return 8;
    case deepepFloat32:
      return 4;
    case deepepBFloat16:
      return 2;
    case deepepFloat8E4M3:
      return 1;
    case deepepUInt8:
      return 1;
  }
  fail(deepepInvalidArgument, "unknown deepepDataType_t value %d", static_cast<int>(type));
}

}  // namespace
}  // namespace deepep

using namespace deepep;

extern "C" {

DEEPEP_API deepepResult_t deepepGetVersion(int* version) {
  return guarded_call(__func__, [&] {
    require_out(version, "version");
    *version = DEEPEP_VERSION;
  });
}

DEEPEP_API deepepResult_t deepepConfigInit(deepepConfig* config, size_t struct_size) {
  return guarded_call(__func__, [&] {
    const deepepConfig defaults = DEEPEP_CONFIG_INIT;
    init_struct(config, struct_size, defaults, "config");
  });
}

DEEPEP_API deepepResult_t deepepGetUniqueId(deepepUniqueId* id) {
  return guarded_call(__func__, [&] {
    require_out(id, "id");
    get_unique_id(id);
  });
}

DEEPEP_API deepepResult_t deepepGetBufferSizeHint(const deepepConfig* config, int nranks, size_t* bytes) {
  return guarded_call(__func__, [&] {
    require_out(bytes, "bytes");
    DEEPEP_REQUIRE(nranks >= 1 && nranks <= DEEPEP_MAX_RANKS, "nranks is %d; it must be in [1, %d]", nranks,
                   DEEPEP_MAX_RANKS);
    *bytes = total_buffer_size(resolve_config(config), nranks);
  });
}

DEEPEP_API deepepResult_t deepepCommInitRank(deepepComm_t* comm, int nranks, const deepepUniqueId* id, int rank,
                                             const deepepConfig* config) {
  return guarded_call(__func__, [&] {
    require_out(comm, "comm");
    *comm = nullptr;
    require_out(id, "id");
    DEEPEP_REQUIRE(nranks >= 1 && nranks <= DEEPEP_MAX_RANKS, "nranks is %d; it must be in [1, %d]", nranks,
                   DEEPEP_MAX_RANKS);
    DEEPEP_REQUIRE(rank >= 0 && rank < nranks, "rank is %d; it must be in [0, nranks = %d)", rank, nranks);
    const deepepConfig resolved = resolve_config(config);
    *comm = create_comm(nranks, *id, rank, resolved);
  });
}

DEEPEP_API deepepResult_t deepepCommDestroy(deepepComm_t comm) {
  return guarded_call(__func__, [&] {
    if (comm == nullptr) return;
    destroy_comm(checked_comm(comm));
  });
}

DEEPEP_API deepepResult_t deepepCommRank(deepepComm_t comm, int* rank) {
  return query(__func__, comm, rank, "rank", [](const deepepComm& c) { return c.rank; });
}

DEEPEP_API deepepResult_t deepepCommSize(deepepComm_t comm, int* nranks) {
  return query(__func__, comm, nranks, "nranks", [](const deepepComm& c) { return c.nranks; });
}

DEEPEP_API deepepResult_t deepepCommRanksPerNvlDomain(deepepComm_t comm, int* ranks_per_domain) {
  return query(__func__, comm, ranks_per_domain, "ranks_per_domain",
               [](const deepepComm& c) { return c.ranks_per_nvl_domain; });
}

DEEPEP_API deepepResult_t deepepCommDevice(deepepComm_t comm, int* device) {
  return query(__func__, comm, device, "device", [](const deepepComm& c) { return c.device; });
}

DEEPEP_API deepepResult_t deepepCommBufferBytes(deepepComm_t comm, size_t* bytes) {
  return query(__func__, comm, bytes, "bytes", [](const deepepComm& c) { return c.total_buffer_bytes; });
}

DEEPEP_API deepepResult_t deepepCommGetDispatchArea(deepepComm_t comm, void** area, size_t* bytes) {
  return guarded_call(__func__, [&] {
    require_out(area, "area");
    require_out(bytes, "bytes");
    const deepepComm& c = *checked_comm(comm);
    *area = c.dispatch_area();
    *bytes = c.dispatch_area_bytes;
  });
}

DEEPEP_API deepepResult_t deepepCommGetStream(deepepComm_t comm, struct CUstream_st** stream) {
  return query(__func__, comm, stream, "stream", [](const deepepComm& c) { return c.stream; });
}

DEEPEP_API deepepResult_t deepepCommGetAsyncError(deepepComm_t comm, deepepResult_t* async_error) {
  return guarded_call(__func__, [&] {
    require_out(async_error, "async_error");
    std::string message;
    *async_error = read_async_error(*checked_comm(comm), &message);
    // A found fault is described through the calling thread's message, like a failed call.
    if (*async_error != deepepSuccess) set_last_error_message(message);
  });
}

DEEPEP_API deepepResult_t deepepCommClearAsyncError(deepepComm_t comm) {
  return guarded_call(__func__, [&] {
    deepepComm* c = checked_comm(comm);
    if (c->async_error->code == deepepTimeout) c->peer_timed_out.store(true);  // sticky: see destroy_comm
    std::memset(c->async_error, 0, sizeof(AsyncErrorRecord));
  });
}

DEEPEP_API deepepResult_t deepepGetDispatchLayout(deepepComm_t comm, const void* topk_idx, deepepDataType_t topk_type,
                                                  int64_t num_tokens, int num_topk, int64_t topk_row_stride,
                                                  int num_experts, int32_t* num_tokens_per_rank,
                                                  int32_t* num_tokens_per_expert, uint8_t* is_token_in_rank,
                                                  struct CUstream_st* stream) {
  return guarded_call(__func__, [&] {
    const deepepComm& c = *checked_comm(comm);
    DeviceGuard guard(c.device);         // first: the checks below call the runtime
    const CaptureScope capture(stream);  // outputs may be allocations of the capture itself
    DEEPEP_REQUIRE(topk_type == deepepInt64 || topk_type == deepepInt32,
                   "topk_type is %d; topk_idx must be deepepInt64 or deepepInt32", static_cast<int>(topk_type));
    DEEPEP_REQUIRE(num_tokens >= 0, "num_tokens is %lld; it must be >= 0", static_cast<long long>(num_tokens));
    DEEPEP_REQUIRE(num_topk >= 1 && num_topk <= DEEPEP_MAX_TOPK, "num_topk is %d; it must be in [1, %d]", num_topk,
                   DEEPEP_MAX_TOPK);
    if (topk_row_stride == 0) topk_row_stride = num_topk;  // contiguous rows, as in every other call
    DEEPEP_REQUIRE(topk_row_stride >= num_topk && topk_row_stride <= (int64_t(1) << 32),
                   "topk_row_stride is %lld; it must be in [num_topk (%d), 2^32] (0: num_topk)",
                   static_cast<long long>(topk_row_stride), num_topk);
    // The counts are int32: a rank's count reaches num_tokens, an expert's num_tokens * num_topk (one per slot).
    constexpr int64_t kMaxCount = INT32_MAX;
    DEEPEP_REQUIRE(num_tokens <= kMaxCount, "num_tokens is %lld; at most 2^31 - 1 tokens are supported (int32 counts)",
                   static_cast<long long>(num_tokens));
    DEEPEP_REQUIRE(num_tokens * num_topk <= kMaxCount,
                   "num_tokens * num_topk is %lld; at most 2^31 - 1 slots are supported (an expert's int32 count may "
                   "reach it)",
                   static_cast<long long>(num_tokens * num_topk));
    DEEPEP_REQUIRE(num_experts >= 1, "num_experts is %d; it must be positive", num_experts);
    DEEPEP_REQUIRE(num_experts % c.nranks == 0, "num_experts (%d) is not divisible by the number of ranks (%d)",
                   num_experts, c.nranks);
    DEEPEP_REQUIRE(num_experts / c.nranks <= DEEPEP_MAX_LOCAL_EXPERTS,
                   "num_experts / nranks is %d; at most %d experts per rank are supported", num_experts / c.nranks,
                   DEEPEP_MAX_LOCAL_EXPERTS);
    const size_t index_bytes = element_bytes(topk_type);
    check_device_array(c, topk_idx, matrix_bytes(num_tokens, num_topk, topk_row_stride, index_bytes), index_bytes,
                       "topk_idx");
    check_device_array(c, num_tokens_per_rank, sizeof(int32_t) * c.nranks, 4, "num_tokens_per_rank");
    check_device_array(c, num_tokens_per_expert, sizeof(int32_t) * num_experts, 4, "num_tokens_per_expert");
    check_device_array(c, is_token_in_rank, static_cast<size_t>(num_tokens) * c.nranks, 1, "is_token_in_rank");
    launch_dispatch_layout(c, topk_idx, topk_type, num_tokens, num_topk, topk_row_stride, num_experts,
                           num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank, stream);
  });
}

}  // extern "C"
