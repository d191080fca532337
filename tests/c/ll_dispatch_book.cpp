// The rules of libdeepep/ll_dispatch_book.hpp, on the host alone (tests/test_ll_cpu.py builds and runs this): which
// low-latency combines are refused against their set's dispatch, through the call sequences legitimate callers make
// (sets sharing one workspace, graphs sending what eager calls receive, copies of routing, a receive only summing) and
// the mix-ups they catch. Prints one line per check; exit status 0: all as expected, 1: not.
#include "ll_dispatch_book.hpp"

#include <cstdio>

using deepep::ByteSpan;
using deepep::CombineRefusal;
using deepep::LowLatencyDispatchBook;
using deepep::LowLatencySizes;

namespace {

int failures = 0;

const char* name(CombineRefusal refusal) {
  switch (refusal) {
    case CombineRefusal::kNone:
      return "accepted";
    case CombineRefusal::kNoDispatch:
      return "no dispatch";
    case CombineRefusal::kOtherSizes:
      return "other sizes";
    case CombineRefusal::kOtherSetsSrcInfo:
      return "other set's src_info";
    case CombineRefusal::kOtherSetsLayoutRange:
      return "other set's layout_range";
    case CombineRefusal::kRoutingWrittenOver:
      return "routing written over";
  }
  return "?";
}

void expect(const char* step, CombineRefusal got, CombineRefusal want) {
  const bool ok = got == want;
  std::printf("%s: %s (%s)\n", step, name(got), ok ? "as expected" : "UNEXPECTED");
  failures += !ok;
}

// 256 bytes of device memory at `address` (the book compares addresses only).
ByteSpan at(uintptr_t address) { return {address, address + 256}; }

// The arrays a dispatch writes: rows, counts and statistics at `rows`, `rows` + 0x1000, ..., routing at `routing`
// (src_info) and `routing` + 0x100 (layout_range).
struct Outputs {
  ByteSpan spans[LowLatencyDispatchBook::kDispatchOutputs];
};
Outputs outputs(uintptr_t rows, uintptr_t src_info, uintptr_t layout_range) {
  return {{at(rows),
           at(rows + 0x1000),
           at(rows + 0x2000),
           {src_info, src_info + 0x100},
           {layout_range, layout_range + 0x100},
           ByteSpan{},
           ByteSpan{}}};
}

const LowLatencySizes kSizes{8, 2, 4};
constexpr bool kSends = true, kReceives = true;

void dispatch(LowLatencyDispatchBook& book, int set, const Outputs& o, bool set_captured = false,
              bool capturing = false) {
  book.note_dispatch(set, kSends, kReceives, set_captured, capturing, kSizes, o.spans);
}

CombineRefusal combine(const LowLatencyDispatchBook& book, int set, uintptr_t src_info, uintptr_t layout_range,
                       bool sends = kSends, LowLatencySizes sizes = kSizes) {
  const ByteSpan given[2] = {{src_info, src_info + 0x100}, {layout_range, layout_range + 0x100}};
  return book.check_combine(set, sends, sizes, given);
}

}  // namespace

int main() {
  const CombineRefusal kNone = CombineRefusal::kNone;
  {
    LowLatencyDispatchBook book;
    expect("a combine before any dispatch", combine(book, 0, 0x10000, 0x10100), CombineRefusal::kNoDispatch);
    dispatch(book, 0, outputs(0x100000, 0x10000, 0x10100));
    dispatch(book, 1, outputs(0x200000, 0x20000, 0x20100));
    expect("a combine given its dispatch's routing", combine(book, 0, 0x10000, 0x10100), kNone);
    expect("a combine with fewer tokens than its dispatch",
           combine(book, 0, 0x10000, 0x10100, kSends, LowLatencySizes{7, 2, 4}), CombineRefusal::kOtherSizes);
    expect("a combine with another top-k", combine(book, 1, 0x20000, 0x20100, kSends, LowLatencySizes{8, 3, 4}),
           CombineRefusal::kOtherSizes);
    expect("a combine with another expert count", combine(book, 1, 0x20000, 0x20100, kSends, LowLatencySizes{8, 2, 6}),
           CombineRefusal::kOtherSizes);
    expect("a combine given the other set's src_info", combine(book, 0, 0x20000, 0x10100),
           CombineRefusal::kOtherSetsSrcInfo);
    expect("a combine given the other set's layout_range", combine(book, 0, 0x10000, 0x20100),
           CombineRefusal::kOtherSetsLayoutRange);
    expect("a combine given a copy of its routing elsewhere", combine(book, 1, 0x30000, 0x30100), kNone);
    // Set 0's next dispatch writes its layout over set 1's routing.
    dispatch(book, 0, outputs(0x100000, 0x10000, 0x20100));
    expect("a combine whose routing a later dispatch covered", combine(book, 1, 0x20000, 0x20100),
           CombineRefusal::kRoutingWrittenOver);
    expect("its Recv alone (the Send read the routing before)", combine(book, 1, 0x20000, 0x20100, !kSends), kNone);
    expect("a combine given a copy made before that", combine(book, 1, 0x30000, 0x30100), kNone);
    expect("the later dispatch's combine, sharing the array", combine(book, 0, 0x10000, 0x20100), kNone);
    // A Send on set 1 begins its record anew; its Recv fills it and clears the mark.
    book.note_dispatch(1, kSends, !kReceives, false, false, kSizes, outputs(0x200000, 0x20000, 0x20100).spans);
    expect("a combine while its dispatch's Recv is due", combine(book, 1, 0x20000, 0x20100),
           CombineRefusal::kNoDispatch);
    book.note_dispatch(1, !kSends, kReceives, false, false, kSizes, outputs(0x200000, 0x20000, 0x20100).spans);
    expect("a combine after its dispatch's Recv rewrote the routing", combine(book, 1, 0x20000, 0x20100), kNone);
    expect("that Recv marked set 0's layout_range (shared)", combine(book, 0, 0x10000, 0x20100),
           CombineRefusal::kRoutingWrittenOver);
    book.forget(1);  // a dispatch refused on this rank
    expect("a combine after its dispatch was refused here", combine(book, 1, 0x20000, 0x20100),
           CombineRefusal::kNoDispatch);
  }
  {
    // One workspace for both sets, each combine made before the next dispatch (examples/cpp/moe_step.cpp).
    LowLatencyDispatchBook book;
    bool all = true;
    for (int step = 0; step < 6; ++step) {
      dispatch(book, step % 2, outputs(0x100000, 0x10000, 0x10100));
      all = all && combine(book, step % 2, 0x10000, 0x10100) == kNone;
    }
    expect("one workspace for both sets, over six steps", all ? kNone : CombineRefusal::kRoutingWrittenOver, kNone);
  }
  {
    // Two micro-batches: the second's combine output lands on the first's routing before the first's combine.
    LowLatencyDispatchBook book;
    dispatch(book, 0, outputs(0x100000, 0x10000, 0x10100));
    dispatch(book, 1, outputs(0x200000, 0x20000, 0x20100));
    const ByteSpan out = at(0x10080);
    book.note_written(&out, 1);
    expect("a combine whose routing another combine's out covered", combine(book, 0, 0x10000, 0x10100),
           CombineRefusal::kRoutingWrittenOver);
    // Statistics arrays are outputs too.
    Outputs with_stats = outputs(0x300000, 0x30000, 0x30100);
    with_stats.spans[5] = at(0x20000);
    dispatch(book, 0, with_stats);
    expect("a combine whose routing a dispatch's statistics covered", combine(book, 1, 0x20000, 0x20100),
           CombineRefusal::kRoutingWrittenOver);
    Outputs with_wait_times = outputs(0x400000, 0x40000, 0x40100);
    with_wait_times.spans[6] = at(0x30000);
    dispatch(book, 1, with_wait_times);
    expect("a combine whose routing a dispatch's wait times covered", combine(book, 0, 0x30000, 0x30100),
           CombineRefusal::kRoutingWrittenOver);
    const ByteSpan empty{0x40080, 0x40080};  // an empty array (a rank with no tokens), inside set 1's routing
    book.note_written(&empty, 1);
    expect("an empty array covers nothing", combine(book, 1, 0x40000, 0x40100), kNone);
  }
  {
    // A set a capture has used keeps no record, and what a capture records is not seen; eager calls on a captured set
    // still write.
    LowLatencyDispatchBook book;
    dispatch(book, 0, outputs(0x100000, 0x10000, 0x10100));
    dispatch(book, 1, outputs(0x200000, 0x20000, 0x10100), true, true);  // recorded by a capture, over set 0's layout
    expect("a combine after a captured dispatch (its writes unseen)", combine(book, 0, 0x10000, 0x10100), kNone);
    // A graph sends set 1's dispatch at each launch; an eager Recv receives it, over set 0's layout_range.
    book.note_dispatch(1, kSends, !kReceives, true, true, kSizes, outputs(0x200000, 0x20000, 0x10100).spans);
    for (int launch = 0; launch < 2; ++launch) {
      book.note_dispatch(1, !kSends, kReceives, true, false, kSizes, outputs(0x200000, 0x20000, 0x10100).spans);
    }
    expect("set 1 keeps no record once captured", book.record(1).made ? kNone : CombineRefusal::kNoDispatch,
           CombineRefusal::kNoDispatch);
    expect("the eager Recv on the captured set marked set 0", combine(book, 0, 0x10000, 0x10100),
           CombineRefusal::kRoutingWrittenOver);
    // Set 0 is captured after its eager dispatch (a captured combine, say): its next eager Recv drops the old record,
    // which would otherwise stand for routing nobody checks any more.
    dispatch(book, 0, outputs(0x100000, 0x10000, 0x10100));
    book.note_dispatch(0, !kSends, kReceives, true, false, kSizes, outputs(0x100000, 0x40000, 0x40100).spans);
    expect("a set captured after its dispatch keeps no record",
           book.record(0).made ? kNone : CombineRefusal::kNoDispatch, CombineRefusal::kNoDispatch);
  }
  return failures == 0 ? 0 : 1;
}
