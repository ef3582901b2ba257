// Shared by the quantized matrix-vector kernels (quant_matvec.cpp, int4_bf16_matvec.cpp): the
// weight layout, the runs of rows per expert, and the loop over weight rows.

#pragma once

#include "pool.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace kernel_moe::quant {

struct Rows {
  int64_t expert, first_row, rows;
};

struct Layout {
  int64_t N, K, groups, group_len;  // group_len features per scale (K when one scale per row)
  int64_t bytes_per_row, bytes_per_group;
};

// y[r, n] for every weight row n of every active expert against its x rows, four at a time:
// ``dot(rows, weight_row, first_x_row, acc)`` writes acc[0 .. rows) (rows a compile-time constant).
// ``quad(weight_row, x_row, acc)``, where given (not nullptr), takes four consecutive weight rows of an
// expert with one x row (decode): four independent sums, and one horizontal sum for all four.
template <typename Dot, typename Quad = std::nullptr_t>
void for_each_weight_row(const Layout& L, const std::vector<Rows>& groups, float* y_SN, Dot dot,
                         Quad quad = nullptr) {
  const int64_t R = static_cast<int64_t>(groups.size());
  kernel_moe::parallel_chunks(R * L.N, 16, [&](int64_t begin, int64_t end) {
    float acc[4];
    for (int64_t i = begin; i < end; ++i) {
      const Rows& g = groups[i / L.N];
      const int64_t n = i % L.N;
      const int64_t row = g.expert * L.N + n;
      if constexpr (!std::is_same_v<Quad, std::nullptr_t>) {
        if (g.rows == 1 && n + 4 <= L.N && i + 4 <= end) {
          quad(row, g.first_row, acc);
          for (int q = 0; q < 4; ++q) y_SN[g.first_row * L.N + n + q] = acc[q];
          i += 3;
          continue;
        }
      }
      int64_t r = g.first_row;
      const int64_t r_end = g.first_row + g.rows;
      for (; r + 4 <= r_end; r += 4) {
        dot(std::integral_constant<int, 4>{}, row, r, acc);
        for (int j = 0; j < 4; ++j) y_SN[(r + j) * L.N + n] = acc[j];
      }
      const int64_t rest = r_end - r;
      if (rest == 3) dot(std::integral_constant<int, 3>{}, row, r, acc);
      if (rest == 2) dot(std::integral_constant<int, 2>{}, row, r, acc);
      if (rest == 1) dot(std::integral_constant<int, 1>{}, row, r, acc);
      for (int64_t j = 0; j < rest; ++j) y_SN[(r + j) * L.N + n] = acc[j];
    }
  });
}

// y_SN = int4 weights @ bf16 x rows with the CPU's bf16 dot products (int4_bf16_matvec.cpp).
// Returns false, having written nothing, where the CPU lacks them or the layout does not fit
// (K a multiple of 128; groups of 32, 64 or a multiple of 128 features).
bool int4_bf16_matvec(const uint8_t* w, const float* scale, const at::Tensor& x_SK, float* y_SN, const Layout& L,
                      const std::vector<Rows>& groups);

}  // namespace kernel_moe::quant
