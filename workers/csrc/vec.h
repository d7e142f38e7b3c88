// Helpers shared by kvray's CPU kernels (included by each .cpp of workers/csrc).
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace kvray {

// Calls f(std::integral_constant<int, count>()) for 1 <= count <= kMax: loops over a tile's
// rows take their row count as a template argument, so their accumulators stay in registers.
template <int kMax, typename F>
inline void with_rows(int64_t count, F&& f) {
  if constexpr (kMax > 1) {
    if (count < kMax) return with_rows<kMax - 1>(count, f);
  }
  f(std::integral_constant<int, kMax>());
}

#if defined(__AVX512F__)
// [sum a, sum b, sum c, sum d]: four 16-lane reductions for about the price of one.
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 v = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#endif

}  // namespace kvray
