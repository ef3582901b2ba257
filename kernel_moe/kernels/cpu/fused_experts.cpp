// The whole routed-experts forward on CPU for batches: gather, up-projection, activation,
// down-projection and weighted combine, with the experts' work run concurrently.
//
// Work is cut into tasks of one expert's block of consecutive sorted rows. A task gathers its
// token rows, runs both GEMMs and the activation on one thread, on data that stays in that
// core's cache, and writes its expert outputs, unrounded where the bf16 kernel computes them, to
// their sorted rows of an fp32 buffer kept between calls (workspace.h); then
// every token sums its k outputs, weighted, in slot order (so the result does not depend on
// the schedule). Per-expert GEMMs of tens to hundreds of rows scale poorly when each is spread
// over every thread in turn (each thread gets a thin slice and waits at its end); whole tasks
// per thread keep every thread busy, and the intermediate [S, N] and [S, I] tensors of a
// layer-wide pass are never materialised. Threads take tasks largest first from a shared
// counter, so they finish together.
//
// Quantized experts (int8, fp8, int4 with their scales): a task dequantizes its expert's weights
// a tile of kDequantRows weight rows at a time into the activations' dtype, just before the GEMM
// that reads the tile, so no full-precision copy of an expert (let alone the stack) exists; an
// expert's rows are never split over tasks, so each expert is dequantized once per call.
//
// Legend: T tokens, K top-k, S = T*K slots (the kept ones sorted; dropped slots are left out),
// H hidden, E experts, N up features, I intermediate, M rows of one task.

#include "bf16_gemm.h"
#include "experts_common.h"
#include "kernels.h"
#include "workspace.h"

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>

namespace {

using kernel_moe::experts::Activation;
using kernel_moe::experts::check_experts_call;
using kernel_moe::experts::combine_dispatch;
using kernel_moe::experts::parse_activation;
using kernel_moe::experts::sorted_positions;

// rows of one task: at least this many (a GEMM of fewer rows wastes its weight reads) ...
constexpr int64_t kMinTaskRows = 16;
// ... and about this many at most (the task's intermediates stay a few MB)
constexpr int64_t kMaxTaskRows = 256;
// weight rows of one dequantized tile of a quantized expert (Mixtral size: 256 x 14336 bf16, 7 MiB)
constexpr int64_t kDequantRows = 256;

struct Task {
  int64_t expert, first_row, rows;
};

// Each active expert's rows cut into blocks of about S / (2 * threads) rows (within the
// bounds above, and under 1.5 times that), so about two tasks per thread when there are rows
// enough; largest first.
// Quantized experts (``whole``) are never split: each task dequantizes its expert's weights.
std::vector<Task> plan_tasks(const std::vector<int64_t>& counts, int64_t S, int64_t threads, bool whole) {
  const int64_t target = whole ? std::max<int64_t>(S, 1)
                               : std::clamp<int64_t>((S + 2 * threads - 1) / (2 * threads), kMinTaskRows, kMaxTaskRows);
  std::vector<Task> tasks;
  int64_t row = 0;
  for (int64_t e = 0; e < static_cast<int64_t>(counts.size()); ++e) {
    const int64_t n = counts[e];
    // the nearest whole number of blocks: an expert a little over the target stays one GEMM
    const int64_t blocks = n == 0 ? 0 : std::max<int64_t>(1, (n + target / 2) / target);
    for (int64_t b = 0; b < blocks; ++b) {  // blocks of n / blocks rows, the first ones one row longer
      const int64_t first = row + b * (n / blocks) + std::min(b, n % blocks);
      tasks.push_back({e, first, n / blocks + (b < n % blocks ? 1 : 0)});
    }
    row += n;
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.rows > b.rows; });
  return tasks;
}

struct Inputs {
  const at::Tensor& x_TH;
  const at::Tensor& tok_S;
  const at::Tensor& w_up_ENH;
  const at::Tensor& w_down_EHI;
  const std::optional<at::Tensor>& b_up_EN;
  const std::optional<at::Tensor>& b_down_EH;
  const Activation& activation;
  const std::optional<at::Tensor>& w_up_scale;  // quantized weights: [E, N] or [E, N, G] float32
  const std::optional<at::Tensor>& w_down_scale;  // [E, H] or [E, H, G]
  int64_t format;  // 0 full precision, else the weight format code of dequantize_rows
};

// out_MN = x_MK @ w_NK^T (+ bias_N) for expert weights w_NK, full precision or quantized with
// scale_N[G]: quantized weights are dequantized kDequantRows rows at a time, each tile into x's
// dtype just before its GEMM. bf16 rows the bf16 dot-product kernel takes (bf16_gemm.cpp) run
// there, x packed once for every tile, the bias added in fp32 and the sums written in out's dtype
// (x's or float32) unrounded; everything else runs at::mm in x's dtype, converted where out is
// float32.
void expert_gemm(const at::Tensor& x_MK, const at::Tensor& w_NK, const at::Tensor* scale_N, const at::Tensor* bias_N,
                 int64_t format, at::Tensor out_MN) {
  const bool ours = kernel_moe::Bf16Gemm::takes_rows(x_MK) &&
                    (format != 0 || kernel_moe::Bf16Gemm::takes_weights(w_NK));
  std::optional<kernel_moe::Bf16Gemm> gemm;
  at::Tensor bias_f;
  if (ours) {
    gemm.emplace(x_MK);
    if (bias_N != nullptr) bias_f = bias_N->to(at::kFloat).contiguous();
  }
  // out_MX = x @ w_XK^T + bias[n0 : n0 + X]
  const auto multiply = [&](const at::Tensor& w_XK, int64_t n0, at::Tensor out_MX) {
    if (ours) return gemm->run(w_XK, bias_f.defined() ? bias_f.data_ptr<float>() + n0 : nullptr, out_MX);
    const at::Tensor bias_X = bias_N != nullptr ? bias_N->narrow(0, n0, w_XK.size(0)) : at::Tensor();
    if (out_MX.scalar_type() != x_MK.scalar_type()) {
      out_MX.copy_(bias_X.defined() ? at::addmm(bias_X, x_MK, w_XK.t()) : at::mm(x_MK, w_XK.t()));
    } else if (bias_X.defined()) {
      at::addmm_out(out_MX, bias_X, x_MK, w_XK.t());
    } else {
      at::mm_out(out_MX, x_MK, w_XK.t());
    }
  };
  if (format == 0) return multiply(w_NK, 0, out_MN);
  const int64_t N = w_NK.size(0);
  for (int64_t n0 = 0; n0 < N; n0 += kDequantRows) {
    const int64_t len = std::min(kDequantRows, N - n0);
    const at::Tensor tile = dequantize_rows(w_NK.narrow(0, n0, len), scale_N->narrow(0, n0, len), format,
                                            x_MK.scalar_type());
    multiply(tile, n0, out_MN.narrow(1, n0, len));
  }
}

// y_SH[task rows] = expert(x[tokens of the task rows]) in fp32
void run_task(const Task& t, const Inputs& in, const at::Tensor& y_SH) {
  // worker threads do not inherit the caller's dispatch state, and the weights may require
  // grad: nothing here may be recorded by autograd
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::NoGradGuard no_grad;
  const at::Tensor x_MH = in.x_TH.index_select(0, in.tok_S.narrow(0, t.first_row, t.rows));
  const at::Tensor w_up_NH = in.w_up_ENH.select(0, t.expert);
  const at::Tensor w_down_HI = in.w_down_EHI.select(0, t.expert);
  at::Tensor up_scale, down_scale, b_up, b_down;
  if (in.format != 0) {
    up_scale = in.w_up_scale->select(0, t.expert);
    down_scale = in.w_down_scale->select(0, t.expert);
  }
  if (in.b_up_EN.has_value()) b_up = in.b_up_EN->select(0, t.expert);
  if (in.b_down_EH.has_value()) b_down = in.b_down_EH->select(0, t.expert);
  const at::Tensor h_MN = at::empty({t.rows, w_up_NH.size(0)}, x_MH.options());
  expert_gemm(x_MH, w_up_NH, &up_scale, b_up.defined() ? &b_up : nullptr, in.format, h_MN);
  const at::Tensor a_MI = in.activation(h_MN);
  expert_gemm(a_MI, w_down_HI, &down_scale, b_down.defined() ? &b_down : nullptr, in.format,
              y_SH.narrow(0, t.first_row, t.rows));
}

}  // namespace

at::Tensor fused_experts(const at::Tensor& x_TH, const at::Tensor& topk_weights_TK, const at::Tensor& order_S,
                         const std::vector<int64_t>& counts, const at::Tensor& w_up_ENH, const at::Tensor& w_down_EHI,
                         const std::optional<at::Tensor>& b_up_EN, const std::optional<at::Tensor>& b_down_EH,
                         const std::string& activation, const std::string& glu, double alpha, double limit,
                         double gate_softcap, double up_softcap, const std::optional<at::Tensor>& w_up_scale,
                         const std::optional<at::Tensor>& w_down_scale, int64_t format) {
  check_experts_call("fused_experts", x_TH, topk_weights_TK, order_S, counts, w_up_ENH, w_down_EHI, b_up_EN, b_down_EH,
                     w_up_scale, w_down_scale, format);
  TORCH_CHECK(x_TH.scalar_type() == at::kFloat || x_TH.scalar_type() == at::kBFloat16 ||
                  x_TH.scalar_type() == at::kHalf,
              "fused_experts: x must be float32, bfloat16 or float16 (outputs are summed in float32)");
  for (const auto* b : {&b_up_EN, &b_down_EH}) {
    TORCH_CHECK(!b->has_value() || (*b)->scalar_type() == x_TH.scalar_type(), "fused_experts: biases need x's dtype");
  }
  const int64_t T = x_TH.size(0), H = x_TH.size(1), K = topk_weights_TK.size(1), S = T * K;
  const bool quantized = format != 0;
  const int64_t kept = order_S.size(0);  // slots not dropped, in sorted order
  const Activation act = parse_activation("fused_experts", activation, glu, alpha, limit, gate_softcap, up_softcap);

  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::NoGradGuard no_grad;
  const at::Tensor order = order_S.contiguous();
  const std::vector<int64_t> pos_S = sorted_positions("fused_experts", order, S);
  const at::Tensor tok_S = at::div(order, K, "floor");
  const Inputs in{x_TH, tok_S, w_up_ENH, w_down_EHI, b_up_EN, b_down_EH, act, w_up_scale, w_down_scale, format};
  const kernel_moe::Workspace::Lease y_lease = kernel_moe::workspace().float_rows(kept, H);
  const at::Tensor& y_SH = y_lease.tensor;

  const int64_t threads = at::get_num_threads();
  const std::vector<Task> tasks = plan_tasks(counts, kept, threads, quantized);
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  if (threads == 1 || num_tasks < threads || at::in_parallel_region()) {
    // too few tasks to share (or already inside a parallel region): one after the other,
    // each GEMM spread over the threads
    for (const Task& t : tasks) run_task(t, in, y_SH);
  } else {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t worker = begin; worker < end; ++worker) {
        for (int64_t i = next.fetch_add(1); i < num_tasks; i = next.fetch_add(1)) run_task(tasks[i], in, y_SH);
      }
    });
  }

  return combine_dispatch(y_SH, topk_weights_TK, pos_S, x_TH.scalar_type(), false);
}
