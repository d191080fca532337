// What this rank knows of the low-latency dispatch each buffer set holds, and the checks of a combine against it
// (deepep.h, "Buffer sets and lifetimes"). Host-side bookkeeping only, with no CUDA in it, so that the CPU tests
// exercise the rules themselves (tests/c/ll_dispatch_book.cpp); api_ll.cpp feeds it the calls and turns its verdicts
// into errors.
#pragma once

#include <cstddef>
#include <cstdint>

namespace deepep {

// The device memory [begin, end) of an array (begin == end: none, wherever it is).
struct ByteSpan {
  uintptr_t begin = 0, end = 0;
  bool empty() const { return begin == end; }
  bool overlaps(const ByteSpan& other) const {
    return !empty() && !other.empty() && begin < other.end && other.begin < end;
  }
};

inline ByteSpan span_of(const void* array, size_t bytes) {
  const auto begin = reinterpret_cast<uintptr_t>(array);
  return {begin, array != nullptr ? begin + bytes : begin};
}

// What a dispatch and its combine must agree on.
struct LowLatencySizes {
  int64_t num_tokens = 0;
  int num_topk = 0;
  int num_experts = 0;
  bool operator==(const LowLatencySizes& other) const {
    return num_tokens == other.num_tokens && num_topk == other.num_topk && num_experts == other.num_experts;
  }
};

struct LowLatencyDispatchRecord {
  bool made = false;         // its Recv (or SendRecv) ran here and wrote the routing below
  bool overwritten = false;  // a later call's outputs covered some of that routing since
  LowLatencySizes sizes;
  ByteSpan routing[2];  // recv_src_info, recv_layout_range: what the combine's Send reads
  bool covers_part_of(const ByteSpan& array) const {
    return made && (array.overlaps(routing[0]) || array.overlaps(routing[1]));
  }
};

enum class CombineRefusal {
  kNone,
  kNoDispatch,            // no dispatch on the set wrote routing here (none made, or refused on this rank)
  kOtherSizes,            // num_tokens, num_topk or num_experts differ from the dispatch's
  kOtherSetsSrcInfo,      // src_info is a routing array of the other set's dispatch, not of its own
  kOtherSetsLayoutRange,  // the same for layout_range
  kRoutingWrittenOver     // a later call's outputs covered the routing arrays given
};

// Kept for eager calls, as the phase order is: a call a stream capture records writes when its graph is launched,
// which the library does not see, and a set a capture has used is not checked any more.
class LowLatencyDispatchBook {
 public:
  // The number of arrays a dispatch writes: recv_x, recv_scales, recv_count, recv_src_info, recv_layout_range,
  // stats_recv_count, stats_wait_ns.
  static constexpr size_t kDispatchOutputs = 7;

  // A dispatch refused on this rank (its side ran without data): the set holds no routing.
  void forget(int buffer_set) { records_[buffer_set] = LowLatencyDispatchRecord{}; }

  // After a dispatch launched: a Send or SendRecv (`sends`) begins its set's record anew (a set a capture has used
  // keeps none); an eager Recv or SendRecv (`receives`) marks the routing its outputs cover and fills the record.
  void note_dispatch(int buffer_set, bool sends, bool receives, bool set_captured, bool capturing,
                     const LowLatencySizes& sizes, const ByteSpan (&outputs)[kDispatchOutputs]) {
    LowLatencyDispatchRecord& record = records_[buffer_set];
    if (sends || set_captured) record = LowLatencyDispatchRecord{};
    if (!receives || capturing) return;
    note_written(outputs, kDispatchOutputs);
    if (!set_captured) record = {true, false, sizes, {outputs[3], outputs[4]}};
  }

  // Arrays an eager call wrote: the routing they cover now holds their data.
  void note_written(const ByteSpan* outputs, size_t count) {
    for (LowLatencyDispatchRecord& record : records_) {
      for (size_t i = 0; i < count; ++i) {
        if (record.covers_part_of(outputs[i])) record.overwritten = true;
      }
    }
  }

  // An eager combine on a set no capture has used, given `sizes` and routing arrays `given` (src_info, layout_range);
  // `sends`: a Send or SendRecv, which reads the routing (a Recv only sums what arrived).
  CombineRefusal check_combine(int buffer_set, bool sends, const LowLatencySizes& sizes,
                               const ByteSpan (&given)[2]) const {
    const LowLatencyDispatchRecord& own = records_[buffer_set];
    const LowLatencyDispatchRecord& other = records_[1 - buffer_set];
    if (!own.made) return CombineRefusal::kNoDispatch;
    if (!(sizes == own.sizes)) return CombineRefusal::kOtherSizes;
    if (!sends) return CombineRefusal::kNone;
    if (other.covers_part_of(given[0]) && !own.covers_part_of(given[0])) return CombineRefusal::kOtherSetsSrcInfo;
    if (other.covers_part_of(given[1]) && !own.covers_part_of(given[1])) return CombineRefusal::kOtherSetsLayoutRange;
    if (own.overwritten && (own.covers_part_of(given[0]) || own.covers_part_of(given[1]))) {
      return CombineRefusal::kRoutingWrittenOver;
    }
    return CombineRefusal::kNone;
  }

  const LowLatencyDispatchRecord& record(int buffer_set) const { return records_[buffer_set]; }

 private:
  LowLatencyDispatchRecord records_[2];
};

}  // namespace deepep
