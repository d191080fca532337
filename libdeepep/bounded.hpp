// Runs a blocking step that cannot be interrupted (an NVSHMEM collective) on a helper thread and waits for it at
// most `timeout_seconds`. On expiry the caller gets deepepTimeout and the helper thread is left to finish or hang
// on its own: the process can still report the error and exit instead of hanging.
#pragma once

#include <functional>

namespace deepep {

void run_bounded(double timeout_seconds, const char* what, std::function<void()> step);

}  // namespace deepep
