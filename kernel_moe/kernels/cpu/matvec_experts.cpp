// The routed-experts forward of decode and small batches (a few rows per active expert) in one
// call: gather, up-projection on the grouped matrix-vector kernels (grouped_matvec.cpp,
// quant_matvec.cpp), bias, activation, down-projection, bias and the weighted combine.
//
// The call's four parallel jobs (up projection, activation, down projection, combine) run either
// all on the calling thread's ATen OpenMP team, where PyTorch's last op left that team awake and
// the machine has a core for each runnable thread (omp_team.h), or all on the sleeping pool
// (pool.h); nothing else runs in between, and the activation runs in row chunks under ATen's grain
// size, so each ATen op inside it runs inline. After every parallel region, PyTorch's OpenMP
// threads spin for a while: with the same steps as separate PyTorch calls (gather, activation,
// conversions), each opening a region of its own, a Qwen3-30B-A3B-size bf16 layer at T = 8 took
// 16.2-16.7 ms, and 11.7-12.3 ms with OMP_WAIT_POLICY=passive set before the process started (no
// spinning), on this 2-core machine.
//
// Legend: T tokens, K top-k, S' kept slots sorted by expert, H hidden, N up features, I intermediate.

#include "experts_common.h"
#include "kernels.h"
#include "pool.h"

#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cstring>

namespace {

using kernel_moe::experts::Activation;

// x rows of the sorted slots, [S', H]: converted to float, or copied where out_t is x's own type
template <typename in_t, typename out_t>
void gather_rows(const in_t* x_TH, const std::vector<int64_t>& tok_S, out_t* x_SH, int64_t H) {
  for (size_t s = 0; s < tok_S.size(); ++s) {
    const in_t* src = x_TH + tok_S[s] * H;
    out_t* dst = x_SH + s * H;
    if constexpr (std::is_same_v<in_t, out_t>) {
      std::memcpy(dst, src, H * sizeof(in_t));
    } else {
      for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<out_t>(static_cast<float>(src[h]));
    }
  }
}

// x_SH [S', H]: bf16 where the int4 kernel multiplies bf16 rows of a bf16 model (the model's own
// precision), float32 otherwise
at::Tensor gather(const at::Tensor& x_TH, const std::vector<int64_t>& tok_S, bool bf16_rows) {
  const int64_t H = x_TH.size(1), S = static_cast<int64_t>(tok_S.size());
  at::Tensor x_SH = at::empty({S, H}, x_TH.options().dtype(bf16_rows ? at::kBFloat16 : at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_TH.scalar_type(), "matvec_experts_gather", [&] {
    if (bf16_rows) {
      gather_rows<scalar_t, c10::BFloat16>(x_TH.data_ptr<scalar_t>(), tok_S, x_SH.data_ptr<c10::BFloat16>(), H);
    } else {
      gather_rows<scalar_t, float>(x_TH.data_ptr<scalar_t>(), tok_S, x_SH.data_ptr<float>(), H);
    }
  });
  return x_SH;
}

// y[r] += bias[expert of r] over the sorted rows (y float32 [S', X], bias [E, X] any float dtype)
void add_bias(at::Tensor& y_SX, const at::Tensor& bias_EX, const std::vector<int64_t>& counts) {
  const at::Tensor b = bias_EX.contiguous();
  const int64_t X = y_SX.size(1);
  float* y = y_SX.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, b.scalar_type(), "matvec_experts_bias", [&] {
    const scalar_t* b_ptr = b.data_ptr<scalar_t>();
    int64_t r = 0;
    for (size_t e = 0; e < counts.size(); ++e) {
      for (int64_t i = 0; i < counts[e]; ++i, ++r) {
        for (int64_t x = 0; x < X; ++x) y[r * X + x] += static_cast<float>(b_ptr[e * X + x]);
      }
    }
  });
}

// a_SI = act(h_SN) in chunks of rows under ATen's grain size (each op on a chunk runs inline on
// the thread that calls it), spread over the sleeping pool; a row too long for that runs on the
// calling thread, where ATen may parallelize it as usual
void activate(const Activation& act, const at::Tensor& h_SN, at::Tensor& a_SI) {
  const int64_t S = h_SN.size(0), N = h_SN.size(1);
  const auto rows = [&](int64_t r0, int64_t r1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // pool threads do not inherit the caller's state
    at::NoGradGuard no_grad;
    a_SI.narrow(0, r0, r1 - r0).copy_(act(h_SN.narrow(0, r0, r1 - r0)));
  };
  if (N >= at::internal::GRAIN_SIZE) return rows(0, S);
  const int64_t chunk = std::max<int64_t>(1, (at::internal::GRAIN_SIZE - 1) / N);
  const int64_t num_chunks = (S + chunk - 1) / chunk;
  kernel_moe::sleeping_pool().run(num_chunks, at::get_num_threads(), [&](int64_t c) {
    rows(c * chunk, std::min(S, (c + 1) * chunk));
  });
}

// the grouped matrix-vector product over full-precision (format 0) or quantized weights
at::Tensor project(const at::Tensor& x_SK, const at::Tensor& w_ENK, const std::optional<at::Tensor>& scale,
                   const std::vector<int64_t>& counts, int64_t format) {
  return format == 0 ? grouped_matvec(x_SK, w_ENK, counts) : grouped_matvec_quantized(x_SK, w_ENK, *scale, counts, format);
}

}  // namespace

at::Tensor matvec_experts(const at::Tensor& x_TH, const at::Tensor& topk_weights_TK, const at::Tensor& order_S,
                          const std::vector<int64_t>& counts, const at::Tensor& w_up_ENH, const at::Tensor& w_down_EHI,
                          const std::optional<at::Tensor>& b_up_EN, const std::optional<at::Tensor>& b_down_EH,
                          const std::string& activation, const std::string& glu, double alpha, double limit,
                          double gate_softcap, double up_softcap, const std::optional<at::Tensor>& w_up_scale,
                          const std::optional<at::Tensor>& w_down_scale, int64_t format) {
  kernel_moe::experts::check_experts_call("matvec_experts", x_TH, topk_weights_TK, order_S, counts, w_up_ENH,
                                          w_down_EHI, b_up_EN, b_down_EH, w_up_scale, w_down_scale, format);
  const int64_t T = x_TH.size(0), K = topk_weights_TK.size(1), S = T * K;
  const kernel_moe::experts::Activation act = kernel_moe::experts::parse_activation(
      "matvec_experts", activation, glu, alpha, limit, gate_softcap, up_softcap);

  // one way for every job of this call (pool.h): the OpenMP team where PyTorch's last op left it
  // awake, the calling thread alone for a short call on a busy machine, else the pool
  const int64_t E = w_up_ENH.size(0);
  const int64_t expert_bytes = E == 0 ? 0 : (w_up_ENH.nbytes() + w_down_EHI.nbytes()) / E;
  const int64_t active = std::count_if(counts.begin(), counts.end(), [](int64_t n) { return n > 0; });
  const kernel_moe::SleepingPool::Hold hold(active * expert_bytes);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::NoGradGuard no_grad;
  const at::Tensor order = order_S.contiguous();
  const std::vector<int64_t> pos_S = kernel_moe::experts::sorted_positions("matvec_experts", order, S);
  std::vector<int64_t> tok_S(order.size(0));
  for (size_t i = 0; i < tok_S.size(); ++i) tok_S[i] = order.data_ptr<int64_t>()[i] / K;
  const bool bf16_rows = format == 3 && x_TH.scalar_type() == at::kBFloat16;
  const at::Tensor x = x_TH.contiguous();

  at::Tensor h_SN = project(gather(x, tok_S, bf16_rows), w_up_ENH, w_up_scale, counts, format);
  if (b_up_EN.has_value()) add_bias(h_SN, *b_up_EN, counts);
  const int64_t N = h_SN.size(1);
  at::Tensor a_SI = at::empty({h_SN.size(0), act.glu == kernel_moe::experts::Glu::kNone ? N : N / 2},
                              h_SN.options().dtype(bf16_rows ? at::kBFloat16 : at::kFloat));
  activate(act, h_SN, a_SI);
  at::Tensor y_SH = project(a_SI, w_down_EHI, w_down_scale, counts, format);
  if (b_down_EH.has_value()) add_bias(y_SH, *b_down_EH, counts);
  return kernel_moe::experts::combine_dispatch(y_SH, topk_weights_TK, pos_S, x_TH.scalar_type(), true);
}
