// Weight-only int8 linear layer for bf16 activations, in bf16_linear.cpp's panel layout.
//
// int8_linear.cpp streams one output feature's weights at a time and reduces 16 lanes per
// output, which kept a decode at 8-18 GB/s of int8 weights (against the ~27 packed bf16 reaches:
// slower than bf16 per token). Here the weights sit in panels of 32 output features, each k-pair
// row the 32 features' weights for inputs 2i and 2i + 1 (vdpbf16ps's operand order), so a panel
// is one contiguous stream and a tile of up to 12 rows keeps its 24 accumulators in registers,
// as in bf16_linear.cpp. Each 64-byte row is widened in registers: int8 -> fp32, times its
// feature's group scale (an exact product), rounded to bf16 (nearest even): the weights every
// other int8 path multiplies by, `bf16(weight * scale)`.
//
//   packed [panels, in_features / 2, 32, 2]        int8 (out_features padded with zeros)
//   scales [panels, in_features / group_size, 32]  bf16
//   x      [rows, in_features]                     bf16
//   bias   [out_features] or None                  any float dtype, added in fp32
// group_size is a multiple of 2 dividing in_features (32 by default). Returns [rows, out] bf16.

#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "panel.h"
#include "vec.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>

namespace {

using kvray::kPanel;
using kvray::kTileRows;
using kvray::with_rows;

// The 32 features' scales of one group, as the fp32 lanes of each quarter of a widened k-pair
// row: quarter q holds features 8q .. 8q + 7, each twice (its two inputs).
struct GroupScales {
  __m512 q[4];
  explicit GroupScales(const c10::BFloat16* s) {
    const __m512i first = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    const __m512 lo = kvray::load_bf16x16(s), hi = kvray::load_bf16x16(s + 16);
    q[0] = _mm512_permutexvar_ps(first, lo);
    q[1] = _mm512_permutexvar_ps(second, lo);
    q[2] = _mm512_permutexvar_ps(first, hi);
    q[3] = _mm512_permutexvar_ps(second, hi);
  }
};

inline __m512 widen(const int8_t* w, __m512 scale) {  // 16 weights times their scales
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)w))),
                       scale);
}

// One k-pair row (64 weights) as two vectors of 16 bf16 pairs: features 0-15, then 16-31.
inline void weights(const int8_t* w, const GroupScales& s, __m512bh* w0, __m512bh* w1) {
  *w0 = _mm512_cvtne2ps_pbh(widen(w + 16, s.q[1]), widen(w, s.q[0]));
  *w1 = _mm512_cvtne2ps_pbh(widen(w + 48, s.q[3]), widen(w + 32, s.q[2]));
}

template <int kRows>
inline void tile(const c10::BFloat16* x, int64_t pairs, int64_t group_pairs, const int8_t* panel,
                 const c10::BFloat16* scales, float* sums) {
  kvray::TileSums<kRows> t;
  for (int64_t g = 0; g * group_pairs < pairs; ++g) {
    const GroupScales s(scales + g * kPanel);
    for (int64_t p = g * group_pairs; p < (g + 1) * group_pairs; ++p) {
      __m512bh w0, w1;
      weights(panel + p * 2 * kPanel, s, &w0, &w1);
      t.add(x, pairs, p, w0, w1);
    }
  }
  t.store(sums);
}

// One panel as bf16(weight * scale), in the same layout: [pairs, 32, 2] bf16.
void widen_panel(const int8_t* panel, const c10::BFloat16* scales, int64_t pairs,
                 int64_t group_pairs, c10::BFloat16* out) {
  for (int64_t g = 0; g * group_pairs < pairs; ++g) {
    const GroupScales s(scales + g * kPanel);
    for (int64_t p = g * group_pairs; p < (g + 1) * group_pairs; ++p) {
      __m512bh w0, w1;
      weights(panel + p * 2 * kPanel, s, &w0, &w1);
      _mm512_storeu_si512((void*)(out + p * 2 * kPanel), (__m512i)w0);
      _mm512_storeu_si512((void*)(out + p * 2 * kPanel + 32), (__m512i)w1);
    }
  }
}

void check(const at::Tensor& packed, const at::Tensor& scales, int64_t group_size,
           int64_t out_features) {
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kPanel && packed.size(3) == 2 &&
                  packed.scalar_type() == at::kChar && packed.is_contiguous(),
              "packed must be contiguous int8 [panels, in_features / 2, 32, 2]");
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && (packed.size(1) * 2) % group_size == 0,
              "group_size must be even and divide in_features, got ", group_size);
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.is_contiguous() &&
                  scales.dim() == 3 && scales.size(0) == packed.size(0) &&
                  scales.size(1) == packed.size(1) * 2 / group_size && scales.size(2) == kPanel,
              "scales must be contiguous bf16 [panels, in_features / group_size, 32]");
  TORCH_CHECK(out_features > packed.size(0) * kPanel - kPanel &&
                  out_features <= packed.size(0) * kPanel,
              "out_features ", out_features, " does not match ", packed.size(0), " panels");
}

}  // namespace

at::Tensor int8_panel_linear(at::Tensor x, at::Tensor packed, at::Tensor scales,
                             int64_t group_size, int64_t out_features,
                             c10::optional<at::Tensor> bias) {
  check(packed, scales, group_size, out_features);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be 2-d bf16");
  TORCH_CHECK(x.size(1) == packed.size(1) * 2, "x has ", x.size(1), " features, weight expects ",
              packed.size(1) * 2);
  const at::Tensor xc = x.contiguous();
  const int64_t rows = x.size(0), pairs = packed.size(1);
  const int64_t groups = scales.size(1), group_pairs = group_size / 2;
  const c10::BFloat16* x_ptr = xc.data_ptr<c10::BFloat16>();
  const int8_t* w = packed.data_ptr<int8_t>();
  const c10::BFloat16* s = scales.data_ptr<c10::BFloat16>();
  // NOTE: past one tile of rows, each panel is widened once into its thread's scratch (in its
  // L2: 2 * in_features * 64 bytes), and every tile reads it as bf16_linear's would.
  thread_local std::vector<c10::BFloat16> widened;
  const bool scratch = rows > kTileRows;
  return kvray::panel_linear(
      xc, packed.size(0), out_features, bias,
      [&](int64_t p) {
        if (!scratch) return;
        widened.resize(pairs * 2 * kPanel);
        widen_panel(w + p * pairs * 2 * kPanel, s + p * groups * kPanel, pairs, group_pairs,
                    widened.data());
      },
      [&](int64_t p, int64_t m0, int64_t count, float* sums) {
        with_rows<kTileRows>(count, [&](auto tile_rows) {
          constexpr int kRows = decltype(tile_rows)::value;
          const c10::BFloat16* xs = x_ptr + m0 * 2 * pairs;
          if (scratch) {
            kvray::tile<kRows>(xs, pairs, widened.data(), sums);
          } else {
            tile<kRows>(xs, pairs, group_pairs, w + p * pairs * 2 * kPanel,
                        s + p * groups * kPanel, sums);
          }
        });
      });
}

// bf16(weight * scale) as bf16_pack's panels, [panels, in_features / 2, 32, 2]: for inputs of
// many rows (prompt chunks), where one oneDNN matmul over the widened weights is faster.
at::Tensor int8_panel_dequantize(at::Tensor packed, at::Tensor scales, int64_t group_size) {
  check(packed, scales, group_size, packed.size(0) * kPanel);
  auto out = at::empty(packed.sizes(), packed.options().dtype(at::kBFloat16));
  const int64_t pairs = packed.size(1), groups = scales.size(1), group_pairs = group_size / 2;
  const int8_t* w = packed.data_ptr<int8_t>();
  const c10::BFloat16* s = scales.data_ptr<c10::BFloat16>();
  c10::BFloat16* y = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, packed.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t at = p * pairs * 2 * kPanel;
      widen_panel(w + at, s + p * groups * kPanel, pairs, group_pairs, y + at);
    }
  });
  return out;
}
#endif

TORCH_LIBRARY_FRAGMENT(kvray, m) {
#if defined(__AVX512BF16__)
  // NOTE: only where the compiler targets AVX512-BF16; elsewhere int8 keeps int8_linear.cpp.
  m.def("int8_panel_linear(Tensor x, Tensor packed, Tensor scales, int group_size, "
        "int out_features, Tensor? bias) -> Tensor");
  m.def("int8_panel_dequantize(Tensor packed, Tensor scales, int group_size) -> Tensor");
#endif
}

TORCH_LIBRARY_IMPL(kvray, CPU, m) {
#if defined(__AVX512BF16__)
  m.impl("int8_panel_linear", &int8_panel_linear);
  m.impl("int8_panel_dequantize", &int8_panel_dequantize);
#endif
}
