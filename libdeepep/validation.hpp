// Argument checks shared by the C entry points.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "comm.hpp"
#include "error.hpp"

namespace deepep {

// A caller's array must be device memory of the communicator's device (or managed memory), suitably aligned.
// Nothing is checked when `bytes` is 0 (NULL is then accepted). Inside a CaptureScope of a capturing stream, memory
// unknown to CUDA is accepted: an allocation made by the capture itself (a graph allocation node) has no pointer
// attributes until the graph runs.
void check_device_array(const deepepComm& comm, const void* pointer, size_t bytes, size_t alignment, const char* name);

// Refuses (deepepInvalidUsage, "<what> cannot be captured<why>") work that must run now, not when a graph replays
// it, on a stream that is capturing.
void require_not_capturing(cudaStream_t stream, const char* what, const char* why = "");

// Marks, for this thread, the argument checks of one call on `stream` (see check_device_array).
class CaptureScope {
 public:
  explicit CaptureScope(cudaStream_t stream);
  ~CaptureScope();
  CaptureScope(const CaptureScope&) = delete;
  CaptureScope& operator=(const CaptureScope&) = delete;
  bool capturing() const { return capturing_; }  // `stream` is capturing: the call is recorded, not run

 private:
  bool previous_;
  bool capturing_ = false;
};

// Bytes spanned by `rows` rows of `cols` elements, rows `stride` elements apart; past kMaxDeviceBytes (or for a span
// that no valid stride gives) kMaxDeviceBytes + 1, never a size wrapped around.
inline size_t matrix_bytes(int64_t rows, int64_t cols, int64_t stride, size_t element) {
  if (rows <= 0) return 0;
  const long double span = (static_cast<long double>(rows - 1) * stride + cols) * element;
  if (span < 0 || span > static_cast<long double>(kMaxDeviceBytes)) return kMaxDeviceBytes + 1;
  return static_cast<size_t>(span);
}

// Most bytes a size-versioned struct may claim: more comes from an uninitialised struct_size.
constexpr size_t kMaxStructSize = size_t(1) << 16;

// Where the fields this library knows end in each size-versioned struct of deepep.h: what follows (a `reserved` field,
// or the fields of a newer header) must be zero. A caller passes at least this size, or the exact size of an older
// release's struct (OlderStructSizes: 0.2.0 is the first release of this soname).
template <class T>
constexpr size_t kFieldsEnd = T::not_a_size_versioned_struct;  // only the specialisations below exist
template <>
constexpr size_t kFieldsEnd<deepepConfig> = offsetof(deepepConfig, reserved);
template <>
constexpr size_t kFieldsEnd<deepepDispatchArgs> = offsetof(deepepDispatchArgs, reserved);
template <>
constexpr size_t kFieldsEnd<deepepCombineArgs> = offsetof(deepepCombineArgs, out_topk_weights) + sizeof(void*);
template <>
constexpr size_t kFieldsEnd<deepepLowLatencyDispatchArgs> =
    offsetof(deepepLowLatencyDispatchArgs, stats_wait_ns) + sizeof(void*);
template <>
constexpr size_t kFieldsEnd<deepepLowLatencyCombineArgs> =
    offsetof(deepepLowLatencyCombineArgs, stats_wait_ns) + sizeof(void*);

// The sizeof of each older release's struct of this soname that ends before the fields above do (0: none). A program
// built against that header passes it, and the fields its struct lacks take their defaults. Appending a field adds
// the struct's size before it here: every released size stays accepted.
template <class T>
struct OlderStructSizes {
  static constexpr size_t sizes[1] = {0};
};
template <>
struct OlderStructSizes<deepepLowLatencyCombineArgs> {
  static constexpr size_t sizes[1] = {offsetof(deepepLowLatencyCombineArgs, stats_wait_ns)};  // 0.2.0, 0.2.1
};

// Refuses a struct_size no caller's struct has (`name`: the struct's parameter, for the message).
template <class Args>
void check_struct_size(size_t struct_size, const char* name) {
  if (struct_size >= kFieldsEnd<Args> && struct_size <= kMaxStructSize) return;
  std::string older;  // the older sizes, for the message
  for (const size_t size : OlderStructSizes<Args>::sizes) {
    if (size == 0) continue;
    if (struct_size == size) return;
    older += (older.empty() ? ", or an older release's: " : ", ") + std::to_string(size);
  }
  fail(deepepInvalidArgument,
       "%s->struct_size is %zu; it is sizeof(*%s) of the caller's header: at least %zu%s (set it with the struct's "
       "Init function)",
       name, struct_size, name, kFieldsEnd<Args>, older.c_str());
}

// What a *Init function does: writes `defaults` over the caller's struct of `struct_size` bytes (its header's
// sizeof: larger than the library's for a newer header, whose fields this library does not know and zeroes, as it
// zeroes `reserved` fields and padding), and sets struct_size to that size.
template <class Args>
void init_struct(Args* args, size_t struct_size, const Args& defaults, const char* name) {
  DEEPEP_REQUIRE(args != nullptr, "%s is NULL", name);
  check_struct_size<Args>(struct_size, name);
  unsigned char* bytes = reinterpret_cast<unsigned char*>(args);
  std::memset(bytes, 0, struct_size);
  std::memcpy(bytes, &defaults, std::min(struct_size, kFieldsEnd<Args>));
  std::memcpy(bytes, &struct_size, sizeof(size_t));
}

// Copies a size-versioned struct of the caller's: fields past its struct_size (a caller built against an older
// header of this soname) keep their `defaults`, as deepep.h promises. What follows the fields this library knows
// must be zero, as its *Init function leaves it: a newer header's field set there cannot be honoured here, and a
// setting this library ignored would be lost without a word.
template <class Args>
Args checked_struct(const Args* args, const char* name, const Args& defaults) {
  DEEPEP_REQUIRE(args != nullptr, "%s is NULL", name);
  const size_t size = args->struct_size;
  check_struct_size<Args>(size, name);
  const unsigned char* bytes = reinterpret_cast<const unsigned char*>(args);
  for (size_t i = kFieldsEnd<Args>; i < size; ++i) {
    if (bytes[i] != 0) {
      fail(deepepNotSupported,
           "%s sets a field this library (%d.%d.%d) does not know (byte %zu of its %zu; this library's fields end at "
           "%zu): it needs the library of the header it was built with",
           name, DEEPEP_VERSION_MAJOR, DEEPEP_VERSION_MINOR, DEEPEP_VERSION_PATCH, i, size, kFieldsEnd<Args>);
    }
  }
  Args copy = defaults;
  std::memcpy(&copy, args, std::min(size, kFieldsEnd<Args>));
  copy.struct_size = sizeof(Args);
  return copy;
}

// The fault a kernel recorded, in words; deepepSuccess and "" when there is none.
deepepResult_t read_async_error(const deepepComm& comm, std::string* message);
// Throws the recorded fault, if any.
void raise_async_error(const deepepComm& comm);

}  // namespace deepep
