// A parallel loop for the CPU backend. Compiled once (parallel.cc, OpenMP), so headers that use
// it need no OpenMP flags of their own.
#pragma once

#include <cstdint>
#include <functional>

namespace moe::cpu {

// Threads the backend uses by default: OpenMP's maximum (OMP_NUM_THREADS), at least 1.
int default_num_threads();

// Calls body(task, thread) for task in [0, num_tasks) on up to num_threads threads, with dynamic
// scheduling; `thread` in [0, num_threads) identifies per-thread scratch.
void parallel_for(std::int64_t num_tasks, int num_threads, const std::function<void(std::int64_t, int)>& body);

}  // namespace moe::cpu
