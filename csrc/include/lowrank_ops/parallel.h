// Parallel regions of the CPU kernels.
//
// Regions run on the OpenMP team torch's own CPU ops use, found at run time in the
// process (GOMP_parallel), so our kernels and torch's share one set of threads; without
// such a runtime (or with LOWRANK_OPS_THREADS=pool, or in a forked child) on a small
// persistent pool of our own.  We never link an OpenMP runtime ourselves: a second one
// in the process would oversubscribe the cores and can deadlock after fork.  The Python
// ops pass torch.get_num_threads(), so our kernels follow torch's thread setting.
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
// whichever participant is free (on our own pool the caller never waits for a worker
// that has not joined: a worker can be kept off its core for milliseconds).  So which
// thread runs a task is a cache-locality preference only, never a guarantee: fn must
// not depend on it.
void parallel_for(int64_t n_tasks, int num_threads, const std::function<void(int64_t)>& fn);

// Whether parallel_for runs on the process's OpenMP team (true) or on our own pool.
bool parallel_uses_openmp();

// While alive, parallel_for on this thread uses our own pool even where an OpenMP team
// exists.  For kernels that open many tiny regions in a row with no torch op in between
// (the Arnoldi cycle: several regions per matrix-vector product): there the pool's
// lighter region entry wins (measured 4.6-5.3 % of a whole 64 x 64 Darcy sequence) and
// torch's team, idle meanwhile, does not compete for the cores.
class PreferOwnPool {
 public:
  PreferOwnPool();
  ~PreferOwnPool();
  PreferOwnPool(const PreferOwnPool&) = delete;
  PreferOwnPool& operator=(const PreferOwnPool&) = delete;

 private:
  bool previous_;
};

}  // namespace lowrank_ops
