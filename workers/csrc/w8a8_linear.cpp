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
//   x      [rows, in_features]                 bf16 or fp32
//   weight [out_features, in_features]         int8 in [-127, 127] (quantize_int8's rows)
//   scale  [out_features, in_features / 32]    bf16, one per group of 32 weights
//   bias   [out_features] or None              any float dtype, added in fp32
// in_features a multiple of 32. Returns [rows, out_features] in x's dtype.
//
// AVX2 (what this kernel is built for): 32 products per `vpmaddubsw` (u8 x s8 -> s16 pairs)
// and `vpmaddwd` with ones (-> s32 quads), llama.cpp's trick for the signs: |x| as the unsigned
// operand and x's sign moved onto the weights (`vpsignb`), so no s16 sum can saturate (at most
// 2 * 127 * 127). The eight s32 lanes of a group are converted to fp32 and accumulated with
// the group's two scales in one FMA; each output is reduced across lanes once at the end.
// NOTE: so the kernel's fp32 sums run in another order than the torch reference's
// (workers/w8a8.py), which sums whole groups: equal to fp32 rounding, not bit for bit.
//
// Where AVX512-VNNI exists (not built here: the machines this was written and measured on lack
// it), `_mm512_dpbusd_epi32` does the u8 x s8 multiply and the quad sum in one instruction on
// 64 bytes, accumulating into s32: a group's dot would then be one vpsignb + one vpdpbusd per
// 64 bytes (two groups, split afterwards), against three instructions per 32 bytes here. AMX-INT8
// (`_tile_dpbssd`, signed x signed, no sign trick) multiplies a 16 x 64 tile of activations by a
// 64 x 16 tile of weights per instruction, for prompt chunks; it needs the weights repacked in
// groups of 4 along k and the per-group scales applied per 32-k step (two tile products).

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
constexpr int kTileRows = 4;      // rows per tile: kTileRows x kCols fp32 accumulators
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
  const float* xs;               // [rows, groups]
  const int8_t* w;               // [out, in]
  const c10::BFloat16* ws;       // [out, groups]
  const float* bias;             // fp32 or nullptr
};

// kRows rows (from m0) x kCols output features (from n0): every group's 32 inputs as 8 s32
// lanes of 4 products, times both scales into fp32 lanes; reduced across lanes once.
template <int kRows, int kCols>
inline void tile(const Layer& L, int64_t m0, int64_t n0, float* sums) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[kRows][kCols];
  for (int m = 0; m < kRows; ++m)
    for (int j = 0; j < kCols; ++j) acc[m][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < L.groups; ++g) {
    const int64_t k = g * kGroup;
    __m256i w[kCols];
    __m256 ws[kCols];
    for (int j = 0; j < kCols; ++j) {
      w[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(L.w + (n0 + j) * L.in + k));
      ws[j] = _mm256_set1_ps(static_cast<float>(L.ws[(n0 + j) * L.groups + g]));
    }
    for (int m = 0; m < kRows; ++m) {
      const int64_t row = (m0 + m) * L.in + k;
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(L.xq + row));
      const __m256i mag = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(L.xmag + row));
      const __m256 xs = _mm256_set1_ps(L.xs[(m0 + m) * L.groups + g]);
      for (int j = 0; j < kCols; ++j) {
        const __m256i pairs = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(w[j], a));
        const __m256 dots = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
        acc[m][j] = _mm256_fmadd_ps(dots, _mm256_mul_ps(xs, ws[j]), acc[m][j]);
      }
    }
  }
  for (int m = 0; m < kRows; ++m)
    for (int j = 0; j < kCols; ++j) sums[m * kCols + j] = hsum(acc[m][j]);
}

// Output features [n0, n0 + kCols) for every row, a tile of rows at a time.
template <int kCols, typename T>
void columns(const Layer& L, int64_t n0, int64_t m_begin, int64_t m_end, T* out) {
  float sums[kTileRows * kCols];
  for (int64_t m0 = m_begin; m0 < m_end; m0 += kTileRows) {
    const int64_t count = std::min<int64_t>(kTileRows, m_end - m0);
    with_rows<kTileRows>(count, [&](auto rows) {
      tile<decltype(rows)::value, kCols>(L, m0, n0, sums);
    });
    for (int64_t m = 0; m < count; ++m) {
      for (int j = 0; j < kCols; ++j) {
        const float b = L.bias ? L.bias[n0 + j] : 0.0f;
        out[(m0 + m) * L.out + n0 + j] = static_cast<T>(sums[m * kCols + j] + b);
      }
    }
  }
}

// NOTE: loop order: each thread takes a range of output features, kChunk at a time; within a
// chunk, a tile of rows meets every feature's weights before the next tile starts, so a chunk's
// weights come from memory once and from L2 for the other tiles, and a tile's activations
// (kTileRows x in x 2 bytes) stay in L1.
template <typename T>
void linear(const Layer& L, T* out) {
  constexpr int kCols = 2;
  const int64_t pairs = L.out / kCols;
  at::parallel_for(0, pairs, 8, [&](int64_t begin, int64_t end) {
    for (int64_t c0 = begin; c0 < end; c0 += kChunk / kCols) {
      const int64_t c1 = std::min(end, c0 + kChunk / kCols);
      for (int64_t m0 = 0; m0 < L.rows; m0 += kTileRows) {
        const int64_t m1 = std::min(L.rows, m0 + kTileRows);
        for (int64_t c = c0; c < c1; ++c) columns<kCols>(L, c * kCols, m0, m1, out);
      }
    }
  });
  if (L.out % kCols) columns<1>(L, L.out - 1, 0, L.rows, out);  // an odd last feature
}

void check_weights(const at::Tensor& weight, const at::Tensor& scale, int64_t in) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == in, "weight must be [out_features, ", in,
              "], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "weight must be contiguous int8");
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.dim() == 2 &&
                  scale.size(0) == weight.size(0) && scale.size(1) == in / kGroup,
              "scale must be bf16 [out_features, in_features / 32]");
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

at::Tensor w8a8_linear(at::Tensor x, at::Tensor weight, at::Tensor scale,
                       c10::optional<at::Tensor> bias) {
  const QuantizedRows q = quantize(x);
  check_weights(weight, scale, x.size(1));
  const at::Tensor scale_c = scale.contiguous();
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) bias_f = bias->to(at::kFloat).contiguous();
  const Layer L{x.size(0),
                x.size(1),
                weight.size(0),
                x.size(1) / kGroup,
                q.q.data_ptr<int8_t>(),
                q.magnitude.data_ptr<uint8_t>(),
                q.scale.data_ptr<float>(),
                weight.data_ptr<int8_t>(),
                scale_c.data_ptr<c10::BFloat16>(),
                bias_f.defined() ? bias_f.data_ptr<float>() : nullptr};
  auto out = at::empty({x.size(0), weight.size(0)}, x.options());
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
  m.def("w8a8_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias) -> Tensor");
  m.def("w8a8_quantize(Tensor x) -> (Tensor, Tensor)");
#endif
}

TORCH_LIBRARY_IMPL(kvray, CPU, m) {
#if defined(__AVX2__) && defined(__FMA__)
  m.impl("w8a8_linear", &w8a8_linear);
  m.impl("w8a8_quantize", &w8a8_quantize);
#endif
}
