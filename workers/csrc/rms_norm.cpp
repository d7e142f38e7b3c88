// RMSNorm of bf16 rows in one call, bitwise equal to transformers' `LlamaRMSNorm.forward`:
//
//   h = x.to(fp32);  v = h.pow(2).mean(-1, keepdim);  y = (h * rsqrt(v + eps)).to(bf16);
//   out = weight * y   (bf16 times bf16, rounded to bf16)
//
// The squares are a widened bf16 times itself (what `to` then `pow(2)` give). Their mean must add
// them in ATen's order: `mean_squares` repeats ATen's inner-dimension sum (SumKernel.cpp's
// vectorized_inner_sum, 16-lane vectors) and divides as `mean` does, and is used for a width
// only once it has matched ATen's own `mean` bit for bit on test rows of that width in this
// process (another ATen build or CPU capability may sum in another order: then ATen's reduction
// runs, on a tensor of the squares), and only for rows shorter than ATen's grain (32768 values:
// from there ATen may split one row's sum across threads). The rest is one pass computing what the remaining five
// operations compute (1 / sqrt in fp32, as ATen's rsqrt; round to nearest even). Eight
// Python-level tensor operations become one, with no ATen call inside where the order matched
// (a decode step's norms: ~25 us of ATen's reduction each, 61 a step for SmolLM2).
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

namespace {

// 1 / sqrt(variance + eps) times each value, then times the weight, both rounded to bf16.
inline void normalize_row(const c10::BFloat16* row, const c10::BFloat16* wp, float variance,
                          float epsilon, int64_t dim, c10::BFloat16* dst) {
  const float scale = 1.0f / std::sqrt(variance + epsilon);
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 scales = _mm512_set1_ps(scale);
  for (; i + 16 <= dim; i += 16) {
    const __m512 y = kvray::round_bf16(_mm512_mul_ps(kvray::load_bf16x16(row + i), scales));
    kvray::store_bf16x16(dst + i, kvray::round_bf16(_mm512_mul_ps(kvray::load_bf16x16(wp + i), y)));
  }
#endif
  for (; i < dim; ++i) {
    const float y = c10::BFloat16(static_cast<float>(row[i]) * scale);  // `.to(input_dtype)`
    dst[i] = c10::BFloat16(static_cast<float>(wp[i]) * y);
  }
}

#if defined(__AVX512F__)
// The mean of a bf16 row's squares, summed as ATen sums a contiguous fp32 row: its 16-lane
// vectors in 4 interleaved accumulators (row_sum's ilp), each a cascade of 4 levels that
// passes its sum up every 16 vectors (multi_row_sum), the 4 accumulators added in order, then
// the values past the last whole vector, then the 16 lanes in order; then divided by the width.
float mean_squares(const c10::BFloat16* x, int64_t n) {
  const int64_t vecs = n / 16, size = vecs / 4;
  const auto square = [&](int64_t v) {
    const __m512 value = kvray::load_bf16x16(x + 16 * v);
    return _mm512_mul_ps(value, value);
  };
  const int64_t ceil_log2 = size <= 2 ? 1 : 64 - __builtin_clzll(static_cast<uint64_t>(size - 1));
  const int64_t power = std::max<int64_t>(4, ceil_log2 / 4), step = int64_t(1) << power;
  const int64_t mask = step - 1;
  __m512 acc[4][4];
  for (auto& level : acc)
    for (auto& a : level) a = _mm512_setzero_ps();
  int64_t i = 0;
  while (i + step <= size) {
    for (int64_t j = 0; j < step; ++j, ++i)
      for (int k = 0; k < 4; ++k) acc[0][k] = _mm512_add_ps(acc[0][k], square(4 * i + k));
    for (int j = 1; j < 4; ++j) {
      for (int k = 0; k < 4; ++k) {
        acc[j][k] = _mm512_add_ps(acc[j][k], acc[j - 1][k]);
        acc[j - 1][k] = _mm512_setzero_ps();
      }
      if (i & (mask << (j * power))) break;
    }
  }
  for (; i < size; ++i)
    for (int k = 0; k < 4; ++k) acc[0][k] = _mm512_add_ps(acc[0][k], square(4 * i + k));
  for (int j = 1; j < 4; ++j)
    for (int k = 0; k < 4; ++k) acc[0][k] = _mm512_add_ps(acc[0][k], acc[j][k]);
  for (int64_t v = 4 * size; v < vecs; ++v) acc[0][0] = _mm512_add_ps(acc[0][0], square(v));
  for (int k = 1; k < 4; ++k) acc[0][0] = _mm512_add_ps(acc[0][0], acc[0][k]);
  float total = 0.0f;
  for (int64_t k = 16 * vecs; k < n; ++k) {
    const float v = static_cast<float>(x[k]);
    const float sq = v * v;
    total += sq;
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, acc[0][0]);
  for (float lane : lanes) total += lane;
  return total / static_cast<float>(n);
}

// Whether `mean_squares` gives ATen's `mean` bit for bit at this width, in this process: rows of
// values spread over many magnitudes, checked once per width.
bool same_order_as_aten(int64_t dim) {
  static std::mutex lock;
  static std::map<int64_t, bool> checked;
  std::lock_guard<std::mutex> guard(lock);
  const auto found = checked.find(dim);
  if (found != checked.end()) return found->second;
  constexpr int64_t kRows = 8;
  auto x = at::empty({kRows, dim}, at::TensorOptions().dtype(at::kBFloat16));
  c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
  for (int64_t i = 0; i < kRows * dim; ++i)
    xp[i] = c10::BFloat16(std::sin(0.37f * i + 1.0f) * std::ldexp(1.0f, int(i * 7 % 23) - 11));
  const auto expected = x.to(at::kFloat).pow(2).mean(-1).contiguous();  // transformers' ops
  bool same = true;
  for (int64_t r = 0; r < kRows; ++r) {
    const float got = mean_squares(xp + r * dim, dim);
    same = same && std::memcmp(&got, expected.data_ptr<float>() + r, sizeof(float)) == 0;
  }
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
#if defined(__AVX512F__)
  if (dim > 0 && dim < at::internal::GRAIN_SIZE && same_order_as_aten(dim)) {
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        normalize_row(xp + r * dim, wp, mean_squares(xp + r * dim, dim), epsilon, dim,
                      op + r * dim);
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
#if defined(__AVX512F__)
    for (; i + 16 <= end; i += 16) {
      const __m512 v = kvray::load_bf16x16(xp + i);
      _mm512_storeu_ps(sp + i, _mm512_mul_ps(v, v));
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
