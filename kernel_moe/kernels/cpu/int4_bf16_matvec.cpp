// int4 expert weights against bf16 x rows (decode of a bf16 model), on the CPU's bf16 dot-product
// instruction (AVX512_BF16).
//
// A stored nibble q (0..15) becomes the bf16 number q - 8 by one word permute (vpermw) from a table
// of 32 entries indexed by the word's low five bits, entry i holding (i mod 16) - 8: decoding 32
// weights takes a shift and the permute, with no int -> float conversion, and each product with a
// bf16 x is exact in fp32. Taking
// 64 bytes (128 features) as 32 16-bit words, nibble j of word i is feature 4i + j, so x is stored
// per block of 128 as four runs of 32 (run j, element i: feature 4i + j) and fp32 lane m of a
// dot product sums features 8m .. 8m + 7.

#include "quant_rows.h"

#include <algorithm>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>

namespace kernel_moe::quant {
namespace {

constexpr int64_t kBlock = 128;

// the table: word i holds bf16((i mod 16) - 8)
inline __m512i int4_table() {
  alignas(64) uint16_t table[32];
  for (int i = 0; i < 32; ++i) table[i] = c10::BFloat16(static_cast<float>(i % 16 - 8)).x;
  return _mm512_load_si512(table);
}

// the 128 weights of one block as four vectors of 32 bf16, run j holding nibble j of each word
// (vpermw reads only the low five bits of each index word, so no mask is needed)
inline void decode_int4_block(const uint8_t* wb, const __m512i& table, __m512bh* w) {
  const __m512i v = _mm512_loadu_si512(wb);
  w[0] = (__m512bh)_mm512_permutexvar_epi16(v, table);
  w[1] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
  w[2] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), table);
  w[3] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), table);
}

// one block's 16 lane sums for one x row: the four runs' dot products
inline __m512 block_dot(const __m512bh* w, const __m512bh* x) {
  __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), w[0], x[0]);
  t = _mm512_dpbf16_ps(t, w[1], x[1]);
  t = _mm512_dpbf16_ps(t, w[2], x[2]);
  return _mm512_dpbf16_ps(t, w[3], x[3]);
}

inline void load_block_x(const uint16_t* xb, __m512bh* x) {
  for (int j = 0; j < 4; ++j) x[j] = (__m512bh)_mm512_loadu_si512(xb + 32 * j);
}

// What every row kernel of one call shares: the layout, x in the kernel's order, the decode table,
// and where each lane finds its scale
struct Call {
  const Layout& L;
  const uint16_t* xp;  // [S, K / 128, 4, 32] bf16: run j of a block holds features 4i + j
  __m512i table;
  __m512i lane_group;     // lane m's group within the block's first scales (groups of 32 or 64)
  __mmask16 scale_mask;   // the scales one block reads
};

// the scales of one block's 16 lanes
template <bool WIDE>
inline __m512 block_scales(const float* scale_row, int64_t b, const Call& c) {
  const int64_t g0 = b * kBlock / c.L.group_len;
  if constexpr (WIDE) return _mm512_set1_ps(scale_row[g0]);
  return _mm512_permutexvar_ps(c.lane_group, _mm512_maskz_loadu_ps(c.scale_mask, scale_row + g0));
}

// One weight row against ROWS x rows (from ``x_row``). WIDE: groups of whole blocks (one scale per
// block, broadcast); else groups of 32 or 64 features, whose scales are spread over the lanes.
// Even and odd blocks go to their own accumulators, so that one block's sums do not wait on the other's.
template <int ROWS, bool WIDE>
inline void row_dot_int4_bf16(const uint8_t* __restrict w_row, const float* __restrict scale_row, int64_t x_row,
                              const Call& c, float* out) {
  const int64_t K = c.L.K, blocks = K / kBlock;
  __m512 acc[2][ROWS];
  for (int u = 0; u < 2; ++u)
    for (int j = 0; j < ROWS; ++j) acc[u][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* wb = w_row + b * (kBlock / 2);
    _mm_prefetch(reinterpret_cast<const char*>(wb) + 4096, _MM_HINT_T0);  // see grouped_matvec.cpp
    __m512bh w[4], x[4];
    decode_int4_block(wb, c.table, w);
    const __m512 s = block_scales<WIDE>(scale_row, b, c);
    for (int j = 0; j < ROWS; ++j) {
      load_block_x(c.xp + (x_row + j) * K + b * kBlock, x);
      acc[b & 1][j] = _mm512_fmadd_ps(block_dot(w, x), s, acc[b & 1][j]);
    }
  }
  for (int j = 0; j < ROWS; ++j) out[j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][j], acc[1][j]));
}

// the lane sums of four vectors: out[q] = sum of a[q]'s 16 lanes
inline void reduce4(const __m512* a, float* out) {
  // halves of a0 | a1 and of a2 | a3 added: 8 lanes each
  const __m512 t01 = _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], 0x44), _mm512_shuffle_f32x4(a[0], a[1], 0xEE));
  const __m512 t23 = _mm512_add_ps(_mm512_shuffle_f32x4(a[2], a[3], 0x44), _mm512_shuffle_f32x4(a[2], a[3], 0xEE));
  // quarters: 128-bit lane q holds four partial sums of a[q]
  __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(t01, t23, 0x88), _mm512_shuffle_f32x4(t01, t23, 0xDD));
  u = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4E));
  u = _mm512_add_ps(u, _mm512_permute_ps(u, 0xB1));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, u);
  for (int q = 0; q < 4; ++q) out[q] = lanes[4 * q];
}

// How far ahead the four-row kernel prefetches each row's bytes: 4 KiB within a row (see
// grouped_matvec.cpp), but for rows shorter than that the same place in a later group of four rows,
// at least 4 KiB on: 4 KiB ahead in a short row would land in rows this group is reading now.
inline int64_t rows4_prefetch(int64_t row_bytes) {
  if (row_bytes >= 4096) return 4096;
  const int64_t quad = 4 * row_bytes;
  return quad * ((4096 + quad - 1) / quad);
}

// four consecutive weight rows against one x row: the x block is loaded once for the four, whose
// independent sums keep the dot-product units busy at decode
template <bool WIDE>
inline void rows4_dot_int4_bf16(const uint8_t* __restrict w_row, const float* __restrict scale_row, int64_t x_row,
                                const Call& c, float* out) {
  const Layout& L = c.L;
  const int64_t ahead = rows4_prefetch(L.bytes_per_row);
  __m512 acc[4];
  for (int q = 0; q < 4; ++q) acc[q] = _mm512_setzero_ps();
  for (int64_t b = 0; b < L.K / kBlock; ++b) {
    __m512bh x[4];
    load_block_x(c.xp + x_row * L.K + b * kBlock, x);
    for (int q = 0; q < 4; ++q) {
      const uint8_t* wb = w_row + q * L.bytes_per_row + b * (kBlock / 2);
      _mm_prefetch(reinterpret_cast<const char*>(wb) + ahead, _MM_HINT_T0);
      __m512bh w[4];
      decode_int4_block(wb, c.table, w);
      acc[q] = _mm512_fmadd_ps(block_dot(w, x), block_scales<WIDE>(scale_row + q * L.groups, b, c), acc[q]);
    }
  }
  reduce4(acc, out);
}

// Whether the bf16 int4 kernel takes this layout: whole blocks, and groups that are whole
// blocks or split one evenly into lanes (32, 64).
inline bool int4_bf16_fits(const Layout& L) {
  return L.K % kBlock == 0 && L.group_len % 32 == 0 && (kBlock % L.group_len == 0 || L.group_len % kBlock == 0);
}

// bf16 x rows [S, K] in the kernel's order [S, K / 128, 4, 32]
void prepare_x(const c10::BFloat16* x_SK, int64_t S, int64_t K, uint16_t* xp) {
  for (int64_t f0 = 0; f0 < S * K; f0 += kBlock) {
    for (int64_t f = 0; f < kBlock; ++f) xp[f0 + 32 * (f % 4) + f / 4] = x_SK[f0 + f].x;
  }
}

}  // namespace

bool int4_bf16_matvec(const uint8_t* w, const float* scale, const at::Tensor& x_SK, float* y_SN, const Layout& L,
                      const std::vector<Rows>& groups) {
  if (x_SK.scalar_type() != at::kBFloat16 || !int4_bf16_fits(L)) return false;
  std::vector<uint16_t> xp(x_SK.numel());
  prepare_x(x_SK.data_ptr<c10::BFloat16>(), x_SK.size(0), L.K, xp.data());
  alignas(64) int32_t lane_group[16];
  for (int m = 0; m < 16; ++m) lane_group[m] = static_cast<int32_t>(8 * m / L.group_len);
  const auto scale_mask = static_cast<__mmask16>((1u << std::max<int64_t>(1, kBlock / L.group_len)) - 1);
  const Call c{L, xp.data(), int4_table(), _mm512_load_si512(lane_group), scale_mask};
  const auto run = [&](auto wide_tag) {
    constexpr bool WIDE = decltype(wide_tag)::value;
    const auto dot = [&](auto rows, int64_t row, int64_t r, float* acc) {
      row_dot_int4_bf16<decltype(rows)::value, WIDE>(w + row * L.bytes_per_row, scale + row * L.groups, r, c, acc);
    };
    const auto quad = [&](int64_t row, int64_t r, float* acc) {
      rows4_dot_int4_bf16<WIDE>(w + row * L.bytes_per_row, scale + row * L.groups, r, c, acc);
    };
    for_each_weight_row(L, groups, y_SN, dot, quad);
  };
  if (L.group_len % kBlock == 0) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }
  return true;
}

}  // namespace kernel_moe::quant

#else

namespace kernel_moe::quant {

bool int4_bf16_matvec(const uint8_t*, const float*, const at::Tensor&, float*, const Layout&,
                      const std::vector<Rows>&) {
  return false;
}

}  // namespace kernel_moe::quant

#endif
