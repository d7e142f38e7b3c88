// int8 x int8 linear layer on CPU (`quantization: w8a8`): y = x @ W^T + bias, with the
// activations quantized on the fly, per row, in groups of 32 (llama.cpp's Q8_0 x Q8_0).
//
// Weight-only int8 (int8_linear.cpp, int8_panel.cpp) widens every weight to fp32 or bf16 before
// multiplying, which costs more than it saves once a batch makes the layer compute-bound. Here
// both operands stay int8: each group of 32 inputs of a row is scaled to [-127, 127] and rounded
// (nearest even, as torch.round), one fp32 scale per group, and multiplied with the weights'
// groups as 8-bit integers. Per group, the int32 dot is exact; it is then multiplied by both
// scales and summed over the groups in fp32:
//
//   y[m, n] = bias[n] + sum_g  xs[m, g] * ws[n, g] * sum_{k in g} xq[m, k] * wq[n, k]
//
//   x       [rows, in_features]                   bf16 or fp32
//   packed  [panels, in_features / 4, 8, 4]       int8 in [-127, 127]: quantize_int8's rows in
//                                                 panels of 8 output features, each quad row
//                                                 the 8 features' weights for 4 inputs
//                                                 (out_features padded with zeros; see
//                                                 `to_panels` in workers/w8a8.py)
//   scales  [panels, in_features / 32, 8]         fp32, the weights' bf16 group scales
//   bias    [out_features] or None                any float dtype, added in fp32
// in_features a multiple of 32. Returns [rows, out_features] in x's dtype.
//
// AVX2 (what this kernel is built for): a row's 4 inputs of a quad are broadcast against a
// panel's quad row (32 bytes: 8 features x 4 inputs), `vpmaddubsw` (u8 x s8 -> s16 pairs) and
// `vpmaddwd` with ones (-> s32 quads) give each feature's 4 products in its own s32 lane; the
// group's 8 quads are summed in those lanes, converted and multiplied by both scales into fp32
// lanes once per group, and the lanes are the outputs: no reduction across lanes. Signs as in
// llama.cpp: |x| as the unsigned operand and x's sign moved onto the weights (`vpsignb`), so
// no s16 sum can saturate (at most 2 * 127 * 127). A tile is 2 rows x 2 panels (4 s32 and 4
// fp32 accumulators of the 16 registers).
// NOTE: the group sums are exact; the fp32 sum over the groups runs in the kernel's order (with
// FMAs), the torch reference's in torch's: equal to fp32 rounding, not bit for bit.
//
// Where AVX512-VNNI exists (not built here: the machines this was written and measured on lack
// it), `_mm512_dpbusd_epi32` does vpmaddubsw + vpmaddwd + the s32 add in one instruction on
// twice the width (16 features per panel, or two panels), and saturates nothing, so the sign
// trick would stay only for the unsigned operand: 2 instructions per 64 products against 4
// per 32 here. AMX-INT8 (`_tile_dpbssd`: signed x signed, no sign trick) multiplies a 16-row x
// 64-input tile of activations by a 64 x 16-feature tile of weights (this quad layout, 16
// features wide) per instruction into s32, for prompt chunks and big batches; the per-group
// scales would then be applied after each 32-input half (two tile products per 64 inputs).
// Both would be checked at start as AVX512-BF16 is (a compile-time `#if defined(__AVX512VNNI__)`
// beside this path, as int8_panel.cpp does for AVX512-BF16).

#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>

#include "vec.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace {

using kvray::with_rows;

constexpr int64_t kGroup = 32;    // inputs per scale, weights' and activations' alike
constexpr int kTileRows = 2;      // rows per tile: kTileRows x 2 panels, s32 and fp32 sums
constexpr int64_t kPanel = 8;     // output features per panel: one s32 or fp32 lane each
constexpr int64_t kChunk = 64;    // output features whose weights stay in L2 across row tiles

// 8 bf16 values widened to fp32 (exact).
inline __m256 load_bf16x8(const c10::BFloat16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

template <typename T>
inline __m256 load8(const T* p) {
  if constexpr (std::is_same<T, float>::value) {
    return _mm256_loadu_ps(p);
  } else {
    return load_bf16x8(p);
  }
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The activations, quantized: int8 values, their magnitudes (the unsigned operand) and one fp32
// scale per group, each [rows, ...] row-major.
struct QuantizedRows {
  at::Tensor q, magnitude, scale;  // int8 [rows, in]; uint8 [rows, in]; fp32 [rows, in / 32]
};

// One group of 32 inputs: amax / 127 as its scale, round(x * (127 / amax)) as its values.
// NOTE: the same fp32 operations as the torch reference, in the same order, so bit for bit.
template <typename T>
inline void quantize_group(const T* x, int8_t* q, uint8_t* magnitude, float* scale) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = load8(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[i]));
  }
  const float a = hmax(amax);
  *scale = a / 127.0f;
  const __m256 inv = _mm256_set1_ps(a > 0.0f ? 127.0f / a : 0.0f);
  __m256i n[4];
  for (int i = 0; i < 4; ++i) n[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // even
  // packs interleave 128-bit lanes: the permute puts the 32 bytes back in input order.
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]),
                                            _mm256_packs_epi32(n[2], n[3]));
  const __m256i ordered =
      _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), ordered);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(magnitude), _mm256_sign_epi8(ordered, ordered));
}

template <typename T>
QuantizedRows quantize_rows(const at::Tensor& x) {
  const int64_t rows = x.size(0), in = x.size(1), groups = in / kGroup;
  const at::Tensor xc = x.contiguous();
  QuantizedRows out{at::empty({rows, in}, x.options().dtype(at::kChar)),
                    at::empty({rows, in}, x.options().dtype(at::kByte)),
                    at::empty({rows, groups}, x.options().dtype(at::kFloat))};
  const T* xp = xc.data_ptr<T>();
  int8_t* q = out.q.data_ptr<int8_t>();
  uint8_t* mag = out.magnitude.data_ptr<uint8_t>();
  float* s = out.scale.data_ptr<float>();
  at::parallel_for(0, rows * groups, 64, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      quantize_group(xp + g * kGroup, q + g * kGroup, mag + g * kGroup, s + g);
    }
  });
  return out;
}

struct Layer {
  int64_t rows, in, out, groups;
  const int8_t* xq;
  const uint8_t* xmag;
  const float* xs;      // [rows, groups]
  const int8_t* w;      // [panels, in / 4, 8, 4]
  const float* ws;      // [panels, groups, 8]
  const float* bias;    // fp32 or nullptr

  const int8_t* panel(int64_t p) const { return w + p * in * kPanel; }
};

// kRows rows (from m0) x kPanels panels (from p0): per group, each quad of inputs (4 bytes,
// broadcast) times the panel's 8 features' quads, summed in s32 lanes (one per feature) over
// the group's 8 quads, then converted and scaled into fp32 lanes once per group.
template <int kRows, int kPanels>
inline void tile(const Layer& L, int64_t m0, int64_t p0, __m256 (&acc)[kRows][kPanels]) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int m = 0; m < kRows; ++m)
    for (int j = 0; j < kPanels; ++j) acc[m][j] = _mm256_setzero_ps();
  const int8_t* panels[kPanels];
  for (int j = 0; j < kPanels; ++j) panels[j] = L.panel(p0 + j);
  for (int64_t g = 0; g < L.groups; ++g) {
    __m256i dots[kRows][kPanels];
    for (int m = 0; m < kRows; ++m)
      for (int j = 0; j < kPanels; ++j) dots[m][j] = _mm256_setzero_si256();
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; k += 4) {
      __m256i w[kPanels];
      for (int j = 0; j < kPanels; ++j)
        w[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panels[j] + k * kPanel));
      for (int m = 0; m < kRows; ++m) {
        int32_t a4, mag4;
        std::memcpy(&a4, L.xq + (m0 + m) * L.in + k, 4);
        std::memcpy(&mag4, L.xmag + (m0 + m) * L.in + k, 4);
        const __m256i a = _mm256_set1_epi32(a4), mag = _mm256_set1_epi32(mag4);
        for (int j = 0; j < kPanels; ++j) {
          const __m256i pairs = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(w[j], a));
          dots[m][j] = _mm256_add_epi32(dots[m][j], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
    for (int j = 0; j < kPanels; ++j) {
      const __m256 ws = _mm256_loadu_ps(L.ws + ((p0 + j) * L.groups + g) * kPanel);
      for (int m = 0; m < kRows; ++m) {
        const __m256 scale = _mm256_mul_ps(_mm256_set1_ps(L.xs[(m0 + m) * L.groups + g]), ws);
        acc[m][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[m][j]), scale, acc[m][j]);
      }
    }
  }
}

template <typename T>
inline void store(const Layer& L, int64_t m, int64_t p, __m256 sums, T* out) {
  float v[kPanel];
  _mm256_storeu_ps(v, sums);
  const int64_t n0 = p * kPanel, count = std::min<int64_t>(kPanel, L.out - n0);
  for (int64_t f = 0; f < count; ++f) {
    out[m * L.out + n0 + f] = static_cast<T>(v[f] + (L.bias ? L.bias[n0 + f] : 0.0f));
  }
}

// Panels [p0, p0 + kPanels) for rows [m_begin, m_end), a tile of rows at a time.
template <int kPanels, typename T>
void panels(const Layer& L, int64_t p0, int64_t m_begin, int64_t m_end, T* out) {
  for (int64_t m0 = m_begin; m0 < m_end; m0 += kTileRows) {
    const int64_t count = std::min<int64_t>(kTileRows, m_end - m0);
    with_rows<kTileRows>(count, [&](auto rows) {
      constexpr int kRows = decltype(rows)::value;
      __m256 acc[kRows][kPanels];
      tile<kRows, kPanels>(L, m0, p0, acc);
      for (int m = 0; m < kRows; ++m)
        for (int j = 0; j < kPanels; ++j) store(L, m0 + m, p0 + j, acc[m][j], out);
    });
  }
}

// NOTE: loop order: each thread takes a range of panel pairs, kChunk features at a time;
// within a chunk, a tile of rows meets every panel before the next tile starts, so a chunk's
// weights come from memory once and from L2 for the other tiles, and a tile's activations
// (kTileRows x in x 2 bytes) stay in L1.
template <typename T>
void linear(const Layer& L, T* out) {
  constexpr int kPanels = 2;
  const int64_t num_panels = (L.out + kPanel - 1) / kPanel, pairs = num_panels / kPanels;
  constexpr int64_t kChunkPairs = kChunk / (kPanel * kPanels);
  at::parallel_for(0, pairs, 4, [&](int64_t begin, int64_t end) {
    for (int64_t c0 = begin; c0 < end; c0 += kChunkPairs) {
      const int64_t c1 = std::min(end, c0 + kChunkPairs);
      for (int64_t m0 = 0; m0 < L.rows; m0 += kTileRows) {
        const int64_t m1 = std::min(L.rows, m0 + kTileRows);
        for (int64_t c = c0; c < c1; ++c) panels<kPanels>(L, c * kPanels, m0, m1, out);
      }
    }
  });
  if (num_panels % kPanels) panels<1>(L, num_panels - 1, 0, L.rows, out);  // an odd last one
}

void check_weights(const at::Tensor& packed, const at::Tensor& scales, int64_t in, int64_t out) {
  const int64_t num_panels = (out + kPanel - 1) / kPanel;
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.is_contiguous() && packed.dim() == 4 &&
                  packed.size(0) == num_panels && packed.size(1) == in / 4 &&
                  packed.size(2) == kPanel && packed.size(3) == 4,
              "packed must be contiguous int8 [", num_panels, ", ", in / 4, ", 8, 4], got ",
              packed.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.dim() == 3 && scales.size(0) == num_panels &&
                  scales.size(1) == in / kGroup && scales.size(2) == kPanel,
              "scales must be contiguous fp32 [panels, in_features / 32, 8]");
}

QuantizedRows quantize(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-d [rows, in_features]");
  TORCH_CHECK(x.size(1) % kGroup == 0, "in_features must be a multiple of 32, got ", x.size(1));
  if (x.scalar_type() == at::kBFloat16) return quantize_rows<c10::BFloat16>(x);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be bf16 or fp32, got ", x.scalar_type());
  return quantize_rows<float>(x);
}

}  // namespace

// x's Q8_0 quantization, as the linear layer computes it: (int8 [rows, in], fp32 scales
// [rows, in / 32]).
std::tuple<at::Tensor, at::Tensor> w8a8_quantize(at::Tensor x) {
  QuantizedRows q = quantize(x);
  return {q.q, q.scale};
}

at::Tensor w8a8_linear(at::Tensor x, at::Tensor packed, at::Tensor scales, int64_t out_features,
                       c10::optional<at::Tensor> bias) {
  const QuantizedRows q = quantize(x);
  check_weights(packed, scales, x.size(1), out_features);
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) bias_f = bias->to(at::kFloat).contiguous();
  const Layer L{x.size(0),
                x.size(1),
                out_features,
                x.size(1) / kGroup,
                q.q.data_ptr<int8_t>(),
                q.magnitude.data_ptr<uint8_t>(),
                q.scale.data_ptr<float>(),
                packed.data_ptr<int8_t>(),
                scales.data_ptr<float>(),
                bias_f.defined() ? bias_f.data_ptr<float>() : nullptr};
  auto out = at::empty({x.size(0), out_features}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    linear<c10::BFloat16>(L, out.data_ptr<c10::BFloat16>());
  } else {
    linear<float>(L, out.data_ptr<float>());
  }
  return out;
}
#endif

TORCH_LIBRARY_FRAGMENT(kvray, m) {
#if defined(__AVX2__) && defined(__FMA__)
  m.def("w8a8_linear(Tensor x, Tensor packed, Tensor scales, int out_features, Tensor? bias) -> Tensor");
  m.def("w8a8_quantize(Tensor x) -> (Tensor, Tensor)");
#endif
}

TORCH_LIBRARY_IMPL(kvray, CPU, m) {
#if defined(__AVX2__) && defined(__FMA__)
  m.impl("w8a8_linear", &w8a8_linear);
  m.impl("w8a8_quantize", &w8a8_quantize);
#endif
}
