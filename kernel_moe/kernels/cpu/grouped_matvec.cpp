// Grouped matrix-vector products for MoE experts on CPU: decode and small batches.
//
// y[r] = W[e(r)] @ x[r] for rows r sorted by expert, where expert e owns counts[e]
// consecutive rows. Each weight row is loaded once and multiplied with all of its expert's
// rows (in blocks of four), so the weights stream through the cache once per call. oneDNN
// and MKL block a matrix-vector product over many weight rows at a time, which keeps the
// hardware prefetcher from streaming cold weights; one row at a time reads them at close
// to memory bandwidth.
//
// Legend: E experts, N output features, K input features, S rows (sum of counts).

#include "kernels.h"
#include "pool.h"

#include <ATen/Parallel.h>

#include <cstring>

namespace {

template <typename W>
inline float to_float(W v);

template <>
inline float to_float<float>(float v) {
  return v;
}

template <>
inline float to_float<uint16_t>(uint16_t v) {  // bfloat16 bits -> float
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// out[j] = w . x[j] for ROWS rows of x spaced K apart; w and each x row hold K values.
template <typename W, int ROWS>
inline void dot_rows(const W* __restrict w, const float* __restrict x, int64_t K, float* out) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t k = 0; k < K; ++k) {
    const float wk = to_float<W>(w[k]);
    s0 += wk * x[k];
    if (ROWS > 1) s1 += wk * x[K + k];
    if (ROWS > 2) s2 += wk * x[2 * K + k];
    if (ROWS > 3) s3 += wk * x[3 * K + k];
  }
  out[0] = s0;
  if (ROWS > 1) out[1] = s1;
  if (ROWS > 2) out[2] = s2;
  if (ROWS > 3) out[3] = s3;
}

struct Group {
  int64_t expert, first_row, rows;
};

template <typename W>
void grouped_matvec_impl(const W* w_ENK, int64_t stride_e, int64_t stride_n, const float* x_SK, float* y_SN,
                         int64_t N, int64_t K, const std::vector<Group>& groups) {
  const int64_t G = static_cast<int64_t>(groups.size());
  // one task = one weight row of one group, at least 16 of them per thread chunk
  kernel_moe::parallel_chunks(G * N, 16, [&](int64_t begin, int64_t end) {
    float acc[4];
    for (int64_t i = begin; i < end; ++i) {
      const Group& g = groups[i / N];
      const int64_t n = i % N;
      const W* w_K = w_ENK + g.expert * stride_e + n * stride_n;
      int64_t r = g.first_row;
      const int64_t r_end = g.first_row + g.rows;
      for (; r + 4 <= r_end; r += 4) {
        dot_rows<W, 4>(w_K, x_SK + r * K, K, acc);
        for (int j = 0; j < 4; ++j) y_SN[(r + j) * N + n] = acc[j];
      }
      const int64_t rest = r_end - r;
      if (rest == 3) dot_rows<W, 3>(w_K, x_SK + r * K, K, acc);
      if (rest == 2) dot_rows<W, 2>(w_K, x_SK + r * K, K, acc);
      if (rest == 1) dot_rows<W, 1>(w_K, x_SK + r * K, K, acc);
      for (int64_t j = 0; j < rest; ++j) y_SN[(r + j) * N + n] = acc[j];
    }
  });
}

}  // namespace

// Any expert and row strides of w_ENK; counts: E ints summing to S.
at::Tensor grouped_matvec(const at::Tensor& x_SK, const at::Tensor& w_ENK, const std::vector<int64_t>& counts) {
  TORCH_CHECK(x_SK.dim() == 2 && x_SK.scalar_type() == at::kFloat && x_SK.is_contiguous(),
              "grouped_matvec: x must be a contiguous float32 [S, K] tensor");
  TORCH_CHECK(w_ENK.dim() == 3 && w_ENK.stride(2) == 1, "grouped_matvec: w must be [E, N, K] with unit stride along K");
  TORCH_CHECK(w_ENK.scalar_type() == at::kFloat || w_ENK.scalar_type() == at::kBFloat16,
              "grouped_matvec: w must be float32 or bfloat16");
  TORCH_CHECK(x_SK.device().is_cpu() && w_ENK.device().is_cpu(), "grouped_matvec: CPU tensors only");
  const int64_t E = w_ENK.size(0), N = w_ENK.size(1), K = w_ENK.size(2);
  TORCH_CHECK(x_SK.size(1) == K, "grouped_matvec: x has ", x_SK.size(1), " features, w expects ", K);
  check_counts("grouped_matvec", counts, E, x_SK.size(0));
  std::vector<Group> groups;
  int64_t row = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (counts[e] > 0) groups.push_back({e, row, counts[e]});
    row += counts[e];
  }
  auto y_SN = at::empty({x_SK.size(0), N}, x_SK.options());
  if (w_ENK.scalar_type() == at::kBFloat16) {
    grouped_matvec_impl<uint16_t>(reinterpret_cast<const uint16_t*>(w_ENK.data_ptr()), w_ENK.stride(0), w_ENK.stride(1),
                                  x_SK.data_ptr<float>(), y_SN.data_ptr<float>(), N, K, groups);
  } else {
    grouped_matvec_impl<float>(w_ENK.data_ptr<float>(), w_ENK.stride(0), w_ENK.stride(1), x_SK.data_ptr<float>(),
                               y_SN.data_ptr<float>(), N, K, groups);
  }
  return y_SN;
}
