#include "moe/cpu/parallel.h"

#include <omp.h>

namespace moe::cpu {

int default_num_threads() {
  const int n = omp_get_max_threads();
  return n > 0 ? n : 1;
}

void parallel_for(std::int64_t num_tasks, int num_threads, const std::function<void(std::int64_t, int)>& body) {
  if (num_tasks <= 0) return;
  if (num_threads <= 1 || num_tasks == 1) {
    for (std::int64_t t = 0; t < num_tasks; ++t) body(t, 0);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
  for (std::int64_t t = 0; t < num_tasks; ++t) body(t, omp_get_thread_num());
}

}  // namespace moe::cpu
