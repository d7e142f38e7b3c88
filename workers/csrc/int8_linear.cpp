// Weight-only int8 linear layer on CPU: y = x @ (scale * W)^T + bias, for few rows of x.
//
// A decode step multiplies a handful of rows by every weight once, so its speed is the speed at
// which weights stream in from memory: int8 weights halve the bytes of bf16 ones. Each thread
// takes a run of output features; for each it converts 16 int8 weights to fp32 in registers and
// multiplies them with up to four rows of x (pre-converted to fp32, in L1) at once, summing in
// fp32. Per-output-feature scales are applied once, at the end.
//
//   x      [rows, in_features]            bf16 or fp32
//   weight [out_features, in_features]    int8, symmetric: w = scale[n] * weight[n, k]
//   scale  [out_features]                 fp32
//   bias   [out_features] or None         any float dtype
// Returns [rows, out_features] in x's dtype.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int kLanes = 16;
constexpr int kRowsAtOnce = 4;

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

inline float reduce_add(f32x16 v) {
  f32x8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
            __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  f32x4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// out[m] = sum_k x[m, k] * w[k] for kRows rows of x; the accumulators stay in registers.
template <int kRows>
inline void dot_rows(const float* x, const int8_t* w, int64_t in_features, float* out) {
  f32x16 acc[kRows] = {};
  const int64_t whole = in_features / kLanes * kLanes;
  for (int64_t k = 0; k < whole; k += kLanes) {
    const f32x16 wf = load_int8(w + k);
    for (int m = 0; m < kRows; ++m) acc[m] += wf * load16(x + m * in_features + k);
  }
  for (int m = 0; m < kRows; ++m) {
    float sum = reduce_add(acc[m]);
    for (int64_t k = whole; k < in_features; ++k) sum += float(w[k]) * x[m * in_features + k];
    out[m] = sum;
  }
}

inline void dot_rows(const float* x, int64_t count, const int8_t* w, int64_t in_features,
                     float* out) {
  switch (count) {
    case 1: return dot_rows<1>(x, w, in_features, out);
    case 2: return dot_rows<2>(x, w, in_features, out);
    case 3: return dot_rows<3>(x, w, in_features, out);
    default: return dot_rows<kRowsAtOnce>(x, w, in_features, out);
  }
}

#if defined(__AVX512BF16__)
// bf16 rows of x: int8 weights become bf16 in registers (exactly: |w| <= 127) and each
// instruction multiplies 32 pairs, summing in fp32 (vdpbf16ps), twice fp32 FMA's rate. A block
// is kRows rows of x times kCols output features; its kRows * kCols sums are reduced together
// (four at a time), since one 16-lane reduction per output would cost half the dot products.
constexpr int kCols = 4;

inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {  // -> [sum a, sum b, sum c, sum d]
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 v = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

inline __m512bh load_int8_bf16(const int8_t* w) {  // 32 int8 -> 32 bf16, in order
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)w)));
  const __m512 hi =
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + 16))));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// out[m * kCols + j] = x[m] . w[j] for kRows rows of x and kCols weight rows (stride in_features)
template <int kRows>
inline void dot_block(const c10::BFloat16* x, const int8_t* w, int64_t in_features, float* out) {
  __m512 acc[kRows][kCols];
  for (int m = 0; m < kRows; ++m)
    for (int j = 0; j < kCols; ++j) acc[m][j] = _mm512_setzero_ps();
  const int64_t whole = in_features / 32 * 32;
  for (int64_t k = 0; k < whole; k += 32) {
    __m512bh wb[kCols];
    for (int j = 0; j < kCols; ++j) wb[j] = load_int8_bf16(w + j * in_features + k);
    for (int m = 0; m < kRows; ++m) {
      const __m512bh xb = (__m512bh)_mm512_loadu_si512((const void*)(x + m * in_features + k));
      for (int j = 0; j < kCols; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xb, wb[j]);
    }
  }
  for (int m = 0; m < kRows; ++m) {
    _mm_storeu_ps(out + m * kCols, reduce4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
    for (int j = 0; j < kCols; ++j) {
      for (int64_t k = whole; k < in_features; ++k) {
        out[m * kCols + j] +=
            float(w[j * in_features + k]) * static_cast<float>(x[m * in_features + k]);
      }
    }
  }
}

// One output feature for `kRows` rows (a decode of a few sequences): memory-bound, so a
// single stream of weights and no blocking; one 16-lane reduction per output is cheap here.
template <int kRows>
inline void dot_column(const c10::BFloat16* x, const int8_t* w, int64_t in_features,
                       float* out) {
  __m512 acc[kRows];
  for (int m = 0; m < kRows; ++m) acc[m] = _mm512_setzero_ps();
  const int64_t whole = in_features / 32 * 32;
  for (int64_t k = 0; k < whole; k += 32) {
    const __m512bh wb = load_int8_bf16(w + k);
    for (int m = 0; m < kRows; ++m) {
      const __m512bh xb = (__m512bh)_mm512_loadu_si512((const void*)(x + m * in_features + k));
      acc[m] = _mm512_dpbf16_ps(acc[m], xb, wb);
    }
  }
  for (int m = 0; m < kRows; ++m) {
    float sum = _mm512_reduce_add_ps(acc[m]);
    for (int64_t k = whole; k < in_features; ++k) {
      sum += float(w[k]) * static_cast<float>(x[m * in_features + k]);
    }
    out[m] = sum;
  }
}

constexpr int kBf16Rows = 4;  // rows of x per block
constexpr int kColumnRows = 8;  // the most rows that take dot_column

inline void dot_column(const c10::BFloat16* x, int64_t count, const int8_t* w,
                       int64_t in_features, float* out) {
  switch (count) {
    case 1: return dot_column<1>(x, w, in_features, out);
    case 2: return dot_column<2>(x, w, in_features, out);
    case 3: return dot_column<3>(x, w, in_features, out);
    case 4: return dot_column<4>(x, w, in_features, out);
    case 5: return dot_column<5>(x, w, in_features, out);
    case 6: return dot_column<6>(x, w, in_features, out);
    case 7: return dot_column<7>(x, w, in_features, out);
    default: return dot_column<kColumnRows>(x, w, in_features, out);
  }
}

inline void dot_block(const c10::BFloat16* x, int64_t count, const int8_t* w,
                      int64_t in_features, float* out) {
  switch (count) {
    case 1: return dot_block<1>(x, w, in_features, out);
    case 2: return dot_block<2>(x, w, in_features, out);
    case 3: return dot_block<3>(x, w, in_features, out);
    default: return dot_block<kBf16Rows>(x, w, in_features, out);
  }
}

void linear_bf16(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scale,
                 const c10::optional<torch::Tensor>& bias, torch::Tensor& out) {
  const int64_t rows = x.size(0), in_features = x.size(1), out_features = weight.size(0);
  const torch::Tensor xc = x.contiguous();
  const c10::BFloat16* x_ptr = xc.data_ptr<c10::BFloat16>();
  const int8_t* w_ptr = weight.data_ptr<int8_t>();
  const float* s_ptr = scale.data_ptr<float>();
  torch::Tensor bias_f;
  const float* b_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    bias_f = bias->to(torch::kFloat32).contiguous();
    b_ptr = bias_f.data_ptr<float>();
  }
  c10::BFloat16* out_ptr = out.data_ptr<c10::BFloat16>();
  auto store = [&](int64_t m, int64_t n, float sum) {
    out_ptr[m * out_features + n] = static_cast<c10::BFloat16>(sum * s_ptr[n] + (b_ptr ? b_ptr[n] : 0.f));
  };
  if (rows <= kColumnRows) {  // a decode: stream the weights once, one feature at a time
    at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
      float sums[kColumnRows];
      for (int64_t n = begin; n < end; ++n) {
        dot_column(x_ptr, rows, w_ptr + n * in_features, in_features, sums);
        for (int64_t m = 0; m < rows; ++m) store(m, n, sums[m]);
      }
    });
    return;
  }
  const int64_t blocks = out_features / kCols;
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    float sums[kBf16Rows * kCols];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kCols;
      for (int64_t m0 = 0; m0 < rows; m0 += kBf16Rows) {
        const int64_t count = std::min<int64_t>(kBf16Rows, rows - m0);
        dot_block(x_ptr + m0 * in_features, count, w_ptr + n0 * in_features, in_features, sums);
        for (int64_t m = 0; m < count; ++m)
          for (int j = 0; j < kCols; ++j) store(m0 + m, n0 + j, sums[m * kCols + j]);
      }
    }
  });
  for (int64_t n = blocks * kCols; n < out_features; ++n) {  // the last out_features % 4
    for (int64_t m = 0; m < rows; ++m) {
      float sum = 0.f;
      for (int64_t k = 0; k < in_features; ++k) {
        sum += float(w_ptr[n * in_features + k]) * static_cast<float>(x_ptr[m * in_features + k]);
      }
      store(m, n, sum);
    }
  }
}
#endif

template <typename T>
void linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scale,
            const c10::optional<torch::Tensor>& bias, torch::Tensor& out) {
  const int64_t rows = x.size(0), in_features = x.size(1), out_features = weight.size(0);
  const torch::Tensor xf = x.to(torch::kFloat32).contiguous();  // small: a few rows
  const float* x_ptr = xf.data_ptr<float>();
  const int8_t* w_ptr = weight.data_ptr<int8_t>();
  const float* s_ptr = scale.data_ptr<float>();
  torch::Tensor bias_f;
  const float* b_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    bias_f = bias->to(torch::kFloat32).contiguous();
    b_ptr = bias_f.data_ptr<float>();
  }
  T* out_ptr = out.data_ptr<T>();
  at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
    float sums[kRowsAtOnce];
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* w = w_ptr + n * in_features;
      for (int64_t m0 = 0; m0 < rows; m0 += kRowsAtOnce) {
        const int64_t count = std::min<int64_t>(kRowsAtOnce, rows - m0);
        dot_rows(x_ptr + m0 * in_features, count, w, in_features, sums);
        for (int64_t m = 0; m < count; ++m) {
          const float y = sums[m] * s_ptr[n] + (b_ptr ? b_ptr[n] : 0.f);
          out_ptr[(m0 + m) * out_features + n] = static_cast<T>(y);
        }
      }
    }
  });
}

}  // namespace

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor scale,
                          c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "x and weight must be 2-d");
  TORCH_CHECK(x.size(1) == weight.size(1), "x has ", x.size(1), " features, weight expects ",
              weight.size(1));
  TORCH_CHECK(weight.scalar_type() == torch::kInt8 && weight.is_contiguous(),
              "weight must be contiguous int8");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.numel() == weight.size(0),
              "scale must be fp32 with one entry per output feature");
  auto out = torch::empty({x.size(0), weight.size(0)}, x.options());
  if (x.scalar_type() == torch::kBFloat16) {
#if defined(__AVX512BF16__)
    linear_bf16(x, weight, scale.contiguous(), bias, out);
#else
    linear<c10::BFloat16>(x, weight, scale.contiguous(), bias, out);
#endif
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32, "x must be bf16 or fp32");
    linear<float>(x, weight, scale.contiguous(), bias, out);
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(kvray, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvray, CPU, m) { m.impl("int8_linear", &int8_linear); }
