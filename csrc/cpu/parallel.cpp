#include "lowrank_ops/parallel.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace lowrank_ops {
namespace {

thread_local bool in_parallel_region = false;

// How long an idle worker polls for the next region before sleeping: busy for
// kSpinWindow, then yielding its core at every poll (so that any other runnable thread
// there, e.g. one of torch's OpenMP workers, runs first) until kYieldWindow.  Waking a
// sleeping thread costs tens of microseconds on virtual machines, as much as a whole
// SpMV, and on a loaded machine the woken thread may wait for a core much longer;
// back-to-back calls (solver iterations, the two passes of an M-FAC step around
// Python-side work) arrive within these windows.
constexpr auto kSpinWindow = std::chrono::microseconds(200);
constexpr auto kYieldWindow = std::chrono::microseconds(2000);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// The region word packs (generation << kGenShift) | open bit | number of workers that
// joined.  A worker joins with one compare-and-swap that only succeeds while the region
// it saw is still open; the caller closes it (one more CAS) once every task has been
// claimed, and then waits for the joined workers only.  A worker that wakes after the
// close fails its CAS and touches nothing, so the next region can start at once.
constexpr uint64_t kJoinedMask = (uint64_t(1) << 20) - 1;
constexpr uint64_t kOpenBit = uint64_t(1) << 20;
constexpr int kGenShift = 21;

inline uint64_t generation_of(uint64_t word) { return word >> kGenShift; }

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
    // One task per thread: participant p first claims task p, so repeated calls on the
    // same data find their part in the same core's cache (as OpenMP's static schedule)
    // whenever every thread shows up; a task whose thread has not started yet is taken
    // by whoever finishes first.  Otherwise tasks are claimed one at a time.
    static_schedule_ = n_tasks == n_threads;
    if (static_schedule_) {
      if (static_cast<int64_t>(claimed_size_) < n_tasks) {
        claimed_.reset(new std::atomic<bool>[static_cast<size_t>(n_tasks)]);
        claimed_size_ = static_cast<size_t>(n_tasks);
      }
      for (int64_t t = 0; t < n_tasks; ++t) claimed_[t].store(false, std::memory_order_relaxed);
    }
    next_task_.store(0, std::memory_order_relaxed);
    wanted_ = helpers;
    finished_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    const uint64_t generation = generation_of(region_.load(std::memory_order_relaxed)) + 1;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      region_.store((generation << kGenShift) | kOpenBit, std::memory_order_release);
    }
    work_cv_.notify_all();
    work(0);
    // Every task is claimed: close the region to late workers and wait for those that joined.
    uint64_t word = region_.load(std::memory_order_acquire);
    while (!region_.compare_exchange_weak(word, generation << kGenShift, std::memory_order_acq_rel)) {
    }
    const uint64_t joined = word & kJoinedMask;
    while (finished_.load(std::memory_order_acquire) != joined) cpu_relax();
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

  // Waits for a region word of a generation other than `seen`; returns that word.
  uint64_t wait_for_region(uint64_t seen) {
    const auto start = std::chrono::steady_clock::now();
    bool yielding = false;
    for (int spins = 0;; ++spins) {
      const uint64_t word = region_.load(std::memory_order_acquire);
      if (generation_of(word) != seen) return word;
      if (yielding) {
        std::this_thread::yield();
        if (std::chrono::steady_clock::now() - start > kYieldWindow) break;
      } else if ((spins & 63) == 63) {
        yielding = std::chrono::steady_clock::now() - start > kSpinWindow;
      } else {
        cpu_relax();
      }
    }
    std::unique_lock<std::mutex> lock(mutex_);
    work_cv_.wait(lock, [&] { return generation_of(region_.load(std::memory_order_acquire)) != seen; });
    return region_.load(std::memory_order_acquire);
  }

  // Joins the region `word` belongs to if it is still open; false if closed or replaced.
  bool join(uint64_t word) {
    const uint64_t generation = generation_of(word);
    while ((word & kOpenBit) && generation_of(word) == generation) {
      if (region_.compare_exchange_weak(word, word + 1, std::memory_order_acq_rel)) return true;
    }
    return false;
  }

  void worker_loop(int index) {
    in_parallel_region = true;
    uint64_t seen = 0;
    for (;;) {
      const uint64_t word = wait_for_region(seen);
      seen = generation_of(word);
      // wanted_ is read only after joining: before, it may belong to another region.
      if (!join(word)) continue;
      if (index < wanted_) work(index + 1);
      finished_.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  // Runs tasks until none is left: under the static schedule the participant's own
  // task first, then any unclaimed one; otherwise tasks claimed one at a time.
  void work(int participant) {
    const bool was_nested = in_parallel_region;
    in_parallel_region = true;
    if (static_schedule_) {
      if (!claimed_[participant].exchange(true, std::memory_order_acq_rel)) run_task(participant);
      for (int64_t task = 0; task < n_tasks_; ++task)
        if (!claimed_[task].load(std::memory_order_relaxed) && !claimed_[task].exchange(true, std::memory_order_acq_rel))
          run_task(task);
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
      // Stop handing out work.
      next_task_.store(n_tasks_);
      if (static_schedule_)
        for (int64_t t = 0; t < n_tasks_; ++t) claimed_[t].store(true, std::memory_order_relaxed);
    }
  }

  const pid_t owner_pid_;
  std::mutex busy_;   // one region at a time
  std::mutex mutex_;  // guards sleeping and error_
  std::condition_variable work_cv_;
  std::vector<std::thread> workers_;
  // Written by the caller before the region opens (release), read by workers after
  // they join it (acquire); never rewritten while a joined worker may read them.
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_tasks_ = 0;
  bool static_schedule_ = false;
  int wanted_ = 0;
  std::unique_ptr<std::atomic<bool>[]> claimed_;
  size_t claimed_size_ = 0;
  std::atomic<int64_t> next_task_{0};
  std::atomic<uint64_t> finished_{0};
  std::atomic<uint64_t> region_{0};
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
