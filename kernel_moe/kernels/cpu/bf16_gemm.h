// One expert's bf16 GEMM for the fused forward (bf16_gemm.cpp): y[M, N] = x[M, K] @ w[N, K]^T
// (+ bias) on the CPU's bf16 dot products, reading the weights as stored.

#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace kernel_moe {

struct Bf16Gemm {
  // whether this build has the kernel (a CPU with AVX512_BF16)
  static bool available();
  // whether it takes these rows: bf16, K even, unit stride along K (and even rows), more than 16
  // rows (with one 16-token vector its dot products wait on each other: 2-3x slower than at::mm,
  // measured)
  static bool takes_rows(const at::Tensor& x_MK) {
    return available() && x_MK.scalar_type() == at::kBFloat16 && x_MK.size(1) % 2 == 0 && x_MK.stride(1) == 1 &&
           x_MK.stride(0) % 2 == 0 && x_MK.size(0) > kMinRows;
  }
  static constexpr int64_t kMinRows = 16;
  // ... and these weights: bf16 with unit stride along K
  static bool takes_weights(const at::Tensor& w_NK) {
    return w_NK.scalar_type() == at::kBFloat16 && w_NK.stride(1) == 1;
  }

  // x packed once, for any number of weight matrices (or tiles of one)
  explicit Bf16Gemm(const at::Tensor& x_MK);
  // out_MN (bf16 or float32, unit stride along N) = x @ w_NK^T + bias_N (fp32, may be null), summed
  // in fp32 (then rounded for a bf16 out)
  void run(const at::Tensor& w_NK, const float* bias_N, at::Tensor& out_MN) const;

  int64_t M, Mp, K2;
  std::vector<std::pair<int64_t, int64_t>> panels;  // (first token, 16-token vectors) of each panel
  // panel by panel, [K / 2][16 V]: (x[m, 2p], x[m, 2p + 1]); zero for m >= M
  std::vector<uint32_t> pairs;
};

}  // namespace kernel_moe
