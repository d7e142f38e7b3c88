// bf16 linear layer on CPUs with AVX512-BF16 (no AMX): y = x @ W^T + bias, W prepacked.
//
// A decode step multiplies a few rows by every weight once, so it runs at the speed weights
// stream in from memory; a batch or a prompt chunk runs at the speed of vdpbf16ps. oneDNN's
// bf16 GEMM on this kind of CPU reaches neither at small batches (17-19 GB/s against the ~30 the
// memory gives at one row; 283 against 360 GFLOP/s at 32 rows). This kernel does both with one
// weight layout:
//
//   packed [panels, in_features / 2, 32, 2]   panel p holds output features 32p .. 32p + 31,
//                                             each k-pair row is the 32 features' weights for
//                                             inputs 2i and 2i + 1 (vdpbf16ps's operand order)
//
// so a panel is one contiguous stream, and a tile of up to 12 rows keeps 24 accumulators of 16
// sums each in registers while one pair of inputs per row is broadcast against the panel's two
// vectors. Sums are fp32 in input order, as oneDNN's are: the results equal F.linear's but for
// rare last-bit roundings. out_features is padded to whole panels with zero weights.
//
//   x    [rows, in_features]  bf16, in_features even
//   bias [out_features] or None, any float dtype (added in fp32 before the rounding to bf16)
// Returns [rows, out_features] bf16.

#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "panel.h"
#include "vec.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

using kvray::kPanel;

at::Tensor bf16_pack(at::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16,
              "weight must be a 2-d bf16 tensor");
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  TORCH_CHECK(in_features % 2 == 0, "in_features must be even, got ", in_features);
  const int64_t padded = (out_features + kPanel - 1) / kPanel * kPanel;
  return at::constant_pad_nd(weight.contiguous(), {0, 0, 0, padded - out_features})
      .view({padded / kPanel, kPanel, in_features / 2, 2})
      .permute({0, 2, 1, 3})
      .contiguous();
}

at::Tensor bf16_unpack(at::Tensor packed, int64_t out_features) {
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kPanel && packed.size(3) == 2,
              "packed must be [panels, in_features / 2, 32, 2]");
  return packed.permute({0, 2, 1, 3})
      .reshape({packed.size(0) * kPanel, packed.size(1) * 2})
      .narrow(0, 0, out_features)
      .contiguous();
}

#if defined(__AVX512BF16__)
using kvray::kTileRows;
using kvray::with_rows;

at::Tensor bf16_linear(at::Tensor x, at::Tensor packed, int64_t out_features,
                       c10::optional<at::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be 2-d bf16");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kPanel && packed.size(3) == 2 &&
                  packed.scalar_type() == at::kBFloat16 && packed.is_contiguous(),
              "packed must be bf16_pack's [panels, in_features / 2, 32, 2]");
  TORCH_CHECK(x.size(1) == packed.size(1) * 2, "x has ", x.size(1), " features, weight expects ",
              packed.size(1) * 2);
  TORCH_CHECK(out_features > packed.size(0) * kPanel - kPanel &&
                  out_features <= packed.size(0) * kPanel,
              "out_features ", out_features, " does not match ", packed.size(0), " panels");
  const at::Tensor xc = x.contiguous();
  at::Tensor bias_f;  // NOTE: PackedLinear keeps its bias in fp32, so no copy per call
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == out_features, "bias has ", bias->numel(), " values for ",
                out_features, " out_features");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const float* b = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const int64_t rows = x.size(0), pairs = packed.size(1), panels = packed.size(0);
  auto out = at::empty({rows, out_features}, x.options());
  const c10::BFloat16* x_ptr = xc.data_ptr<c10::BFloat16>();
  const c10::BFloat16* w = packed.data_ptr<c10::BFloat16>();
  c10::BFloat16* y = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float sums[kTileRows * kPanel];
    for (int64_t p = begin; p < end; ++p) {
      const c10::BFloat16* panel = w + p * pairs * 2 * kPanel;
      const int64_t n0 = p * kPanel, cols = std::min(kPanel, out_features - n0);
      const __mmask16 lo_cols = cols >= 16 ? 0xFFFF : (1u << cols) - 1;
      const __mmask16 hi_cols = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : (1u << (cols - 16)) - 1;
      const __m512 bias_lo = b ? _mm512_maskz_loadu_ps(lo_cols, b + n0) : _mm512_setzero_ps();
      const __m512 bias_hi = b ? _mm512_maskz_loadu_ps(hi_cols, b + n0 + 16) : _mm512_setzero_ps();
      for (int64_t m0 = 0; m0 < rows; m0 += kTileRows) {
        const int64_t count = std::min<int64_t>(kTileRows, rows - m0);
        with_rows<kTileRows>(count, [&](auto tile_rows) {
          kvray::tile<decltype(tile_rows)::value>(x_ptr + m0 * 2 * pairs, pairs, panel, sums);
        });
        for (int64_t m = 0; m < count; ++m) {
          const __m512 lo = _mm512_add_ps(_mm512_load_ps(sums + m * kPanel), bias_lo);
          const __m512 hi = _mm512_add_ps(_mm512_load_ps(sums + m * kPanel + 16), bias_hi);
          const __m512i rounded = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // nearest even
          const __mmask32 mask = cols == kPanel ? ~__mmask32(0) : (__mmask32(1) << cols) - 1;
          _mm512_mask_storeu_epi16(y + (m0 + m) * out_features + n0, mask, rounded);
        }
      }
    }
  });
  return out;
}
#endif

TORCH_LIBRARY_FRAGMENT(kvray, m) {
  m.def("bf16_pack(Tensor weight) -> Tensor");
  m.def("bf16_unpack(Tensor packed, int out_features) -> Tensor");
#if defined(__AVX512BF16__)
  // NOTE: only where the compiler targets AVX512-BF16: elsewhere the op does not exist, and
  // callers keep oneDNN (workers/cpu_kernels.py checks).
  m.def("bf16_linear(Tensor x, Tensor packed, int out_features, Tensor? bias) -> Tensor");
#endif
}

TORCH_LIBRARY_IMPL(kvray, CPU, m) {
  m.impl("bf16_pack", &bf16_pack);
  m.impl("bf16_unpack", &bf16_unpack);
#if defined(__AVX512BF16__)
  m.impl("bf16_linear", &bf16_linear);
#endif
}
