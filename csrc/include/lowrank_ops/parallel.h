// A small persistent thread pool for the CPU kernels.
//
// Why not OpenMP: torch ships its own OpenMP runtime; linking a second one into the
// same process oversubscribes cores and can deadlock after fork.  The Python op
// passes torch.get_num_threads(), so our kernels follow torch's thread setting.
#pragma once

#include <cstdint>
#include <functional>

namespace lowrank_ops {

// Runs fn(task) for every task in [0, n_tasks) on up to num_threads threads (the
// caller included) and returns when all are done.  The first exception thrown by a
// task is rethrown here.  Nested calls, and calls while another thread is using the
// pool, run serially on the calling thread.
void parallel_for(int64_t n_tasks, int num_threads, const std::function<void(int64_t)>& fn);

}  // namespace lowrank_ops
