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
// pool, run serially on the calling thread (safe from several Python threads at once).
//
// Scheduling: with n_tasks == threads, participant p (the caller is 0) first takes task
// p, so repeated calls find their data in the same core's cache; otherwise tasks are
// claimed one at a time.  Either way a task whose worker has not started yet is run by
// whichever participant is free, and the caller never waits for a worker that has not
// joined: a worker can be kept off its core for milliseconds (torch's OpenMP threads
// spin after every parallel torch op; 4 ms per region measured on 2 cores).  So which
// thread runs a task is a cache-locality preference only, never a guarantee: fn must
// not depend on it.
void parallel_for(int64_t n_tasks, int num_threads, const std::function<void(int64_t)>& fn);

}  // namespace lowrank_ops
