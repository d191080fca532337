#include <dirent.h>
#include <fcntl.h>
#include <nvshmem.h>
#include <nvshmemx.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "bounded.hpp"
#include "comm.hpp"
#include "cuda_utils.hpp"
#include "device_utils.cuh"
#include "error.hpp"
#include "handle.hpp"
#include "validation.hpp"

namespace deepep {

namespace {

static_assert(sizeof(nvshmemx_uniqueid_t) == DEEPEP_UNIQUE_ID_BYTES, "deepepUniqueId must hold NVSHMEM's id");

// Live communicators: lets every entry point reject freed or foreign handles without touching their memory.
std::mutex registry_mutex;
std::set<deepepComm*> live_comms;
// Destroyed communicators' memory, never freed, so that a new one never gets the address of an old one: a stale
// handle (a second deepepCommDestroy, say) is then refused instead of acting on the new communicator.
std::vector<std::unique_ptr<deepepComm>> retired_comms;

// NVSHMEM is a per-process runtime, set up by one communicator at a time; under registry_mutex. Once it has started
// it is unusable for the rest of the process: a teardown that finished leaves it finalised (NVSHMEM documents an
// initialisation after nvshmem_finalize as undefined), and a setup or teardown that did not finish (a timeout, a lost
// peer, a failure that left NVSHMEM initialised) may still be running. `nvshmem_unusable` then says why, and the next
// deepepCommInitRank says so instead of initialising NVSHMEM a second time.
bool nvshmem_in_use = false;  // a communicator holds it, or is being created or destroyed
const char* nvshmem_unusable = nullptr;

// Ends a creation's or a destruction's hold on NVSHMEM: free for the next communicator, or (`unusable`: why) never
// again in this process.
struct NvshmemHold {
  const char* unusable = nullptr;
  bool kept = false;  // a communicator was made: it holds NVSHMEM on
  ~NvshmemHold() {
    if (kept) return;
    std::lock_guard<std::mutex> lock(registry_mutex);
    nvshmem_in_use = false;
    if (unusable != nullptr && nvshmem_unusable == nullptr) nvshmem_unusable = unusable;
  }
};
constexpr const char* kSetupUnfinished =
    "an earlier deepepCommInitRank's NVSHMEM setup did not finish (it failed or timed out with NVSHMEM started)";
constexpr const char* kFinalized =
    "NVSHMEM was finalised by an earlier communicator's teardown (a destroyed communicator, or a setup undone after "
    "NVSHMEM started), and NVSHMEM documents initialising it again as undefined";
constexpr const char* kTeardownSkipped =
    "an earlier communicator's NVSHMEM teardown did not run or finish (a peer lost or late, a stream error, or a "
    "timeout)";

// What each rank publishes at setup so that ranks can check they agree before any collective relies on it.
// Fields are only ever appended (see kHelloBytes).
struct RankHello {
  int64_t rank;
  int64_t nranks;
  int64_t buffer_bytes;  // the whole allocation
  int64_t version;
  int64_t sm_count;
  // Where the buffer's areas lie and how they are cut: peers write into each other's buffers by this layout, and two
  // configs can give the same total size with different layouts.
  int64_t ht_bytes;  // the high-throughput part, whose per-rank receive regions it sizes
  int64_t ll_offset;
  int64_t ll_max_tokens;
  int64_t ll_max_hidden;
  int64_t ll_max_topk;
  int64_t ll_max_local_experts;
  int64_t dispatch_area_offset;
  // Bounds and choices the header says every rank must share, though the buffer's size and layout may not show them:
  // a receiver sizes its checks (the int32 row counts, a worst-case dispatch's bound) by its own
  // max_tokens_per_rank, and a low-latency receiver waits for the signals of the transport it chose itself.
  int64_t max_tokens_per_rank;
  int64_t ll_transport;
};

// Of two hellos of one library version (which the caller compares first).
bool same_setup(const RankHello& a, const RankHello& b) {
  return a.nranks == b.nranks && a.buffer_bytes == b.buffer_bytes && a.ht_bytes == b.ht_bytes &&
         a.ll_offset == b.ll_offset && a.ll_max_tokens == b.ll_max_tokens && a.ll_max_hidden == b.ll_max_hidden &&
         a.ll_max_topk == b.ll_max_topk && a.ll_max_local_experts == b.ll_max_local_experts &&
         a.dispatch_area_offset == b.dispatch_area_offset && a.max_tokens_per_rank == b.max_tokens_per_rank &&
         a.ll_transport == b.ll_transport;
}

std::string describe_setup(const RankHello& h) {
  return "buffer_bytes " + std::to_string(h.buffer_bytes) + " (high-throughput part " + std::to_string(h.ht_bytes) +
         "), max_tokens_per_rank " + std::to_string(h.max_tokens_per_rank) + ", low-latency area at " +
         std::to_string(h.ll_offset) + " for " + std::to_string(h.ll_max_tokens) + " tokens, hidden " +
         std::to_string(h.ll_max_hidden) + ", top-k " + std::to_string(h.ll_max_topk) + ", " +
         std::to_string(h.ll_max_local_experts) + " local experts, low-latency transport " +
         (h.ll_transport == DEEPEP_LL_TRANSPORT_NVSHMEM ? "nvshmem" : "auto") + ", zero-copy dispatch area at " +
         std::to_string(h.dispatch_area_offset) + " and " + std::to_string(h.nranks) + " ranks";
}

// The hello's allocation: fixed, so that a hello that grows does not make ranks of two builds pass different sizes
// to the collective nvshmem_malloc. A hello whose fields change must come with a new DEEPEP_VERSION, which the ranks
// compare: the other fields are read by offset. (Builds from before this fixed size, which allocated the struct's own
// size, cannot be mixed with later ones at all.)
constexpr size_t kHelloBytes = 256;
static_assert(sizeof(RankHello) <= kHelloBytes, "RankHello outgrew its allocation");

}  // namespace

deepepConfig resolve_config(const deepepConfig* config) {
  const deepepConfig defaults = DEEPEP_CONFIG_INIT;
  if (config == nullptr) return defaults;
  const deepepConfig resolved = checked_struct(config, "config", defaults);
  DEEPEP_REQUIRE(resolved.device >= -1, "config->device is %d; use a device ordinal or -1 for the current device",
                 resolved.device);
  DEEPEP_REQUIRE(resolved.allow_nvlink_multicast == 0 || resolved.allow_nvlink_multicast == 1,
                 "config->allow_nvlink_multicast is %d; it must be 0 or 1", resolved.allow_nvlink_multicast);
  DEEPEP_REQUIRE(resolved.timeout_seconds > 0 && resolved.timeout_seconds <= 86400.0,
                 "config->timeout_seconds is %g; it must be in (0, 86400]", resolved.timeout_seconds);
  DEEPEP_REQUIRE(resolved.low_latency_max_tokens >= 0 && resolved.low_latency_max_tokens <= DEEPEP_LL_MAX_TOKENS,
                 "config->low_latency_max_tokens is %d; it must be in [0, %d] (0: no low-latency area)",
                 resolved.low_latency_max_tokens, DEEPEP_LL_MAX_TOKENS);
  DEEPEP_REQUIRE(resolved.low_latency_transport == DEEPEP_LL_TRANSPORT_AUTO ||
                     resolved.low_latency_transport == DEEPEP_LL_TRANSPORT_NVSHMEM,
                 "config->low_latency_transport is %d; it must be DEEPEP_LL_TRANSPORT_AUTO (0) or "
                 "DEEPEP_LL_TRANSPORT_NVSHMEM (1)",
                 resolved.low_latency_transport);
  // It bounds every dispatch and sizes every handle, whatever sizes the buffer.
  DEEPEP_REQUIRE(resolved.max_tokens_per_rank > 0, "config->max_tokens_per_rank is %d; it must be positive",
                 resolved.max_tokens_per_rank);
  DEEPEP_REQUIRE(resolved.zero_copy_dispatch == 0 || resolved.zero_copy_dispatch == 1,
                 "config->zero_copy_dispatch is %d; it must be 0 or 1", resolved.zero_copy_dispatch);
  if (resolved.buffer_bytes == 0 || resolved.low_latency_max_tokens > 0 || resolved.zero_copy_dispatch) {
    DEEPEP_REQUIRE(resolved.hidden > 0 && resolved.hidden % 8 == 0 && resolved.hidden <= DEEPEP_MAX_HIDDEN,
                   "config->hidden is %d; it must be a positive multiple of 8 (16-byte BF16 rows), at most %d",
                   resolved.hidden, DEEPEP_MAX_HIDDEN);
    DEEPEP_REQUIRE(resolved.num_topk >= 1 && resolved.num_topk <= DEEPEP_MAX_TOPK,
                   "config->num_topk is %d; it must be in [1, %d]", resolved.num_topk, DEEPEP_MAX_TOPK);
    DEEPEP_REQUIRE(resolved.num_experts >= 1, "config->num_experts is %d; it must be positive", resolved.num_experts);
  }
  DEEPEP_REQUIRE(resolved.low_latency_max_tokens == 0 || resolved.hidden <= DEEPEP_LL_MAX_HIDDEN,
                 "config->hidden is %d; with a low-latency area (low_latency_max_tokens %d) it must be at most %d",
                 resolved.hidden, resolved.low_latency_max_tokens, DEEPEP_LL_MAX_HIDDEN);
  return resolved;
}

size_t buffer_size_for(const deepepConfig& config, int nranks) {
  // Every dispatch's routing counts rows in int32 (check_routing): a communicator no routing could use is refused here.
  const int64_t most_tokens = static_cast<int64_t>(nranks) * config.max_tokens_per_rank;
  DEEPEP_REQUIRE(most_tokens <= INT32_MAX,
                 "nranks * config->max_tokens_per_rank = %lld; it must be at most %d (each dispatch counts its rows "
                 "in int32): lower max_tokens_per_rank",
                 static_cast<long long>(most_tokens), INT32_MAX);
  if (config.buffer_bytes != 0) {
    // The control region plus room for at least a few rows from every rank.
    const size_t minimum = kControlBytes + static_cast<size_t>(nranks) * kMinRegionBytes;
    DEEPEP_REQUIRE(config.buffer_bytes >= minimum,
                   "config->buffer_bytes is %zu; at least %zu are needed on %d ranks (1 MiB of control words plus "
                   "%zu bytes per rank)",
                   config.buffer_bytes, minimum, nranks, kMinRegionBytes);
    DEEPEP_REQUIRE(config.buffer_bytes <= kMaxDeviceBytes,
                   "config->buffer_bytes is %zu; more than any GPU holds (at most %zu)", config.buffer_bytes,
                   kMaxDeviceBytes);
    return config.buffer_bytes;
  }
  const long double total =
      static_cast<long double>(kControlBytes) +
      static_cast<long double>(nranks) *
          (static_cast<long double>(config.max_tokens_per_rank) * workload_row_bytes(config) + kRegionAlignment);
  if (total > static_cast<long double>(kMaxDeviceBytes)) {
    fail(deepepInvalidArgument,
         "the workload (max_tokens_per_rank %d, hidden %d, num_topk %d, %d ranks) needs %.3Le bytes of buffer per "
         "rank, more than any GPU holds",
         config.max_tokens_per_rank, config.hidden, config.num_topk, nranks, total);
  }
  return buffer_bytes_for_regions(nranks, static_cast<size_t>(config.max_tokens_per_rank) * workload_row_bytes(config));
}

// The largest dispatch row of the workload: its BF16 payload (the larger of the two payload forms), FP8 scales,
// top-k ids and weights, and its source index, rounded up as the rows themselves are, so that it stays at least
// their size.
size_t workload_row_bytes(const deepepConfig& config) {
  const size_t hidden = static_cast<size_t>(config.hidden);
  return align_up(align_up(hidden * 2, 16) + align_up((hidden + 127) / 128 * 4, 16) +
                      align_up(static_cast<size_t>(config.num_topk) * (8 + 4), 16) + 16,
                  kRowAlignment);
}

// Each region a whole number of kRegionAlignment, so that none loses part of a row to the rounding down of
// region_bytes_of (intranode.cu).
size_t buffer_bytes_for_regions(int nranks, size_t region_bytes) {
  return kControlBytes + static_cast<size_t>(nranks) * align_up(region_bytes, kRegionAlignment);
}

size_t low_latency_offset(size_t ht_bytes) { return align_up(ht_bytes, 4096); }

size_t dispatch_area_bytes(const deepepConfig& config, int nranks) {
  if (!config.zero_copy_dispatch) return 0;
  // Every rank's every token, in the largest row the workload has; the slack keeps the side rows' start aligned.
  const long double bytes = static_cast<long double>(nranks) * config.max_tokens_per_rank * workload_row_bytes(config);
  if (bytes > static_cast<long double>(kMaxDeviceBytes)) {
    fail(deepepInvalidArgument,
         "the zero-copy dispatch area of the workload (max_tokens_per_rank %d, hidden %d, %d ranks) needs %.3Le "
         "bytes per rank, more than any GPU holds",
         config.max_tokens_per_rank, config.hidden, nranks, bytes);
  }
  return static_cast<size_t>(bytes) + kDispatchAreaSlack;
}

// The high-throughput part and the low-latency area: everything ahead of the dispatch area.
static size_t bytes_before_dispatch_area(const deepepConfig& config, int nranks) {
  const size_t ht = buffer_size_for(config, nranks);
  const LowLatencyArea area = low_latency_area(config, nranks);
  return area.total_bytes == 0 ? ht : low_latency_offset(ht) + area.total_bytes;
}

size_t dispatch_area_offset(const deepepConfig& config, int nranks) {
  return align_up(bytes_before_dispatch_area(config, nranks), 4096);
}

size_t total_buffer_size(const deepepConfig& config, int nranks) {
  const size_t dispatch_area = dispatch_area_bytes(config, nranks);
  return dispatch_area == 0 ? bytes_before_dispatch_area(config, nranks)
                            : dispatch_area_offset(config, nranks) + dispatch_area;
}

// NVSHMEM reads its environment once, at the process's first NVSHMEM call: in the process that makes the id, that is
// here, before any communicator's config is known. The settings that do not depend on one go in first.
static void set_process_nvshmem_defaults() {
  // Where every peer is reached over NVLink, NVSHMEM's proxy thread serves only device-side global exit and device
  // wait timeouts, which nothing here uses, and polls a CPU core all the while. A rank bound to one core shares it
  // with that thread: the host's waits then take milliseconds. Off unless the caller says otherwise; NVSHMEM keeps the
  // proxy where a remote transport needs it.
  setenv("NVSHMEM_DISABLE_LOCAL_ONLY_PROXY", "1", 0);
}

// The IPv4 and IPv6 sockets open in this process, as (descriptor, inode) pairs (empty where /proc/self/fd cannot be
// read). The inode tells a socket apart from an earlier one whose descriptor number it took over: another thread (the
// bootstrap root's, in the process that made the id) may close a socket while NVSHMEM opens others.
static std::set<std::pair<int, ino_t>> open_network_sockets() {
  std::set<std::pair<int, ino_t>> sockets;
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return sockets;
  const int own = dirfd(dir);
  while (const dirent* entry = readdir(dir)) {
    char* end = nullptr;
    const int fd = static_cast<int>(std::strtol(entry->d_name, &end, 10));
    struct stat info;
    int domain = 0;
    socklen_t length = sizeof(domain);
    if (end != entry->d_name && *end == '\0' && fd != own && fstat(fd, &info) == 0 && S_ISSOCK(info.st_mode) &&
        getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &length) == 0 && (domain == AF_INET || domain == AF_INET6))
      sockets.emplace(fd, info.st_ino);
  }
  closedir(dir);
  return sockets;
}

// NVSHMEM opens its bootstrap's TCP sockets (the root's listening socket, the connections between the ranks) without
// close-on-exec: a program this process starts (a shell command, a launcher, a compiler) would inherit them and keep
// them open after this process ends, so a peer would not see the connection close. The IPv4 and IPv6 sockets opened
// since `before` get close-on-exec (another thread's opened meanwhile would too, which only a program exec'd to
// inherit it would notice); local sockets (the driver's, MPS's, NVSHMEM's passing of memory handles) are left alone.
static void mark_new_sockets_close_on_exec(const std::set<std::pair<int, ino_t>>& before) {
  for (const auto& [fd, inode] : open_network_sockets()) {
    if (before.count({fd, inode}) != 0) continue;
    const int flags = fcntl(fd, F_GETFD);
    if (flags >= 0) fcntl(fd, F_SETFD, flags | FD_CLOEXEC);
  }
}

void get_unique_id(deepepUniqueId* id) {
  // NVLink multicast stays off here too (see create_comm): a config asking for it comes too late in this process.
  setenv("NVSHMEM_DISABLE_NVLS", "1", 0);
  set_process_nvshmem_defaults();
  nvshmemx_uniqueid_t nvshmem_id = NVSHMEMX_UNIQUEID_INITIALIZER;
  const auto before = open_network_sockets();
  const int status = nvshmemx_get_uniqueid(&nvshmem_id);
  mark_new_sockets_close_on_exec(before);  // the bootstrap root's listening socket
  if (status != 0) fail(deepepNvshmemError, "nvshmemx_get_uniqueid failed with status %d", status);
  std::memcpy(id->internal, &nvshmem_id, sizeof(nvshmem_id));
}

// What the setup thread hands back. Shared with that thread, which may outlive a timed-out caller.
struct SetupRequest {
  int rank = 0;
  int nranks = 0;
  int device = 0;
  int sm_count = 0;             // of this rank's device
  size_t buffer_bytes = 0;      // the whole allocation
  size_t ht_bytes = 0;          // its high-throughput part
  size_t ll_offset = 0;         // start of the low-latency area (0: none)
  size_t ll_control_bytes = 0;  // its control words, zeroed before any peer can write them
  LowLatencyArea ll_area;       // its layout
  size_t dispatch_area_offset = 0;
  int max_tokens_per_rank = 0;
  int ll_transport = DEEPEP_LL_TRANSPORT_AUTO;
  deepepUniqueId id = {};
  // What a failed setup leaves NVSHMEM in. The setup thread moves kNotStarted -> kStarted just before initialising
  // NVSHMEM (and gives up if it cannot: the caller abandoned it after a timeout), and to kFinalized once a collective
  // nvshmem_finalize undid that; the caller's failure path moves kNotStarted -> kAbandoned. So "never started" is
  // certain when the caller's move succeeds, and a thread still running after a timeout never starts NVSHMEM later.
  enum NvshmemProgress : int { kNotStarted, kStarted, kFinalized, kAbandoned };
  std::atomic<int> nvshmem{kNotStarted};
  // Results:
  void* buffer = nullptr;
  std::vector<void*> peer_buffers;
  int min_sm_count = 0;  // the smallest SM count among the ranks
};

// Collective over all ranks: every rank's `mine`, by rank, through a symmetric allocation of `bytes` (at least
// sizeof(T); the same on every rank, as nvshmem_malloc requires).
template <class T>
static std::vector<T> gather_from_every_rank(const T& mine, size_t bytes) {
  auto* slot = static_cast<T*>(nvshmem_malloc(bytes));
  if (slot == nullptr) fail(deepepNvshmemError, "nvshmem_malloc of %zu bytes failed", bytes);
  DEEPEP_CUDA_CHECK(cudaMemcpy(slot, &mine, sizeof(T), cudaMemcpyHostToDevice));
  nvshmem_barrier_all();
  std::vector<T> all(nvshmem_n_pes());
  for (int peer = 0; peer < nvshmem_n_pes(); ++peer) nvshmem_getmem(&all[peer], slot, sizeof(T), peer);
  nvshmem_barrier_all();  // every rank has read every slot before the slots are freed
  nvshmem_free(slot);
  return all;
}

// Everything NVSHMEM does at setup; runs on a helper thread under the timeout (see run_bounded).
static void nvshmem_setup(SetupRequest* comm) {
  const deepepUniqueId& id = comm->id;
  DEEPEP_CUDA_CHECK(cudaSetDevice(comm->device));

  nvshmemx_uniqueid_t nvshmem_id;
  std::memcpy(&nvshmem_id, id.internal, sizeof(nvshmem_id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  int status = nvshmemx_set_attr_uniqueid_args(comm->rank, comm->nranks, &nvshmem_id, &attr);
  if (status != 0) fail(deepepNvshmemError, "nvshmemx_set_attr_uniqueid_args failed with status %d", status);
  // Another user of NVSHMEM in the process (a second copy of this library, another communication library) may have
  // initialised it: initialising it again is undefined, and this library's teardown would finalise it under them.
  const int found = nvshmemx_init_status();
  if (found == NVSHMEM_STATUS_IS_INITIALIZED || found == NVSHMEM_STATUS_LIMITED_MPG ||
      found == NVSHMEM_STATUS_FULL_MPG) {
    fail(deepepInvalidUsage,
         "NVSHMEM is already initialised in this process by another user of it (another library, or another copy "
         "of this one); a communicator needs NVSHMEM to itself");
  }
  int not_started = SetupRequest::kNotStarted;
  if (!comm->nvshmem.compare_exchange_strong(not_started, SetupRequest::kStarted))
    fail(deepepTimeout, "NVSHMEM setup abandoned by its deepepCommInitRank (timeout) before it started");
  // nvshmemx_init_attr() would exit the process on failure; call the initialiser it wraps and report instead.
  int provided = 0;
  nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                NVSHMEM_VENDOR_PATCH_VERSION};
  const auto before = open_network_sockets();
  status = nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, NVSHMEMX_INIT_WITH_UNIQUEID, &attr, version);
  mark_new_sockets_close_on_exec(before);  // the bootstrap's connections between the ranks
  if (status != 0)
    fail(deepepNvshmemError,
         "NVSHMEM initialisation failed with status %d (rank %d of %d); one cause is an NVSHMEM host library of "
         "another version than the %d.%d.%d this library was built against (pip show nvidia-nvshmem-cu13)",
         status, comm->rank, comm->nranks, NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
         NVSHMEM_VENDOR_PATCH_VERSION);
  if (nvshmem_n_pes() != comm->nranks || nvshmem_my_pe() != comm->rank) {
    fail(deepepInvalidArgument, "NVSHMEM placed this process as PE %d of %d, but the caller said rank %d of %d",
         nvshmem_my_pe(), nvshmem_n_pes(), comm->rank, comm->nranks);
  }

  // Agree on the buffer size before allocating it: nvshmem_malloc requires the same size on every PE.
  const RankHello mine = {comm->rank,
                          comm->nranks,
                          static_cast<int64_t>(comm->buffer_bytes),
                          DEEPEP_VERSION,
                          comm->sm_count,
                          static_cast<int64_t>(comm->ht_bytes),
                          static_cast<int64_t>(comm->ll_offset),
                          comm->ll_area.max_tokens,
                          comm->ll_area.max_hidden,
                          comm->ll_area.max_topk,
                          comm->ll_area.max_local_experts,
                          static_cast<int64_t>(comm->dispatch_area_offset),
                          comm->max_tokens_per_rank,
                          comm->ll_transport};
  const std::vector<RankHello> hellos = gather_from_every_rank(mine, kHelloBytes);
  std::string disagreement;
  comm->min_sm_count = comm->sm_count;
  for (int peer = 0; peer < comm->nranks && disagreement.empty(); ++peer) {
    const RankHello& theirs = hellos[peer];
    comm->min_sm_count = std::min(comm->min_sm_count, static_cast<int>(theirs.sm_count));
    if (theirs.version != mine.version) {
      // A build of another version may lay the hello out otherwise (or write less of it): only its version is read.
      disagreement = "rank " + std::to_string(peer) + " runs library version " + std::to_string(theirs.version) +
                     "; this rank runs " + std::to_string(mine.version);
    } else if (!same_setup(theirs, mine)) {
      disagreement =
          "rank " + std::to_string(peer) + " has " + describe_setup(theirs) + "; this rank has " + describe_setup(mine);
    }
  }
  if (!disagreement.empty()) {
    nvshmem_finalize();
    comm->nvshmem = SetupRequest::kFinalized;
    fail(deepepInvalidArgument, "ranks disagree on the communicator setup: %s", disagreement.c_str());
  }

  comm->buffer = nvshmem_malloc(comm->buffer_bytes);
  if (comm->buffer == nullptr) {
    nvshmem_finalize();
    comm->nvshmem = SetupRequest::kFinalized;
    fail(deepepOutOfMemory, "nvshmem_malloc of the %zu-byte communication buffer failed", comm->buffer_bytes);
  }
  DEEPEP_CUDA_CHECK(cudaMemset(comm->buffer, 0, kControlBytes));
  if (comm->ll_control_bytes != 0) {
    DEEPEP_CUDA_CHECK(cudaMemset(static_cast<uint8_t*>(comm->buffer) + comm->ll_offset, 0, comm->ll_control_bytes));
  }

  comm->peer_buffers.assign(comm->nranks, nullptr);
  for (int peer = 0; peer < comm->nranks; ++peer) comm->peer_buffers[peer] = nvshmem_ptr(comm->buffer, peer);
  nvshmem_barrier_all();
}

// Collective over all ranks: whether every rank passed `yes`.
static bool every_rank_says_yes(bool yes) {
  const std::vector<int32_t> answers = gather_from_every_rank<int32_t>(yes ? 1 : 0, sizeof(int32_t));
  return std::all_of(answers.begin(), answers.end(), [](int32_t answer) { return answer == 1; });
}

// Ranks reached by NVLink must form a block of consecutive ranks around this one.
static int nvl_domain_size(const deepepComm& comm) {
  int count = 0;
  for (void* p : comm.peer_buffers) count += p != nullptr;
  if (count == 0) fail(deepepNvshmemError, "NVSHMEM gives no address for this rank's own buffer");
  const int first = comm.rank / count * count;
  for (int peer = first; peer < first + count; ++peer) {
    if (peer >= comm.nranks || comm.peer_buffers[peer] == nullptr) {
      fail(deepepNotSupported,
           "the %d ranks reachable over NVLink from rank %d are not the consecutive block [%d, %d); order the ranks "
           "so that each NVLink domain holds consecutive ranks",
           count, comm.rank, first, first + count);
    }
  }
  return count;
}

static void free_local_resources(deepepComm* comm) {
  std::lock_guard<std::mutex> retired_lock(comm->retired_mutex);  // a handle's destruction may park storage meanwhile
  if (!comm->retired_handles.empty()) {
    // Their last uses may be on any stream. (Refused while a stream of the device captures: not a sticky error, and
    // not this thread's to keep.)
    if (cudaDeviceSynchronize() != cudaSuccess) cudaGetLastError();
    for (const auto& retired : comm->retired_handles) {
      cudaFree(retired.storage);
      cudaEventDestroy(retired.last_use);
    }
    comm->retired_handles.clear();
  }
  if (comm->stream != nullptr) cudaStreamDestroy(comm->stream);
  if (comm->peer_buffers_device != nullptr) cudaFree(comm->peer_buffers_device);
  if (comm->ll_direct_device != nullptr) cudaFree(comm->ll_direct_device);
  if (comm->async_error != nullptr) cudaFreeHost(comm->async_error);
  if (comm->op_state_device != nullptr) cudaFree(comm->op_state_device);
  if (comm->notify_host != nullptr) cudaFreeHost(comm->notify_host);
  if (comm->host_wait_event != nullptr) cudaEventDestroy(comm->host_wait_event);
  if (comm->ll_timeline_device != nullptr) cudaFree(comm->ll_timeline_device);
  comm->ll_timeline_device = nullptr;
  comm->host_wait_event = nullptr;
  comm->op_state_device = nullptr;
  comm->notify_host = nullptr;
  comm->report_host = nullptr;
  comm->report_host_device = nullptr;
  comm->stream = nullptr;
  comm->peer_buffers_device = nullptr;
  comm->ll_direct_device = nullptr;
  comm->async_error = nullptr;
}

deepepComm* create_comm(int nranks, const deepepUniqueId& id, int rank, const deepepConfig& config) {
  const int count = device_count();
  int device = config.device;
  if (device < 0) DEEPEP_CUDA_CHECK(cudaGetDevice(&device));
  DEEPEP_REQUIRE(device < count, "config->device is %d but this process sees %d CUDA device(s)", device, count);

  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    if (nvshmem_unusable != nullptr) {
      fail(deepepInvalidUsage, "this process cannot set up NVSHMEM again: %s; make the communicator in a new process",
           nvshmem_unusable);
    }
    if (nvshmem_in_use) {
      fail(deepepInvalidUsage,
           "a communicator already exists in this process, or is being created or destroyed; this release supports "
           "one at a time (destroy it first)");
    }
    nvshmem_in_use = true;
  }
  NvshmemHold hold;

  // NVLink multicast can take shared GPUs down and nothing here needs it: off unless the caller asks.
  // These take effect only where NVSHMEM has not read its environment yet: in a process that made the id, they did
  // before (get_unique_id).
  if (!config.allow_nvlink_multicast) setenv("NVSHMEM_DISABLE_NVLS", "1", 1);
  set_process_nvshmem_defaults();
  const size_t total_bytes = total_buffer_size(config, nranks);
  // NVSHMEM reserves a 1 GiB symmetric heap by default; a low-latency area can need more. A caller's own setting
  // wins.
  constexpr size_t kDefaultHeap = size_t(1) << 30;
  if (total_bytes + (size_t(128) << 20) > kDefaultHeap) {
    const std::string heap = std::to_string(align_up(total_bytes + (size_t(256) << 20), size_t(1) << 20));
    setenv("NVSHMEM_SYMMETRIC_SIZE", heap.c_str(), 0);
  }

  auto comm = std::make_unique<deepepComm>();
  comm->rank = rank;
  comm->nranks = nranks;
  comm->device = device;
  comm->timeout_seconds = config.timeout_seconds;
  comm->buffer_bytes = buffer_size_for(config, nranks);
  comm->total_buffer_bytes = total_bytes;
  comm->ll_area = low_latency_area(config, nranks);
  comm->ll_offset = comm->ll_area.total_bytes == 0 ? 0 : low_latency_offset(comm->buffer_bytes);
  comm->max_tokens_per_rank = config.max_tokens_per_rank;
  comm->dispatch_area_bytes = dispatch_area_bytes(config, nranks);
  comm->dispatch_area_offset = comm->dispatch_area_bytes == 0 ? 0 : dispatch_area_offset(config, nranks);
  DEEPEP_CUDA_CHECK(cudaDeviceGetAttribute(&comm->num_sms, cudaDevAttrMultiProcessorCount, device));

  DeviceGuard guard(device);
  auto request = std::make_shared<SetupRequest>();
  request->rank = rank;
  request->nranks = nranks;
  request->device = device;
  request->sm_count = comm->num_sms;
  request->buffer_bytes = comm->total_buffer_bytes;
  request->ht_bytes = comm->buffer_bytes;
  request->ll_offset = comm->ll_offset;
  request->ll_control_bytes = comm->ll_area.control_bytes;
  request->ll_area = comm->ll_area;
  request->dispatch_area_offset = comm->dispatch_area_offset;
  request->max_tokens_per_rank = config.max_tokens_per_rank;
  request->ll_transport = config.low_latency_transport;
  request->id = id;
  try {
    run_bounded(config.timeout_seconds, "NVSHMEM setup (deepepCommInitRank)",
                [request]() { nvshmem_setup(request.get()); });
  } catch (...) {
    int not_started = SetupRequest::kNotStarted;
    const bool never_started = request->nvshmem.compare_exchange_strong(not_started, SetupRequest::kAbandoned);
    if (!never_started) hold.unusable = request->nvshmem == SetupRequest::kFinalized ? kFinalized : kSetupUnfinished;
    throw;
  }
  hold.unusable = kSetupUnfinished;  // until the communicator is made (or NVSHMEM finalised again: kFinalized)
  comm->buffer = request->buffer;
  comm->peer_buffers = request->peer_buffers;
  comm->ll_blocks = low_latency_blocks(request->min_sm_count);
  deepepComm* raw = comm.get();

  std::exception_ptr local_failure;
  try {
    comm->ranks_per_nvl_domain = nvl_domain_size(*comm);
    DEEPEP_CUDA_CHECK(cudaStreamCreateWithFlags(&comm->stream, cudaStreamNonBlocking));
    DEEPEP_CUDA_CHECK(
        cudaHostAlloc(reinterpret_cast<void**>(&comm->async_error), sizeof(AsyncErrorRecord), cudaHostAllocMapped));
    std::memset(comm->async_error, 0, sizeof(AsyncErrorRecord));
    DEEPEP_CUDA_CHECK(
        cudaHostGetDevicePointer(reinterpret_cast<void**>(&comm->async_error_device), comm->async_error, 0));
    DEEPEP_CUDA_CHECK(cudaHostAlloc(&comm->notify_host, 2 * sizeof(HandleHostInfo), cudaHostAllocMapped));
    DEEPEP_CUDA_CHECK(cudaEventCreateWithFlags(&comm->host_wait_event, cudaEventDisableTiming));
    const char* timeline = std::getenv("DEEPEP_LL_TIMELINE");
    if (timeline != nullptr && std::strcmp(timeline, "1") == 0) {
      const size_t bytes = static_cast<size_t>(comm->ll_blocks) * DEEPEP_LL_TIMELINE_MARKS * sizeof(int64_t);
      DEEPEP_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&comm->ll_timeline_device), bytes));
      DEEPEP_CUDA_CHECK(cudaMemset(comm->ll_timeline_device, 0, bytes));
    }
    std::memset(comm->notify_host, 0, 2 * sizeof(HandleHostInfo));
    DEEPEP_CUDA_CHECK(cudaHostGetDevicePointer(&comm->notify_host_device, comm->notify_host, 0));
    comm->report_host = static_cast<HandleHostInfo*>(comm->notify_host) + 1;
    comm->report_host_device = static_cast<HandleHostInfo*>(comm->notify_host_device) + 1;
    DEEPEP_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&comm->op_state_device), 4 * sizeof(uint32_t)));
    DEEPEP_CUDA_CHECK(cudaMemset(comm->op_state_device, 0, 4 * sizeof(uint32_t)));
    DEEPEP_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&comm->peer_buffers_device), sizeof(void*) * nranks));
    DEEPEP_CUDA_CHECK(cudaMemcpy(comm->peer_buffers_device, comm->peer_buffers.data(), sizeof(void*) * nranks,
                                 cudaMemcpyHostToDevice));
    const std::vector<void*> direct = low_latency_direct_table(*comm, config.low_latency_transport);
    DEEPEP_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&comm->ll_direct_device), sizeof(void*) * nranks));
    DEEPEP_CUDA_CHECK(
        cudaMemcpy(comm->ll_direct_device, direct.data(), sizeof(void*) * nranks, cudaMemcpyHostToDevice));
  } catch (...) {
    local_failure = std::current_exception();
  }

  // The steps above can fail on one rank only. The ranks agree on the outcome before any returns, so that they all
  // keep the communicator or all undo it together (a collective teardown run by one rank alone would wait for the
  // others until its timeout, while they went on with a communicator that has a rank missing).
  auto every_rank_ok = std::make_shared<bool>(false);
  try {
    run_bounded(config.timeout_seconds, "the ranks' agreement on the setup (deepepCommInitRank)",
                [device, ok = local_failure == nullptr, every_rank_ok]() {
                  DEEPEP_CUDA_CHECK(cudaSetDevice(device));
                  *every_rank_ok = every_rank_says_yes(ok);
                });
  } catch (...) {
    // A peer did not take part, so no collective teardown could finish, and this rank's resources stay allocated:
    // the abandoned agreement may still run NVSHMEM's barrier kernel, which never ends, and freeing device memory
    // (cudaFree, cudaFreeHost) would wait for it. The process cannot set up NVSHMEM again anyway.
    if (local_failure) std::rethrow_exception(local_failure);
    throw;
  }
  if (!*every_rank_ok) {
    free_local_resources(raw);
    try {
      run_bounded(config.timeout_seconds, "NVSHMEM teardown after a failed setup", [device, buffer = raw->buffer]() {
        cudaSetDevice(device);
        nvshmem_free(buffer);
        nvshmem_finalize();
      });
      hold.unusable = kFinalized;
    } catch (const Error&) {
    }
    if (local_failure) std::rethrow_exception(local_failure);
    fail(deepepRemoteError,
         "another rank's setup failed after NVSHMEM started (its own deepepCommInitRank says why); this rank's is "
         "undone too");
  }

  std::lock_guard<std::mutex> lock(registry_mutex);
  live_comms.insert(raw);
  hold.kept = true;
  return comm.release();
}

// Whether a peer may be gone: a timeout is recorded or was, or a low-latency call masked a rank.
static bool peer_may_be_lost(const deepepComm& comm) {
  if (comm.peer_timed_out.load()) return true;
  if (comm.async_error != nullptr && comm.async_error->code == deepepTimeout) return true;
  if (comm.ll_area.max_tokens > 0) {
    std::vector<uint32_t> mask;
    if (read_low_latency_mask(comm, &mask) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    for (const uint32_t bit : mask) {
      if (bit != 0) return true;
    }
  }
  return false;
}

__device__ __forceinline__ uint64_t* arrival_word(void* buffer, int rank) {
  return reinterpret_cast<uint64_t*>(static_cast<uint8_t*>(buffer) + kArrivalOffset) + rank;
}

// A rank's arrival word in each peer's buffer: 0 until it reaches deepepCommDestroy, then kArrived; kGaveUp once
// it stopped waiting for the others (it skips the collective teardown, so a late peer must skip it too).
constexpr uint64_t kArrived = 1;
constexpr uint64_t kGaveUp = 2;

// Thread `peer` sets this rank's arrival word in `peer`'s buffer, then waits until `peer` set its word here. A rank
// that gives up says so in its words, so that a peer arriving later does not run the teardown alone.
static __global__ void arrival_barrier_kernel(void* const* peers, int rank, int nranks, uint64_t timeout_ns,
                                              int* all_arrived) {
  const int peer = threadIdx.x;
  bool arrived = true;
  if (peer < nranks) {
    store_release_sys(arrival_word(peers[peer], rank), kArrived);
    const uint64_t deadline = global_timer_ns() + timeout_ns;
    uint64_t word;
    while ((word = load_acquire_sys(arrival_word(peers[rank], peer))) == 0 && global_timer_ns() <= deadline) {
      __nanosleep(1000);
    }
    arrived = word == kArrived;
  }
  arrived = __syncthreads_and(arrived);
  // A peer seen early may have given up since, waiting for one seen late: look again, so that this rank does not run
  // the teardown without it. What is left is the instant between this look and a peer's deadline.
  if (arrived)
    arrived = __syncthreads_and(peer >= nranks || load_acquire_sys(arrival_word(peers[rank], peer)) == kArrived);
  if (!arrived && peer < nranks) store_release_sys(arrival_word(peers[peer], rank), kGaveUp);
  if (threadIdx.x == 0) *all_arrived = arrived;
}

// Whether every rank reached deepepCommDestroy within the timeout (this rank waits at most that long); no when the
// meeting itself failed on this device (`*status`: its CUDA error, else cudaSuccess). Ranks outside the NVLink domain
// have no words to write: then the answer is yes, and NVSHMEM's own teardown decides.
static bool every_rank_arrives(const deepepComm& comm, cudaError_t* status) {
  *status = cudaSuccess;
  if (comm.nranks > kMaxArrivalRanks) return true;
  for (void* peer : comm.peer_buffers) {
    if (peer == nullptr) return true;
  }
  // The answer goes to a word the communicator already holds (an allocation here could fail on a full GPU, and this
  // rank would then skip the barrier and leave its peers waiting), and comes back on the communicator's stream.
  int* flag = reinterpret_cast<int*>(comm.op_state_device + 2);
  int arrived = 0;
  const uint64_t timeout_ns = static_cast<uint64_t>(comm.timeout_seconds * 1e9);
  cudaError_t result =
      try_launch_kernel(arrival_barrier_kernel, 1, 32 * ((comm.nranks + 31) / 32), 0, comm.stream, false, false,
                        comm.peer_buffers_device, comm.rank, comm.nranks, timeout_ns, flag);
  if (result == cudaSuccess) result = cudaMemcpyAsync(&arrived, flag, sizeof(int), cudaMemcpyDeviceToHost, comm.stream);
  if (result == cudaSuccess) result = cudaStreamSynchronize(comm.stream);
  if (result != cudaSuccess) cudaGetLastError();
  *status = result;
  return result == cudaSuccess && arrived != 0;
}

void destroy_comm(deepepComm* comm) {
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    // One destruction per communicator, also when two threads destroy it at once. Retired before anything else (if
    // that fails, the communicator stays live): its memory is kept from here on.
    if (live_comms.count(comm) == 0) {
      fail(deepepInvalidUsage, "comm %p is not a live communicator (destroyed, or being destroyed)",
           static_cast<void*>(comm));
    }
    retired_comms.emplace_back(comm);
    live_comms.erase(comm);
  }
  NvshmemHold hold{kTeardownSkipped};
  DeviceGuard guard(comm->device);
  // Calls run on the callers' streams and may still be running: wait for the whole device, not only the communicator's
  // stream, before the ranks meet and anything they use is freed. A graph capture on another stream of the device
  // refuses a device-wide wait (not a sticky error): then only the communicator's stream is waited for, so that this
  // rank still meets its peers; the header tells callers not to destroy during a capture. The wait has no bound of its
  // own: work of another library that never ends (a collective waiting for a lost peer) holds it, as it would hold the
  // frees below, which synchronise the device too.
  const char* waited_for = "cudaDeviceSynchronize (before the teardown)";
  cudaError_t stream_status = cudaDeviceSynchronize();
  if (stream_status == cudaErrorStreamCaptureUnsupported || stream_status == cudaErrorStreamCaptureImplicit) {
    cudaGetLastError();
    waited_for = "cudaStreamSynchronize(communicator stream)";
    stream_status = cudaStreamSynchronize(comm->stream);
  }
  const bool peer_lost = peer_may_be_lost(*comm);  // before the record is freed
  // NVSHMEM's teardown spins on the device until every rank joins: with a dead peer it would never end and would keep
  // this process from exiting. So the ranks first meet through words in their buffers, with a bounded wait, and only
  // when all arrive does the collective teardown run.
  cudaError_t meeting_status = cudaSuccess;
  const bool all_arrived = stream_status == cudaSuccess && every_rank_arrives(*comm, &meeting_status);
  free_local_resources(comm);
  comm->magic = 0;
  if (stream_status != cudaSuccess) {
    fail_cuda(stream_status, waited_for, __FILE__, __LINE__);
  }
  if (meeting_status != cudaSuccess) {
    // Not a late peer: this device failed the meeting, so NVSHMEM's collective teardown is skipped all the same.
    fail_cuda(meeting_status, "the ranks' meeting before NVSHMEM's teardown (deepepCommDestroy)", __FILE__, __LINE__);
  }
  if (!all_arrived) {
    // The heap stays mapped until the process exits; NVSHMEM cannot be initialised again in this process.
    if (peer_lost) return;  // the caller already had the timeout that says so
    fail(deepepTimeout,
         "a peer rank did not reach deepepCommDestroy within %.1f s (timeout_seconds); this rank's resources are "
         "freed, NVSHMEM's collective teardown was skipped",
         comm->timeout_seconds);
  }
  // Collective part: NVSHMEM frees the heap and finalises with barriers among all ranks.
  run_bounded(comm->timeout_seconds, "NVSHMEM teardown (deepepCommDestroy)",
              [device = comm->device, buffer = comm->buffer]() {
                DEEPEP_CUDA_CHECK(cudaSetDevice(device));
                nvshmem_barrier_all();
                nvshmem_free(buffer);
                nvshmem_finalize();
              });
  hold.unusable = kFinalized;
}

bool is_live_comm(const deepepComm* comm) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  return live_comms.count(const_cast<deepepComm*>(comm)) != 0;
}

deepepComm* checked_comm(deepepComm_t comm) {
  DEEPEP_REQUIRE(comm != nullptr, "comm is NULL");
  std::lock_guard<std::mutex> lock(registry_mutex);
  if (live_comms.count(comm) == 0 || comm->magic != deepepComm::kMagic) {
    fail(deepepInvalidUsage, "comm %p is not a live communicator (destroyed, or never created)",
         static_cast<void*>(comm));
  }
  return comm;
}

}  // namespace deepep
