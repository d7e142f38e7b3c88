// The panel layout shared by csrc/bf16_linear.cpp and csrc/int8_panel.cpp.
//
//   packed [panels, in_features / 2, 32, 2]   panel p holds output features 32p .. 32p + 31,
//                                             each k-pair row the 32 features' weights for
//                                             inputs 2i and 2i + 1 (vdpbf16ps's operand order)
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "vec.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace kvray {

constexpr int64_t kPanel = 32;  // output features per panel: two vectors of 16 fp32 sums
constexpr int kTileRows = 12;   // rows per tile: 24 accumulators of the 32 registers

#if defined(__AVX512BF16__)
inline int32_t input_pair(const c10::BFloat16* x) {  // two bf16 inputs as one 32-bit lane
  int32_t pair;
  std::memcpy(&pair, x, sizeof(pair));
  return pair;
}

// The fp32 sums of a tile of kRows rows against one panel's 32 features, in registers.
template <int kRows>
struct TileSums {
  __m512 acc[kRows][2];
  TileSums() {
    for (int m = 0; m < kRows; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  }
  // Adds k-pair row p (features 0-15 in w0, 16-31 in w1) times each row's inputs 2p, 2p + 1.
  inline void add(const c10::BFloat16* x, int64_t pairs, int64_t p, __m512bh w0, __m512bh w1) {
    for (int m = 0; m < kRows; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(input_pair(x + 2 * (m * pairs + p)));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
    }
  }
  inline void store(float* sums) const {  // sums[m][0..32)
    for (int m = 0; m < kRows; ++m) {
      _mm512_storeu_ps(sums + m * kPanel, acc[m][0]);
      _mm512_storeu_ps(sums + m * kPanel + 16, acc[m][1]);
    }
  }
};

// sums[m][0..32) = x[m] . panel over all pairs, for a panel of bf16 weights.
template <int kRows>
inline void tile(const c10::BFloat16* x, int64_t pairs, const c10::BFloat16* panel,
                 float* sums) {
  TileSums<kRows> t;
  for (int64_t p = 0; p < pairs; ++p) {
    t.add(x, pairs, p, (__m512bh)_mm512_loadu_si512((const void*)(panel + p * 2 * kPanel)),
          (__m512bh)_mm512_loadu_si512((const void*)(panel + p * 2 * kPanel + 32)));
  }
  t.store(sums);
}

// y = x @ W^T + bias, W in `panels` panels: `begin(p)` runs once per panel, then
// `tile_sums(p, m0, count, sums)` writes the fp32 sums of rows m0 .. m0 + count - 1 against
// panel p; the bias is added in fp32 and each output rounded once to bf16 (nearest even).
//   x [rows, in_features] bf16, contiguous; bias [out_features] or None, any float dtype.
template <typename Begin, typename TileSumsFn>
at::Tensor panel_linear(const at::Tensor& x, int64_t panels, int64_t out_features,
                        const c10::optional<at::Tensor>& bias, Begin&& begin,
                        TileSumsFn&& tile_sums) {
  at::Tensor bias_f;  // NOTE: PackedLinear keeps its bias in fp32, so no copy per call
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == out_features, "bias has ", bias->numel(), " values for ",
                out_features, " out_features");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const float* b = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const int64_t rows = x.size(0);
  auto out = at::empty({rows, out_features}, x.options());
  c10::BFloat16* y = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, panels, 1, [&](int64_t first, int64_t end) {
    alignas(64) float sums[kTileRows * kPanel];
    for (int64_t p = first; p < end; ++p) {
      const int64_t n0 = p * kPanel, cols = std::min(kPanel, out_features - n0);
      const __mmask16 lo_cols = cols >= 16 ? 0xFFFF : (1u << cols) - 1;
      const __mmask16 hi_cols = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : (1u << (cols - 16)) - 1;
      const __m512 bias_lo = b ? _mm512_maskz_loadu_ps(lo_cols, b + n0) : _mm512_setzero_ps();
      const __m512 bias_hi = b ? _mm512_maskz_loadu_ps(hi_cols, b + n0 + 16) : _mm512_setzero_ps();
      const __mmask32 mask = cols == kPanel ? ~__mmask32(0) : (__mmask32(1) << cols) - 1;
      begin(p);
      for (int64_t m0 = 0; m0 < rows; m0 += kTileRows) {
        const int64_t count = std::min<int64_t>(kTileRows, rows - m0);
        tile_sums(p, m0, count, sums);
        for (int64_t m = 0; m < count; ++m) {
          const __m512 lo = _mm512_add_ps(_mm512_load_ps(sums + m * kPanel), bias_lo);
          const __m512 hi = _mm512_add_ps(_mm512_load_ps(sums + m * kPanel + 16), bias_hi);
          const __m512i rounded = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
          _mm512_mask_storeu_epi16(y + (m0 + m) * out_features + n0, mask, rounded);
        }
      }
    }
  });
  return out;
}

#endif

}  // namespace kvray
