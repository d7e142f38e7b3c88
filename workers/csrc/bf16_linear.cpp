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
  const int64_t pairs = packed.size(1);
  const c10::BFloat16* x_ptr = xc.data_ptr<c10::BFloat16>();
  const c10::BFloat16* w = packed.data_ptr<c10::BFloat16>();
  return kvray::panel_linear(
      xc, packed.size(0), out_features, bias, [](int64_t) {},
      [&](int64_t p, int64_t m0, int64_t count, float* sums) {
        with_rows<kTileRows>(count, [&](auto rows) {
          kvray::tile<decltype(rows)::value>(x_ptr + m0 * 2 * pairs, pairs,
                                             w + p * pairs * 2 * kPanel, sums);
        });
      });
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
