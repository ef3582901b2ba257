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
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#define KERNEL_MOE_AVX512 1
#endif

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

// out[j] = w . x[j] for ROWS rows of x spaced K apart; w and each x row hold K values (the
// portable kernel: any K, any build).
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

#ifdef KERNEL_MOE_AVX512
// Software prefetch of the weights this many bytes ahead of the load: the hardware prefetchers
// stop at 4 KiB page boundaries, and an expert's weights are rows of 1.5 to 28 KiB read one after
// the other, so each page would start with a stall. 4 KiB ahead (into the next row when this one
// ends) measured 5-30% faster than none on bf16 experts of Qwen3-30B-A3B and Mixtral size, 1 and
// 2 KiB in between (real-size stacks, fresh routings each call, variants side by side in one process).
constexpr int64_t kPrefetchBytes = 4096;

template <typename T>
inline void prefetch_ahead(const T* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
}

// Independent accumulators per x row: one accumulator's FMA chain (4 cycles a link) would cap
// one row at 16 floats per 4 cycles, below what one core can read; fewer x rows need more.
template <int ROWS>
constexpr int kUnroll = ROWS == 1 ? 4 : (ROWS == 2 ? 2 : 1);

// fp32 weights: 16 features a vector, kUnroll vectors a step, the tail masked.
template <int ROWS>
inline void dot_rows_f32(const float* __restrict w, const float* __restrict x, int64_t K, float* out) {
  constexpr int U = kUnroll<ROWS>;
  __m512 acc[ROWS][U];
  for (int j = 0; j < ROWS; ++j)
    for (int u = 0; u < U; ++u) acc[j][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U) {
    for (int u = 0; u < U; ++u) {
      prefetch_ahead(w + k + 16 * u);
      const __m512 wv = _mm512_loadu_ps(w + k + 16 * u);
      for (int j = 0; j < ROWS; ++j) acc[j][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + j * K + k + 16 * u), acc[j][u]);
    }
  }
  for (; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    const __m512 wv = _mm512_maskz_loadu_ps(m, w + k);
    for (int j = 0; j < ROWS; ++j) acc[j][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + j * K + k), acc[j][0]);
  }
  for (int j = 0; j < ROWS; ++j) {
    for (int u = 1; u < U; ++u) acc[j][0] = _mm512_add_ps(acc[j][0], acc[j][u]);
    out[j] = _mm512_reduce_add_ps(acc[j][0]);
  }
}

// bf16 weights, K a multiple of 32: one 64-byte load holds 32 weights; shifting each 32-bit lane
// left by 16 gives the even-indexed weights as floats, masking off its low half the odd ones (two
// integer instructions, no conversion). ``xp`` rows are deinterleaved to match: in each block of 32
// features the 16 even ones, then the 16 odd ones.
template <int ROWS>
inline void dot_rows_bf16(const uint16_t* __restrict w, const float* __restrict xp, int64_t K, float* out) {
  constexpr int U = kUnroll<ROWS> > 1 ? kUnroll<ROWS> / 2 : 1;
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 acc[ROWS][2 * U];
  for (int j = 0; j < ROWS; ++j)
    for (int u = 0; u < 2 * U; ++u) acc[j][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 * U <= K; k += 32 * U) {
    for (int u = 0; u < U; ++u) {
      prefetch_ahead(w + k + 32 * u);
      const __m512i v = _mm512_loadu_si512(w + k + 32 * u);
      const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v, high_half));
      for (int j = 0; j < ROWS; ++j) {
        const float* xj = xp + j * K + k + 32 * u;
        acc[j][2 * u] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xj), acc[j][2 * u]);
        acc[j][2 * u + 1] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xj + 16), acc[j][2 * u + 1]);
      }
    }
  }
  for (; k < K; k += 32) {
    const __m512i v = _mm512_loadu_si512(w + k);
    const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v, high_half));
    for (int j = 0; j < ROWS; ++j) {
      acc[j][0] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xp + j * K + k), acc[j][0]);
      acc[j][1] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xp + j * K + k + 16), acc[j][1]);
    }
  }
  for (int j = 0; j < ROWS; ++j) {
    for (int u = 1; u < 2 * U; ++u) acc[j][0] = _mm512_add_ps(acc[j][0], acc[j][u]);
    out[j] = _mm512_reduce_add_ps(acc[j][0]);
  }
}

// Two weight rows against ROWS x rows at once (ROWS 3 and 4): each x vector loaded serves both
// weight rows. One weight row at a time, four x rows of a long K (64 KiB at K 4096) stream from L2
// four times per weight vector and cap the kernel below the memory bandwidth it must keep up with.
template <int ROWS>
inline void dot_pair_f32(const float* __restrict w0, const float* __restrict w1, const float* __restrict x, int64_t K,
                         float* out0, float* out1) {
  __m512 a0[ROWS], a1[ROWS];
  for (int j = 0; j < ROWS; ++j) a0[j] = a1[j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    prefetch_ahead(w0 + k);
    prefetch_ahead(w1 + k);
    const __m512 v0 = _mm512_maskz_loadu_ps(m, w0 + k), v1 = _mm512_maskz_loadu_ps(m, w1 + k);
    for (int j = 0; j < ROWS; ++j) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + j * K + k);
      a0[j] = _mm512_fmadd_ps(v0, xv, a0[j]);
      a1[j] = _mm512_fmadd_ps(v1, xv, a1[j]);
    }
  }
  for (int j = 0; j < ROWS; ++j) {
    out0[j] = _mm512_reduce_add_ps(a0[j]);
    out1[j] = _mm512_reduce_add_ps(a1[j]);
  }
}

template <int ROWS>
inline void dot_pair_bf16(const uint16_t* __restrict w0, const uint16_t* __restrict w1, const float* __restrict xp,
                          int64_t K, float* out0, float* out1) {
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 a0[ROWS][2], a1[ROWS][2];
  for (int j = 0; j < ROWS; ++j) a0[j][0] = a0[j][1] = a1[j][0] = a1[j][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    prefetch_ahead(w0 + k);
    prefetch_ahead(w1 + k);
    const __m512i v0 = _mm512_loadu_si512(w0 + k), v1 = _mm512_loadu_si512(w1 + k);
    const __m512 e0 = _mm512_castsi512_ps(_mm512_slli_epi32(v0, 16));
    const __m512 o0 = _mm512_castsi512_ps(_mm512_and_si512(v0, high_half));
    const __m512 e1 = _mm512_castsi512_ps(_mm512_slli_epi32(v1, 16));
    const __m512 o1 = _mm512_castsi512_ps(_mm512_and_si512(v1, high_half));
    for (int j = 0; j < ROWS; ++j) {
      const __m512 xe = _mm512_loadu_ps(xp + j * K + k), xo = _mm512_loadu_ps(xp + j * K + k + 16);
      a0[j][0] = _mm512_fmadd_ps(e0, xe, a0[j][0]);
      a0[j][1] = _mm512_fmadd_ps(o0, xo, a0[j][1]);
      a1[j][0] = _mm512_fmadd_ps(e1, xe, a1[j][0]);
      a1[j][1] = _mm512_fmadd_ps(o1, xo, a1[j][1]);
    }
  }
  for (int j = 0; j < ROWS; ++j) {
    out0[j] = _mm512_reduce_add_ps(_mm512_add_ps(a0[j][0], a0[j][1]));
    out1[j] = _mm512_reduce_add_ps(_mm512_add_ps(a1[j][0], a1[j][1]));
  }
}
#endif

// The kernel for W weights and ROWS x rows: the AVX-512 ones where the build and K allow.
template <typename W, int ROWS>
inline void dot_rows_best(const W* __restrict w, const float* __restrict x, int64_t K, bool deinterleaved,
                          float* out) {
#ifdef KERNEL_MOE_AVX512
  if constexpr (std::is_same_v<W, float>) {
    return dot_rows_f32<ROWS>(w, x, K, out);
  } else {
    if (deinterleaved) return dot_rows_bf16<ROWS>(w, x, K, out);
  }
#endif
  dot_rows<W, ROWS>(w, x, K, out);
}

// Whether dot_pair_best runs a fused kernel for W weights and ROWS x rows: for one or two x rows
// each weight row alone is faster (its kernels keep more sums in flight).
template <typename W, int ROWS>
inline bool has_pair_kernel(bool deinterleaved) {
#ifdef KERNEL_MOE_AVX512
  return ROWS >= 3 && (std::is_same_v<W, float> || deinterleaved);
#else
  return false;
#endif
}

// Two weight rows against ROWS x rows: one fused kernel where has_pair_kernel, else one row after the other.
template <typename W, int ROWS>
inline void dot_pair_best(const W* __restrict w0, const W* __restrict w1, const float* __restrict x, int64_t K,
                          bool deinterleaved, float* out0, float* out1) {
#ifdef KERNEL_MOE_AVX512
  if (has_pair_kernel<W, ROWS>(deinterleaved)) {
    if constexpr (std::is_same_v<W, float>) {
      return dot_pair_f32<ROWS>(w0, w1, x, K, out0, out1);
    } else {
      return dot_pair_bf16<ROWS>(w0, w1, x, K, out0, out1);
    }
  }
#endif
  dot_rows_best<W, ROWS>(w0, x, K, deinterleaved, out0);
  dot_rows_best<W, ROWS>(w1, x, K, deinterleaved, out1);
}

struct Group {
  int64_t expert, first_row, rows;
};

// The rows r of group g against weight rows [n, n + pair) (pair 1 or 2) of its expert.
template <typename W, int ROWS>
inline void rows_block(const W* w0, const W* w1, const float* x_SK, int64_t r, bool deinterleaved, float* y_SN,
                       int64_t n, int64_t N, int64_t K) {
  float acc0[4], acc1[4];
  if (w1 != nullptr) {
    dot_pair_best<W, ROWS>(w0, w1, x_SK + r * K, K, deinterleaved, acc0, acc1);
  } else {
    dot_rows_best<W, ROWS>(w0, x_SK + r * K, K, deinterleaved, acc0);
  }
  for (int j = 0; j < ROWS; ++j) {
    y_SN[(r + j) * N + n] = acc0[j];
    if (w1 != nullptr) y_SN[(r + j) * N + n + 1] = acc1[j];
  }
}

template <typename W>
void grouped_matvec_impl(const W* w_ENK, int64_t stride_e, int64_t stride_n, const float* x_SK, bool deinterleaved,
                         float* y_SN, int64_t N, int64_t K, const std::vector<Group>& groups) {
  const int64_t G = static_cast<int64_t>(groups.size());
  const int64_t pairs = (N + 1) / 2;
  // one task = two weight rows of one group (the last one of an odd N alone), at least 8 tasks per chunk
  kernel_moe::parallel_chunks(G * pairs, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Group& g = groups[i / pairs];
      const int64_t n = 2 * (i % pairs);
      const W* w0 = w_ENK + g.expert * stride_e + n * stride_n;
      const W* w1 = n + 1 < N ? w0 + stride_n : nullptr;
      int64_t r = g.first_row;
      const int64_t r_end = g.first_row + g.rows;
      for (; r + 4 <= r_end; r += 4) rows_block<W, 4>(w0, w1, x_SK, r, deinterleaved, y_SN, n, N, K);
      const int64_t rest = r_end - r;
      if (rest == 3) rows_block<W, 3>(w0, w1, x_SK, r, deinterleaved, y_SN, n, N, K);
      if (rest == 2) rows_block<W, 2>(w0, w1, x_SK, r, deinterleaved, y_SN, n, N, K);
      if (rest == 1) rows_block<W, 1>(w0, w1, x_SK, r, deinterleaved, y_SN, n, N, K);
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
    bool deinterleaved = false;
    at::Tensor x = x_SK;
#ifdef KERNEL_MOE_AVX512
    if (K % 32 == 0) {  // the bf16 kernel's x layout: per block of 32 features, even ones then odd ones
      x = at::empty_like(x_SK);
      const float* src = x_SK.data_ptr<float>();
      float* dst = x.data_ptr<float>();
      for (int64_t b = 0; b < x_SK.numel(); b += 32) {
        for (int i = 0; i < 16; ++i) {
          dst[b + i] = src[b + 2 * i];
          dst[b + 16 + i] = src[b + 2 * i + 1];
        }
      }
      deinterleaved = true;
    }
#endif
    grouped_matvec_impl<uint16_t>(reinterpret_cast<const uint16_t*>(w_ENK.data_ptr()), w_ENK.stride(0), w_ENK.stride(1),
                                  x.data_ptr<float>(), deinterleaved, y_SN.data_ptr<float>(), N, K, groups);
  } else {
    grouped_matvec_impl<float>(w_ENK.data_ptr<float>(), w_ENK.stride(0), w_ENK.stride(1), x_SK.data_ptr<float>(), false,
                               y_SN.data_ptr<float>(), N, K, groups);
  }
  return y_SN;
}
