#include "lowrank_ops/parallel.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace lowrank_ops {
namespace {

thread_local bool in_parallel_region = false;

class ThreadPool {
 public:
  // The pool is created per process (a forked child starts a fresh one: the parent's
  // workers do not exist there) and never destroyed, so exit never joins threads.
  static ThreadPool& instance() {
    static std::mutex creation_mutex;
    static ThreadPool* pool = nullptr;
    std::lock_guard<std::mutex> lock(creation_mutex);
    if (pool == nullptr || pool->owner_pid_ != getpid()) pool = new ThreadPool();
    return *pool;
  }

  // Returns false (and runs nothing) when another region holds the pool.
  bool try_run(int64_t n_tasks, int n_threads, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    const int helpers = n_threads - 1;
    grow(helpers);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = &fn;
      n_tasks_ = n_tasks;
      next_task_.store(0);
      wanted_ = helpers;
      pending_ = helpers;
      error_ = nullptr;
      ++generation_;
    }
    work_cv_.notify_all();
    work();
    std::unique_lock<std::mutex> lock(mutex_);
    done_cv_.wait(lock, [&] { return pending_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
    return true;
  }

 private:
  ThreadPool() : owner_pid_(getpid()) {}

  void grow(int helpers) {
    while (static_cast<int>(workers_.size()) < helpers) {
      const int index = static_cast<int>(workers_.size());
      workers_.emplace_back([this, index] { worker_loop(index); });
      workers_.back().detach();
    }
  }

  void worker_loop(int index) {
    in_parallel_region = true;
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        work_cv_.wait(lock, [&] { return generation_ != seen && index < wanted_; });
        seen = generation_;
      }
      work();
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }

  void work() {
    const bool was_nested = in_parallel_region;
    in_parallel_region = true;
    for (int64_t task = next_task_.fetch_add(1); task < n_tasks_; task = next_task_.fetch_add(1)) {
      try {
        (*fn_)(task);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
        next_task_.store(n_tasks_);  // stop handing out work
      }
    }
    in_parallel_region = was_nested;
  }

  const pid_t owner_pid_;
  std::mutex busy_;
  std::mutex mutex_;
  std::condition_variable work_cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_tasks_ = 0;
  std::atomic<int64_t> next_task_{0};
  int wanted_ = 0;
  int pending_ = 0;
  uint64_t generation_ = 0;
  std::exception_ptr error_;
};

}  // namespace

void parallel_for(int64_t n_tasks, int num_threads, const std::function<void(int64_t)>& fn) {
  if (n_tasks <= 0) return;
  const int hardware = std::max(1u, std::thread::hardware_concurrency());
  const int n_threads = static_cast<int>(std::min<int64_t>({n_tasks, num_threads, 4 * hardware}));
  if (n_threads > 1 && !in_parallel_region && ThreadPool::instance().try_run(n_tasks, n_threads, fn)) return;
  for (int64_t task = 0; task < n_tasks; ++task) fn(task);
}

}  // namespace lowrank_ops
