// C ABI of the high-throughput calls: handles, dispatch notify, dispatch, combine. Checks every argument, then
// launches the intranode kernels.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <random>
#include <string>
#include <thread>
#include <unordered_map>

#include "comm.hpp"
#include "cuda_utils.hpp"
#include "deepep/deepep.h"
#include "error.hpp"
#include "handle.hpp"
#include "intranode.hpp"
#include "refusal.hpp"
#include "validation.hpp"

using namespace deepep;

namespace {

// Live handles by the value the caller holds, which counts up and is never an address: a new handle may get the
// memory of a destroyed one, and a stale value (a second destroy, a call after the destroy) would then act on it.
// The count starts at a random value, so that a second instance of the library in the process (libdeepep.so and
// libdeepep.so.0.2 are two to the loader) does not take this one's handles for its own. Values are multiples of 16,
// as an address of the struct would be, for callers that keep tags in the low bits.
std::mutex handle_registry_mutex;
std::unordered_map<uintptr_t, deepepHandle*> live_handles;
uintptr_t last_handle_value = [] {
  // Without a random source (random_device may throw), the clock and where this instance is loaded.
  uintptr_t start = reinterpret_cast<uintptr_t>(&live_handles) ^
                    static_cast<uintptr_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  try {
    std::random_device random;
    start = static_cast<uintptr_t>(random()) << 32 | random();
  } catch (const std::exception&) {
  }
  return start & ~uintptr_t{15};
}();

deepepHandle* checked_handle(deepepHandle_t handle, const deepepComm* comm) {
  DEEPEP_REQUIRE(handle != nullptr, "handle is NULL");
  std::lock_guard<std::mutex> lock(handle_registry_mutex);
  const auto live = live_handles.find(reinterpret_cast<uintptr_t>(handle));
  if (live == live_handles.end()) {
    fail(deepepInvalidUsage, "handle %p is not a live handle (destroyed, or never created)",
         static_cast<void*>(handle));
  }
  if (comm != nullptr && live->second->comm != comm) {
    fail(deepepInvalidUsage, "the handle belongs to another communicator (or to a destroyed one)");
  }
  return live->second;
}

// The intranode kernels reach every rank by NVLink loads and stores.
void require_intranode(const deepepComm& comm) {
  if (comm.nranks > kMaxNvlRanks || comm.ranks_per_nvl_domain != comm.nranks) {
    fail(deepepNotSupported,
         "high-throughput calls need all %d ranks in one NVLink domain of at most %d ranks (this domain has %d)",
         comm.nranks, kMaxNvlRanks, comm.ranks_per_nvl_domain);
  }
}

int resolve_num_sms(const deepepComm& comm, int requested) {
  int sm_count = 0;
  DEEPEP_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, comm.device));
  // The default fits a device with fewer SMs (a MIG slice), where it would otherwise refuse every call.
  const int num_sms = requested == 0 ? std::min(default_num_sms(comm.nranks), sm_count) : requested;
  DEEPEP_REQUIRE(num_sms >= 1 && num_sms <= std::min(kMaxBlocks, sm_count),
                 "num_sms is %d; it must be in [1, %d] on this device (0 picks the default)", num_sms,
                 std::min(kMaxBlocks, sm_count));
  return num_sms;
}

void check_routing(const deepepComm& comm, const deepepDispatchArgs& a) {
  DEEPEP_REQUIRE(a.num_tokens >= 0 && a.num_tokens <= comm.max_tokens_per_rank,
                 "num_tokens is %lld; it must be in [0, max_tokens_per_rank = %lld] (set in the config)",
                 static_cast<long long>(a.num_tokens), static_cast<long long>(comm.max_tokens_per_rank));
  DEEPEP_REQUIRE(a.topk_type == deepepInt64 || a.topk_type == deepepInt32,
                 "topk_type is %d; topk_idx must be deepepInt64 or deepepInt32", static_cast<int>(a.topk_type));
  DEEPEP_REQUIRE(a.num_topk >= 1 && a.num_topk <= DEEPEP_MAX_TOPK, "num_topk is %d; it must be in [1, %d]", a.num_topk,
                 DEEPEP_MAX_TOPK);
  const int64_t stride = a.topk_row_stride != 0 ? a.topk_row_stride : a.num_topk;
  DEEPEP_REQUIRE(stride >= a.num_topk && stride <= (int64_t(1) << 32),
                 "topk_row_stride is %lld; it must be in [num_topk = %d, 2^32] (0: num_topk)",
                 static_cast<long long>(stride), a.num_topk);
  DEEPEP_REQUIRE(a.num_experts >= 1 && a.num_experts % comm.nranks == 0,
                 "num_experts (%d) must be a positive multiple of the number of ranks (%d)", a.num_experts,
                 comm.nranks);
  DEEPEP_REQUIRE(a.num_experts / comm.nranks <= DEEPEP_MAX_LOCAL_EXPERTS,
                 "num_experts / nranks is %d; at most %d experts per rank are supported", a.num_experts / comm.nranks,
                 DEEPEP_MAX_LOCAL_EXPERTS);
  // An expert's count is at most nranks * max_tokens_per_rank * num_topk rows (a token whose slots repeat an expert
  // counts once per slot); rounded up to the alignment it must still fit the int32 the counts are reported in.
  const int64_t most_rows = static_cast<int64_t>(comm.nranks) * comm.max_tokens_per_rank * a.num_topk;
  DEEPEP_REQUIRE(most_rows <= INT32_MAX,
                 "nranks * max_tokens_per_rank * num_topk = %lld rows may reach one expert, more than its int32 count "
                 "holds: lower max_tokens_per_rank or num_topk",
                 static_cast<long long>(most_rows));
  const int64_t most_alignment = INT32_MAX - most_rows + 1;
  DEEPEP_REQUIRE(a.expert_alignment >= 1 && a.expert_alignment <= most_alignment,
                 "expert_alignment is %d; it must be in [1, %lld] (an expert's count of up to nranks * "
                 "max_tokens_per_rank * num_topk = %lld rows, rounded up to it, must fit int32)",
                 a.expert_alignment, static_cast<long long>(most_alignment), static_cast<long long>(most_rows));
  const size_t element = a.topk_type == deepepInt64 ? 8 : 4;
  check_device_array(comm, a.topk_idx, matrix_bytes(a.num_tokens, a.num_topk, stride, element), element, "topk_idx");
}

deepepDispatchArgs dispatch_defaults() {
  deepepDispatchArgs args{};
  args.struct_size = sizeof(args);
  args.topk_type = deepepInt64;
  args.expert_alignment = 1;
  args.x_type = deepepBFloat16;
  args.scales_type = deepepFloat32;
  return args;
}

deepepCombineArgs combine_defaults() {
  deepepCombineArgs args{};
  args.struct_size = sizeof(args);
  return args;
}

// The id of the stream capture that `stream` takes part in (CUDA makes one per capture, unique in the process), 0
// when it is not capturing.
unsigned long long capture_id_of(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long id = 0;
  DEEPEP_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &status, &id));
  if (status == cudaStreamCaptureStatusNone) return 0;
  return id != 0 ? id : ~0ull;  // ids start at 1; a capture is never taken for none
}

// Remembers the handle's last use on `stream`, so that its storage is reused only after that work (see
// deepepHandleDestroy). Inside a stream capture the graph may run at any later time: the handle is marked instead,
// with the capture (see check_capture_use). Returns the capture's id, 0 outside one.
unsigned long long note_use(deepepHandle& handle, cudaStream_t stream) {
  const unsigned long long capture = capture_id_of(stream);
  if (capture != 0) {
    handle.used_in_capture = true;
    if (handle.capture_id != 0 && handle.capture_id != capture) handle.several_captures = true;
    handle.capture_id = capture;
    return capture;
  }
  DEEPEP_CUDA_CHECK(cudaEventRecord(handle.last_use, stream));
  return 0;
}

// A handle that a stream capture used: the graph's replays read its device routing and, where a dispatch in the capture
// routed it, write it again at every replay, while its host fields (routed, num_tokens, num_experts, num_sms, the
// receive counts) stay those the calls set when they were made. Refuses `what` on `stream` (deepepInvalidUsage),
// before anything is launched or changed, where the two could part:
//  - a call that routes the handle (`reroutes`: notify, a worst-case or bounded dispatch) once a capture other than
//    this one used it (any capture, outside one): that graph's replays would read the new routing;
//  - any call outside the capture whose dispatch routed it: each replay of that graph routes it again, under this
//    call's host view.
// Calls within one capture stay free (a graph of several layers may route one handle several times), and so do
// cached dispatches and combines, captured or not, with a handle routed outside every capture.
void check_capture_use(const deepepHandle& h, bool reroutes, cudaStream_t stream, const char* what) {
  if (h.capture_id == 0) return;  // no capture used it
  const unsigned long long current = capture_id_of(stream);
  if (h.routing_capture_id != 0 && h.routing_capture_id != current) {
    fail(deepepInvalidUsage,
         "%s refused: the handle was routed by a dispatch captured in a CUDA graph, and every replay of that graph "
         "routes it again, so %s may not match its routing on the device: use the handle only in that capture, "
         "and another handle %s",
         what, current == 0 ? "its state here" : "its state in this capture",
         current == 0 ? "outside the graph" : "in this capture");
  }
  if (reroutes && (current == 0 || h.capture_id != current || h.several_captures)) {
    fail(deepepInvalidUsage,
         "%s refused: it would route again a handle that %s used, and that graph's replays read the handle's "
         "routing: keep the handle for that graph (cached dispatches and combines with it stay allowed) and use "
         "another handle for the new routing",
         what, current == 0 ? "a CUDA graph capture" : "another CUDA graph capture");
  }
}

// This rank's side of a refused `call` on `stream` (deepepRefuseCall). A dispatch (of either kind) or a combine runs
// on the peers' block count (block b talks to block b): the handle's where it holds a routing, else `num_sms` resolved
// like a dispatch's, or the default one where that is no valid count (the refusal may be of that very argument).
void launch_refusal(const deepepComm& comm, deepepHandle* handle, deepepCall_t call, int num_sms, cudaStream_t stream) {
  int blocks = 1;
  if (call != deepepCallDispatchNotify) {
    if (handle != nullptr && handle->routed) {
      blocks = handle->num_sms;
    } else {
      try {
        blocks = resolve_num_sms(comm, num_sms);
      } catch (const Error&) {
        blocks = resolve_num_sms(comm, 0);
      }
    }
  }
  DeviceGuard guard(comm.device);
  launch_refused(comm, handle, call, blocks, stream);
  if (handle != nullptr) note_use(*handle, stream);  // the kernel reads the handle's ranges
}

// What a high-throughput call's refusal (RefusalOnThrow) needs, filled in as the checks learn it: the call's kind, its
// handle and block count.
struct HighThroughputRefusal {
  const deepepComm& comm;
  deepepCall_t call;
  cudaStream_t stream;
  deepepHandle* handle = nullptr;
  int num_sms = 0;
  void operator()() const {
    require_intranode(comm);  // nothing where high-throughput calls cannot run at all
    launch_refusal(comm, handle, call, num_sms, stream);
  }
};

// Fills the handle's routing from args (prepare kernel); the caller then runs notify or a worst-case dispatch, which
// fill the receive counts, and marks the handle routed once that call is launched (notify: once it is done). The
// caller has checked the handle's captures (check_capture_use): outside a capture, none used the handle.
void prepare(const deepepComm& comm, deepepHandle& handle, const deepepDispatchArgs& given, cudaStream_t stream) {
  deepepDispatchArgs a = given;
  if (a.topk_row_stride == 0) a.topk_row_stride = a.num_topk;  // 0 means contiguous rows
  const int num_sms = resolve_num_sms(comm, a.num_sms);
  handle.routed = false;
  handle.dispatched = false;
  handle.recv_counts_on_host = false;
  handle.report_ticket = 0;
  handle.num_tokens = a.num_tokens;
  handle.num_experts = a.num_experts;
  handle.expert_alignment = a.expert_alignment;
  handle.num_sms = num_sms;
  launch_prepare_routing(comm, handle, a, num_sms, stream);
  // Inside a capture, every replay routes the handle again: the capture's id marks it as that graph's.
  handle.routing_capture_id = note_use(handle, stream);
}

// Spins until `done()` holds, at most the communicator's timeout plus 5 s; past that, a fault a kernel recorded is
// reported (earlier work on the stream may have held the awaited kernel up), else a timeout. A fault recorded
// meanwhile does not end the wait: it may be earlier work's, while the awaited kernel still finishes well (and it ends
// within its own timeout regardless). Count exchanges finish in tens of microseconds: the host spins first, then
// stops burning the core.
template <class Done>
void spin_bounded(const deepepComm& comm, const char* what, Done done) {
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + std::chrono::duration<double>(comm.timeout_seconds + 5);
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) {
      comm.peer_timed_out.store(true);
      raise_async_error(comm);
      fail(deepepTimeout, "%s did not finish within %.1f s", what, comm.timeout_seconds);
    }
    if (std::chrono::steady_clock::now() - start < std::chrono::milliseconds(2)) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }
}

// Whether `event` has completed (false while not ready; any other status throws, naming `what`).
bool event_done(cudaEvent_t event, const char* what) {
  const cudaError_t status = cudaEventQuery(event);
  if (status != cudaSuccess && status != cudaErrorNotReady) fail_cuda(status, what, __FILE__, __LINE__);
  return status == cudaSuccess;
}

// A call whose host waits for counts refuses while a fault is recorded: the first recorded fault stays (later ones
// are not recorded), so the wait could neither see this call's own faults nor tell the old one from them.
void require_no_recorded_fault(const deepepComm& comm, const char* what) {
  std::string message;
  const deepepResult_t found = read_async_error(comm, &message);
  if (found != deepepSuccess) {
    fail(deepepInvalidUsage,
         "%s refused: an asynchronous error is recorded on this communicator (%s: %s); read it with "
         "deepepCommGetAsyncError and clear it with deepepCommClearAsyncError first",
         what, deepepGetErrorString(found), message.c_str());
  }
}

// Waits for the notify kernel launched on `stream` with `ticket`: it stores the ticket once the counts are on the
// host, its routing took every id and every source sent its counts in agreement, before it ends. A kernel that ends
// without it found a fault, which it or the routing recorded (or an earlier one was: the first stays), reported here.
void wait_for_notify(const deepepComm& comm, uint64_t ticket, cudaStream_t stream) {
  const char* what = "the dispatch count exchange";
  auto* slot = static_cast<HandleHostInfo*>(comm.notify_host);
  auto ticket_now = [&] { return __atomic_load_n(&slot->ticket, __ATOMIC_ACQUIRE); };
  DEEPEP_CUDA_CHECK(cudaEventRecord(comm.host_wait_event, stream));
  spin_bounded(comm, what, [&] { return ticket_now() == ticket || event_done(comm.host_wait_event, what); });
  if (ticket_now() == ticket) return;
  raise_async_error(comm);
  fail(deepepInternalError, "%s ended without its counts and without a recorded fault", what);
}

}  // namespace

extern "C" {

DEEPEP_API deepepResult_t deepepHandleCreate(deepepComm_t comm, deepepHandle_t* handle) {
  return guarded_call(__func__, [&] {
    DEEPEP_REQUIRE(handle != nullptr, "handle is NULL");
    *handle = nullptr;
    deepepComm* c = checked_comm(comm);
    require_intranode(*c);
    DeviceGuard guard(c->device);
    auto h = std::make_unique<deepepHandle>();
    h->comm = c;
    h->device = c->device;
    h->nranks = c->nranks;
    h->max_tokens = c->max_tokens_per_rank;
    const size_t R = static_cast<size_t>(c->nranks);
    const size_t tiles = std::max<size_t>(1, (static_cast<size_t>(h->max_tokens) + kRoutingTile - 1) / kRoutingTile);
    const size_t ints = static_cast<size_t>(h->max_tokens) * R + R + R * DEEPEP_MAX_LOCAL_EXPERTS +
                        2 * R * kMaxBlocks * 2 + R + DEEPEP_MAX_LOCAL_EXPERTS + tiles * R + 4;
    const size_t bytes = sizeof(int64_t) + ints * sizeof(int32_t);
    {
      // Reuse the storage of a destroyed handle whose last use has finished (no allocation, no device sync).
      std::lock_guard<std::mutex> lock(c->retired_mutex);
      for (auto it = c->retired_handles.begin(); it != c->retired_handles.end(); ++it) {
        const cudaError_t status = cudaEventQuery(it->last_use);
        if (status == cudaSuccess) {
          h->device_storage = it->storage;
          h->last_use = it->last_use;
          c->retired_handles.erase(it);
          break;
        }
        if (status != cudaErrorNotReady) fail_cuda(status, "cudaEventQuery(retired handle)", __FILE__, __LINE__);
      }
    }
    const bool fresh = h->device_storage == nullptr;
    if (fresh) {
      DEEPEP_CUDA_CHECK(cudaMalloc(&h->device_storage, bytes));
      const cudaError_t status = cudaEventCreateWithFlags(&h->last_use, cudaEventDisableTiming);
      if (status != cudaSuccess) {
        cudaFree(h->device_storage);
        fail_cuda(status, "cudaEventCreateWithFlags", __FILE__, __LINE__);
      }
    }
    struct FreeOnFailure {
      deepepHandle* handle;
      ~FreeOnFailure() {
        if (handle != nullptr) {
          cudaFree(handle->device_storage);
          cudaEventDestroy(handle->last_use);
        }
      }
    } free_on_failure{h.get()};
    auto* base = static_cast<uint8_t*>(h->device_storage);
    h->num_recv_device = reinterpret_cast<int64_t*>(base);
    int32_t* next = reinterpret_cast<int32_t*>(base + sizeof(int64_t));
    auto take = [&](size_t count) {
      int32_t* p = next;
      next += count;
      return p;
    };
    h->send_pos = take(static_cast<size_t>(h->max_tokens) * R);
    h->send_counts = take(R);
    h->expert_counts = take(R * DEEPEP_MAX_LOCAL_EXPERTS);
    h->send_ranges = take(R * kMaxBlocks * 2);
    h->recv_ranges = take(R * kMaxBlocks * 2);
    h->recv_counts = take(R);
    h->recv_expert_counts = take(DEEPEP_MAX_LOCAL_EXPERTS);
    h->tile_counts = take(tiles * R);
    h->routing_ticket = reinterpret_cast<uint32_t*>(take(1));
    h->routing_faults = take(2);  // with dispatch_failed after it: the routing clears both
    h->dispatch_failed = h->routing_faults + 1;
    h->routing_op = reinterpret_cast<uint32_t*>(take(1));
    // New storage starts zeroed (reused storage keeps stale routing, which nothing reads before a routing rewrites
    // it: calls check `routed` first). The clearing is finished before the handle is returned: a memset left on the
    // legacy stream would race with routings on non-blocking streams.
    if (fresh) {
      cudaStream_t clear = nullptr;
      DEEPEP_CUDA_CHECK(cudaStreamCreateWithFlags(&clear, cudaStreamNonBlocking));
      cudaError_t status = cudaMemsetAsync(h->device_storage, 0, bytes, clear);
      if (status == cudaSuccess) status = cudaStreamSynchronize(clear);
      cudaStreamDestroy(clear);
      if (status != cudaSuccess) fail_cuda(status, "clearing the handle's storage", __FILE__, __LINE__);
    }
    std::lock_guard<std::mutex> lock(handle_registry_mutex);
    do {
      last_handle_value += 16;
    } while (last_handle_value == 0);
    live_handles.emplace(last_handle_value, h.get());
    free_on_failure.handle = nullptr;  // registered (emplace may throw): the handle owns its storage from here on
    *handle = reinterpret_cast<deepepHandle_t>(last_handle_value);
    h.release();
  });
}

DEEPEP_API deepepResult_t deepepHandleDestroy(deepepHandle_t handle) {
  return guarded_call(__func__, [&] {
    if (handle == nullptr) return;
    deepepHandle* h = checked_handle(handle, nullptr);
    {
      std::lock_guard<std::mutex> lock(handle_registry_mutex);
      // One destruction per handle, also when two threads destroy it at once.
      if (live_handles.erase(reinterpret_cast<uintptr_t>(handle)) == 0) {
        fail(deepepInvalidUsage, "handle %p is not a live handle (destroyed, or being destroyed)",
             static_cast<void*>(handle));
      }
    }
    std::unique_ptr<deepepHandle> owner(h);
    DeviceGuard guard(h->device);
    deepepComm* c = h->comm;
    // The communicator's memory outlives it (comm.cu keeps destroyed ones), so its mutex may be taken first; whether
    // it is live is asked under it, so that a destruction running meanwhile frees what is parked here.
    std::unique_lock<std::mutex> lock(c->retired_mutex);
    if (!h->used_in_capture && is_live_comm(c)) {
      // Park the storage with the event of its last use; a later handle reuses it once that work is done.
      constexpr size_t kMaxRetired = 8;
      if (c->retired_handles.size() >= kMaxRetired) {
        const auto oldest = c->retired_handles.front();
        cudaEventSynchronize(oldest.last_use);
        cudaFree(oldest.storage);
        cudaEventDestroy(oldest.last_use);
        c->retired_handles.erase(c->retired_handles.begin());
      }
      try {
        c->retired_handles.push_back({h->device_storage, h->last_use});
        return;
      } catch (const std::bad_alloc&) {
        // No host memory to park it: free it now, as below (never leaked).
      }
    }
    lock.unlock();
    // Used inside a captured graph (or the communicator is gone, or parking failed): work on any stream may still
    // read the storage.
    cudaDeviceSynchronize();
    cudaFree(h->device_storage);
    cudaEventDestroy(h->last_use);
  });
}

DEEPEP_API deepepResult_t deepepHandleGetNumRecvTokens(deepepHandle_t handle, int64_t* num_recv_tokens) {
  return guarded_call(__func__, [&] {
    DEEPEP_REQUIRE(num_recv_tokens != nullptr, "num_recv_tokens is NULL");
    deepepHandle* h = checked_handle(handle, nullptr);
    if (!h->recv_counts_on_host) {
      fail(deepepInvalidUsage,
           "the handle's receive count is not on the host (no deepepDispatchNotify or deepepHandleWaitRecvCounts "
           "filled it)");
    }
    *num_recv_tokens = h->host_info.num_recv_tokens;
  });
}

DEEPEP_API deepepResult_t deepepHandleGetRecvTokensPerExpert(deepepHandle_t handle, int32_t* counts,
                                                             int num_local_experts) {
  return guarded_call(__func__, [&] {
    DEEPEP_REQUIRE(counts != nullptr, "counts is NULL");
    deepepHandle* h = checked_handle(handle, nullptr);
    if (!h->recv_counts_on_host) {
      fail(deepepInvalidUsage,
           "the handle's receive counts are not on the host (no deepepDispatchNotify or "
           "deepepHandleWaitRecvCounts filled them)");
    }
    const int local = h->num_experts / h->nranks;
    DEEPEP_REQUIRE(num_local_experts == local, "num_local_experts is %d; the handle's routing has %d",
                   num_local_experts, local);
    std::memcpy(counts, h->host_info.recv_tokens_per_expert, sizeof(int32_t) * local);
  });
}

DEEPEP_API deepepResult_t deepepHandleGetNumTokens(deepepHandle_t handle, int64_t* num_tokens) {
  return guarded_call(__func__, [&] {
    DEEPEP_REQUIRE(num_tokens != nullptr, "num_tokens is NULL");
    deepepHandle* h = checked_handle(handle, nullptr);
    if (!h->routed) fail(deepepInvalidUsage, "the handle holds no routing yet");
    *num_tokens = h->num_tokens;
  });
}

DEEPEP_API deepepResult_t deepepDispatchArgsInit(deepepDispatchArgs* args, size_t struct_size) {
  return guarded_call(__func__, [&] { init_struct(args, struct_size, dispatch_defaults(), "args"); });
}

DEEPEP_API deepepResult_t deepepCombineArgsInit(deepepCombineArgs* args, size_t struct_size) {
  return guarded_call(__func__, [&] { init_struct(args, struct_size, combine_defaults(), "args"); });
}

DEEPEP_API deepepResult_t deepepDispatchNotify(deepepComm_t comm, const deepepDispatchArgs* args, deepepHandle_t handle,
                                               struct CUstream_st* stream) {
  return guarded_call(__func__, [&] {
    const deepepComm& c = *checked_comm(comm);
    DeviceGuard guard(c.device);  // first: the checks below call the runtime
    HighThroughputRefusal refused{c, deepepCallDispatchNotify, stream};
    RefusalOnThrow refusal(stream, [&] { refused(); });
    const deepepDispatchArgs a = checked_struct(args, "args", dispatch_defaults());
    refused.num_sms = a.num_sms;
    deepepHandle& h = *checked_handle(handle, &c);
    refused.handle = &h;
    require_intranode(c);
    require_not_capturing(stream, "deepepDispatchNotify", ": the host waits for the counts");
    check_capture_use(h, true, stream, "deepepDispatchNotify");
    require_no_recorded_fault(c, "deepepDispatchNotify");
    check_routing(c, a);
    prepare(c, h, a, stream);
    const uint64_t ticket = ++c.notify_tickets;
    launch_notify(c, h, a.expert_alignment, ticket, stream);
    refusal.launched();
    // Before the wait, which may throw while the notify still writes the handle's storage: a destroyed handle's
    // storage is reused only once its last use is done.
    note_use(h, stream);
    wait_for_notify(c, ticket, stream);
    h.routed = true;
    std::memcpy(&h.host_info, c.notify_host, sizeof(HandleHostInfo));
    h.recv_counts_on_host = true;
  });
}

DEEPEP_API deepepResult_t deepepDispatch(deepepComm_t comm, const deepepDispatchArgs* args, deepepHandle_t handle,
                                         struct CUstream_st* stream) {
  return guarded_call(__func__, [&] {
    const deepepComm& c = *checked_comm(comm);
    DeviceGuard guard(c.device);         // first: the checks below call the runtime
    const CaptureScope capture(stream);  // outputs may be allocations of the capture itself
    // A refused dispatch lets the peers finish either kind (refused_kernel): the kind is in the arguments checked.
    HighThroughputRefusal refused{c, deepepCallDispatch, stream};
    RefusalOnThrow refusal(stream, [&] { refused(); });
    // The handle first: its block count is the one the peers run a cached dispatch on, also when args cannot be read.
    deepepHandle& h = *checked_handle(handle, &c);
    refused.handle = &h;
    const deepepDispatchArgs a = checked_struct(args, "args", dispatch_defaults());
    const bool worst_case = a.num_worst_tokens > 0;
    refused.num_sms = a.num_sms;
    require_intranode(c);
    DEEPEP_REQUIRE(a.num_worst_tokens >= 0, "num_worst_tokens is %lld; it must be >= 0",
                   static_cast<long long>(a.num_worst_tokens));
    DEEPEP_REQUIRE(a.report_recv_counts == 0 || a.report_recv_counts == 1,
                   "report_recv_counts is %d; it must be 0 or 1", a.report_recv_counts);
    const bool report = a.report_recv_counts != 0;
    if (report) {
      DEEPEP_REQUIRE(worst_case, "report_recv_counts needs a worst-case dispatch (num_worst_tokens > 0)");
      require_not_capturing(stream, "a dispatch reporting its receive counts", ": the host waits for them");
      require_no_recorded_fault(c, "a dispatch reporting its receive counts");
    }
    check_capture_use(h, worst_case, stream,
                      report       ? "a bounded dispatch (report_recv_counts)"
                      : worst_case ? "a worst-case dispatch"
                                   : "a cached dispatch");
    if (!worst_case) {
      if (!h.routed)
        fail(deepepInvalidUsage,
             "the handle holds no routing: call deepepDispatchNotify first, or "
             "pass num_worst_tokens > 0 with the routing");
      DEEPEP_REQUIRE(a.num_tokens == h.num_tokens,
                     "num_tokens is %lld but the handle's routing is for %lld tokens (a cached dispatch needs the "
                     "same tokens)",
                     static_cast<long long>(a.num_tokens), static_cast<long long>(h.num_tokens));
    }
    // Payload.
    DEEPEP_REQUIRE(a.x_type == deepepBFloat16 || a.x_type == deepepFloat8E4M3,
                   "x_type is %d; x must be deepepBFloat16 or deepepFloat8E4M3", static_cast<int>(a.x_type));
    const bool fp8 = a.x_type == deepepFloat8E4M3;
    DEEPEP_REQUIRE(a.hidden > 0 && (fp8 ? a.hidden % 128 == 0 : a.hidden % 8 == 0) && a.hidden <= DEEPEP_MAX_HIDDEN,
                   "hidden is %d; it must be a positive multiple of %d for %s, at most %d", a.hidden, fp8 ? 128 : 8,
                   fp8 ? "FP8" : "BF16", DEEPEP_MAX_HIDDEN);
    const size_t element = fp8 ? 1 : 2;
    const int64_t x_stride = a.x_row_stride != 0 ? a.x_row_stride : a.hidden;
    DEEPEP_REQUIRE(x_stride >= a.hidden, "x_row_stride %lld is below hidden %d", static_cast<long long>(x_stride),
                   a.hidden);
    check_device_array(c, a.x, matrix_bytes(a.num_tokens, a.hidden, x_stride, element), element, "x");
    size_t scale_bytes = 0;
    if (fp8) {
      DEEPEP_REQUIRE(a.x_scales != nullptr || a.num_tokens == 0, "x_scales is NULL; FP8 payloads need scales");
      DEEPEP_REQUIRE(a.scales_type == deepepFloat32 || a.scales_type == deepepInt32,
                     "scales_type is %d; scales are deepepFloat32 or UE8M0-packed deepepInt32",
                     static_cast<int>(a.scales_type));
      const int expected = a.scales_type == deepepFloat32 ? a.hidden / 128 : (a.hidden / 128 + 3) / 4;
      DEEPEP_REQUIRE(a.num_scales == expected, "num_scales is %d; %s scales of hidden %d need %d per row", a.num_scales,
                     a.scales_type == deepepFloat32 ? "float32" : "UE8M0-packed", a.hidden, expected);
      const int64_t stride = a.scales_row_stride != 0 ? a.scales_row_stride : a.num_scales;
      DEEPEP_REQUIRE(stride >= a.num_scales, "scales_row_stride %lld is below num_scales %d",
                     static_cast<long long>(stride), a.num_scales);
      check_device_array(c, a.x_scales, matrix_bytes(a.num_tokens, a.num_scales, stride, 4), 4, "x_scales");
      scale_bytes = static_cast<size_t>(a.num_scales) * 4;
    } else {
      DEEPEP_REQUIRE(a.x_scales == nullptr, "x_scales is given but x is BF16 (scales are for FP8 payloads)");
    }
    // Top-k ids travel with the tokens when num_topk > 0, which every rank must say alike (the rows are laid out by
    // it); a rank with no tokens may pass NULL ids.
    DEEPEP_REQUIRE(a.num_topk >= 0, "num_topk is %d; it must be in [0, %d] (0: no ids travel with the tokens)",
                   a.num_topk, DEEPEP_MAX_TOPK);
    DEEPEP_REQUIRE(a.num_topk <= 0 || a.topk_idx != nullptr || a.num_tokens == 0,
                   "topk_idx is NULL but num_topk is %d: with num_topk > 0 the ids travel with the tokens (every rank "
                   "alike); set num_topk to 0 on every rank to send none",
                   a.num_topk);
    const bool has_topk = a.num_topk > 0;
    if (has_topk && !worst_case) {
      // Cached: the ids only travel with the tokens; the expert count is the handle's.
      deepepDispatchArgs ids = a;
      ids.num_experts = h.num_experts;
      ids.expert_alignment = 1;
      check_routing(c, ids);
    }
    if (a.topk_weights != nullptr) {
      DEEPEP_REQUIRE(a.num_topk > 0,
                     "topk_weights are given but num_topk is %d; it must be in [1, %d] (the columns of topk_idx and "
                     "topk_weights)",
                     a.num_topk, DEEPEP_MAX_TOPK);
      const int64_t stride = a.weights_row_stride != 0 ? a.weights_row_stride : a.num_topk;
      DEEPEP_REQUIRE(stride >= a.num_topk, "weights_row_stride is below num_topk");
      check_device_array(c, a.topk_weights, matrix_bytes(a.num_tokens, a.num_topk, stride, 4), 4, "topk_weights");
    }
    const int num_topk = has_topk ? a.num_topk : 0;
    if (worst_case) check_routing(c, a);  // before the buffer's capacity: num_tokens above the config is said so
    const DispatchRowLayout layout = dispatch_row_layout(element * a.hidden, scale_bytes, num_topk);
    const int64_t capacity = region_capacity_rows(c, layout.row_bytes);
    if (a.num_tokens > capacity) {
      fail(deepepBufferTooSmall,
           "%lld tokens of %zu-byte rows need %zu bytes of communication buffer per rank on %d ranks; this "
           "communicator has %zu (raise buffer_bytes or the workload in the config)",
           static_cast<long long>(a.num_tokens), layout.row_bytes,
           buffer_bytes_for_regions(c.nranks, static_cast<size_t>(a.num_tokens) * layout.row_bytes), c.nranks,
           c.buffer_bytes);
    }
    // Outputs.
    const int64_t rows = worst_case ? a.num_worst_tokens : a.num_recv_rows;
    DEEPEP_REQUIRE(rows >= 0, "num_recv_rows is %lld; it must be >= 0 (deepepHandleGetNumRecvTokens)",
                   static_cast<long long>(rows));
    if (!worst_case && h.recv_counts_on_host) {
      DEEPEP_REQUIRE(rows >= h.host_info.num_recv_tokens,
                     "the outputs hold %lld rows but %lld arrive (deepepHandleGetNumRecvTokens)",
                     static_cast<long long>(rows), static_cast<long long>(h.host_info.num_recv_tokens));
    }
    if (c.dispatch_area_bytes != 0) {
      // Zero-copy: the peers write the rows into the area, whose size is known here.
      const void* area = c.dispatch_area();
      DEEPEP_REQUIRE(a.recv_x == area,
                     "recv_x is %p; on a communicator with zero_copy_dispatch it must be the dispatch area's start, %p "
                     "(deepepCommGetDispatchArea)",
                     a.recv_x, area);
      const int64_t area_rows = dispatch_area_layout(c, layout).rows;
      if (rows > area_rows) {
        fail(deepepBufferTooSmall,
             "%lld rows of %d %s elements do not fit in the zero-copy dispatch area (%zu bytes: %lld such rows); "
             "raise max_tokens_per_rank, hidden or num_topk in the config, or ask for fewer rows",
             static_cast<long long>(rows), a.hidden, fp8 ? "FP8" : "BF16", c.dispatch_area_bytes,
             static_cast<long long>(area_rows));
      }
    } else {
      check_device_array(c, a.recv_x, matrix_bytes(rows, a.hidden, a.hidden, element), element, "recv_x");
    }
    if (fp8) check_device_array(c, a.recv_scales, matrix_bytes(rows, scale_bytes, scale_bytes, 1), 4, "recv_scales");
    DEEPEP_REQUIRE(fp8 || a.recv_scales == nullptr, "recv_scales is given but x is BF16");
    if (a.recv_topk_idx != nullptr || a.recv_topk_weights != nullptr) {
      DEEPEP_REQUIRE(a.num_topk > 0,
                     "recv_topk_idx / recv_topk_weights are given but num_topk is %d; it must be in "
                     "[1, %d] (the columns of topk_idx)",
                     a.num_topk, DEEPEP_MAX_TOPK);
    }
    // Optional outputs are checked when given.
    if (a.recv_topk_idx != nullptr)
      check_device_array(c, a.recv_topk_idx, matrix_bytes(rows, num_topk, num_topk, 8), 8, "recv_topk_idx");
    if (a.recv_topk_weights != nullptr)
      check_device_array(c, a.recv_topk_weights, matrix_bytes(rows, num_topk, num_topk, 4), 4, "recv_topk_weights");
    if (a.recv_src_idx != nullptr)
      check_device_array(c, a.recv_src_idx, matrix_bytes(rows, 1, 1, 4), 4, "recv_src_idx");
    // Every check before the routing is prepared: a refusal after it would leave the handle without the routing it
    // held.
    const int num_experts = worst_case ? a.num_experts : h.num_experts;
    DEEPEP_REQUIRE(a.num_recv_tokens_per_expert == nullptr || num_experts > 0, "no routing for expert counts");
    if (a.num_recv_tokens_per_expert != nullptr)
      check_device_array(c, a.num_recv_tokens_per_expert, static_cast<size_t>(num_experts / c.nranks) * 4, 4,
                         "num_recv_tokens_per_expert");
    if (worst_case) prepare(c, h, a, stream);
    const uint64_t ticket = report ? ++c.report_tickets : 0;
    deepepDispatchArgs launch = a;
    launch.num_recv_rows = rows;
    launch.num_topk = num_topk;
    launch_dispatch(c, h, launch, layout, worst_case, ticket, stream);
    refusal.launched();
    if (report) {
      h.report_ticket = ticket;
      h.report_rows = rows;
    }
    if (worst_case) h.routed = true;  // its kernel fills the receive counts
    h.dispatched = true;
    note_use(h, stream);
  });
}

DEEPEP_API deepepResult_t deepepHandleWaitRecvCounts(deepepHandle_t handle) {
  return guarded_call(__func__, [&] {
    deepepHandle& h = *checked_handle(handle, nullptr);
    // The counts are in the communicator's host slot, freed with it.
    if (!is_live_comm(h.comm)) {
      fail(deepepInvalidUsage,
           "the handle's communicator was destroyed: the receive counts of its dispatch are gone (dispatch again on "
           "a live communicator, with a handle of its own)");
    }
    if (h.report_ticket == 0) {
      fail(deepepInvalidUsage,
           "no receive counts to wait for: the handle's routing is not from a dispatch with report_recv_counts, or "
           "its counts were collected (or a wait for them failed) already");
    }
    // Whatever the outcome, the report is consumed: a second wait for it is refused rather than repeated.
    struct Consume {
      deepepHandle& handle;
      ~Consume() { handle.report_ticket = 0; }
    } consume{h};
    const deepepComm& c = *checked_comm(h.comm);
    DeviceGuard guard(c.device);
    auto* slot = static_cast<HandleHostInfo*>(c.report_host);
    auto ticket_now = [&] { return __atomic_load_n(&slot->ticket, __ATOMIC_ACQUIRE); };
    auto overwritten = [&] {
      fail(deepepInvalidUsage,
           "the receive counts of the handle's dispatch were overwritten by another dispatch reporting counts on "
           "the communicator: collect them with deepepHandleWaitRecvCounts before the next such dispatch");
    };
    // Done when the ticket is there. The kernel having ended without it found a fault (it gave up before it had the
    // counts, or its routing skipped ids out of range), which it recorded, or another report overwrote it. A fault
    // recorded elsewhere meanwhile (earlier work, this dispatch's rows) is not this call's to report.
    spin_bounded(c, "the dispatch's count exchange", [&] {
      if (ticket_now() == h.report_ticket) return true;
      if (!event_done(h.last_use, "cudaEventQuery(the handle's last use)")) return false;
      if (ticket_now() != h.report_ticket) {
        raise_async_error(c);
        overwritten();
      }
      return true;
    });
    HandleHostInfo info;
    std::memcpy(&info, slot, sizeof(info));
    std::atomic_thread_fence(std::memory_order_acquire);
    if (ticket_now() != h.report_ticket) overwritten();  // another dispatch's kernel began to write meanwhile
    if (info.num_recv_tokens > h.report_rows) {
      fail(deepepBufferTooSmall, "%lld rows arrive but the outputs hold %lld (num_worst_tokens)",
           static_cast<long long>(info.num_recv_tokens), static_cast<long long>(h.report_rows));
    }
    h.host_info = info;
    h.recv_counts_on_host = true;
  });
}

DEEPEP_API deepepResult_t deepepCombine(deepepComm_t comm, const deepepCombineArgs* args, deepepHandle_t handle,
                                        struct CUstream_st* stream) {
  return guarded_call(__func__, [&] {
    const deepepComm& c = *checked_comm(comm);
    DeviceGuard guard(c.device);         // first: the checks below call the runtime
    const CaptureScope capture(stream);  // outputs may be allocations of the capture itself
    HighThroughputRefusal refused{c, deepepCallCombine, stream};
    RefusalOnThrow refusal(stream, [&] { refused(); });
    // The handle first: its block count is the one the peers run on, also when args cannot be read.
    deepepHandle& h = *checked_handle(handle, &c);
    refused.handle = &h;
    const deepepCombineArgs a = checked_struct(args, "args", combine_defaults());
    require_intranode(c);
    check_capture_use(h, false, stream, "deepepCombine");
    if (!h.routed) fail(deepepInvalidUsage, "the handle holds no routing: dispatch with it first");
    // The receive ranges combine reads are the dispatch kernel's: after a notify alone they would be those of the
    // handle's previous routing, and the sums silently wrong.
    if (!h.dispatched)
      fail(deepepInvalidUsage,
           "the handle's routing was never dispatched (a notify without a dispatch after it): "
           "dispatch with it before combining");
    DEEPEP_REQUIRE(a.hidden > 0 && a.hidden % 8 == 0 && a.hidden <= DEEPEP_MAX_HIDDEN,
                   "hidden is %d; it must be a positive multiple of 8, at most %d", a.hidden, DEEPEP_MAX_HIDDEN);
    DEEPEP_REQUIRE(a.num_rows >= 0, "num_rows is %lld", static_cast<long long>(a.num_rows));
    if (h.recv_counts_on_host) {
      DEEPEP_REQUIRE(a.num_rows >= h.host_info.num_recv_tokens,
                     "x has %lld rows but the handle's dispatch delivered %lld", static_cast<long long>(a.num_rows),
                     static_cast<long long>(h.host_info.num_recv_tokens));
    }
    const int64_t stride = a.x_row_stride != 0 ? a.x_row_stride : a.hidden;
    DEEPEP_REQUIRE(stride >= a.hidden && stride % 8 == 0,
                   "x_row_stride is %lld; rows must be >= hidden and start on 16-byte boundaries",
                   static_cast<long long>(stride));
    check_device_array(c, a.x, matrix_bytes(a.num_rows, a.hidden, stride, 2), 16, "x");
    if (a.topk_weights != nullptr || a.num_topk != 0) {
      DEEPEP_REQUIRE(a.num_topk >= 1 && a.num_topk <= DEEPEP_MAX_TOPK, "num_topk is %d; it must be in [1, %d]",
                     a.num_topk, DEEPEP_MAX_TOPK);
      const int64_t wstride = a.weights_row_stride != 0 ? a.weights_row_stride : a.num_topk;
      DEEPEP_REQUIRE(wstride >= a.num_topk, "weights_row_stride is below num_topk");
      check_device_array(c, a.topk_weights, matrix_bytes(a.num_rows, a.num_topk, wstride, 4), 4, "topk_weights");
      DEEPEP_REQUIRE(a.out_topk_weights != nullptr || h.num_tokens == 0,
                     "out_topk_weights is NULL but topk_weights are given");
      check_device_array(c, a.out_topk_weights, static_cast<size_t>(h.num_tokens) * a.num_topk * 4, 4,
                         "out_topk_weights");
    }
    for (int i = 0; i < 2; ++i) {
      if (a.bias[i] == nullptr) continue;
      const int64_t bstride = a.bias_row_stride[i] != 0 ? a.bias_row_stride[i] : a.hidden;
      DEEPEP_REQUIRE(bstride >= a.hidden && bstride % 8 == 0,
                     "bias %d row stride %lld: rows must be >= hidden and start on 16-byte boundaries", i,
                     static_cast<long long>(bstride));
      check_device_array(c, a.bias[i], matrix_bytes(h.num_tokens, a.hidden, bstride, 2), 16,
                         i == 0 ? "bias[0]" : "bias[1]");
    }
    check_device_array(c, a.out, static_cast<size_t>(h.num_tokens) * a.hidden * 2, 16, "out");
    // A rank with no rows may pass NULL weights and still declares num_topk: every rank lays out rows alike.
    const bool has_weights = a.num_topk > 0 && (a.topk_weights != nullptr || a.num_rows == 0);
    const size_t row_bytes = combine_row_bytes(a.hidden, has_weights ? a.num_topk : 0);
    if (h.num_tokens > region_capacity_rows(c, row_bytes)) {
      fail(deepepBufferTooSmall, "combine rows of %zu bytes for %lld tokens do not fit this communicator's buffer",
           row_bytes, static_cast<long long>(h.num_tokens));
    }
    deepepCombineArgs launch = a;
    launch.num_topk = has_weights ? a.num_topk : 0;
    launch_combine(c, h, launch, stream);
    refusal.launched();
    note_use(h, stream);
  });
}

DEEPEP_API deepepResult_t deepepRefuseCall(deepepComm_t comm, deepepCall_t call, deepepHandle_t handle, int num_sms,
                                           struct CUstream_st* stream) {
  return guarded_call(__func__, [&] {
    const deepepComm& c = *checked_comm(comm);
    DeviceGuard guard(c.device);  // first: the checks below call the runtime
    DEEPEP_REQUIRE(call == deepepCallDispatchNotify || call == deepepCallDispatch ||
                       call == deepepCallWorstCaseDispatch || call == deepepCallCombine,
                   "call is %d; it must be a deepepCall_t", static_cast<int>(call));
    deepepHandle* h = handle != nullptr ? checked_handle(handle, &c) : nullptr;
    require_intranode(c);
    require_not_capturing(stream, "a refusal");
    launch_refusal(c, h, call, num_sms, stream);
  });
}

DEEPEP_API deepepResult_t deepepCommMeasurePushBandwidth(deepepComm_t comm, int num_sms, size_t bytes, int iterations,
                                                         double* gb_per_s, struct CUstream_st* stream) {
  return guarded_call(__func__, [&] {
    DEEPEP_REQUIRE(gb_per_s != nullptr, "gb_per_s is NULL");
    const deepepComm& c = *checked_comm(comm);
    DeviceGuard guard(c.device);  // first: the checks below call the runtime
    DEEPEP_REQUIRE(iterations >= 1 && iterations <= 10000, "iterations is %d; it must be in [1, 10000]", iterations);
    DEEPEP_REQUIRE(bytes >= 16, "bytes is %zu; at least 16 are needed", bytes);
    DEEPEP_REQUIRE(c.peer_buffers[(c.rank + 1) % c.nranks] != nullptr, "the next rank is not reachable over NVLink");
    const int blocks = resolve_num_sms(c, num_sms);
    *gb_per_s = measure_push_bandwidth(c, blocks, bytes, iterations, stream);
  });
}

}  // extern "C"
