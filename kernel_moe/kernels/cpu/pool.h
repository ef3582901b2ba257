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
  // While alive, the pool's workers poll for the next job instead of blocking (see above);
  // the workers are woken when the hold begins, so they are ready by the first job.
  class Hold {
   public:
    explicit Hold(SleepingPool& pool, int64_t threads) : pool_(pool) { pool_.begin_hold(threads); }
    ~Hold() { pool_.held_.fetch_sub(1); }
    Hold(const Hold&) = delete;
    Hold& operator=(const Hold&) = delete;

   private:
    SleepingPool& pool_;
  };

  // fn(chunk) for every chunk in [0, num_chunks), spread over at most `threads` threads (the caller
  // included); returns when all are done. Calls from several threads at once take turns.
  void run(int64_t num_chunks, int64_t threads, const std::function<void(int64_t)>& fn) {
    if (num_chunks <= 1 || threads <= 1) {
      for (int64_t c = 0; c < num_chunks; ++c) fn(c);
      return;
    }
    std::lock_guard<std::mutex> one_call(call_mutex_);
    auto job = std::make_shared<Job>(fn, num_chunks);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ensure_workers(threads - 1);
      job_ = job;
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    job->work();
    job->wait();
  }

  ~SleepingPool() {
    if (owner_pid_ != getpid()) return;  // a forked child: the threads were never its own
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_.store(true);
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

  void begin_hold(int64_t threads) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      held_.fetch_add(1);
      if (threads <= 1) return;
      ensure_workers(threads - 1);
      holds_.fetch_add(1);
    }
    wake_.notify_all();
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
    uint64_t seen = 0, seen_hold = 0;
    for (;;) {
      // a caller holds the pool: its next job comes within microseconds
      while (held_.load() > 0 && generation_.load() == seen && !stopping_) std::this_thread::yield();
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] {
          return stopping_ || generation_.load() != seen || (held_.load() > 0 && holds_.load() != seen_hold);
        });
        if (stopping_) return;
        seen_hold = holds_.load();
        if (generation_.load() == seen) continue;  // woken by a hold: poll for its first job
        seen = generation_.load();
        job = job_;
      }
      job->work();  // a late worker finds the chunks taken and goes back to waiting
    }
  }

  std::mutex call_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::shared_ptr<Job> job_;
  std::atomic<uint64_t> generation_{0};  // jobs started; written under mutex_
  std::atomic<uint64_t> holds_{0};       // holds begun; written under mutex_
  std::atomic<int64_t> held_{0};         // holds alive
  std::atomic<bool> stopping_{false};
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
