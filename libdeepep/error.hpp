// Errors inside libdeepep: C++ exceptions carrying a result code and a message, turned into a deepepResult_t and a
// per-thread message at every ABI entry point (no exception crosses the C boundary).
#pragma once

#include <string>

#include "deepep/deepep.h"

namespace deepep {

class Error {
 public:
  Error(deepepResult_t code, std::string message) : code_(code), message_(std::move(message)) {}
  deepepResult_t code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  deepepResult_t code_;
  std::string message_;
};

// printf-style message; throws Error(code, message).
[[noreturn]] void fail(deepepResult_t code, const char* format, ...) __attribute__((format(printf, 2, 3)));

// Sets the calling thread's last-error message.
void set_last_error_message(const std::string& message);

// Runs `body` and maps whatever it throws to a result code plus the calling thread's message.
template <class Body>
deepepResult_t guarded_call(const char* function, Body&& body) noexcept {
  try {
    body();
    return deepepSuccess;
  } catch (const Error& e) {
    set_last_error_message(std::string(function) + ": " + e.message());
    return e.code();
  } catch (const std::bad_alloc&) {
    set_last_error_message(std::string(function) + ": host memory exhausted");
    return deepepOutOfMemory;
  } catch (const std::exception& e) {
    set_last_error_message(std::string(function) + ": internal error: " + e.what());
    return deepepInternalError;
  } catch (...) {
    set_last_error_message(std::string(function) + ": internal error: unknown exception");
    return deepepInternalError;
  }
}

// Argument checks that read like the rule they enforce.
#define DEEPEP_REQUIRE(cond, ...)                                    \
  do {                                                               \
    if (!(cond)) ::deepep::fail(deepepInvalidArgument, __VA_ARGS__); \
  } while (0)

}  // namespace deepep
