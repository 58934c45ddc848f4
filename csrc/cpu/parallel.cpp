#include "lowrank_ops/parallel.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace lowrank_ops {
namespace {

thread_local bool in_parallel_region = false;

// How long an idle worker polls for the next region before sleeping.  Waking a
// sleeping thread costs tens of microseconds on virtual machines, as much as a whole
// SpMV; back-to-back calls (solver iterations) arrive well within this window.
constexpr auto kSpinWindow = std::chrono::microseconds(200);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

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
    fn_ = &fn;
    n_tasks_ = n_tasks;
    // One task per thread: a fixed task -> thread map, so repeated calls on the same
    // data find their part in the same core's cache (as OpenMP's static schedule).
    static_schedule_ = n_tasks == n_threads;
    next_task_.store(static_schedule_ ? n_tasks : 0, std::memory_order_relaxed);
    wanted_ = helpers;
    pending_.store(helpers, std::memory_order_relaxed);
    error_ = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    work_cv_.notify_all();
    work(0);
    while (pending_.load(std::memory_order_acquire) != 0) cpu_relax();
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

  uint64_t wait_for_region(uint64_t seen) {
    const auto deadline = std::chrono::steady_clock::now() + kSpinWindow;
    for (int spins = 0;; ++spins) {
      const uint64_t now = generation_.load(std::memory_order_acquire);
      if (now != seen) return now;
      if ((spins & 63) == 63 && std::chrono::steady_clock::now() > deadline) break;
      cpu_relax();
    }
    std::unique_lock<std::mutex> lock(mutex_);
    work_cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
    return generation_.load(std::memory_order_acquire);
  }

  void worker_loop(int index) {
    in_parallel_region = true;
    uint64_t seen = 0;
    for (;;) {
      seen = wait_for_region(seen);
      if (index >= wanted_) continue;  // this region needs fewer threads
      work(index + 1);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  // Runs the participant's share: its own task under the static schedule, else tasks
  // claimed one at a time.
  void work(int participant) {
    const bool was_nested = in_parallel_region;
    in_parallel_region = true;
    if (static_schedule_) {
      run_task(participant);
    } else {
      for (int64_t task = next_task_.fetch_add(1); task < n_tasks_; task = next_task_.fetch_add(1)) run_task(task);
    }
    in_parallel_region = was_nested;
  }

  void run_task(int64_t task) {
    try {
      (*fn_)(task);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
      next_task_.store(n_tasks_);  // stop handing out work
    }
  }

  const pid_t owner_pid_;
  std::mutex busy_;   // one region at a time
  std::mutex mutex_;  // guards sleeping and error_
  std::condition_variable work_cv_;
  std::vector<std::thread> workers_;
  // Written by the caller before the generation bump (release), read by workers after
  // they observe it (acquire).
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_tasks_ = 0;
  bool static_schedule_ = false;
  int wanted_ = 0;
  std::atomic<int64_t> next_task_{0};
  std::atomic<int> pending_{0};
  std::atomic<uint64_t> generation_{0};
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
