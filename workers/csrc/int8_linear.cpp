// Weight-only int8 linear layer on CPU: y = x @ W^T + bias, W stored as int8 in groups.
//
// A decode step multiplies a handful of rows by every weight once, so its speed is the speed at
// which weights stream in from memory: int8 weights halve the bytes of bf16 ones. Every group of
// `group_size` consecutive weights of an output feature shares one bf16 scale (llama.cpp's Q8_0
// does the same with groups of 32): W[n, k] = scale[n, k / group_size] * weight[n, k].
//
// Weights are widened in registers: int8 -> fp32, times the group's scale (an exact product:
// 8-bit by 8-bit mantissas), then for bf16 activations rounded to bf16 and multiplied 32 pairs at
// a time (vdpbf16ps, summing in fp32). So every path, torch's fallback included, multiplies x by
// the same dequantized weights: bf16(weight * scale) for bf16 x, fp32 for fp32 x.
//
//   x      [rows, in_features]                    bf16 or fp32
//   weight [out_features, in_features]            int8
//   scale  [out_features, in_features / group]    bf16
//   bias   [out_features] or None                 any float dtype
// group_size is a multiple of 32 that divides in_features. Returns [rows, out_features], x's dtype.

#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "vec.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using kvray::with_rows;
#if defined(__AVX512F__)
using kvray::reduce4;
#endif

constexpr int kLanes = 16;
constexpr int kColumnRows = 8;  // up to this many rows, one output feature at a time
constexpr int kBlockRows = 4;   // past it, blocks of kBlockRows rows x kCols features
constexpr int kCols = 4;
constexpr int kF32Rows = 4;     // rows at once on the fp32-FMA path

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));

// 16 int8 weights as fp32. NOTE: intrinsics, because GCC turns the portable
// __builtin_convertvector(int8 -> int32) into scalar code.
inline f32x16 load_int8(const int8_t* p) {
#if defined(__AVX512F__)
  return (f32x16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
  const __m256 hi =
      _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8))));
  return __builtin_shufflevector((f32x8)lo, (f32x8)hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                 13, 14, 15);
#else
  f32x16 v;
  for (int j = 0; j < kLanes; ++j) v[j] = float(p[j]);
  return v;
#endif
}

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float reduce_add(f32x16 v) {  // halving shuffles, not 15 scalar adds
  f32x8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
            __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  f32x4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

struct Layer {
  int64_t rows, in_features, out_features, group_size;
  const int8_t* weight;
  const c10::BFloat16* scale;  // [out_features, in_features / group_size]
  const float* bias;           // fp32 or nullptr

  const int8_t* w(int64_t n) const { return weight + n * in_features; }
  const c10::BFloat16* s(int64_t n) const { return scale + n * (in_features / group_size); }
  float finish(int64_t n, float sum) const { return sum + (bias ? bias[n] : 0.f); }
};

// ---------------------------------------------------------------- fp32 x (and bf16 x without
// AVX512-BF16, widened to fp32 first): 16 weights at a time, fp32 FMAs.

typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline f32x16 round_to_bf16(f32x16 v) {  // round to nearest even, as torch's bf16 casts do
  u32x16 bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// kBf16Weights: round the widened weights to bf16, the weights a bf16 model multiplies by.
template <int kRows, bool kBf16Weights>
inline void dot_rows_f32(const float* x, const Layer& L, int64_t n, float* out) {
  f32x16 acc[kRows] = {};
  const int8_t* w = L.w(n);
  const c10::BFloat16* s = L.s(n);
  for (int64_t k = 0; k < L.in_features; k += kLanes) {
    f32x16 wf = load_int8(w + k) * static_cast<float>(s[k / L.group_size]);
    if (kBf16Weights) wf = round_to_bf16(wf);
    for (int m = 0; m < kRows; ++m) acc[m] += wf * load16(x + m * L.in_features + k);
  }
  for (int m = 0; m < kRows; ++m) out[m] = reduce_add(acc[m]);
}

template <typename T>
void linear_f32(const at::Tensor& x, const Layer& L, T* out) {
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* x_ptr = xf.data_ptr<float>();
  at::parallel_for(0, L.out_features, 16, [&](int64_t begin, int64_t end) {
    float sums[kF32Rows];
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t m0 = 0; m0 < L.rows; m0 += kF32Rows) {
        const int64_t count = std::min<int64_t>(kF32Rows, L.rows - m0);
        with_rows<kF32Rows>(count, [&](auto rows) {
          constexpr bool kBf16 = std::is_same<T, c10::BFloat16>::value;
          dot_rows_f32<decltype(rows)::value, kBf16>(x_ptr + m0 * L.in_features, L, n, sums);
        });
        for (int64_t m = 0; m < count; ++m) {
          out[(m0 + m) * L.out_features + n] = static_cast<T>(L.finish(n, sums[m]));
        }
      }
    }
  });
}

#if defined(__AVX512BF16__)
// ---------------------------------------------------------------- bf16 x: 32 pairs per vdpbf16ps

inline __m512bh load_weights_bf16(const int8_t* w, float scale) {  // 32 weights, in order
  const __m512 s = _mm512_set1_ps(scale);
  const __m512 lo = _mm512_mul_ps(
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)w))), s);
  const __m512 hi = _mm512_mul_ps(
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + 16)))), s);
  return _mm512_cvtne2ps_pbh(hi, lo);
}

inline __m512bh load_x(const c10::BFloat16* x) {
  return (__m512bh)_mm512_loadu_si512((const void*)x);
}

// A decode: one output feature for kRows rows, the weights streamed once.
template <int kRows>
inline void dot_column(const c10::BFloat16* x, const Layer& L, int64_t n, float* out) {
  __m512 acc[kRows];
  for (int m = 0; m < kRows; ++m) acc[m] = _mm512_setzero_ps();
  const int8_t* w = L.w(n);
  const c10::BFloat16* s = L.s(n);
  for (int64_t k = 0; k < L.in_features; k += 32) {
    const __m512bh wb = load_weights_bf16(w + k, static_cast<float>(s[k / L.group_size]));
    for (int m = 0; m < kRows; ++m) {
      acc[m] = _mm512_dpbf16_ps(acc[m], load_x(x + m * L.in_features + k), wb);
    }
  }
  for (int m = 0; m < kRows; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
}

// A bigger batch: kRows rows x kCols features, whose sums are reduced four at a time (one
// 16-lane reduction per output would cost half as much as the dot products themselves).
template <int kRows>
inline void dot_block(const c10::BFloat16* x, const Layer& L, int64_t n0, float* out) {
  __m512 acc[kRows][kCols];
  for (int m = 0; m < kRows; ++m)
    for (int j = 0; j < kCols; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < L.in_features; k += 32) {
    __m512bh wb[kCols];
    for (int j = 0; j < kCols; ++j) {
      wb[j] = load_weights_bf16(L.w(n0 + j) + k, static_cast<float>(L.s(n0 + j)[k / L.group_size]));
    }
    for (int m = 0; m < kRows; ++m) {
      const __m512bh xb = load_x(x + m * L.in_features + k);
      for (int j = 0; j < kCols; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xb, wb[j]);
    }
  }
  for (int m = 0; m < kRows; ++m) {
    _mm_storeu_ps(out + m * kCols, reduce4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
  }
}

void linear_bf16(const at::Tensor& x, const Layer& L, c10::BFloat16* out) {
  const at::Tensor xc = x.contiguous();
  const c10::BFloat16* x_ptr = xc.data_ptr<c10::BFloat16>();
  auto store = [&](int64_t m, int64_t n, float sum) {
    out[m * L.out_features + n] = static_cast<c10::BFloat16>(L.finish(n, sum));
  };
  if (L.rows <= kColumnRows) {
    at::parallel_for(0, L.out_features, 16, [&](int64_t begin, int64_t end) {
      float sums[kColumnRows];
      for (int64_t n = begin; n < end; ++n) {
        with_rows<kColumnRows>(L.rows, [&](auto rows) {
          dot_column<decltype(rows)::value>(x_ptr, L, n, sums);
        });
        for (int64_t m = 0; m < L.rows; ++m) store(m, n, sums[m]);
      }
    });
    return;
  }
  const int64_t blocks = L.out_features / kCols;
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    float sums[kBlockRows * kCols];
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t m0 = 0; m0 < L.rows; m0 += kBlockRows) {
        const int64_t count = std::min<int64_t>(kBlockRows, L.rows - m0);
        with_rows<kBlockRows>(count, [&](auto rows) {
          dot_block<decltype(rows)::value>(x_ptr + m0 * L.in_features, L, b * kCols, sums);
        });
        for (int64_t m = 0; m < count; ++m)
          for (int j = 0; j < kCols; ++j) store(m0 + m, b * kCols + j, sums[m * kCols + j]);
      }
    }
  });
  for (int64_t n = blocks * kCols; n < L.out_features; ++n) {  // the last out_features % 4
    for (int64_t m0 = 0; m0 < L.rows; m0 += kColumnRows) {
      const int64_t count = std::min<int64_t>(kColumnRows, L.rows - m0);
      float sums[kColumnRows];
      with_rows<kColumnRows>(count, [&](auto rows) {
        dot_column<decltype(rows)::value>(x_ptr + m0 * L.in_features, L, n, sums);
      });
      for (int64_t m = 0; m < count; ++m) store(m0 + m, n, sums[m]);
    }
  }
}
#endif

}  // namespace

at::Tensor int8_linear(at::Tensor x, at::Tensor weight, at::Tensor scale,
                       int64_t group_size, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "x and weight must be 2-d");
  TORCH_CHECK(x.size(1) == weight.size(1), "x has ", x.size(1), " features, weight expects ",
              weight.size(1));
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "weight must be contiguous int8");
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && weight.size(1) % group_size == 0,
              "group_size must be a multiple of 32 that divides in_features, got ", group_size);
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.dim() == 2 &&
                  scale.size(0) == weight.size(0) && scale.size(1) == weight.size(1) / group_size,
              "scale must be bf16 [out_features, in_features / group_size]");
  const at::Tensor scale_c = scale.contiguous();
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) bias_f = bias->to(at::kFloat).contiguous();
  const Layer L{x.size(0), x.size(1), weight.size(0), group_size, weight.data_ptr<int8_t>(),
                scale_c.data_ptr<c10::BFloat16>(), bias_f.defined() ? bias_f.data_ptr<float>() : nullptr};
  auto out = at::empty({x.size(0), weight.size(0)}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
#if defined(__AVX512BF16__)
    linear_bf16(x, L, out.data_ptr<c10::BFloat16>());
#else
    linear_f32<c10::BFloat16>(x, L, out.data_ptr<c10::BFloat16>());
#endif
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be bf16 or fp32");
    linear_f32<float>(x, L, out.data_ptr<float>());
  }
  return out;
}

// dtype(weight * scale) as a dense [out_features, in_features] tensor, in one pass: for big
// inputs (prompt chunks), where one oneDNN matmul over the widened weights beats the kernel.
at::Tensor int8_dequantize(at::Tensor weight, at::Tensor scale, int64_t group_size,
                           c10::ScalarType dtype) {
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.is_contiguous() && weight.dim() == 2,
              "weight must be contiguous 2-d int8");
  TORCH_CHECK(group_size > 0 && weight.size(1) % group_size == 0 &&
                  scale.scalar_type() == at::kBFloat16 && scale.numel() * group_size == weight.numel(),
              "scale must be bf16 with one entry per group");
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "dtype must be bf16 or fp32");
  const at::Tensor scale_c = scale.contiguous();
  auto out = at::empty(weight.sizes(), weight.options().dtype(dtype));
  const int8_t* w = weight.data_ptr<int8_t>();
  const c10::BFloat16* s = scale_c.data_ptr<c10::BFloat16>();
  const int64_t groups = weight.numel() / group_size;
  const bool to_bf16 = dtype == at::kBFloat16;
  uint16_t* out_bf16 = to_bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>()) : nullptr;
  float* out_f32 = to_bf16 ? nullptr : out.data_ptr<float>();
  at::parallel_for(0, groups, 256, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const float sg = static_cast<float>(s[g]);
      for (int64_t i = g * group_size; i < (g + 1) * group_size; i += kLanes) {
        const f32x16 v = load_int8(w + i) * sg;
        if (!to_bf16) {
          std::memcpy(out_f32 + i, &v, sizeof(v));
          continue;
        }
        u32x16 bits;
        const f32x16 r = round_to_bf16(v);
        std::memcpy(&bits, &r, sizeof(bits));
        bits >>= 16;  // the bf16: r's top half
#if defined(__AVX512F__)
        _mm256_storeu_si256((__m256i*)(out_bf16 + i), _mm512_cvtepi32_epi16((__m512i)bits));
#else
        for (int j = 0; j < kLanes; ++j) out_bf16[i + j] = static_cast<uint16_t>(bits[j]);
#endif
      }
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(kvray, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale, int group_size, Tensor? bias) -> Tensor");
  m.def("int8_dequantize(Tensor weight, Tensor scale, int group_size, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvray, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int8_dequantize", &int8_dequantize);
}
