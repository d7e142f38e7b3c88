// A decode step's decoder layers in one call, for kvray's Llama-family forward (bf16 or int8
// weights, bf16 activations, CPU; or int8 weights times activations quantized per layer, w8a8).
//
// With every layer's arithmetic already in kvray's kernels (packed linears, RMSNorm, rotary
// embedding, paged decode attention), what a one-stream decode step of SmolLM2-135M still spent
// in Python was the glue: ~100 Python-level calls a layer (module forwards, views, slices,
// keyword plumbing), a quarter of the step. This runs the same operations, in the same order
// and on the same dtypes, as workers/llama_family.py's `_Layer` with
// `paged_attention_forward` for a step in which every sequence computes one token, so its
// results are bitwise those of the Python path (and so of transformers' forward).
//
//   h            [1, n, hidden] bf16: the embedded tokens, one per sequence
//   cos, sin     [1, n, head_dim] bf16: the rotary embedding of each token's position
//   slot_mapping [n] int64: the cache slot each token's key and value go to
//   block_table  [n, blocks] int64, context_lens [n] int64: as paged_decode_attention reads them
//   weights      per layer, kPerLayer tensors (see `Weight`)
//   caches       per layer, its key cache then its value cache ([slots, kv_heads, head_dim])
//   sizes        kHeadSizes (`Head`), then per layer kInts (`Size`)
//   floats       per layer kFloats (`Float`)
// Returns h after the last layer, [1, n, hidden] bf16.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

// Built where kvray's panels are: bf16 and weight-only int8 with AVX512-BF16, w8a8 with AVX2 +
// FMA (w8a8_linear.cpp's paths), so a CPU with AVX2 alone runs w8a8 decode steps in one call.
#if defined(__AVX512BF16__) || (defined(__AVX2__) && defined(__FMA__))
#define KVRAY_DECODE_LAYERS 1
#endif

at::Tensor bf16_linear(at::Tensor x, at::Tensor packed, int64_t out_features,
                       c10::optional<at::Tensor> bias);
at::Tensor int8_panel_linear(at::Tensor x, at::Tensor packed, at::Tensor scales,
                             int64_t group_size, int64_t out_features,
                             c10::optional<at::Tensor> bias);
at::Tensor w8a8_linear(at::Tensor x, at::Tensor packed, at::Tensor scales, int64_t out_features,
                       c10::optional<at::Tensor> bias);
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps);
std::tuple<at::Tensor, at::Tensor> rotary_embedding(at::Tensor q, at::Tensor k,
                                                    at::Tensor cos, at::Tensor sin);
at::Tensor paged_decode_attention(at::Tensor query, at::Tensor key_cache,
                                  at::Tensor value_cache, at::Tensor block_table,
                                  at::Tensor context_lens, int64_t block_size, double scale,
                                  int64_t window);

#if defined(KVRAY_DECODE_LAYERS)
namespace {

// A layer's tensors, in this order: each linear layer as its weight, scales and bias, as
// PackedLinear (bf16 panels, no scales, an fp32 bias), Int8Linear (int8 panels, bf16 scales,
// the model's bias) or Int8ActLinear (w8a8's int8 panels, fp32 scales, the model's bias) keeps
// them; an empty tensor for an absent scale, bias or norm.
enum Weight {
  kNorm1, kQkv, kQkvScale, kQkvBias, kQNorm, kKNorm, kO, kOScale, kOBias, kNorm2,
  kGateUp, kGateUpScale, kGateUpBias, kDown, kDownScale, kDownBias, kPerLayer
};
enum Head { kHeads, kKvHeads, kHeadDim, kBlockSize, kGroupSize, kHeadSizes };
enum Size { kQkvOut, kQSize, kKSize, kHidden, kIntermediate, kWindow, kInts };
enum Float { kEps1, kEps2, kQEps, kKEps, kScale, kFloats };

c10::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.numel() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

struct Linear {
  const at::Tensor *weight, *scale, *bias;
};

// A linear layer as PackedLinear.forward, Int8Linear.forward (its panels) or
// Int8ActLinear.forward computes it: rows in, [..., out] back. The weights' dtype tells bf16
// from int8, the scales' dtype weight-only int8 (bf16) from w8a8 (fp32).
at::Tensor linear(const at::Tensor& x, const Linear& l, int64_t out_features,
                  const int64_t* head) {
  auto shape = x.sizes().vec();
  shape.back() = out_features;
  const auto rows = x.reshape({-1, x.size(-1)});
  at::Tensor out;
  if (l.weight->scalar_type() != at::kBFloat16 && l.scale->scalar_type() == at::kFloat) {
    out = w8a8_linear(rows, *l.weight, *l.scale, out_features, maybe(*l.bias));
  } else {
#if defined(__AVX512BF16__)
    out = l.weight->scalar_type() == at::kBFloat16
              ? bf16_linear(rows, *l.weight, out_features, maybe(*l.bias))
              : int8_panel_linear(rows, *l.weight, *l.scale, head[kGroupSize], out_features,
                                  maybe(*l.bias));
#else
    TORCH_CHECK(false, "decode_layers: this build (no AVX512-BF16) runs w8a8 layers only");
#endif
  }
  return out.view(shape);
}

// llama_family's norm: the one-call op for contiguous rows, else transformers' operations.
at::Tensor norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (x.is_contiguous()) return rms_norm(x, weight, eps);
  auto h = x.to(at::kFloat);
  const auto variance = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(variance + eps);
  return weight * h.to(x.scalar_type());
}

}  // namespace

at::Tensor decode_layers(at::Tensor h, at::Tensor cos, at::Tensor sin,
                         at::Tensor slot_mapping, at::Tensor block_table,
                         at::Tensor context_lens, std::vector<at::Tensor> weights,
                         std::vector<at::Tensor> caches, std::vector<int64_t> sizes,
                         std::vector<double> floats) {
  TORCH_CHECK(h.dim() == 3 && h.size(0) == 1 && h.scalar_type() == at::kBFloat16,
              "h must be [1, n, hidden] bf16");
  TORCH_CHECK(sizes.size() >= kHeadSizes, "sizes must start with the `Head` sizes");
  const int64_t num_layers = static_cast<int64_t>(weights.size()) / kPerLayer;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == num_layers * kPerLayer &&
                  static_cast<int64_t>(caches.size()) == 2 * num_layers &&
                  static_cast<int64_t>(sizes.size()) == kHeadSizes + kInts * num_layers &&
                  static_cast<int64_t>(floats.size()) == kFloats * num_layers,
              "weights, caches, sizes and floats must describe the same number of layers");
  const int64_t* head = sizes.data();
  const int64_t heads = head[kHeads], kv_heads = head[kKvHeads], head_dim = head[kHeadDim];
  const int64_t n = h.size(1);
  for (int64_t l = 0; l < num_layers; ++l) {
    const at::Tensor* w = weights.data() + l * kPerLayer;
    const int64_t* s = sizes.data() + kHeadSizes + l * kInts;
    const double* f = floats.data() + l * kFloats;
    const int64_t qkv_out = s[kQkvOut], q_size = s[kQSize], k_size = s[kKSize];
    const int64_t hidden = s[kHidden], inter = s[kIntermediate];
    // attention: norm, fused q/k/v, q/k norms (Qwen3), rotary, cache write, paged attention
    const auto x = norm(h, w[kNorm1], f[kEps1]);
    const auto qkv = linear(x, {&w[kQkv], &w[kQkvScale], &w[kQkvBias]}, qkv_out, head);
    auto q = qkv.slice(-1, 0, q_size).view({1, n, -1, head_dim});
    auto k = qkv.slice(-1, q_size, q_size + k_size).view({1, n, -1, head_dim});
    const auto v = qkv.slice(-1, q_size + k_size, qkv_out).view({1, n, -1, head_dim});
    if (w[kQNorm].numel() && w[kKNorm].numel()) {
      q = norm(q, w[kQNorm], f[kQEps]);
      k = norm(k, w[kKNorm], f[kKEps]);
    }
    auto rotated = rotary_embedding(q.transpose(1, 2), k.transpose(1, 2), cos, sin);
    const auto q_rows = std::get<0>(rotated)[0].transpose(0, 1);  // [n, heads, head_dim]
    const auto k_rows = std::get<1>(rotated)[0].transpose(0, 1);
    const auto v_rows = v[0];  // [n, kv_heads, head_dim]
    caches[2 * l].index_copy_(0, slot_mapping, k_rows);
    caches[2 * l + 1].index_copy_(0, slot_mapping, v_rows);
    const auto attended =
        paged_decode_attention(q_rows, caches[2 * l], caches[2 * l + 1], block_table,
                               context_lens, head[kBlockSize], f[kScale], s[kWindow]);
    TORCH_CHECK(attended.size(1) == heads && k_rows.size(1) == kv_heads, "head counts differ");
    h = h + linear(attended.reshape({1, n, -1}).contiguous(), {&w[kO], &w[kOScale], &w[kOBias]},
                   hidden, head);
    // MLP: norm, fused gate/up, SiLU(gate) * up, down
    const auto gate_up = linear(norm(h, w[kNorm2], f[kEps2]),
                                {&w[kGateUp], &w[kGateUpScale], &w[kGateUpBias]}, 2 * inter, head);
    const auto act = at::silu(gate_up.slice(-1, 0, inter)) * gate_up.slice(-1, inter, 2 * inter);
    h = h + linear(act, {&w[kDown], &w[kDownScale], &w[kDownBias]}, hidden, head);
  }
  return h;
}
#endif

TORCH_LIBRARY_FRAGMENT(kvray, m) {
#if defined(KVRAY_DECODE_LAYERS)
  // NOTE: where kvray's panels exist (see above); elsewhere the Python layers run.
  m.def(
      "decode_layers(Tensor h, Tensor cos, Tensor sin, Tensor slot_mapping, Tensor block_table, "
      "Tensor context_lens, Tensor[] weights, Tensor(a!)[] caches, int[] sizes, float[] floats) "
      "-> Tensor");
#endif
}

TORCH_LIBRARY_IMPL(kvray, CPU, m) {
#if defined(KVRAY_DECODE_LAYERS)
  m.impl("decode_layers", &decode_layers);
#endif
}
