// One expert's bf16 GEMM for the fused forward: y[M, N] = x[M, K] @ w[N, K]^T (+ bias) on the
// CPU's bf16 dot-product instruction, reading the weights as they are stored.
//
// Why not at::mm: for the tens of rows an expert gets in a prefill, oneDNN first reorders each
// expert's weights into its blocked layout, a pass over memory that the GEMM then waits for (on
// one core, an expert's two GEMMs took 1.4x longer with the weights in memory than in cache).
// Here the tokens, not the weights, are repacked: x (small) is laid out once as pairs along K in
// panels of up to 96 tokens, each [K / 2][panel width] 32-bit words, and each step broadcasts one
// weight pair (w[n, k], w[n, k + 1]) against 16 tokens' pairs, so that 16 fp32 lanes of one
// dot-product accumulate 16 tokens of one output feature. A block of 6 rows by up to 64 tokens (or
// 4 rows by 80-96) keeps up to 24 accumulators; each weight row is read once per panel, front to
// back, while the next block's rows are prefetched (a few KiB ahead within a row left each new
// row's start to demand misses). The fp32 results go to a transposed buffer with whole-vector
// stores and reach the output through 16 x 16 register transposes (writing 16 tokens down an
// output column directly cost as much as the products for short rows).
//
// Legend: M rows (tokens), N output features, K input features, Mp = M rounded up to 16.

#include "bf16_gemm.h"
#include "kernels.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>

namespace {

constexpr int64_t kMaxVectors = 6;  // 16-token vectors per panel, at most

// weight rows per block for a panel of V vectors: 6 x 4 (or fewer) or 4 x 6 accumulators
constexpr int rows_for(int64_t V) { return V <= 4 ? 6 : 4; }

using Packed = kernel_moe::Bf16Gemm;

// yT[n0 + r, m0 + 16 v ..] = sum over pairs of w[n0 + r] . x[tokens m0 + 16 v ..] + bias[r], fp32
template <int R, int V>
void block(const Packed& x, int64_t m0, const uint16_t* w, int64_t ldw, const float* bias, float* yT) {
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  const uint32_t* xp = x.pairs.data() + m0 * x.K2;  // this panel: [K / 2][16 V]
  for (int64_t k = 0; k < x.K2; ++k) {
    __m512bh xv[V];
    for (int v = 0; v < V; ++v) xv[v] = (__m512bh)_mm512_loadu_si512(xp + k * 16 * V + 16 * v);
    for (int r = 0; r < R; ++r) {
      const uint16_t* wr = w + r * ldw + 2 * k;
      // the next block's rows, a whole block ahead (a prefetch past the end of w does not fault)
      if (k % 16 == 0) _mm_prefetch(reinterpret_cast<const char*>(wr + R * ldw), _MM_HINT_T0);
      int32_t pair;
      std::memcpy(&pair, wr, sizeof(pair));
      const __m512bh wv = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], wv, xv[v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 b = _mm512_set1_ps(bias != nullptr ? bias[r] : 0.f);
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(yT + r * x.Mp + m0 + 16 * v, _mm512_add_ps(acc[r][v], b));
  }
}

template <int V>
void rows_block(int R, const Packed& x, int64_t m0, const uint16_t* w, int64_t ldw, const float* bias, float* yT) {
  switch (R) {
    case 6: if constexpr (rows_for(V) >= 6) return block<6, V>(x, m0, w, ldw, bias, yT);
    [[fallthrough]];
    case 5: if constexpr (rows_for(V) >= 5) return block<5, V>(x, m0, w, ldw, bias, yT);
    [[fallthrough]];
    case 4: return block<4, V>(x, m0, w, ldw, bias, yT);
    case 3: return block<3, V>(x, m0, w, ldw, bias, yT);
    case 2: return block<2, V>(x, m0, w, ldw, bias, yT);
    default: return block<1, V>(x, m0, w, ldw, bias, yT);
  }
}

// every block of weight rows against one panel of V vectors at token m0
template <int V>
void panel(const Packed& x, int64_t m0, const uint16_t* w, int64_t N, int64_t ldw, const float* bias, float* yT) {
  constexpr int kRows = rows_for(V);
  for (int64_t n0 = 0; n0 < N; n0 += kRows) {
    const int R = static_cast<int>(std::min<int64_t>(kRows, N - n0));
    rows_block<V>(R, x, m0, w + n0 * ldw, ldw, bias != nullptr ? bias + n0 : nullptr, yT + n0 * x.Mp);
  }
}

// a 16 x 16 block of floats transposed in registers: r[i] row i in, column i out
inline void transpose16(__m512* r) {
  __m512 a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // b[4i + j], 128-bit lane l: rows 4i .. 4i + 3 of column 4l + j
    const __m512d a0 = _mm512_castps_pd(a[4 * i]), a1 = _mm512_castps_pd(a[4 * i + 1]);
    const __m512d a2 = _mm512_castps_pd(a[4 * i + 2]), a3 = _mm512_castps_pd(a[4 * i + 3]);
    b[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
    b[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
    b[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
    b[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 u0 = _mm512_shuffle_f32x4(b[j], b[4 + j], 0x88), u1 = _mm512_shuffle_f32x4(b[j], b[4 + j], 0xDD);
    const __m512 u2 = _mm512_shuffle_f32x4(b[8 + j], b[12 + j], 0x88);
    const __m512 u3 = _mm512_shuffle_f32x4(b[8 + j], b[12 + j], 0xDD);
    r[j] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
    r[j + 4] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    r[j + 12] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
  }
}

// out[m, n] = yT[n, m] (rounded to bf16 for a bf16 out) for m < M, n < N, 16 x 16 at a time (yT
// has Np >= N rows of Mp)
template <typename out_t>
void store_transposed(const float* yT, int64_t M, int64_t Mp, int64_t N, out_t* out, int64_t ldo) {
  __m512 r[16];
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    const __mmask16 cols = N - n0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (N - n0)) - 1);
    for (int64_t m0 = 0; m0 < M; m0 += 16) {
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(yT + (n0 + i) * Mp + m0);
      transpose16(r);
      for (int64_t i = 0; i < std::min<int64_t>(16, M - m0); ++i) {
        if constexpr (std::is_same_v<out_t, float>) {
          _mm512_mask_storeu_ps(out + (m0 + i) * ldo + n0, cols, r[i]);
        } else {
          _mm256_mask_storeu_epi16(out + (m0 + i) * ldo + n0, cols, (__m256i)_mm512_cvtneps_pbh(r[i]));
        }
      }
    }
  }
}

}  // namespace

namespace kernel_moe {

bool Bf16Gemm::available() { return true; }

Bf16Gemm::Bf16Gemm(const at::Tensor& x_MK)
    : M(x_MK.size(0)), Mp((M + 15) / 16 * 16), K2(x_MK.size(1) / 2), pairs(K2 * Mp, 0u) {
  // the fewest panels of at most 6 vectors, as even as whole vectors allow (70 tokens: one panel
  // of 80, not 64 + 16, whose second pass would read every weight again for one vector)
  const int64_t vectors = Mp / 16, count = (vectors + kMaxVectors - 1) / kMaxVectors;
  for (int64_t p = 0, m0 = 0; p < count; ++p) {
    const int64_t V = vectors / count + (p < vectors % count ? 1 : 0);
    panels.push_back({m0, V});
    m0 += 16 * V;
  }
  const auto* x = reinterpret_cast<const uint32_t*>(x_MK.data_ptr());  // pairs of one row
  const int64_t row = x_MK.stride(0) / 2;
  for (const auto& [m0, V] : panels) {
    uint32_t* panel_pairs = pairs.data() + m0 * K2;
    for (int64_t m = m0; m < std::min(M, m0 + 16 * V); ++m) {
      for (int64_t k = 0; k < K2; ++k) panel_pairs[k * 16 * V + m - m0] = x[m * row + k];
    }
  }
}

void Bf16Gemm::run(const at::Tensor& w_NK, const float* bias_N, at::Tensor& out_MN) const {
  const Packed& x = *this;
  const int64_t N = w_NK.size(0), ldw = w_NK.stride(0), ldo = out_MN.stride(0);
  TORCH_CHECK((out_MN.scalar_type() == at::kBFloat16 || out_MN.scalar_type() == at::kFloat) &&
                  out_MN.stride(1) == 1 && out_MN.size(0) == M && out_MN.size(1) == N && w_NK.size(1) == 2 * K2,
              "Bf16Gemm: out must be a bf16 or float32 [M, N] view with unit stride along N, w [N, K]");
  const auto* w = reinterpret_cast<const uint16_t*>(w_NK.data_ptr());
  // [Np][Mp]: Np = N rounded up to 16 (rows past N are read by the last transpose, never stored)
  std::vector<float> yT(((N + 15) / 16 * 16) * x.Mp, 0.f);
  // a panel of tokens at a time, every block of weight rows for it: the panel's pairs stay in L2;
  // the weights are read from memory for the first panel and from L3 for the next
  for (const auto& [m0, V] : x.panels) {
    if (V == 1) panel<1>(x, m0, w, N, ldw, bias_N, yT.data());
    if (V == 2) panel<2>(x, m0, w, N, ldw, bias_N, yT.data());
    if (V == 3) panel<3>(x, m0, w, N, ldw, bias_N, yT.data());
    if (V == 4) panel<4>(x, m0, w, N, ldw, bias_N, yT.data());
    if (V == 5) panel<5>(x, m0, w, N, ldw, bias_N, yT.data());
    if (V == 6) panel<6>(x, m0, w, N, ldw, bias_N, yT.data());
  }
  if (out_MN.scalar_type() == at::kFloat) {
    store_transposed(yT.data(), x.M, x.Mp, N, out_MN.data_ptr<float>(), ldo);
  } else {
    store_transposed(yT.data(), x.M, x.Mp, N, out_MN.data_ptr<c10::BFloat16>(), ldo);
  }
}

}  // namespace kernel_moe

#else

namespace kernel_moe {

bool Bf16Gemm::available() { return false; }

Bf16Gemm::Bf16Gemm(const at::Tensor&) : M(0), Mp(0), K2(0) {
  TORCH_CHECK(false, "Bf16Gemm: this CPU has no bf16 dot-product instruction");
}

void Bf16Gemm::run(const at::Tensor&, const float*, at::Tensor&) const {}

}  // namespace kernel_moe

#endif

at::Tensor bf16_gemm(const at::Tensor& x_MK, const at::Tensor& w_NK, const std::optional<at::Tensor>& bias_N,
                     bool float_out) {
  TORCH_CHECK(kernel_moe::Bf16Gemm::available(), "bf16_gemm: this CPU has no bf16 dot-product instruction");
  TORCH_CHECK(x_MK.dim() == 2 && w_NK.dim() == 2 && x_MK.size(1) == w_NK.size(1) && x_MK.device().is_cpu() &&
                  w_NK.device().is_cpu(),
              "bf16_gemm: x [M, K] and w [N, K] CPU tensors, got ", x_MK.sizes(), " and ", w_NK.sizes());
  TORCH_CHECK(kernel_moe::Bf16Gemm::takes_rows(x_MK) && kernel_moe::Bf16Gemm::takes_weights(w_NK),
              "bf16_gemm: x and w must be bfloat16 with unit stride along K, K even, more than ",
              kernel_moe::Bf16Gemm::kMinRows, " rows");
  TORCH_CHECK(!bias_N.has_value() || (bias_N->dim() == 1 && bias_N->size(0) == w_NK.size(0)),
              "bf16_gemm: bias must be [N]");
  at::Tensor out = at::empty({x_MK.size(0), w_NK.size(0)}, x_MK.options().dtype(float_out ? at::kFloat : at::kBFloat16));
  const at::Tensor bias = bias_N.has_value() ? bias_N->to(at::kFloat).contiguous() : at::Tensor();
  kernel_moe::Bf16Gemm(x_MK).run(w_NK, bias.defined() ? bias.data_ptr<float>() : nullptr, out);
  return out;
}
