// Shared by the two native routed-experts forwards (fused_experts.cpp for batches,
// matvec_experts.cpp for decode): the activation as the experts contract defines it, the sorted
// position of each slot, and the weighted combine of sorted expert outputs.
//
// Legend: T tokens, K top-k, S = T*K slots (S' kept, sorted by expert), H hidden, N up features, I intermediate.

#pragma once

#include "kernels.h"
#include "pool.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace kernel_moe::experts {

enum class Glu { kNone, kConcat, kInterleaved };

struct Activation {
  std::string name;
  Glu glu;
  double alpha, limit, gate_softcap, up_softcap;

  at::Tensor pointwise(const at::Tensor& x) const {
    if (name == "silu") return at::silu(x);
    if (name == "gelu") return at::gelu(x);
    if (name == "gelu_tanh") return at::gelu(x, "tanh");
    if (name == "relu2") return at::relu(x).square();
    return at::relu(x);
  }

  static at::Tensor softcap(const at::Tensor& v, double cap) {
    return std::isinf(cap) ? v : at::tanh(v / cap) * cap;
  }

  // [M, N] up-projection features -> [M, I], as kernel_moe.kernels.contract.Activation defines it
  at::Tensor operator()(const at::Tensor& h_MN) const {
    if (glu == Glu::kNone) return pointwise(h_MN);
    const int64_t N = h_MN.size(1), I = N / 2;
    at::Tensor gate = glu == Glu::kConcat ? h_MN.narrow(1, 0, I) : h_MN.slice(1, 0, N, 2);
    at::Tensor up = glu == Glu::kConcat ? h_MN.narrow(1, I, I) : h_MN.slice(1, 1, N, 2);
    if (!std::isinf(limit)) {
      gate = gate.clamp_max(limit);
      up = up.clamp(-limit, limit);
    }
    if (name == "gpt_oss") return (up + 1) * (gate * at::sigmoid(gate * alpha));
    if (!std::isinf(gate_softcap) || !std::isinf(up_softcap)) {
      return softcap(gate, gate_softcap) * at::sigmoid(gate) * softcap(up, up_softcap);
    }
    return pointwise(gate) * up;
  }
};

// ``kernel`` names the caller in errors
inline Activation parse_activation(const char* kernel, const std::string& name, const std::string& glu, double alpha,
                                   double limit, double gate_softcap, double up_softcap) {
  TORCH_CHECK(name == "silu" || name == "gelu" || name == "gelu_tanh" || name == "relu" || name == "relu2" ||
                  name == "gpt_oss",
              kernel, ": activation '", name, "' is not supported; allowed: silu, gelu, gelu_tanh, relu, relu2, gpt_oss");
  TORCH_CHECK(glu == "none" || glu == "concat" || glu == "interleaved", kernel, ": glu '", glu,
              "' is not supported; allowed: none, concat, interleaved");
  TORCH_CHECK(!(name == "gpt_oss" && glu == "none"), kernel, ": activation 'gpt_oss' needs a gated layout");
  const Glu layout = glu == "none" ? Glu::kNone : glu == "concat" ? Glu::kConcat : Glu::kInterleaved;
  return {name, layout, alpha, limit, gate_softcap, up_softcap};
}

// The argument checks both native forwards share (``kernel`` names the caller in errors): ranks,
// shapes of the weights, scales and biases against x, the format and its scales, the counts, CPU
// tensors, int64 order, and full-precision weights in x's dtype.
inline void check_experts_call(const char* kernel, const at::Tensor& x_TH, const at::Tensor& topk_weights_TK,
                               const at::Tensor& order_S, const std::vector<int64_t>& counts,
                               const at::Tensor& w_up_ENH, const at::Tensor& w_down_EHI,
                               const std::optional<at::Tensor>& b_up_EN, const std::optional<at::Tensor>& b_down_EH,
                               const std::optional<at::Tensor>& w_up_scale,
                               const std::optional<at::Tensor>& w_down_scale, int64_t format) {
  TORCH_CHECK(x_TH.dim() == 2 && topk_weights_TK.dim() == 2 && order_S.dim() == 1 && w_up_ENH.dim() == 3 &&
                  w_down_EHI.dim() == 3,
              kernel, ": x must be [T, H], topk_weights [T, K], order [S], w_up [E, N, H], w_down [E, H, I]");
  const int64_t T = x_TH.size(0), H = x_TH.size(1), S = T * topk_weights_TK.size(1);
  TORCH_CHECK(format >= 0 && format <= 3, kernel, ": format ", format,
              " is not one of 0 (full precision), 1 (int8), 2 (fp8), 3 (int4)");
  const bool quantized = format != 0;
  TORCH_CHECK(quantized == (w_up_scale.has_value() && w_down_scale.has_value()), kernel,
              ": quantized weights (format ", format, ") need both scales, full-precision ones none");
  const int64_t packing = format == 3 ? 2 : 1;  // int4: two weights per byte along the input features
  const int64_t E = w_up_ENH.size(0), N = w_up_ENH.size(1), I = w_down_EHI.size(2) * packing;
  const int64_t kept = order_S.size(0);  // slots not dropped, in sorted order
  TORCH_CHECK(topk_weights_TK.size(0) == T && kept <= S, kernel, ": topk_weights is ", topk_weights_TK.sizes(),
              " and order has ", kept, " entries for ", T, " tokens");
  TORCH_CHECK(w_up_ENH.size(2) * packing == H && w_down_EHI.size(0) == E && w_down_EHI.size(1) == H, kernel,
              ": w_up is ", w_up_ENH.sizes(), " and w_down ", w_down_EHI.sizes(), " for hidden size ", H);
  TORCH_CHECK(N == I || N == 2 * I, kernel, ": w_up has ", N, " features for intermediate ", I);
  if (quantized) {
    TORCH_CHECK(w_up_ENH.element_size() == 1 && w_down_EHI.element_size() == 1 && w_up_ENH.is_contiguous() &&
                    w_down_EHI.is_contiguous(),
                kernel, ": quantized w_up and w_down must be contiguous one-byte tensors");
    TORCH_CHECK(w_up_scale->size(0) == E && w_up_scale->size(1) == N && w_down_scale->size(0) == E &&
                    w_down_scale->size(1) == H,
                kernel, ": scales ", w_up_scale->sizes(), " and ", w_down_scale->sizes(), " for w_up ",
                w_up_ENH.sizes(), " and w_down ", w_down_EHI.sizes());
  } else {
    TORCH_CHECK(w_up_ENH.scalar_type() == x_TH.scalar_type() && w_down_EHI.scalar_type() == x_TH.scalar_type(),
                kernel, ": x, w_up and w_down must share one dtype");
  }
  TORCH_CHECK(order_S.scalar_type() == at::kLong, kernel, ": order must be int64");
  TORCH_CHECK(x_TH.device().is_cpu() && w_up_ENH.device().is_cpu() && w_down_EHI.device().is_cpu() &&
                  topk_weights_TK.device().is_cpu() && order_S.device().is_cpu(),
              kernel, ": CPU tensors only");
  TORCH_CHECK(!b_up_EN.has_value() || (b_up_EN->dim() == 2 && b_up_EN->size(0) == E && b_up_EN->size(1) == N),
              kernel, ": b_up must be [E, N]");
  TORCH_CHECK(!b_down_EH.has_value() || (b_down_EH->dim() == 2 && b_down_EH->size(0) == E && b_down_EH->size(1) == H),
              kernel, ": b_down must be [E, H]");
  check_counts(kernel, counts, E, kept);
}

// The sorted row of each slot t * K + j of S slots (-1 for a dropped slot), from order (the slot
// of each sorted row); ``kernel`` names the caller in errors.
inline std::vector<int64_t> sorted_positions(const char* kernel, const at::Tensor& order, int64_t S) {
  std::vector<int64_t> pos_S(S, -1);
  const int64_t* order_ptr = order.data_ptr<int64_t>();
  for (int64_t i = 0; i < order.size(0); ++i) {
    const int64_t slot = order_ptr[i];
    TORCH_CHECK(slot >= 0 && slot < S && pos_S[slot] < 0, kernel, ": order holds slot ", slot, " at ", i,
                ", outside [0, ", S, ") or twice");
    pos_S[slot] = i;
  }
  return pos_S;
}

// out[t] = sum_j weight[t, j] * y[pos[t * K + j]] for tokens [begin, end), summed in fp32 in slot
// order; a dropped slot (pos -1) adds nothing
template <typename scalar_t>
void combine_tokens(const float* y_SH, const float* weights_TK, const int64_t* pos_S, scalar_t* out_TH, int64_t K,
                    int64_t H, int64_t begin, int64_t end) {
  std::vector<float> acc(H);
  for (int64_t t = begin; t < end; ++t) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t j = 0; j < K; ++j) {
      if (pos_S[t * K + j] < 0) continue;
      const float w = weights_TK[t * K + j];
      const float* y = y_SH + pos_S[t * K + j] * H;
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) acc[h] += w * y[h];
    }
    for (int64_t h = 0; h < H; ++h) out_TH[t * H + h] = static_cast<scalar_t>(acc[h]);
  }
}

// The weighted combine in dtype, [T, H], over the tokens in chunks of 8: on the sleeping pool
// (``on_pool``: a decode call, which opens no ATen parallel region) or at::parallel_for (batches,
// whose surrounding PyTorch ops keep those threads warm). Either way a token's sum has one order.
inline at::Tensor combine_dispatch(const at::Tensor& y_SH, const at::Tensor& topk_weights_TK,
                                   const std::vector<int64_t>& pos_S, at::ScalarType dtype, bool on_pool) {
  const int64_t T = topk_weights_TK.size(0), K = topk_weights_TK.size(1), H = y_SH.size(1);
  const at::Tensor weights_TK = topk_weights_TK.to(at::kFloat).contiguous();
  at::Tensor out_TH = at::empty({T, H}, y_SH.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "experts_combine", [&] {
    const auto part = [&](int64_t begin, int64_t end) {
      combine_tokens<scalar_t>(y_SH.data_ptr<float>(), weights_TK.data_ptr<float>(), pos_S.data(),
                               out_TH.data_ptr<scalar_t>(), K, H, begin, end);
    };
    if (on_pool) {
      kernel_moe::parallel_chunks(T, 8, part);
    } else {
      at::parallel_for(0, T, 8, part);
    }
  });
  return out_TH;
}

}  // namespace kernel_moe::experts
