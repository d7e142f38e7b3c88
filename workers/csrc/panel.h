// The panel layout shared by csrc/bf16_linear.cpp and csrc/int8_panel.cpp.
//
//   packed [panels, in_features / 2, 32, 2]   panel p holds output features 32p .. 32p + 31,
//                                             each k-pair row the 32 features' weights for
//                                             inputs 2i and 2i + 1 (vdpbf16ps's operand order)
#pragma once

#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>

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

// sums[m][0..32) = x[m] . panel over all pairs.
template <int kRows>
inline void tile(const c10::BFloat16* x, int64_t pairs, const c10::BFloat16* panel,
                 float* sums) {
  __m512 acc[kRows][2];
  for (int m = 0; m < kRows; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void*)(panel + p * 2 * kPanel));
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512((const void*)(panel + p * 2 * kPanel + 32));
    for (int m = 0; m < kRows; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(input_pair(x + 2 * (m * pairs + p)));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
    }
  }
  for (int m = 0; m < kRows; ++m) {
    _mm512_storeu_ps(sums + m * kPanel, acc[m][0]);
    _mm512_storeu_ps(sums + m * kPanel + 16, acc[m][1]);
  }
}

#endif

}  // namespace kvray
