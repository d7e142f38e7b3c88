// RMSNorm of bf16 rows in one call, bitwise equal to transformers' `LlamaRMSNorm.forward`:
//
//   h = x.to(fp32);  v = h.pow(2).mean(-1, keepdim);  y = (h * rsqrt(v + eps)).to(bf16);
//   out = weight * y   (bf16 times bf16, rounded to bf16)
//
// The squares are a widened bf16 times itself (what `to` then `pow(2)` give). Their mean must add
// them in ATen's order: `mean_squares` repeats ATen's inner-dimension sum (SumKernel.cpp's
// vectorized_inner_sum, in vectors of 16 lanes or of 8: whichever ATen's dispatch runs here) and
// divides as `mean` does, and is used for a width only once it has matched ATen's own `mean`
// bit for bit on test rows of that width in this process (another ATen build may sum in another
// order: then ATen's reduction runs, on a tensor of the squares), and only for rows shorter than
// ATen's grain (32768 values: from there ATen may split one row's sum across threads). The rest
// is one pass computing what the remaining five operations compute (1 / sqrt in fp32, as
// ATen's rsqrt; round to nearest even). Eight Python-level tensor operations become one, with
// no ATen call inside where the order matched (a decode step's norms: ~25 us of ATen's
// reduction each, 61 a step for SmolLM2).
//
//   x      [..., D] bf16, contiguous
//   weight [D] bf16, contiguous
// Returns [..., D] bf16.

#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>

#include "vec.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// The few fp32 vector operations the sums and the normalize below need, in two widths: 16
// lanes (AVX-512) and 8 (AVX2). ATen's reductions sum in vectors of the width of the kernel its
// dispatch picked, which need not be the widest the CPU has (a Zen 4 EPYC, whose capability
// torch reports as AVX512, sums fp32 rows in AVX2's 8 lanes), so an AVX-512 build has both.
#if defined(__AVX512F__)
#define KVRAY_RMS_VECTORS 1
struct Lanes16 {
  static constexpr int64_t kLanes = 16;
  using Vec = __m512;
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static Vec set(float v) { return _mm512_set1_ps(v); }
  static Vec load(const c10::BFloat16* p) { return kvray::load_bf16x16(p); }
  static void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static Vec round(Vec v) { return kvray::round_bf16(v); }
  static void store(c10::BFloat16* p, Vec v) { kvray::store_bf16x16(p, v); }
};
#endif
#if defined(__AVX2__)
#define KVRAY_RMS_VECTORS 1
struct Lanes8 {
  static constexpr int64_t kLanes = 8;
  using Vec = __m256;
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static Vec set(float v) { return _mm256_set1_ps(v); }
  static Vec load(const c10::BFloat16* p) {  // 8 bf16 widened to fp32, exact
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
  static void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static Vec round(Vec v) {  // c10's round to nearest even (see kvray::round_bf16)
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded =
        _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    return _mm256_castsi256_ps(_mm256_and_si256(rounded, _mm256_set1_epi32(0xffff0000)));
  }
  static void store(c10::BFloat16* p, Vec v) {  // lanes that already hold bf16 values
    const __m256i top = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(top),
                                            _mm256_extracti128_si256(top, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
};
#endif
#if defined(__AVX512F__)
using Widest = Lanes16;  // for the elementwise pass, whose results do not depend on the width
#elif defined(__AVX2__)
using Widest = Lanes8;
#endif

// 1 / sqrt(variance + eps) times each value, then times the weight, both rounded to bf16.
inline void normalize_row(const c10::BFloat16* row, const c10::BFloat16* wp, float variance,
                          float epsilon, int64_t dim, c10::BFloat16* dst) {
  const float scale = 1.0f / std::sqrt(variance + epsilon);
  int64_t i = 0;
#if defined(KVRAY_RMS_VECTORS)
  using V = Widest;
  const V::Vec scales = V::set(scale);
  for (; i + V::kLanes <= dim; i += V::kLanes) {
    const V::Vec y = V::round(V::mul(V::load(row + i), scales));
    V::store(dst + i, V::round(V::mul(V::load(wp + i), y)));
  }
#endif
  for (; i < dim; ++i) {
    const float y = c10::BFloat16(static_cast<float>(row[i]) * scale);  // `.to(input_dtype)`
    dst[i] = c10::BFloat16(static_cast<float>(wp[i]) * y);
  }
}

#if defined(KVRAY_RMS_VECTORS)
// The mean of a bf16 row's squares, summed as ATen sums a contiguous fp32 row: its V::kLanes-lane
// vectors in 4 interleaved accumulators (row_sum's ilp), each a cascade of 4 levels that
// passes its sum up every 16 vectors (multi_row_sum), the 4 accumulators added in order, then
// the values past the last whole vector, then the lanes in order; then divided by the width.
template <typename V>
float mean_squares(const c10::BFloat16* x, int64_t n) {
  constexpr int64_t kLanes = V::kLanes;
  const int64_t vecs = n / kLanes, size = vecs / 4;
  const auto square = [&](int64_t v) {
    const typename V::Vec value = V::load(x + kLanes * v);
    return V::mul(value, value);
  };
  const int64_t ceil_log2 = size <= 2 ? 1 : 64 - __builtin_clzll(static_cast<uint64_t>(size - 1));
  const int64_t power = std::max<int64_t>(4, ceil_log2 / 4), step = int64_t(1) << power;
  const int64_t mask = step - 1;
  typename V::Vec acc[4][4];
  for (auto& level : acc)
    for (auto& a : level) a = V::zero();
  int64_t i = 0;
  while (i + step <= size) {
    for (int64_t j = 0; j < step; ++j, ++i)
      for (int k = 0; k < 4; ++k) acc[0][k] = V::add(acc[0][k], square(4 * i + k));
    for (int j = 1; j < 4; ++j) {
      for (int k = 0; k < 4; ++k) {
        acc[j][k] = V::add(acc[j][k], acc[j - 1][k]);
        acc[j - 1][k] = V::zero();
      }
      if (i & (mask << (j * power))) break;
    }
  }
  for (; i < size; ++i)
    for (int k = 0; k < 4; ++k) acc[0][k] = V::add(acc[0][k], square(4 * i + k));
  for (int j = 1; j < 4; ++j)
    for (int k = 0; k < 4; ++k) acc[0][k] = V::add(acc[0][k], acc[j][k]);
  for (int64_t v = 4 * size; v < vecs; ++v) acc[0][0] = V::add(acc[0][0], square(v));
  for (int k = 1; k < 4; ++k) acc[0][0] = V::add(acc[0][0], acc[0][k]);
  float total = 0.0f;
  for (int64_t k = kLanes * vecs; k < n; ++k) {
    const float v = static_cast<float>(x[k]);
    const float sq = v * v;
    total += sq;
  }
  float lanes[kLanes];
  V::store(lanes, acc[0][0]);
  for (float lane : lanes) total += lane;
  return total / static_cast<float>(n);
}

using MeanSquares = float (*)(const c10::BFloat16*, int64_t);

// The `mean_squares` whose order gives ATen's `mean` bit for bit at this width, in this
// process (rows of values spread over many magnitudes, checked once per width), or nullptr.
MeanSquares same_order_as_aten(int64_t dim) {
  static std::mutex lock;
  static std::map<int64_t, MeanSquares> checked;
  std::lock_guard<std::mutex> guard(lock);
  const auto found = checked.find(dim);
  if (found != checked.end()) return found->second;
  constexpr int64_t kRows = 8;
  auto x = at::empty({kRows, dim}, at::TensorOptions().dtype(at::kBFloat16));
  c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
  for (int64_t i = 0; i < kRows * dim; ++i)
    xp[i] = c10::BFloat16(std::sin(0.37f * i + 1.0f) * std::ldexp(1.0f, int(i * 7 % 23) - 11));
  const auto expected = x.to(at::kFloat).pow(2).mean(-1).contiguous();  // transformers' ops
  const auto matches = [&](MeanSquares mean) {
    for (int64_t r = 0; r < kRows; ++r) {
      const float got = mean(xp + r * dim, dim);
      if (std::memcmp(&got, expected.data_ptr<float>() + r, sizeof(float)) != 0) return false;
    }
    return true;
  };
  MeanSquares same = nullptr;
#if defined(__AVX512F__)
  if (matches(&mean_squares<Lanes16>)) same = &mean_squares<Lanes16>;
#endif
  if (same == nullptr && matches(&mean_squares<Lanes8>)) same = &mean_squares<Lanes8>;
  checked[dim] = same;
  return same;
}
#endif

}  // namespace

at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() >= 1,
              "x must be a contiguous bf16 tensor");
  const int64_t dim = x.size(-1);
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() &&
                  weight.dim() == 1 && weight.size(0) == dim,
              "weight must be a contiguous bf16 vector of x's last size");
  const int64_t rows = dim == 0 ? 0 : x.numel() / dim;
  const c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
  const c10::BFloat16* wp = weight.data_ptr<c10::BFloat16>();
  const float epsilon = static_cast<float>(eps);  // a Python float added to fp32: fp32
  auto out = at::empty_like(x);
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
#if defined(KVRAY_RMS_VECTORS)
  const MeanSquares mean =
      dim > 0 && dim < at::internal::GRAIN_SIZE ? same_order_as_aten(dim) : nullptr;
  if (mean != nullptr) {
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        normalize_row(xp + r * dim, wp, mean(xp + r * dim, dim), epsilon, dim, op + r * dim);
      }
    });
    return out;
  }
#endif
  // `h.pow(2)`: each widened value times itself, as ATen's pow by 2 computes it (one rounding)
  auto squares = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  float* sp = squares.data_ptr<float>();
  at::parallel_for(0, rows * dim, 4096, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
#if defined(KVRAY_RMS_VECTORS)
    using V = Widest;
    for (; i + V::kLanes <= end; i += V::kLanes) {
      const V::Vec v = V::load(xp + i);
      V::store(sp + i, V::mul(v, v));
    }
#endif
    for (; i < end; ++i) {
      const float v = static_cast<float>(xp[i]);
      sp[i] = v * v;
    }
  });
  // `.mean(-1, keepdim=True)`: ATen's own reduction, so the same order of additions
  const auto variance = squares.mean(-1, /*keepdim=*/true).contiguous();
  const float* vp = variance.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      normalize_row(xp + r * dim, wp, vp[r], epsilon, dim, op + r * dim);
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(kvray, m) { m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor"); }

TORCH_LIBRARY_IMPL(kvray, CPU, m) { m.impl("rms_norm", &rms_norm); }
