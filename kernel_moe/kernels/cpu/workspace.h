// A float32 buffer kept from call to call for the batch forward's sorted expert outputs [S', H].
//
// Why: at a prefill's size (a Qwen3-30B-A3B-size layer, T 1024, top-8: 8192 x 2048 fp32, 64 MiB)
// a fresh buffer comes from a new mapping (glibc maps every allocation above 32 MiB afresh), and
// its first-touch page faults cost more than the writes: filling 64 MiB took 25 ms fresh against
// 3 ms reused on the 2-core test machine, a tenth of that layer's forward. One buffer of at most
// kMaxHeldBytes is kept; a larger need, or a call that finds the buffer in use by another
// thread, gets one of its own for that call.

#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <mutex>

namespace kernel_moe {

class Workspace {
 public:
  static constexpr int64_t kMaxHeldBytes = int64_t{256} << 20;

  // a float32 [rows, cols] tensor, uninitialised; the kept buffer is the caller's while `lock` is
  // held (the lease outlives every use of `tensor`)
  struct Lease {
    std::unique_lock<std::mutex> lock;
    at::Tensor tensor;
  };

  Lease float_rows(int64_t rows, int64_t cols) {
    const int64_t numel = rows * cols;
    const auto options = at::TensorOptions().dtype(at::kFloat);
    std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);
    if (!lock.owns_lock() || numel * 4 > kMaxHeldBytes) return {{}, at::empty({rows, cols}, options)};
    if (!held_.defined() || held_.numel() < numel) {
      held_ = at::Tensor();  // the old buffer goes before the new one is made
      held_ = at::empty({numel}, options);
    }
    return {std::move(lock), held_.narrow(0, 0, numel).view({rows, cols})};
  }

 private:
  std::mutex mutex_;
  at::Tensor held_;
};

// The process's workspace (never destroyed: its tensor must not be freed during static
// destruction, when the allocator may already be gone).
inline Workspace& workspace() {
  static Workspace* w = new Workspace();
  return *w;
}

}  // namespace kernel_moe
