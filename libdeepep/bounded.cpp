#include "bounded.hpp"

#include <chrono>
#include <future>
#include <memory>
#include <thread>

#include "error.hpp"

namespace deepep {

void run_bounded(double timeout_seconds, const char* what, std::function<void()> step) {
  // The promise lives in a shared_ptr owned by the thread too, so a detached thread never touches freed memory.
  auto done = std::make_shared<std::promise<void>>();
  std::future<void> result = done->get_future();
  std::thread worker([done, step = std::move(step)]() {
    try {
      step();
      done->set_value();
    } catch (...) {
      done->set_exception(std::current_exception());
    }
  });
  const auto limit = std::chrono::duration<double>(timeout_seconds);
  if (result.wait_for(limit) != std::future_status::ready) {
    worker.detach();
    fail(deepepTimeout, "%s did not finish within %.1f s (timeout_seconds): a peer rank did not take part", what,
         timeout_seconds);
  }
  worker.join();
  result.get();  // rethrows the step's Error, if any
}

}  // namespace deepep
