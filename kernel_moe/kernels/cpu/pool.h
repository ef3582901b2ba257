// A small thread pool for the decode kernels (grouped matrix-vector products) whose idle threads
// sleep instead of spinning.
//
// Why not at::parallel_for: its OpenMP threads spin for a while at the end of every parallel region
// (unless OMP_WAIT_POLICY=passive was set before the process started). A decode call is a few short
// regions with serial work between them, so on a machine where another process holds a core the
// spinning threads take the core the calling thread needs, and each region then waits for a
// descheduled thread: a call became 9x slower beside one busy process, while a dense layer (one
// thread at this size) was not slowed. Here the caller works through the chunks itself, the workers
// join when the scheduler runs them, spin only briefly, and then block; the call ends when every
// chunk is done, never waiting for a worker that has not started.

#pragma once

#include "omp_team.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <unistd.h>
#include <vector>

namespace kernel_moe {

class SleepingPool {
 public:
  // how this thread's current call runs its jobs (a Hold decides; the pool outside a hold)
  enum class Way { kPool, kTeam, kAlone };

  // While alive, run() on the thread that made it takes one way for every job of a call that reads
  // `bytes` of weights: on the calling thread alone when the machine has more runnable threads
  // than CPUs and the call is short (under kAloneBytes: a preempted helper holding a chunk would
  // keep it waiting for a time slice of a few milliseconds, longer than the whole call on one
  // core); else on the thread's ATen OpenMP team where PyTorch's last op left it awake and the
  // machine has a core per runnable thread (omp_team.h); else on the pool.
  class Hold {
   public:
    explicit Hold(int64_t bytes) : previous_(way()) { way() = choose(bytes); }
    ~Hold() { way() = previous_; }
    Hold(const Hold&) = delete;
    Hold& operator=(const Hold&) = delete;

   private:
    static Way choose(int64_t bytes) {
      if (at::get_num_threads() <= 1) return Way::kPool;  // run() works alone anyway: nothing to read
      const bool cores_free = OmpTeam::cores_free();
      if (!cores_free && bytes < kAloneBytes) return Way::kAlone;
      return cores_free && omp_team().awake() ? Way::kTeam : Way::kPool;
    }

    Way previous_;
  };
  static constexpr int64_t kAloneBytes = int64_t{16} << 20;

  // fn(chunk) for every chunk in [0, num_chunks), spread over at most `threads` threads (the caller
  // included); returns when all are done. Calls from several threads at once take turns.
  void run(int64_t num_chunks, int64_t threads, const std::function<void(int64_t)>& fn) {
    if (num_chunks <= 1 || threads <= 1 || way() == Way::kAlone) {
      for (int64_t c = 0; c < num_chunks; ++c) fn(c);
      return;
    }
    if (way() == Way::kTeam && !at::in_parallel_region()) {  // each of the team's threads takes chunks in turn
      Job job(fn, num_chunks);
      at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { job.work(); });
      return;
    }
    std::lock_guard<std::mutex> one_call(call_mutex_);
    ensure_workers(threads - 1);
    auto job = std::make_shared<Job>(fn, num_chunks);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = job;
      ++generation_;
    }
    wake_.notify_all();
    job->work();
    job->wait();
  }

  ~SleepingPool() {
    if (owner_pid_ != getpid()) return;  // a forked child: the threads were never its own
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) {
      if (t.joinable()) t.join();
    }
  }

 private:
  struct Job {
    Job(const std::function<void(int64_t)>& f, int64_t n) : fn(f), num_chunks(n) {}
    const std::function<void(int64_t)>& fn;  // alive until every chunk is done (run() waits)
    const int64_t num_chunks;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mutex;
    std::condition_variable finished;

    void work() {
      int64_t finished_here = 0;
      for (int64_t c = next.fetch_add(1); c < num_chunks; c = next.fetch_add(1)) {
        fn(c);
        ++finished_here;
      }
      if (finished_here > 0 && done.fetch_add(finished_here) + finished_here == num_chunks) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }

    void wait() {
      for (int spin = 0; spin < 2000 && done.load() < num_chunks; ++spin) std::this_thread::yield();
      std::unique_lock<std::mutex> lock(mutex);
      finished.wait(lock, [&] { return done.load() >= num_chunks; });
    }
  };

  static Way& way() {
    thread_local Way current = Way::kPool;
    return current;
  }

  void ensure_workers(int64_t count) {
    if (owner_pid_ != getpid()) {  // forked: start over with threads of this process
      for (auto& t : workers_) t.detach();
      workers_.clear();
      owner_pid_ = getpid();
    }
    while (static_cast<int64_t>(workers_.size()) < count) workers_.emplace_back([this] { loop(); });
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
        if (stopping_) return;
        seen = generation_;
        job = job_;
      }
      job->work();  // a late worker finds the chunks taken and goes back to sleep
    }
  }

  std::mutex call_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::shared_ptr<Job> job_;
  uint64_t generation_ = 0;
  bool stopping_ = false;
  pid_t owner_pid_ = getpid();
  std::vector<std::thread> workers_;
};

// The process's pool (never destroyed: worker threads must not be joined during static
// destruction, when the interpreter may already be gone).
inline SleepingPool& sleeping_pool() {
  static SleepingPool* pool = new SleepingPool();
  return *pool;
}

// fn(begin, end) over [0, n) in chunks of about `grain` items, on at::get_num_threads() threads.
inline void parallel_chunks(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t chunk = std::max<int64_t>(grain, (n + 4 * threads - 1) / (4 * threads));
  const int64_t num_chunks = (n + chunk - 1) / chunk;
  sleeping_pool().run(num_chunks, std::min(threads, num_chunks), [&](int64_t c) {
    fn(c * chunk, std::min(n, (c + 1) * chunk));
  });
}

}  // namespace kernel_moe
