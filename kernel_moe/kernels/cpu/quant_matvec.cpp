// Grouped matrix-vector products over quantized expert weights (int8, fp8 e4m3, int4 two per byte):
// decode and small batches of quantized experts.
//
// y[r] = dequant(W[e(r)]) @ x[r] for rows r sorted by expert, as grouped_matvec.cpp does for
// float weights: each quantized weight row is read once and multiplied with all of its expert's
// rows (four at a time), converted to float in registers and multiplied by its scale (one per row,
// or per group of input features). Reading 1 byte (or half a byte) per weight instead
// of 2 or 4 is what makes quantized decode faster: decode is bound by reading the weights.
//
// int4: element 2j of a group sits in the low nibble of byte j, element 2j + 1 in the high one,
// as value + 8. The x rows are deinterleaved once per call (even features of a group, then odd),
// so the inner loop reads bytes and both x halves contiguously. int4 against bf16 x rows (a bf16
// model's decode) runs on the bf16 dot products instead where the CPU has them (int4_bf16_matvec.cpp).
//
// Legend: E experts, N output features, K input features, S rows (sum of counts), G groups per row.

#include "kernels.h"
#include "quant_rows.h"

#include <ATen/Parallel.h>

#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define KERNEL_MOE_AVX512 1
#endif

namespace {

using kernel_moe::quant::for_each_weight_row;
using kernel_moe::quant::Layout;
using kernel_moe::quant::Rows;

enum Format : int64_t { kInt8 = 1, kFp8 = 2, kInt4 = 3 };

// e4m3 (bias 7, no infinities) -> float: the 7 magnitude bits placed at float's exponent/mantissa
// boundary and rescaled by 2^(127 - 7); exact for normal and subnormal codes alike
inline float fp8_to_float(uint8_t b) {
  uint32_t bits = uint32_t(b & 0x7F) << 20;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  f *= 0x1p120f;
  return (b & 0x80) ? -f : f;
}

template <int F>
inline float weight(const uint8_t* w, int64_t k) {
  if constexpr (F == kInt8) {
    return static_cast<float>(static_cast<int8_t>(w[k]));
  } else {
    return fp8_to_float(w[k]);
  }
}

constexpr int64_t kLanes = 16;  // independent partial sums per x row: one 512-bit vector of floats

// acc[j][l] += scale * w[k] * x[j][k] over one group, lane l taking k = l (mod kLanes); the lanes
// are summed once per weight row, not once per group (a horizontal sum per group of 32 costs as
// much as the group's multiplies). int8/fp8: ``len`` bytes; int4: ``len`` features in len / 2
// bytes, x deinterleaved (even features, then odd).
template <int F, int ROWS>
inline void group_fma(const uint8_t* __restrict w, const float* __restrict x, int64_t K, int64_t len, float scale,
                      float (*acc)[kLanes]) {
  const int64_t n = F == kInt4 ? len / 2 : len;
  const int64_t body = n - n % kLanes;
  for (int64_t k0 = 0; k0 < body; k0 += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const int64_t k = k0 + l;
      if constexpr (F == kInt4) {
        const float lo = scale * static_cast<float>(static_cast<int>(w[k] & 0xF) - 8);
        const float hi = scale * static_cast<float>(static_cast<int>(w[k] >> 4) - 8);
        for (int j = 0; j < ROWS; ++j) acc[j][l] += lo * x[j * K + k] + hi * x[j * K + n + k];
      } else {
        const float wk = scale * weight<F>(w, k);
        for (int j = 0; j < ROWS; ++j) acc[j][l] += wk * x[j * K + k];
      }
    }
  }
  for (int64_t k = body; k < n; ++k) {  // the tail (int8 / fp8 rows of K not a multiple of 16)
    if constexpr (F == kInt4) {
      const float lo = scale * static_cast<float>(static_cast<int>(w[k] & 0xF) - 8);
      const float hi = scale * static_cast<float>(static_cast<int>(w[k] >> 4) - 8);
      for (int j = 0; j < ROWS; ++j) acc[j][0] += lo * x[j * K + k] + hi * x[j * K + n + k];
    } else {
      const float wk = scale * weight<F>(w, k);
      for (int j = 0; j < ROWS; ++j) acc[j][0] += wk * x[j * K + k];
    }
  }
}

// one weight row with one scale (int8 / fp8 rows): a plain reduction, scaled once
template <int F, int ROWS>
inline void row_dot_one_scale(const uint8_t* __restrict w, float scale, const float* __restrict x, int64_t K,
                              float* out) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t k = 0; k < K; ++k) {
    const float wk = weight<F>(w, k);
    s0 += wk * x[k];
    if (ROWS > 1) s1 += wk * x[K + k];
    if (ROWS > 2) s2 += wk * x[2 * K + k];
    if (ROWS > 3) s3 += wk * x[3 * K + k];
  }
  out[0] = s0 * scale;
  if (ROWS > 1) out[1] = s1 * scale;
  if (ROWS > 2) out[2] = s2 * scale;
  if (ROWS > 3) out[3] = s3 * scale;
}

#ifdef KERNEL_MOE_AVX512
// 16 int8 / fp8 weights (16 bytes) as floats; fp8 comes out 2^-120 times its value (the magnitude
// bits placed at float's exponent/mantissa boundary, the sign moved to bit 31).
template <int F>
inline __m512 bytes_to_floats(__m128i b) {
  if constexpr (F == kInt8) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  } else {
    const __m512i v = _mm512_cvtepu8_epi32(b);
    const __m512i magnitude = _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0x7F)), 20);
    const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0x80)), 24);
    return _mm512_castsi512_ps(_mm512_or_si512(magnitude, sign));
  }
}

// One int8 / fp8 row with one scale: several accumulators per x row (one FMA chain per row would
// cap a row below what a core reads), the tail masked. fp8 weights are rescaled by 2^120 before
// the multiply, so that no product of a small weight and a small x falls into the subnormals.
template <int F, int ROWS>
inline void row_dot_bytes_avx512(const uint8_t* __restrict w, float scale, const float* __restrict x, int64_t K,
                                 float* out) {
  constexpr int U = ROWS == 1 ? 4 : (ROWS == 2 ? 2 : 1);
  const __m512 fp8_rescale = _mm512_set1_ps(0x1p120f);
  __m512 acc[ROWS][U];
  for (int j = 0; j < ROWS; ++j)
    for (int u = 0; u < U; ++u) acc[j][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U) {
    if (k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + k) + 4096, _MM_HINT_T0);  // see grouped_matvec.cpp
    for (int u = 0; u < U; ++u) {
      __m512 wv = bytes_to_floats<F>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 16 * u)));
      if constexpr (F == kFp8) wv = _mm512_mul_ps(wv, fp8_rescale);
      for (int j = 0; j < ROWS; ++j) acc[j][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + j * K + k + 16 * u), acc[j][u]);
    }
  }
  for (; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    __m512 wv = bytes_to_floats<F>(_mm_maskz_loadu_epi8(m, w + k));
    if constexpr (F == kFp8) wv = _mm512_mul_ps(wv, fp8_rescale);
    for (int j = 0; j < ROWS; ++j) acc[j][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + j * K + k), acc[j][0]);
  }
  for (int j = 0; j < ROWS; ++j) {
    for (int u = 1; u < U; ++u) acc[j][0] = _mm512_add_ps(acc[j][0], acc[j][u]);
    out[j] = _mm512_reduce_add_ps(acc[j][0]) * scale;
  }
}

// An int4 row with AVX-512: 16 bytes (32 features) per step, nibbles widened to int32 and
// converted to float, one FMA per half into a group accumulator that is scaled once per group.
// The "- 8" of the stored value is folded out: sum (q - 8) x = sum q x - 8 sum x, with each
// group's sum of x (``xsum``, [ROWS][groups]) computed once per call.
template <int ROWS>
inline void row_dot_int4_avx512(const uint8_t* w_row, const float* scale_row, const float* x, const float* xsum,
                                const Layout& L, float* out) {
  const __m512i low_mask = _mm512_set1_epi32(0xF);
  const int64_t half = L.group_len / 2;
  __m512 acc[ROWS];
  for (int j = 0; j < ROWS; ++j) acc[j] = _mm512_setzero_ps();
  float offset[ROWS] = {};
  for (int64_t g = 0; g < L.groups; ++g) {
    const uint8_t* w = w_row + g * L.bytes_per_group;
    const float* xg = x + g * L.group_len;
    __m512 part[ROWS];
    for (int j = 0; j < ROWS; ++j) part[j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < half; k += 16) {
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, low_mask));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
      for (int j = 0; j < ROWS; ++j) {
        part[j] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xg + j * L.K + k), part[j]);
        part[j] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xg + j * L.K + half + k), part[j]);
      }
    }
    const __m512 scale = _mm512_set1_ps(scale_row[g]);
    for (int j = 0; j < ROWS; ++j) {
      acc[j] = _mm512_fmadd_ps(part[j], scale, acc[j]);
      offset[j] += 8.f * scale_row[g] * xsum[j * L.groups + g];
    }
  }
  for (int j = 0; j < ROWS; ++j) out[j] = _mm512_reduce_add_ps(acc[j]) - offset[j];
}
#endif

// one weight row against ROWS consecutive x rows (``xsum``: per-group sums of x, int4 only)
template <int F, int ROWS>
inline void row_dot(const uint8_t* w_row, const float* scale_row, const float* x, const float* xsum, const Layout& L,
                    float* out) {
  if constexpr (F != kInt4) {
#ifdef KERNEL_MOE_AVX512
    if (L.groups == 1) return row_dot_bytes_avx512<F, ROWS>(w_row, scale_row[0], x, L.K, out);
#endif
    if (L.groups == 1) return row_dot_one_scale<F, ROWS>(w_row, scale_row[0], x, L.K, out);
  }
#ifdef KERNEL_MOE_AVX512
  if constexpr (F == kInt4) {
    if (L.group_len % 32 == 0) return row_dot_int4_avx512<ROWS>(w_row, scale_row, x, xsum, L, out);
  }
#endif
  float acc[ROWS][kLanes] = {};
  for (int64_t g = 0; g < L.groups; ++g) {
    group_fma<F, ROWS>(w_row + g * L.bytes_per_group, x + g * L.group_len, L.K, L.group_len, scale_row[g], acc);
  }
  for (int j = 0; j < ROWS; ++j) {
    float sum = 0.f;
    for (int64_t l = 0; l < kLanes; ++l) sum += acc[j][l];
    out[j] = sum;
  }
}

template <int F>
void quant_matvec_impl(const uint8_t* w, const float* scale, const float* x_SK, const float* xsum_SG, float* y_SN,
                       const Layout& L, const std::vector<Rows>& groups) {
  for_each_weight_row(L, groups, y_SN, [&](auto rows, int64_t row, int64_t r, float* acc) {
    row_dot<F, decltype(rows)::value>(w + row * L.bytes_per_row, scale + row * L.groups, x_SK + r * L.K,
                                      xsum_SG + r * L.groups, L, acc);
  });
}

// x rows with each group's features reordered even-then-odd (int4's byte layout)
at::Tensor deinterleave_groups(const at::Tensor& x_SK, int64_t group_len) {
  const int64_t S = x_SK.size(0), K = x_SK.size(1);
  return x_SK.view({S, K / group_len, group_len / 2, 2}).transpose(2, 3).reshape({S, K}).contiguous();
}

}  // namespace

at::Tensor grouped_matvec_quantized(const at::Tensor& x_SK, const at::Tensor& w_ENK, const at::Tensor& scale,
                                    const std::vector<int64_t>& counts, int64_t format) {
  TORCH_CHECK(format == kInt8 || format == kFp8 || format == kInt4,
              "grouped_matvec_quantized: format ", format, " is not one of 1 (int8), 2 (fp8), 3 (int4)");
  TORCH_CHECK(x_SK.dim() == 2 && (x_SK.scalar_type() == at::kFloat || x_SK.scalar_type() == at::kBFloat16) &&
                  x_SK.is_contiguous(),
              "grouped_matvec_quantized: x must be a contiguous float32 or bfloat16 [S, K] tensor");
  TORCH_CHECK(w_ENK.dim() == 3 && w_ENK.is_contiguous() && w_ENK.element_size() == 1,
              "grouped_matvec_quantized: w must be a contiguous one-byte [E, N, K (int4: K/2)] tensor");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && (scale.dim() == 2 || scale.dim() == 3),
              "grouped_matvec_quantized: scale must be a contiguous float32 [E, N] or [E, N, G] tensor");
  TORCH_CHECK(x_SK.device().is_cpu() && w_ENK.device().is_cpu() && scale.device().is_cpu(),
              "grouped_matvec_quantized: CPU tensors only");
  const int64_t E = w_ENK.size(0), N = w_ENK.size(1), K = w_ENK.size(2) * (format == kInt4 ? 2 : 1);
  TORCH_CHECK(x_SK.size(1) == K, "grouped_matvec_quantized: x has ", x_SK.size(1), " features, w holds ", K);
  TORCH_CHECK(scale.size(0) == E && scale.size(1) == N, "grouped_matvec_quantized: scale is ", scale.sizes(),
              " for w ", w_ENK.sizes());
  const int64_t groups = scale.dim() == 3 ? scale.size(2) : 1;
  TORCH_CHECK(groups > 0 && K % groups == 0 && (format != kInt4 || (K / groups) % 2 == 0),
              "grouped_matvec_quantized: ", groups, " groups do not divide ", K, " features evenly");
  check_counts("grouped_matvec_quantized", counts, E, x_SK.size(0));
  const int64_t group_len = K / groups;
  const int64_t bytes_per_group = format == kInt4 ? group_len / 2 : group_len;
  const Layout L{N, K, groups, group_len, bytes_per_group * groups, bytes_per_group};
  std::vector<Rows> rows;
  int64_t row = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (counts[e] > 0) rows.push_back({e, row, counts[e]});
    row += counts[e];
  }
  auto y_SN = at::empty({x_SK.size(0), N}, x_SK.options().dtype(at::kFloat));
  const auto* w = static_cast<const uint8_t*>(w_ENK.data_ptr());
  const float* s = scale.data_ptr<float>();
  if (format == kInt4 && kernel_moe::quant::int4_bf16_matvec(w, s, x_SK, y_SN.data_ptr<float>(), L, rows)) {
    return y_SN;
  }
  const at::Tensor x_f = x_SK.to(at::kFloat);
  const at::Tensor x = format == kInt4 ? deinterleave_groups(x_f, group_len) : x_f.contiguous();
  // per-group sums of x (int4 only): its kernels fold the stored values' offset of 8 out of their loop
  const at::Tensor xsum = format == kInt4 ? x_f.view({x_f.size(0), groups, group_len}).sum(-1).contiguous() : at::Tensor();
  const float* xs = format == kInt4 ? xsum.data_ptr<float>() : nullptr;
  if (format == kInt8) quant_matvec_impl<kInt8>(w, s, x.data_ptr<float>(), xs, y_SN.data_ptr<float>(), L, rows);
  if (format == kFp8) quant_matvec_impl<kFp8>(w, s, x.data_ptr<float>(), xs, y_SN.data_ptr<float>(), L, rows);
  if (format == kInt4) quant_matvec_impl<kInt4>(w, s, x.data_ptr<float>(), xs, y_SN.data_ptr<float>(), L, rows);
  return y_SN;
}

namespace {

// float -> T; bfloat16 by round-to-nearest-even on the bits (finite values only, as every
// dequantized weight is), which vectorizes where the checked conversion does not
template <typename T>
inline T to_out(float v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    bits += 0x7FFF + ((bits >> 16) & 1);
    return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
  } else {
    return static_cast<T>(v);
  }
}

// out[n, k] = q[n, k] * scale[n, k / group_len] for rows [n0, n1), converted to T
template <int F, typename T>
void dequantize_rows_impl(const uint8_t* w, const float* scale, T* out, const Layout& L, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w_row = w + n * L.bytes_per_row;
    T* o = out + n * L.K;
    for (int64_t g = 0; g < L.groups; ++g) {
      const float s = scale[n * L.groups + g];
      const uint8_t* wg = w_row + g * L.bytes_per_group;
      T* og = o + g * L.group_len;
      if constexpr (F == kInt4) {
#pragma omp simd
        for (int64_t j = 0; j < L.group_len / 2; ++j) {
          og[2 * j] = to_out<T>(s * static_cast<float>(static_cast<int>(wg[j] & 0xF) - 8));
          og[2 * j + 1] = to_out<T>(s * static_cast<float>(static_cast<int>(wg[j] >> 4) - 8));
        }
      } else {
#pragma omp simd
        for (int64_t k = 0; k < L.group_len; ++k) og[k] = to_out<T>(s * weight<F>(wg, k));
      }
    }
  }
}

template <int F>
void dequantize_dispatch(const uint8_t* w, const float* scale, at::Tensor& out, const Layout& L) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "dequantize_rows", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    kernel_moe::parallel_chunks(L.N, 16, [&](int64_t n0, int64_t n1) {
      dequantize_rows_impl<F, scalar_t>(w, scale, o, L, n0, n1);
    });
  });
}

}  // namespace

at::Tensor dequantize_rows(const at::Tensor& w_NK, const at::Tensor& scale, int64_t format, at::ScalarType dtype) {
  TORCH_CHECK(format == kInt8 || format == kFp8 || format == kInt4,
              "dequantize_rows: format ", format, " is not one of 1 (int8), 2 (fp8), 3 (int4)");
  TORCH_CHECK(w_NK.dim() == 2 && w_NK.is_contiguous() && w_NK.element_size() == 1 && w_NK.device().is_cpu(),
              "dequantize_rows: w must be a contiguous one-byte [N, K (int4: K/2)] CPU tensor");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && (scale.dim() == 1 || scale.dim() == 2) &&
                  scale.size(0) == w_NK.size(0) && scale.device().is_cpu(),
              "dequantize_rows: scale must be a contiguous float32 [N] or [N, G] CPU tensor for w ", w_NK.sizes());
  const int64_t N = w_NK.size(0), K = w_NK.size(1) * (format == kInt4 ? 2 : 1);
  const int64_t groups = scale.dim() == 2 ? scale.size(1) : 1;
  TORCH_CHECK(groups > 0 && K % groups == 0 && (format != kInt4 || (K / groups) % 2 == 0),
              "dequantize_rows: ", groups, " groups do not divide ", K, " features evenly");
  const int64_t group_len = K / groups;
  const int64_t bytes_per_group = format == kInt4 ? group_len / 2 : group_len;
  const Layout L{N, K, groups, group_len, bytes_per_group * groups, bytes_per_group};
  at::Tensor out = at::empty({N, K}, w_NK.options().dtype(dtype));
  const auto* w = static_cast<const uint8_t*>(w_NK.data_ptr());
  const float* s = scale.data_ptr<float>();
  if (format == kInt8) dequantize_dispatch<kInt8>(w, s, out, L);
  if (format == kFp8) dequantize_dispatch<kFp8>(w, s, out, L);
  if (format == kInt4) dequantize_dispatch<kInt4>(w, s, out, L);
  return out;
}
