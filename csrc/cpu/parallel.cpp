#include "lowrank_ops/parallel.h"

#include <dlfcn.h>
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace lowrank_ops {
namespace {

thread_local bool in_parallel_region = false;
thread_local bool prefer_own_pool = false;  // see PreferOwnPool

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

// The tasks of one region and how they are claimed, shared by both ways of running a
// region (the pool below and the process's OpenMP team, see run_on_openmp).  Under the
// static schedule (n_tasks == threads) participant p first claims task p, so repeated
// calls on the same data find their part in the same core's cache whenever every thread
// shows up; then, as otherwise, any task left is claimed by whoever is free.  The first
// exception a task throws is kept (rethrown by the caller) and stops handing out work.
class TaskQueue {
 public:
  void reset(int64_t n_tasks, int n_threads, const std::function<void(int64_t)>& fn) {
    fn_ = &fn;
    n_tasks_ = n_tasks;
    static_schedule_ = n_tasks == n_threads;
    if (static_schedule_) {
      if (static_cast<int64_t>(claimed_size_) < n_tasks) {
        claimed_.reset(new std::atomic<bool>[static_cast<size_t>(n_tasks)]);
        claimed_size_ = static_cast<size_t>(n_tasks);
      }
      for (int64_t t = 0; t < n_tasks; ++t) claimed_[t].store(false, std::memory_order_relaxed);
    }
    next_task_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
  }

  // Runs tasks until none is left (participant: 0 for the caller, then 1, 2, ...).
  void work(int participant) {
    const bool was_nested = in_parallel_region;
    in_parallel_region = true;
    if (static_schedule_) {
      if (participant < n_tasks_ && !claimed_[participant].exchange(true, std::memory_order_acq_rel))
        run_task(participant);
      for (int64_t task = 0; task < n_tasks_; ++task)
        if (!claimed_[task].load(std::memory_order_relaxed) && !claimed_[task].exchange(true, std::memory_order_acq_rel))
          run_task(task);
    } else {
      for (int64_t task = next_task_.fetch_add(1); task < n_tasks_; task = next_task_.fetch_add(1)) run_task(task);
    }
    in_parallel_region = was_nested;
  }

  void finish() {
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void run_task(int64_t task) {
    try {
      (*fn_)(task);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (!error_) error_ = std::current_exception();
      next_task_.store(n_tasks_);
      if (static_schedule_)
        for (int64_t t = 0; t < n_tasks_; ++t) claimed_[t].store(true, std::memory_order_relaxed);
    }
  }

  // Written by the caller before the region opens, read by the participants after they
  // joined it; never rewritten while a participant may read them.
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_tasks_ = 0;
  bool static_schedule_ = false;
  std::unique_ptr<std::atomic<bool>[]> claimed_;
  size_t claimed_size_ = 0;
  std::atomic<int64_t> next_task_{0};
  std::mutex error_mutex_;
  std::exception_ptr error_;
};

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
    queue_.reset(n_tasks, n_threads, fn);
    wanted_ = helpers;
    finished_.store(0, std::memory_order_relaxed);
    const uint64_t generation = generation_of(region_.load(std::memory_order_relaxed)) + 1;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      region_.store((generation << kGenShift) | kOpenBit, std::memory_order_release);
    }
    work_cv_.notify_all();
    queue_.work(0);
    // Every task is claimed: close the region to late workers and wait for those that joined.
    uint64_t word = region_.load(std::memory_order_acquire);
    while (!region_.compare_exchange_weak(word, generation << kGenShift, std::memory_order_acq_rel)) {
    }
    const uint64_t joined = word & kJoinedMask;
    while (finished_.load(std::memory_order_acquire) != joined) cpu_relax();
    queue_.finish();
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
      if (index < wanted_) queue_.work(index + 1);
      finished_.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  const pid_t owner_pid_;
  std::mutex busy_;   // one region at a time
  std::mutex mutex_;  // guards sleeping
  std::condition_variable work_cv_;
  std::vector<std::thread> workers_;
  TaskQueue queue_;
  int wanted_ = 0;  // written before the region opens, read by workers after they joined it
  std::atomic<uint64_t> finished_{0};
  std::atomic<uint64_t> region_{0};
};

// The OpenMP runtime torch's CPU ops run on, when the process has loaded one with its
// symbols global (torch's Linux wheels load GNU OpenMP's libgomp that way; Intel's
// runtime exports the same GOMP_ entry points).  Our regions then run on torch's own
// team instead of a second set of threads: after every parallel torch op that team spins
// on all cores for milliseconds, and a pool of our own then finds no free core (measured:
// the small-batch linear kernel took 3.8 ms right after a 16 x 4096 x 16 torch matmul
// against 2.7 ms alone, on 2 cores).  LOWRANK_OPS_THREADS=pool forces the pool.
struct OpenMp {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;  // GOMP_parallel(fn, data, threads, flags)
  int (*thread_num)() = nullptr;                                          // omp_get_thread_num
  pid_t pid = 0;  // a forked child does not use it (its team's threads were not forked)
};

// Set in a forked child by a pthread_atfork handler registered when the library loads:
// the parent's OpenMP team did not fork, so the child runs its regions on a pool of its
// own.  (OpenMp::pid alone, recorded at the first region, missed a child whose parent had
// used torch's team but never run one of ours: the child entered GOMP_parallel on the dead
// team and waited forever at its barrier.)
std::atomic<bool> forked_child{false};
const bool atfork_registered = pthread_atfork(nullptr, nullptr, [] { forked_child.store(true); }) == 0;

const OpenMp& process_openmp() {
  static const OpenMp runtime = [] {
    OpenMp found;
    const char* choice = std::getenv("LOWRANK_OPS_THREADS");
    if (choice != nullptr && std::strcmp(choice, "pool") == 0) return found;
    found.parallel = reinterpret_cast<decltype(found.parallel)>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
    found.thread_num = reinterpret_cast<decltype(found.thread_num)>(dlsym(RTLD_DEFAULT, "omp_get_thread_num"));
    found.pid = getpid();
    if (found.parallel == nullptr || found.thread_num == nullptr) found = OpenMp{};
    return found;
  }();
  return runtime;
}

struct OpenMpRegion {
  TaskQueue* queue;
  int (*thread_num)();
  static void body(void* data) {
    auto* region = static_cast<OpenMpRegion*>(data);
    region->queue->work(region->thread_num());
  }
};

// Runs the region on the OpenMP team; false (nothing run) while another of our regions
// uses it (a second Python thread then runs its tasks serially, as with the pool).
bool run_on_openmp(const OpenMp& omp, int64_t n_tasks, int n_threads, const std::function<void(int64_t)>& fn) {
  static std::mutex busy;
  std::unique_lock<std::mutex> lock(busy, std::try_to_lock);
  if (!lock.owns_lock()) return false;
  static TaskQueue queue;
  queue.reset(n_tasks, n_threads, fn);
  OpenMpRegion region{&queue, omp.thread_num};
  omp.parallel(&OpenMpRegion::body, &region, static_cast<unsigned>(n_threads), 0);
  queue.finish();
  return true;
}

}  // namespace

PreferOwnPool::PreferOwnPool() : previous_(prefer_own_pool) { prefer_own_pool = true; }
PreferOwnPool::~PreferOwnPool() { prefer_own_pool = previous_; }

bool parallel_uses_openmp() {
  const OpenMp& omp = process_openmp();
  // Not in a forked child (without the handler, a pid that moved shows it).
  return omp.parallel != nullptr && (atfork_registered ? !forked_child.load(std::memory_order_relaxed)
                                                       : omp.pid == getpid());
}

void parallel_for(int64_t n_tasks, int num_threads, const std::function<void(int64_t)>& fn) {
  if (n_tasks <= 0) return;
  // Read once: glibc's hardware_concurrency reads /sys/devices/system/cpu/online on every
  // call (1.7 us measured, more than a whole small kernel).
  static const int hardware = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int n_threads = static_cast<int>(std::min<int64_t>({n_tasks, num_threads, 4 * hardware}));
  if (n_threads > 1 && !in_parallel_region) {
    const bool ran = parallel_uses_openmp() && !prefer_own_pool
                         ? run_on_openmp(process_openmp(), n_tasks, n_threads, fn)
                         : ThreadPool::instance().try_run(n_tasks, n_threads, fn);
    if (ran) return;
  }
  for (int64_t task = 0; task < n_tasks; ++task) fn(task);
}

}  // namespace lowrank_ops
