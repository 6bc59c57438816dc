// Persistent worker threads that spin briefly between jobs (see spin_pool.h for why).
//
// Protocol: one job at a time (a mutex; a caller that finds it held runs serially). The caller publishes the job, then
// bumps `generation_` (release). Every worker, participating or not, acknowledges each generation by decrementing
// `pending_`; the caller returns only when pending_ is 0, so no worker can still be reading a job when the next one
// is published. A worker spins on generation_ for kSpinMicros after its last job, then sleeps on a condition variable.
#include "cpu/spin_pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SF_PAUSE() _mm_pause()
#else
#define SF_PAUSE() ((void)0)
#endif

namespace sparsefast_cpu {
namespace {

constexpr int64_t kSpinMicros = 100;  // longer than the gap between two kernels of a decode step, short next to a step

class SpinPool {
 public:
  void run(int64_t n, int64_t grain, int threads, const std::function<void(int64_t, int64_t)>& fn) {
    const int64_t parts = std::min<int64_t>(std::max(threads, 1), std::max<int64_t>(n / std::max<int64_t>(grain, 1), 1));
    if (parts <= 1) return fn(0, n);
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return fn(0, n);
    grow(static_cast<int>(parts) - 1);
    job_ = &fn;
    n_ = n;
    parts_ = parts;
    pending_.store(static_cast<int>(workers_), std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(wake_mutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    fn(0, n / parts);
    while (pending_.load(std::memory_order_acquire) != 0) SF_PAUSE();
  }

 private:
  // Starts workers until there are `count`. They are detached and never joined: they live as long as the process.
  void grow(int count) {
    while (workers_ < count) {
      std::thread(&SpinPool::work, this, ++workers_, generation_.load(std::memory_order_acquire)).detach();
    }
  }

  void work(int index, uint64_t seen) {
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      int spins = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        SF_PAUSE();
        if (++spins % 16 != 0) continue;
        // Yield while spinning: another runnable thread on this core (torch's OpenMP worker, woken for the next op)
        // runs at once instead of waiting for the scheduler to preempt a spinner.
        std::this_thread::yield();
        if (std::chrono::steady_clock::now() - start > std::chrono::microseconds(kSpinMicros)) {
          std::unique_lock<std::mutex> lock(wake_mutex_);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
          break;
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      if (index < parts_) (*job_)(n_ * index / parts_, n_ * (index + 1) / parts_);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::mutex busy_;
  std::mutex wake_mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  int workers_ = 0;  // changed only under busy_
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t n_ = 0, parts_ = 0;
};

SpinPool* g_pool = nullptr;
std::once_flag g_pool_once;

// A forked child has none of the parent's workers (and maybe a held mutex): it starts a pool of its own. The old
// pool is leaked, never touched again.
void reset_pool_in_child() { g_pool = new SpinPool(); }

SpinPool& pool() {
  std::call_once(g_pool_once, [] {
    g_pool = new SpinPool();
    pthread_atfork(nullptr, nullptr, reset_pool_in_child);
  });
  return *g_pool;
}

}  // namespace

void parallel_ranges(int64_t n, int64_t grain, int threads, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  pool().run(n, grain, threads, fn);
}

}  // namespace sparsefast_cpu
