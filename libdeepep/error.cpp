#include "error.hpp"

#include <cstdarg>
#include <cstdio>
#include <vector>

namespace deepep {

namespace {
thread_local std::string last_error_message;
}

void fail(deepepResult_t code, const char* format, ...) {
  va_list args;
  va_start(args, format);
  va_list copy;
  va_copy(copy, args);
  const int length = std::vsnprintf(nullptr, 0, format, copy);
  va_end(copy);
  std::vector<char> text(length > 0 ? static_cast<size_t>(length) + 1 : 1, '\0');
  if (length > 0) std::vsnprintf(text.data(), text.size(), format, args);
  va_end(args);
  throw Error(code, text.data());
}

void set_last_error_message(const std::string& message) { last_error_message = message; }

}  // namespace deepep

extern "C" {

DEEPEP_API const char* deepepGetLastErrorMessage(void) { return deepep::last_error_message.c_str(); }

DEEPEP_API const char* deepepGetErrorString(deepepResult_t result) {
  switch (result) {
    case deepepSuccess:
      return "success";
    case deepepInvalidArgument:
      return "invalid argument";
    case deepepInvalidUsage:
      return "invalid usage";
    case deepepCudaError:
      return "CUDA error";
    case deepepNvshmemError:
      return "NVSHMEM error";
    case deepepOutOfMemory:
      return "out of memory";
    case deepepTimeout:
      return "timeout";
    case deepepNoDevice:
      return "no CUDA device";
    case deepepNotSupported:
      return "not supported";
    case deepepInternalError:
      return "internal error";
    case deepepBufferTooSmall:
      return "buffer too small";
    case deepepRemoteError:
      return "remote error";
  }
  return "unknown deepep result code";
}

}  // extern "C"
