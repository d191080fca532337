// The communicator: NVSHMEM bootstrap, the communication buffer on the symmetric heap, NVLink peer addresses,
// the communicator stream and the asynchronous-error record.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <vector>

#include "async_error.hpp"
#include "deepep/deepep.h"
#include "ll_dispatch_book.hpp"
#include "lowlatency.hpp"

namespace deepep {

// Space for control words (counters, flags) at the start of every communication buffer, ahead of the data region.
constexpr size_t kControlBytes = size_t(1) << 20;
// The last words of the control space: one per rank, set by that rank when it reaches deepepCommDestroy (see
// destroy_comm). Nothing else writes them, and the control space is zeroed at setup.
constexpr int kMaxArrivalRanks = 64;
constexpr size_t kArrivalOffset = kControlBytes - kMaxArrivalRanks * sizeof(uint64_t);
// Each source rank's receive region is a whole number of these (its start stays aligned for every rank).
constexpr size_t kRegionAlignment = 256;
// Smallest receive region per source rank an explicit buffer_bytes may leave.
constexpr size_t kMinRegionBytes = size_t(64) << 10;
// More bytes than any GPU holds (256 TiB): a buffer or an array past it comes from a mistaken size, count or stride
// (e.g. (size_t)-1), and the sizes computed from it would wrap around.
constexpr size_t kMaxDeviceBytes = size_t(1) << 48;

// A config after validation, with the caller's struct_size honoured (fields past it take their defaults).
deepepConfig resolve_config(const deepepConfig* config);

// Bytes of communication buffer per rank for the high-throughput workload in `config` on `nranks` ranks.
size_t buffer_size_for(const deepepConfig& config, int nranks);
// Bytes of communication buffer per rank whose receive regions (one per source rank, whole kRegionAlignment units)
// each hold `region_bytes`.
size_t buffer_bytes_for_regions(int nranks, size_t region_bytes);
// The largest dispatch row the workload in `config` has (BF16 payload, FP8 scales, metadata), in bytes.
size_t workload_row_bytes(const deepepConfig& config);
// The zero-copy dispatch area (config.zero_copy_dispatch): bytes per rank (0: none), and where it starts.
size_t dispatch_area_bytes(const deepepConfig& config, int nranks);
size_t dispatch_area_offset(const deepepConfig& config, int nranks);
// Bytes of a dispatch area beyond its rows: room to start the side rows (scales and metadata) on a line.
constexpr size_t kDispatchAreaSlack = 256;
// Where the low-latency area starts in a buffer whose high-throughput part has `ht_bytes`.
size_t low_latency_offset(size_t ht_bytes);
// Everything a rank allocates: the high-throughput part, the low-latency area and the dispatch area (what the size
// hint reports).
size_t total_buffer_size(const deepepConfig& config, int nranks);

}  // namespace deepep

struct deepepComm {
  static constexpr uint64_t kMagic = 0x6465657065704331ull;  // "deepepC1": detects stale or foreign handles
  uint64_t magic = kMagic;
  int rank = 0;
  int nranks = 0;
  int device = -1;
  int ranks_per_nvl_domain = 1;
  double timeout_seconds = 100.0;
  size_t buffer_bytes = 0;         // the high-throughput part (control region and receive regions)
  size_t total_buffer_bytes = 0;   // the whole allocation: buffer_bytes, padding, then the low-latency area
  size_t ll_offset = 0;            // where the low-latency area starts in every rank's buffer
  deepep::LowLatencyArea ll_area;  // its layout (max_tokens 0: none)
  // Per low-latency buffer set, the operation whose Send went out and whose Recv is due: kLowLatencyNoRecvDue, or
  // 0 (dispatch) / 1 (combine), as eager calls made them; and whether a stream capture has recorded a call on the set
  // (its graphs may then send and receive there whenever they are launched: the set is no longer checked).
  static constexpr int kLowLatencyNoRecvDue = -1;
  mutable int ll_recv_due[2] = {kLowLatencyNoRecvDue, kLowLatencyNoRecvDue};
  mutable bool ll_set_captured[2] = {false, false};
  // What each set's dispatch was, for its combine's checks (ll_dispatch_book.hpp).
  mutable deepep::LowLatencyDispatchBook ll_dispatch_book;
  int num_sms = 0;                       // of the device
  int ll_blocks = 0;                     // of every low-latency kernel, the same on every rank (low_latency_blocks)
  int64_t max_tokens_per_rank = 0;       // from the config: the most tokens one call may pass
  size_t dispatch_area_offset = 0;       // the zero-copy dispatch area in every rank's buffer (see deepepConfig)
  size_t dispatch_area_bytes = 0;        // 0: none
  void* buffer = nullptr;                // this rank's communication buffer (symmetric heap)
  std::vector<void*> peer_buffers;       // NVLink-mapped address of each rank's buffer, nullptr outside domain
  void** peer_buffers_device = nullptr;  // the same table in device memory, for kernels
  void** ll_direct_device = nullptr;     // the low-latency kernels' table (see low_latency_direct_table)
  cudaStream_t stream = nullptr;         // the communicator stream (asynchronous calls run on it)
  deepep::AsyncErrorRecord* async_error = nullptr;         // mapped pinned memory, host address
  deepep::AsyncErrorRecord* async_error_device = nullptr;  // device address of the same record
  // A timeout the record no longer shows (it was cleared, or a host wait timed out with nothing recorded). With a
  // recorded timeout or a masked rank it means a peer may be gone (see destroy_comm).
  mutable std::atomic<bool> peer_timed_out{false};
  // [0], [1]: sequence number of the collective operations that use the buffer, on the device so that replayed CUDA
  // graphs advance it too (see intranode.cu); [2]: the answer of deepepCommDestroy's arrival barrier; [3]: unused.
  uint32_t* op_state_device = nullptr;
  // Where the notify kernel leaves receive counts for the host (mapped pinned deepep::HandleHostInfo): one per
  // communicator, since notify calls block the host one at a time.
  void* notify_host = nullptr;
  void* notify_host_device = nullptr;
  mutable std::atomic<uint64_t> notify_tickets{0};  // the last one a notify drew; its kernel stores it when done well
  // Where a dispatch reporting its counts leaves them (the second HandleHostInfo of notify_host's allocation: a
  // notify never overwrites a report still to be collected), tagged with the ticket its launch drew.
  void* report_host = nullptr;
  void* report_host_device = nullptr;
  mutable std::atomic<uint64_t> report_tickets{0};
  int64_t* ll_timeline_device = nullptr;  // [ll_blocks][DEEPEP_LL_TIMELINE_MARKS]; DEEPEP_LL_TIMELINE=1 only
  mutable std::atomic<uint32_t> flag_round_epoch{0};  // deepepCommMeasureFlagRound calls made (the same on every rank)
  // Recorded after a notify's kernel, for the host to see it end (wait_for_notify); one per communicator.
  cudaEvent_t host_wait_event = nullptr;
  // Device storage of destroyed handles with the event of its last use: a new handle takes one whose event has
  // completed, so that destroying a handle never waits for the device. Freed with the communicator.
  struct RetiredHandleStorage {
    void* storage;
    cudaEvent_t last_use;
  };
  std::mutex retired_mutex;
  std::vector<RetiredHandleStorage> retired_handles;

  // This rank's zero-copy dispatch area (nullptr: none).
  void* dispatch_area() const {
    return dispatch_area_bytes == 0 ? nullptr : static_cast<uint8_t*>(buffer) + dispatch_area_offset;
  }
};

namespace deepep {

deepepComm* create_comm(int nranks, const deepepUniqueId& id, int rank, const deepepConfig& config);
// Collective; frees everything even when the collective part times out (then throws deepepTimeout).
void destroy_comm(deepepComm* comm);
// Validates a handle passed in by a caller.
deepepComm* checked_comm(deepepComm_t comm);
// Whether `comm` is a live communicator (a destroyed one's address is never reused: comm.cu keeps its memory); never
// throws.
bool is_live_comm(const deepepComm* comm);
void get_unique_id(deepepUniqueId* id);

}  // namespace deepep
