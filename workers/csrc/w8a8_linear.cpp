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
//   x       [rows, in_features]                   bf16 or fp32
//   packed  [panels, in_features / 4, 16, 4]      int8 in [-127, 127]: quantize_int8's rows in
//                                                 panels of 16 output features, each quad row
//                                                 the 16 features' weights for 4 inputs
//                                                 (out_features padded with zeros; see
//                                                 `to_panels` in workers/w8a8.py)
//   scales  [panels, in_features / 32, 16]        fp32, the weights' bf16 group scales
//   bias    [out_features] or None                any float dtype, added in fp32
// in_features a multiple of 32. Returns [rows, out_features] in x's dtype.
//
// Each feature's products land in its own 32-bit lane: a row's 4 inputs of a quad are broadcast
// against a panel's quad row (64 bytes: 16 features x 4 inputs), the group's 8 quads are summed
// in s32 lanes, converted and multiplied by both scales into fp32 lanes once per group, and the
// lanes are the outputs: no reduction across lanes. One layout for both paths:
//
// AVX512-VNNI (`#if defined(__AVX512VNNI__)`; cpu_kernels.py builds with -march=native): one
// `vpdpbusd` (u8 x s8, quads summed into s32, nothing saturates) per row and panel per quad.
// Its first operand is unsigned, so the weights are read as w + 128 (one xor a panel's quad
// row, shared by the tile's rows) against the signed activations, and each group's sum starts
// at -128 * (the row's sum of that group's int8 activations), computed while quantizing: the
// exact dot again. A tile is 4 rows x 2 panels (8 s32 and 8 fp32 accumulators of 32).
//
// AVX2 + FMA: a panel is two 8-lane halves; `vpmaddubsw` (u8 x s8 -> s16 pairs) and
// `vpmaddwd` with ones (-> s32 quads), with llama.cpp's signs: |x| as the unsigned operand and
// x's sign moved onto the weights (`vpsignb`), so no s16 sum can saturate (at most
// 2 * 127 * 127). A tile is 2 rows x 1 panel (4 s32 and 4 fp32 accumulators of 16).
//
// NOTE: the group sums are exact on both paths; the fp32 sum over the groups runs in the
// kernel's order (with FMAs), the torch reference's in torch's: equal to fp32 rounding, not bit
// for bit.
//
// AMX-INT8 (`#if defined(__AMX_INT8__)`; inputs of kAmxRows rows or more, where Linux grants
// the tile state, else the VNNI path): `_tile_dpbssd` (signed x signed, no offset) multiplies
// 16 rows x one group of activations (a 16 x 32-byte tile, loaded straight from the quantized
// rows, padded with zero rows to whole tiles) by the group's 8 quad rows of a panel (an 8 x
// 64-byte tile, straight from the panels above) into 16 x 16 exact s32 sums. A block is 16
// rows x 2 panels; even and odd groups take separate tiles, so one group's products overlap
// the store of the last one's sums. A group's scales differ per row and feature, so its sum
// tiles go to memory (`_tile_stored`) and AVX512 scales them into the block's fp32 sums with
// the VNNI path's operations in its order: both paths give the same bits, so a row's output
// does not depend on the size of the batch it came in.

#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>

#include "vec.h"

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__) && defined(__linux__)
#define KVRAY_AMX_INT8 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace {

using kvray::with_rows;

#if defined(__AVX512VNNI__)
constexpr bool kVnni = true;
constexpr int kTileRows = 4;    // rows per tile
constexpr int kTilePanels = 2;  // panels per tile
#else
constexpr bool kVnni = false;
constexpr int kTileRows = 2;
constexpr int kTilePanels = 1;
#endif
constexpr int64_t kGroup = 32;  // inputs per scale, weights' and activations' alike
constexpr int64_t kPanel = 16;  // output features per panel: one s32 or fp32 lane each
constexpr int64_t kChunk = 64;  // output features whose weights stay in L2 across row tiles

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

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// The activations, quantized, each [rows, ...] row-major: int8 values and one fp32 scale per
// group, and what the path multiplies by: AVX2 the magnitudes (its unsigned operand), VNNI
// each group's offset, -128 x its values' sum (its sums start there).
struct QuantizedRows {
  at::Tensor q, scale;  // int8 [rows, in]; fp32 [rows, in / 32]
  at::Tensor magnitude;  // AVX2: uint8 [rows, in]
  at::Tensor offset;     // VNNI: int32 [rows, in / 32]
};

// One group of 32 inputs: amax / 127 as its scale, round(x * (127 / amax)) as its values.
// NOTE: the same fp32 operations as the torch reference, in the same order, so bit for bit.
template <typename T>
inline void quantize_group(const T* x, int8_t* q, float* scale, uint8_t* magnitude,
                           int32_t* offset) {
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
  if constexpr (kVnni) {
    const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(n[0], n[1]), _mm256_add_epi32(n[2], n[3]));
    *offset = -128 * hsum_epi32(sum);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(magnitude), _mm256_sign_epi8(ordered, ordered));
  }
}

// x's rows quantized into `padded` rows (>= x's; the extra ones zeros, with zero scales).
template <typename T>
QuantizedRows quantize_rows(const at::Tensor& x, int64_t padded) {
  const int64_t rows = x.size(0), in = x.size(1), groups = in / kGroup;
  const at::Tensor xc = x.contiguous();
  QuantizedRows out;
  out.q = at::empty({padded, in}, x.options().dtype(at::kChar));
  out.scale = at::empty({padded, groups}, x.options().dtype(at::kFloat));
  if (padded > rows) {
    out.q.narrow(0, rows, padded - rows).zero_();
    out.scale.narrow(0, rows, padded - rows).zero_();
  }
  if constexpr (kVnni) {
    out.offset = at::empty({rows, groups}, x.options().dtype(at::kInt));
  } else {
    out.magnitude = at::empty({rows, in}, x.options().dtype(at::kByte));
  }
  const T* xp = xc.data_ptr<T>();
  int8_t* q = out.q.data_ptr<int8_t>();
  float* s = out.scale.data_ptr<float>();
  uint8_t* mag = kVnni ? nullptr : out.magnitude.data_ptr<uint8_t>();
  int32_t* off = kVnni ? out.offset.data_ptr<int32_t>() : nullptr;
  at::parallel_for(0, rows * groups, 64, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      quantize_group(xp + g * kGroup, q + g * kGroup, s + g, kVnni ? nullptr : mag + g * kGroup,
                     kVnni ? off + g : nullptr);
    }
  });
  return out;
}

struct Layer {
  int64_t rows, in, out, groups;
  const int8_t* xq;        // [rows, in]
  const uint8_t* xmag;     // AVX2: [rows, in]
  const int32_t* xoffset;  // VNNI: [rows, groups]
  const float* xs;         // [rows, groups]
  const int8_t* w;         // [panels, in / 4, 16, 4]
  const float* ws;         // [panels, groups, 16]
  const float* bias;       // fp32 or nullptr

  const int8_t* panel(int64_t p) const { return w + p * in * kPanel; }
  const float* panel_scales(int64_t p, int64_t g) const { return ws + (p * groups + g) * kPanel; }
  int32_t quad(const int8_t* values, int64_t m, int64_t k) const {  // 4 inputs from k
    int32_t v;
    std::memcpy(&v, values + m * in + k, 4);
    return v;
  }
};

// Row m's 16 sums of panel p (fp32 lanes, in order) into `out`, plus the bias where there is
// one; bf16 rounded to nearest even, as c10::BFloat16 rounds; the padding of the last panel is
// dropped. Every path stores through here, so they round alike.
template <typename T>
inline void store(const Layer& L, int64_t m, int64_t p, const float* sums, T* out) {
  const int64_t n0 = p * kPanel, count = std::min<int64_t>(kPanel, L.out - n0);
  T* dst = out + m * L.out + n0;
#if defined(__AVX512F__)
  const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
  __m512 y = _mm512_loadu_ps(sums);
  if (L.bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, L.bias + n0));
  if constexpr (std::is_same<T, float>::value) {
    _mm512_mask_storeu_ps(dst, mask, y);
  } else {
    const __m512i top = _mm512_srli_epi32(_mm512_castps_si512(kvray::round_bf16(y)), 16);
    _mm256_mask_storeu_epi16(dst, mask, _mm512_cvtepi32_epi16(top));
  }
#else
  for (int64_t f = 0; f < count; ++f) {
    dst[f] = static_cast<T>(L.bias ? sums[f] + L.bias[n0 + f] : sums[f]);
  }
#endif
}

#if defined(__AVX512VNNI__)
// kRows rows (from m0) x kPanels panels (from p0), one zmm of 16 features a row and panel.
template <int kRows, int kPanels, typename T>
inline void tile(const Layer& L, int64_t m0, int64_t p0, T* out) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // w ^ 0x80 == u8(w + 128)
  __m512 acc[kRows][kPanels];
  for (int m = 0; m < kRows; ++m)
    for (int j = 0; j < kPanels; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < L.groups; ++g) {
    __m512i dots[kRows][kPanels];
    for (int m = 0; m < kRows; ++m) {
      const __m512i offset = _mm512_set1_epi32(L.xoffset[(m0 + m) * L.groups + g]);
      for (int j = 0; j < kPanels; ++j) dots[m][j] = offset;
    }
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; k += 4) {
      __m512i w[kPanels];
      for (int j = 0; j < kPanels; ++j)
        w[j] = _mm512_xor_si512(_mm512_loadu_si512(L.panel(p0 + j) + k * kPanel), flip);
      for (int m = 0; m < kRows; ++m) {
        const __m512i a = _mm512_set1_epi32(L.quad(L.xq, m0 + m, k));
        for (int j = 0; j < kPanels; ++j) dots[m][j] = _mm512_dpbusd_epi32(dots[m][j], w[j], a);
      }
    }
    for (int j = 0; j < kPanels; ++j) {
      const __m512 ws = _mm512_loadu_ps(L.panel_scales(p0 + j, g));
      for (int m = 0; m < kRows; ++m) {
        const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(L.xs[(m0 + m) * L.groups + g]), ws);
        acc[m][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[m][j]), scale, acc[m][j]);
      }
    }
  }
  float sums[kPanel];
  for (int m = 0; m < kRows; ++m)
    for (int j = 0; j < kPanels; ++j) {
      _mm512_storeu_ps(sums, acc[m][j]);
      store(L, m0 + m, p0 + j, sums, out);
    }
}
#else
// kRows rows (from m0) x kPanels panels (from p0), two ymm halves of 8 features a row and panel.
template <int kRows, int kPanels, typename T>
inline void tile(const Layer& L, int64_t m0, int64_t p0, T* out) {
  constexpr int kHalves = 2 * kPanels;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[kRows][kHalves];
  for (int m = 0; m < kRows; ++m)
    for (int h = 0; h < kHalves; ++h) acc[m][h] = _mm256_setzero_ps();
  for (int64_t g = 0; g < L.groups; ++g) {
    __m256i dots[kRows][kHalves];
    for (int m = 0; m < kRows; ++m)
      for (int h = 0; h < kHalves; ++h) dots[m][h] = _mm256_setzero_si256();
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; k += 4) {
      __m256i w[kHalves];
      for (int h = 0; h < kHalves; ++h)
        w[h] = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(L.panel(p0 + h / 2) + k * kPanel + 32 * (h % 2)));
      for (int m = 0; m < kRows; ++m) {
        const __m256i a = _mm256_set1_epi32(L.quad(L.xq, m0 + m, k));
        const __m256i mag = _mm256_set1_epi32(
            L.quad(reinterpret_cast<const int8_t*>(L.xmag), m0 + m, k));
        for (int h = 0; h < kHalves; ++h) {
          const __m256i pairs = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(w[h], a));
          dots[m][h] = _mm256_add_epi32(dots[m][h], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
    for (int h = 0; h < kHalves; ++h) {
      const __m256 ws = _mm256_loadu_ps(L.panel_scales(p0 + h / 2, g) + 8 * (h % 2));
      for (int m = 0; m < kRows; ++m) {
        const __m256 scale = _mm256_mul_ps(_mm256_set1_ps(L.xs[(m0 + m) * L.groups + g]), ws);
        acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[m][h]), scale, acc[m][h]);
      }
    }
  }
  float sums[kPanel];
  for (int m = 0; m < kRows; ++m)
    for (int j = 0; j < kPanels; ++j) {
      _mm256_storeu_ps(sums, acc[m][2 * j]);
      _mm256_storeu_ps(sums + 8, acc[m][2 * j + 1]);
      store(L, m0 + m, p0 + j, sums, out);
    }
}
#endif

// Panels [p0, p0 + kPanels) for rows [m_begin, m_end), a tile of rows at a time.
template <int kPanels, typename T>
void panels(const Layer& L, int64_t p0, int64_t m_begin, int64_t m_end, T* out) {
  for (int64_t m0 = m_begin; m0 < m_end; m0 += kTileRows) {
    const int64_t count = std::min<int64_t>(kTileRows, m_end - m0);
    with_rows<kTileRows>(count, [&](auto rows) {
      tile<decltype(rows)::value, kPanels>(L, m0, p0, out);
    });
  }
}

// NOTE: loop order: each thread takes a range of tiles' panels, kChunk features at a time;
// within a chunk, a tile of rows meets every panel before the next tile starts, so a chunk's
// weights come from memory once and from L2 for the other tiles, and a tile's activations
// (kTileRows x in bytes) stay in L1.
template <typename T>
void linear(const Layer& L, T* out) {
  const int64_t num_panels = (L.out + kPanel - 1) / kPanel, steps = num_panels / kTilePanels;
  constexpr int64_t kChunkSteps = std::max<int64_t>(1, kChunk / (kPanel * kTilePanels));
  at::parallel_for(0, steps, 4, [&](int64_t begin, int64_t end) {
    for (int64_t c0 = begin; c0 < end; c0 += kChunkSteps) {
      const int64_t c1 = std::min(end, c0 + kChunkSteps);
      for (int64_t m0 = 0; m0 < L.rows; m0 += kTileRows) {
        const int64_t m1 = std::min(L.rows, m0 + kTileRows);
        for (int64_t c = c0; c < c1; ++c) panels<kTilePanels>(L, c * kTilePanels, m0, m1, out);
      }
    }
  });
  if (num_panels % kTilePanels) panels<1>(L, num_panels - 1, 0, L.rows, out);  // an odd last one
}

constexpr int64_t kAmxRows = 16;      // inputs of this many rows or more take the tile unit
constexpr int64_t kAmxTileRows = 16;  // rows of an activation tile (and of a sum tile)

#if defined(KVRAY_AMX_INT8)
// Whether this process may use the tile registers: Linux hands out their 8 KiB of state only
// on request (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), once per process, for all
// of its threads. Refused (an old kernel, a hypervisor without AMX state): the VNNI path.
bool amx_granted() {
  static const bool granted = [] {
    constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

// The tiles' shapes, loaded by each thread before its first tile instruction (the configuration
// is per thread): 0, 1: activations, 16 rows x one group (32 bytes); 2, 3: weights, a group's
// 8 quad rows of a panel (8 x 64 bytes); 4..7: sums, 16 rows x 16 features of s32.
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

TileConfig tile_shapes() {
  TileConfig c;
  for (int t = 0; t < 2; ++t) c.rows[t] = kAmxTileRows, c.colsb[t] = kGroup;
  for (int t = 2; t < 4; ++t) c.rows[t] = kGroup / 4, c.colsb[t] = 4 * kPanel;
  for (int t = 4; t < 8; ++t) c.rows[t] = kAmxTileRows, c.colsb[t] = 4 * kPanel;
  return c;
}

// NOTE: a global, not a local: GCC 12 drops the stores into a local configuration before
// `ldtilecfg` (it does not see the instruction read all 64 bytes), and the tiles then fault.
alignas(64) const TileConfig kTileShapes = tile_shapes();

void configure_tiles() { _tile_loadconfig(&kTileShapes); }

// Group g's exact dots of 16 rows (from m0) x kPanels panels (from p0) into `dots`: the
// activations into tile A, the weights into tiles 2 (and 3), the sums into tiles C0 (and C1).
// NOTE: a macro: GCC's tile intrinsics paste their tile numbers into the assembly, so they
// must be literals, not template arguments.
#define KVRAY_GROUP_DOTS(A, C0, C1)                                        \
  do {                                                                     \
    const int8_t* b = L.panel(p0) + g * kGroup * kPanel;                   \
    _tile_loadd(A, L.xq + m0 * L.in + g * kGroup, L.in);                   \
    _tile_loadd(2, b, 4 * kPanel);                                         \
    if constexpr (kPanels == 2) _tile_loadd(3, b + L.in * kPanel, 4 * kPanel); \
    _tile_zero(C0);                                                        \
    _tile_dpbssd(C0, A, 2);                                                \
    _tile_stored(C0, dots[g % 2][0], 4 * kPanel);                          \
    if constexpr (kPanels == 2) {                                          \
      _tile_zero(C1);                                                      \
      _tile_dpbssd(C1, A, 3);                                              \
      _tile_stored(C1, dots[g % 2][1], 4 * kPanel);                        \
    }                                                                      \
  } while (0)

// One block: 16 rows (from m0; L.xq and L.xs padded to whole tiles) x kPanels panels (from p0).
// Even groups run on tiles 0 and 4, 5, odd ones on 1 and 6, 7, so a group's products start
// while the group before still stores its sums; each group's sums, times their rows' and
// features' scales, are added to the block's fp32 sums a group later (a vector load right after
// the tile store it reads would wait for that store to reach L1).
template <int kPanels, typename T>
void amx_block(const Layer& L, int64_t m0, int64_t p0, T* out) {
  alignas(64) int32_t dots[2][2][kAmxTileRows][kPanel];  // [group % 2][panel]
  alignas(64) float acc[2][kAmxTileRows][kPanel];
  std::memset(acc, 0, sizeof(acc));
  const float* xs = L.xs + m0 * L.groups;
  const auto scale_group = [&](int64_t g) {
    for (int j = 0; j < kPanels; ++j) {
      const __m512 ws = _mm512_loadu_ps(L.panel_scales(p0 + j, g));
      for (int r = 0; r < kAmxTileRows; ++r) {
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_load_si512(dots[g % 2][j][r]));
        const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(xs[r * L.groups + g]), ws);
        _mm512_store_ps(acc[j][r], _mm512_fmadd_ps(dot, scale, _mm512_load_ps(acc[j][r])));
      }
    }
  };
  for (int64_t g = 0; g < L.groups; ++g) {
    if (g % 2 == 0) {
      KVRAY_GROUP_DOTS(0, 4, 5);
    } else {
      KVRAY_GROUP_DOTS(1, 6, 7);
    }
    if (g > 0) scale_group(g - 1);
  }
  scale_group(L.groups - 1);
  const int64_t count = std::min<int64_t>(kAmxTileRows, L.rows - m0);
  for (int r = 0; r < count; ++r)
    for (int j = 0; j < kPanels; ++j) store(L, m0 + r, p0 + j, acc[j][r], out);
}

// NOTE: loop order as `linear`'s: each thread takes a range of panel pairs; a pair's weights
// (2 x in x 16 bytes) stay in L1/L2 while every block of rows meets them.
template <typename T>
void linear_amx(const Layer& L, T* out) {
  const int64_t num_panels = (L.out + kPanel - 1) / kPanel, pairs = (num_panels + 1) / 2;
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t p0 = 2 * pair;
      const bool two_panels = p0 + 1 < num_panels;
      for (int64_t m0 = 0; m0 < L.rows; m0 += kAmxTileRows) {
        if (two_panels) amx_block<2>(L, m0, p0, out);
        else amx_block<1>(L, m0, p0, out);
      }
    }
    _tile_release();
  });
}
#endif

void check_weights(const at::Tensor& packed, const at::Tensor& scales, int64_t in, int64_t out) {
  const int64_t num_panels = (out + kPanel - 1) / kPanel;
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.is_contiguous() && packed.dim() == 4 &&
                  packed.size(0) == num_panels && packed.size(1) == in / 4 &&
                  packed.size(2) == kPanel && packed.size(3) == 4,
              "packed must be contiguous int8 [", num_panels, ", ", in / 4, ", 16, 4], got ",
              packed.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.dim() == 3 && scales.size(0) == num_panels &&
                  scales.size(1) == in / kGroup && scales.size(2) == kPanel,
              "scales must be contiguous fp32 [panels, in_features / 32, 16]");
}

// Whether a layer call with `rows` rows takes the tile unit.
bool use_amx(int64_t rows) {
#if defined(KVRAY_AMX_INT8)
  return rows >= kAmxRows && amx_granted();
#else
  (void)rows;
  return false;
#endif
}

// x quantized into `padded` rows (see quantize_rows).
QuantizedRows quantize(const at::Tensor& x, int64_t padded) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-d [rows, in_features]");
  TORCH_CHECK(x.size(1) % kGroup == 0, "in_features must be a multiple of 32, got ", x.size(1));
  if (x.scalar_type() == at::kBFloat16) return quantize_rows<c10::BFloat16>(x, padded);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be bf16 or fp32, got ", x.scalar_type());
  return quantize_rows<float>(x, padded);
}

}  // namespace

// x's Q8_0 quantization, as the linear layer computes it: (int8 [rows, in], fp32 scales
// [rows, in / 32]).
std::tuple<at::Tensor, at::Tensor> w8a8_quantize(at::Tensor x) {
  QuantizedRows q = quantize(x, x.size(0));
  return {q.q, q.scale};
}

at::Tensor w8a8_linear(at::Tensor x, at::Tensor packed, at::Tensor scales, int64_t out_features,
                       c10::optional<at::Tensor> bias) {
  const int64_t rows = x.dim() == 2 ? x.size(0) : 0;
  const bool amx = use_amx(rows);
  const int64_t tiles = (rows + kAmxTileRows - 1) / kAmxTileRows;
  const QuantizedRows q = quantize(x, amx ? tiles * kAmxTileRows : rows);
  check_weights(packed, scales, x.size(1), out_features);
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) bias_f = bias->to(at::kFloat).contiguous();
  const Layer L{x.size(0),
                x.size(1),
                out_features,
                x.size(1) / kGroup,
                q.q.data_ptr<int8_t>(),
                kVnni ? nullptr : q.magnitude.data_ptr<uint8_t>(),
                kVnni ? q.offset.data_ptr<int32_t>() : nullptr,
                q.scale.data_ptr<float>(),
                packed.data_ptr<int8_t>(),
                scales.data_ptr<float>(),
                bias_f.defined() ? bias_f.data_ptr<float>() : nullptr};
  auto out = at::empty({x.size(0), out_features}, x.options());
  const bool bf16 = x.scalar_type() == at::kBFloat16;
#if defined(KVRAY_AMX_INT8)
  if (amx && bf16) {
    linear_amx<c10::BFloat16>(L, out.data_ptr<c10::BFloat16>());
  } else if (amx) {
    linear_amx<float>(L, out.data_ptr<float>());
  } else
#endif
  if (bf16) {
    linear<c10::BFloat16>(L, out.data_ptr<c10::BFloat16>());
  } else {
    linear<float>(L, out.data_ptr<float>());
  }
  return out;
}

// bf16(weight * scale) in rows, [out_features, in_features]: the weights the layer's products
// stand for, for inputs of many rows on CPUs with AMX, where one oneDNN matmul over them in bf16
// (the tile unit) beats this file's kernel. The fp32 product of an int8 and a bf16 scale is
// exact, so this is Int8Linear's `dequantized(bf16)` of the same quantized weights.
at::Tensor w8a8_dequantize(at::Tensor packed, at::Tensor scales, int64_t out_features) {
  const int64_t in = packed.size(1) * 4;
  check_weights(packed, scales, in, out_features);
  auto out = at::empty({out_features, in}, packed.options().dtype(at::kBFloat16));
  const int8_t* w = packed.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  c10::BFloat16* y = out.data_ptr<c10::BFloat16>();
  const int64_t quads = in / 4, groups = in / kGroup;
  at::parallel_for(0, out_features, kPanel, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t panel = n / kPanel, lane = n % kPanel;
      const int8_t* w_row = w + panel * quads * kPanel * 4 + lane * 4;  // quad q at q * 64
      const float* s_row = s + panel * groups * kPanel + lane;         // group g at g * 16
      c10::BFloat16* y_row = y + n * in;
#if defined(__AVX512BF16__)
      // a group's 8 quads of this lane (one 32-bit gather), widened, scaled, rounded as
      // c10::BFloat16 rounds (nearest even)
      const __m256i offsets = _mm256_setr_epi32(0, 64, 128, 192, 256, 320, 384, 448);
      for (int64_t g = 0; g < groups; ++g) {
        const __m256i q = _mm256_i32gather_epi32(
            reinterpret_cast<const int*>(w_row + g * 8 * kPanel * 4), offsets, 1);
        const __m512 scale = _mm512_set1_ps(s_row[g * kPanel]);
        const __m512 lo = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))), scale);
        const __m512 hi = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))), scale);
        _mm512_storeu_si512(y_row + g * kGroup, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
#else
      for (int64_t k = 0; k < in; ++k) {
        const float weight = w_row[(k / 4) * kPanel * 4 + k % 4];
        y_row[k] = c10::BFloat16(weight * s_row[(k / kGroup) * kPanel]);
      }
#endif
    }
  });
  return out;
}

// Which paths this build runs: "avx512-vnni" or "avx2", with "+amx-int8" where inputs of
// kAmxRows rows or more take the tile unit.
std::string w8a8_isa() {
  return std::string(kVnni ? "avx512-vnni" : "avx2") + (use_amx(kAmxRows) ? "+amx-int8" : "");
}
#endif

TORCH_LIBRARY_FRAGMENT(kvray, m) {
#if defined(__AVX2__) && defined(__FMA__)
  m.def("w8a8_linear(Tensor x, Tensor packed, Tensor scales, int out_features, Tensor? bias) -> Tensor");
  m.def("w8a8_quantize(Tensor x) -> (Tensor, Tensor)");
  m.def("w8a8_dequantize(Tensor packed, Tensor scales, int out_features) -> Tensor");
  m.def("w8a8_isa() -> str", &w8a8_isa);  // no tensor to dispatch on: one kernel for all
#endif
}

TORCH_LIBRARY_IMPL(kvray, CPU, m) {
#if defined(__AVX2__) && defined(__FMA__)
  m.impl("w8a8_linear", &w8a8_linear);
  m.impl("w8a8_quantize", &w8a8_quantize);
  m.impl("w8a8_dequantize", &w8a8_dequantize);
#endif
}
