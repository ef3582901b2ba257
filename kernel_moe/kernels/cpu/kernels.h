// Declarations of the native CPU kernels; bindings.cpp exposes them to Python.
//
// Legend: E experts, N output features, K input features, S rows sorted by expert, where
// expert e owns counts[e] consecutive rows.

#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

// Checks that counts holds one non-negative row count per expert (E of them) summing to rows;
// the error names ``kernel``.
inline void check_counts(const char* kernel, const std::vector<int64_t>& counts, int64_t E, int64_t rows) {
  TORCH_CHECK(static_cast<int64_t>(counts.size()) == E, kernel, ": ", counts.size(), " counts for ", E, " experts");
  int64_t sum = 0;
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(counts[e] >= 0, kernel, ": negative count for expert ", e);
    sum += counts[e];
  }
  TORCH_CHECK(sum == rows, kernel, ": counts sum to ", sum, ", expected ", rows, " rows");
}

// y[r] = w[e(r)] @ x[r], one pass over each active expert's weight rows (decode, small batches).
// x_SK: [S, K] float32, contiguous; w_ENK: [E, N, K] float32 or bfloat16 with unit stride
// along K. Returns y_SN: [S, N] float32.
at::Tensor grouped_matvec(const at::Tensor& x_SK, const at::Tensor& w_ENK, const std::vector<int64_t>& counts);

// grouped_matvec over quantized weights (quant_matvec.cpp): w_ENK one byte per weight (int8,
// fp8 e4m3) or two per byte (int4, K/2 bytes per row); scale float32 [E, N] (one per row) or
// [E, N, G] (groups of K / G features); format 1 int8, 2 fp8, 3 int4. x_SK float32 or bfloat16
// (int4 against bf16 x runs on the CPU's bf16 dot products where it has them; every other case
// converts x to float32). Returns y_SN: [S, N] float32.
at::Tensor grouped_matvec_quantized(const at::Tensor& x_SK, const at::Tensor& w_ENK, const at::Tensor& scale,
                                    const std::vector<int64_t>& counts, int64_t format);

// One quantized weight matrix (quant_matvec.cpp) in full precision: w_NK one byte per weight (int8,
// fp8) or two per byte (int4); scale float32 [N] or [N, G]; format as above. Returns [N, K] in
// dtype (float32, bfloat16, float16): the PyTorch paths' one-expert transient for large batches.
at::Tensor dequantize_rows(const at::Tensor& w_NK, const at::Tensor& scale, int64_t format, at::ScalarType dtype);

// x_MK @ w_NK^T (+ bias_N) for bf16 x and w (unit stride along K, K even), summed in fp32 and
// rounded to bf16, or kept in fp32 with float_out (bf16_gemm.cpp): the fused forward's expert GEMM,
// where the CPU has bf16 dot products (has_bf16_gemm in Python). Returns [M, N].
at::Tensor bf16_gemm(const at::Tensor& x_MK, const at::Tensor& w_NK, const std::optional<at::Tensor>& bias_N,
                     bool float_out);

// The routed-experts forward for batches: out[t] = sum_j weight[t, j] * expert_{e}(x[t]) over
// the K slots of token t, with the experts' work run concurrently (fused_experts.cpp).
// order_S: [S'] int64, the slot t * K + j of each kept row (S' <= T*K; dropped slots are left
// out and add nothing) sorted by expert; counts: rows per expert, summing to S'. x, w_up [E, N, H], w_down [E, H, I] and the optional biases [E, N], [E, H] share one
// dtype (float32, bfloat16 or float16); the sum is taken in float32. Returns [T, H] in x's dtype.
// activation, glu, alpha, limit, gate_softcap, up_softcap: as kernel_moe.kernels.contract.Activation
// defines them. Quantized experts: w_up / w_down hold the quantized bytes (as dequantize_rows takes
// them), w_up_scale [E, N (, G)] and w_down_scale [E, H (, G)] their scales, format their code (0:
// full precision, no scales); tiles are dequantized into x's dtype inside the tasks.
at::Tensor fused_experts(const at::Tensor& x_TH, const at::Tensor& topk_weights_TK, const at::Tensor& order_S,
                         const std::vector<int64_t>& counts, const at::Tensor& w_up_ENH, const at::Tensor& w_down_EHI,
                         const std::optional<at::Tensor>& b_up_EN, const std::optional<at::Tensor>& b_down_EH,
                         const std::string& activation, const std::string& glu, double alpha, double limit,
                         double gate_softcap, double up_softcap, const std::optional<at::Tensor>& w_up_scale,
                         const std::optional<at::Tensor>& w_down_scale, int64_t format);

// The routed-experts forward of decode and small batches (matvec_experts.cpp): fused_experts'
// arguments and result, computed by gathering the kept slots' rows, grouped_matvec or
// grouped_matvec_quantized for both projections (biases added in float32, the activation in
// float32), and the combine; no ATen parallel region is opened. Weights as grouped_matvec takes
// them (full precision: x's dtype, float32 or bfloat16) or quantized as grouped_matvec_quantized.
at::Tensor matvec_experts(const at::Tensor& x_TH, const at::Tensor& topk_weights_TK, const at::Tensor& order_S,
                          const std::vector<int64_t>& counts, const at::Tensor& w_up_ENH, const at::Tensor& w_down_EHI,
                          const std::optional<at::Tensor>& b_up_EN, const std::optional<at::Tensor>& b_down_EH,
                          const std::string& activation, const std::string& glu, double alpha, double limit,
                          double gate_softcap, double up_softcap, const std::optional<at::Tensor>& w_up_scale,
                          const std::optional<at::Tensor>& w_down_scale, int64_t format);
