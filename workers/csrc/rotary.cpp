// Rotary position embedding of bf16 queries and keys in one pass, bitwise equal to
// transformers' `apply_rotary_pos_emb`:
//
//   out = q * cos + rotate_half(q) * sin,   rotate_half(q) = cat(-q[D/2:], q[:D/2])
//
// which torch runs as five bf16 tensor operations (and a cat), each rounding its result to bf16
// (round to nearest even, as c10::BFloat16 does). Here each element is computed in fp32 with
// the same two roundings of the products and one of the sum, so the results are the same bits;
// one pass over the data instead of ~16 operations a layer.
//
//   q   [B, H, S, D]  bf16, unit stride in D (any other strides)
//   k   [B, KH, S, D] bf16, likewise
//   cos [B or 1, S, D], sin likewise, bf16, unit stride in D
// Returns (q_out, k_out): [B, H, S, D] and [B, KH, S, D] views of token-major memory
// ([B, S, H, D]), the layout the paged attention reads.

#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <tuple>

#include "vec.h"

namespace {

using BF16 = c10::BFloat16;

inline float round_bf16(float x) { return static_cast<float>(BF16(x)); }

#if defined(__AVX512F__)
using kvray::load_bf16x16;
using kvray::round_bf16;
using kvray::store_bf16x16;
#endif

// One head's row: out[i] = x[i] c[i] - x[i + h] s[i], out[i + h] = x[i + h] c[i + h] + x[i] s[i + h].
void rotate_row(const BF16* x, const BF16* c, const BF16* s, BF16* out, int64_t half) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= half; i += 16) {
    const __m512 x1 = load_bf16x16(x + i), x2 = load_bf16x16(x + half + i);
    const __m512 first = _mm512_sub_ps(round_bf16(_mm512_mul_ps(x1, load_bf16x16(c + i))),
                                       round_bf16(_mm512_mul_ps(x2, load_bf16x16(s + i))));
    const __m512 second = _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, load_bf16x16(c + half + i))),
                                        round_bf16(_mm512_mul_ps(x1, load_bf16x16(s + half + i))));
    store_bf16x16(out + i, round_bf16(first));
    store_bf16x16(out + half + i, round_bf16(second));
  }
#endif
  for (; i < half; ++i) {
    const float x1 = x[i], x2 = x[half + i];
    out[i] = BF16(round_bf16(x1 * float(c[i])) - round_bf16(x2 * float(s[i])));
    out[half + i] = BF16(round_bf16(x2 * float(c[half + i])) + round_bf16(x1 * float(s[half + i])));
  }
}

at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kBFloat16 && x.stride(3) == 1,
              "q and k must be [batch, heads, tokens, head_dim] bf16 with unit stride in head_dim");
  const int64_t batch = x.size(0), heads = x.size(1), tokens = x.size(2), dim = x.size(3);
  TORCH_CHECK(dim % 2 == 0, "head_dim must be even, got ", dim);
  TORCH_CHECK(cos.size(1) == tokens && cos.size(2) == dim && sin.sizes() == cos.sizes() &&
                  (cos.size(0) == batch || cos.size(0) == 1),
              "cos and sin must be [batch or 1, tokens, head_dim]");
  auto out = at::empty({batch, tokens, heads, dim}, x.options()).transpose(1, 2);
  const BF16* xp = x.data_ptr<BF16>();
  const BF16* cp = cos.data_ptr<BF16>();
  const BF16* sp = sin.data_ptr<BF16>();
  BF16* op = out.data_ptr<BF16>();
  const int64_t cos_batch = cos.size(0) == 1 ? 0 : cos.stride(0), sin_batch = sin.size(0) == 1 ? 0 : sin.stride(0);
  at::parallel_for(0, batch * tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / tokens, s = t % tokens;
      const BF16* c = cp + b * cos_batch + s * cos.stride(1);
      const BF16* si = sp + b * sin_batch + s * sin.stride(1);
      for (int64_t h = 0; h < heads; ++h) {
        rotate_row(xp + b * x.stride(0) + h * x.stride(1) + s * x.stride(2), c, si,
                   op + b * out.stride(0) + h * out.stride(1) + s * out.stride(2), dim / 2);
      }
    }
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rotary_embedding(at::Tensor q, at::Tensor k,
                                                    at::Tensor cos, at::Tensor sin) {
  TORCH_CHECK(cos.dim() == 3 && cos.scalar_type() == at::kBFloat16 && cos.stride(2) == 1 &&
                  sin.dim() == 3 && sin.scalar_type() == at::kBFloat16 && sin.stride(2) == 1,
              "cos and sin must be 3-d bf16 with unit stride in head_dim");
  return {rotate(q, cos, sin), rotate(k, cos, sin)};
}

TORCH_LIBRARY_FRAGMENT(kvray, m) {
  m.def("rotary_embedding(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kvray, CPU, m) { m.impl("rotary_embedding", &rotary_embedding); }
