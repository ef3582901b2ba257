// Whether the calling thread's ATen OpenMP team is awake: every worker thread of the team running
// or runnable, as it is for several milliseconds after each PyTorch parallel region (libgomp's
// workers spin before they sleep: 4-8 ms measured on the 2-core test machine); and whether the
// machine has no more runnable threads than CPUs (pool.h's Hold takes the team only then).
//
// Why: a decode call that follows a PyTorch op (attention, the router, a dense layer) finds that
// team's worker spinning on a core. Our own pool thread then shares that core with it, and a
// Qwen3-30B-A3B-size bf16 layer at T = 1 took 2.6 ms against 2.1 ms with no PyTorch op before
// it. Run on the team itself, the call needs no core that is not already its own. While the team
// sleeps, waking it costs what waking our pool costs; and a parallel region ends by waiting for
// every thread of the team, also one that a competing process keeps off its core, where the pool
// never waits for a thread that has not started. So the pool is used then, and whenever the
// machine has more runnable threads than CPUs.
//
// How: the workers' thread ids are learnt once per calling thread and team size (one parallel
// region that records them), then each check reads the state letter of each worker from
// /proc/self/task/<tid>/stat and the machine's runnable threads from /proc/loadavg (a few
// microseconds each). Where /proc cannot be read, or ATen does not run on OpenMP, the team counts
// as asleep.

#pragma once

#include <ATen/Parallel.h>

#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace kernel_moe {

class OmpTeam {
 public:
  ~OmpTeam() { close_all(); }

  // whether every worker of the calling thread's team (of at::get_num_threads() threads) is
  // running or runnable now (the caller checks cores_free() too)
  bool awake() {
#if AT_PARALLEL_OPENMP
    const int64_t threads = at::get_num_threads();
    if (threads <= 1 || at::in_parallel_region()) return false;
    if (threads != threads_ || getpid() != pid_) learn(threads);  // a forked child has a team of its own
    if (fds_.empty()) return false;
    char buf[512];
    for (const int fd : fds_) {
      const ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);
      if (n <= 0) return forget();
      buf[n] = '\0';
      const char* paren = strrchr(buf, ')');  // "tid (comm) S ...": comm may hold anything
      if (paren == nullptr || paren[1] != ' ' || paren[2] != 'R') return false;
    }
    return true;
#else
    return false;
#endif
  }

  // whether the machine's runnable threads (the fourth field of /proc/loadavg, "running/total",
  // counted now) are no more than its CPUs; true where /proc/loadavg cannot be read
  static bool cores_free() {
    static const int fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
    static const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    char buf[128];
    const ssize_t n = fd < 0 ? -1 : pread(fd, buf, sizeof(buf) - 1, 0);
    if (n <= 0) return true;
    buf[n] = '\0';
    long running = 0;  // "0.50 0.40 0.30 3/120 4567": three load averages, then running/total
    double load1, load5, load15;
    if (sscanf(buf, "%lf %lf %lf %ld/", &load1, &load5, &load15, &running) != 4) return true;
    return running <= cpus;
  }

 private:
  // the team's worker thread ids (thread 0 is the caller), one /proc file open per worker
  void learn(int64_t threads) {
    close_all();
    threads_ = threads;
    pid_ = getpid();
    std::vector<int64_t> tids(threads, -1);
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) tids[i] = static_cast<int64_t>(syscall(SYS_gettid));
    });
    const int64_t self = static_cast<int64_t>(syscall(SYS_gettid));
    for (const int64_t tid : tids) {
      if (tid == self) continue;
      const std::string path = "/proc/self/task/" + std::to_string(tid) + "/stat";
      const int fd = tid < 0 ? -1 : open(path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) {  // a worker we cannot watch: never count the team as awake
        close_all();
        return;
      }
      fds_.push_back(fd);
    }
    if (fds_.size() + 1 != static_cast<size_t>(threads)) close_all();
  }

  // a worker has gone (the team was rebuilt): learn it again on the next check
  bool forget() {
    close_all();
    threads_ = 0;
    return false;
  }

  void close_all() {
    for (const int fd : fds_) close(fd);
    fds_.clear();
  }

  int64_t threads_ = 0;
  pid_t pid_ = 0;
  std::vector<int> fds_;
};

// The calling thread's team (each thread that starts parallel regions has a team of its own).
inline OmpTeam& omp_team() {
  thread_local OmpTeam team;
  return team;
}

}  // namespace kernel_moe
