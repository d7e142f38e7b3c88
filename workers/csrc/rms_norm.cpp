// RMSNorm of bf16 rows in one call, bitwise equal to transformers' `LlamaRMSNorm.forward`:
//
//   h = x.to(fp32);  v = h.pow(2).mean(-1, keepdim);  y = (h * rsqrt(v + eps)).to(bf16);
//   out = weight * y   (bf16 times bf16, rounded to bf16)
//
// The squares are computed here (a widened bf16 times itself: what `to` then `pow(2)` give) and
// their mean by ATen's own reduction on the same fp32 tensor, so it sums in the same order; the
// rest is one pass computing what the remaining five operations compute (1 / sqrt in fp32, as
// ATen's rsqrt; round to nearest even). Eight Python-level tensor operations become one, and
// three ATen calls within it one.
//
//   x      [..., D] bf16, contiguous
//   weight [D] bf16, contiguous
// Returns [..., D] bf16.

#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#include "vec.h"

at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() >= 1,
              "x must be a contiguous bf16 tensor");
  const int64_t dim = x.size(-1);
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() &&
                  weight.dim() == 1 && weight.size(0) == dim,
              "weight must be a contiguous bf16 vector of x's last size");
  const int64_t rows = dim == 0 ? 0 : x.numel() / dim;
  const c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
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
  auto out = at::empty_like(x);
  const float* vp = variance.data_ptr<float>();
  const c10::BFloat16* wp = weight.data_ptr<c10::BFloat16>();
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  const float epsilon = static_cast<float>(eps);  // a Python float added to fp32: fp32
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float scale = 1.0f / std::sqrt(vp[r] + epsilon);
      const c10::BFloat16* row = xp + r * dim;
      c10::BFloat16* dst = op + r * dim;
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
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(kvray, m) { m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor"); }

TORCH_LIBRARY_IMPL(kvray, CPU, m) { m.impl("rms_norm", &rms_norm); }
