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

// c10's bf16 round to nearest even, 16 lanes at a time: an fp32 holding the bf16 value. (NaN
// payloads are not preserved; every finite input rounds as c10::BFloat16 does.)
inline __m512 round_bf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32(0xffff0000)));
}

// 16 bf16 values (any alignment) widened to fp32.
inline __m512 load_bf16x16(const void* p) {
  const __m256i v = _mm256_loadu_si256(static_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// Stores 16 fp32 lanes that already hold bf16 values (their low halves are zero).
inline void store_bf16x16(void* p, __m512 x) {
  const __m512i top = _mm512_srli_epi32(_mm512_castps_si512(x), 16);
  _mm256_storeu_si256(static_cast<__m256i*>(p), _mm512_cvtepi32_epi16(top));
}
#endif

}  // namespace kvray
