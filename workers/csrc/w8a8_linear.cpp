// int8 x int8 linear layer on CPU (`quantization: w8a8`): y = x @ W^T + bias, with the
// activations quantized on the fly, one scale per row (per token).
//
// Weight-only int8 (int8_linear.cpp, int8_panel.cpp) widens every weight to fp32 or bf16 before
// multiplying, which costs more than it saves once a batch makes the layer compute-bound. Here
// both operands stay int8. One scale per row and per output feature leaves nothing to scale
// until a row's whole dot is summed, so the integer sums run the full depth of the layer (on
// AMX, in the tile unit's registers). A row's few large inputs (outlier channels) would set its
// one scale and leave the rest with few levels, so each row is first rotated, one block of 32
// inputs at a time, by the 32 x 32 Hadamard matrix H (entries +-1, H H = 32 I), which spreads
// an outlier over its block; the weights were rotated alike at load (W H / 32, see
// workers/w8a8.py), so the product is the layer's: (W H / 32)(H x) = W x. Then:
//
//   z = H x (per block of 32)   xs[m] = max |z[m]| / 127   xq[m] = round(z[m] / xs[m])
//   y[m, n] = bias[n] + float(sum_k xq[m, k] * wq[n, k]) * (xs[m] * ws[n])
//
//   x       [rows, in_features]              bf16 or fp32, in_features a multiple of 32
//   packed  [panels, padded / 4, 32, 4]      int8 in [-127, 127]: the rotated weights in panels
//                                            of 32 output features, each quad row the 32
//                                            features' weights for 4 inputs (out_features
//                                            padded with zero features, inputs with zero
//                                            inputs to `padded`, a multiple of 64; see
//                                            `to_panels` in workers/w8a8.py)
//   scales  [panels, 1, 32]                  fp32, one a feature
//   bias    [out_features] or None           any float dtype, added in fp32
// Returns [rows, out_features] in x's dtype. The int32 sum is exact on every path (at most
// 127 * 127 * padded), and each path then does the same fp32 operations, so a row's output is
// the same bits whichever path its batch takes: it does not depend on the batch's size.
//
// Each feature's products land in its own 32-bit lane: a row's 4 inputs of a quad are broadcast
// against a slice of a panel's quad row (64 bytes: 16 features x 4 inputs, one 512-bit
// register), summed in s32 lanes; the lanes are the outputs, no reduction across lanes. A panel
// is two slices side by side, so a tile that takes both reads its weights as one stream of
// 128-byte quad rows: one row's decode step, which reads every weight once, pulls them at the
// read bandwidth (2 cores of a Zen 4 EPYC: 27 GB/s from panels of 16 features, two streams a
// tile; 55 GB/s from one stream). Paths, one layout:
//
// AVX512-VNNI (`#if defined(__AVX512VNNI__)`; cpu_kernels.py builds with -march=native): one
// `vpdpbusd` (u8 x s8, quads summed into s32, nothing saturates) per row and slice per quad.
// Its first operand is unsigned, so the weights are read as w + 128 (one xor a panel's quad
// row, shared by the tile's rows) against the signed activations, and each row's sum starts
// at -128 * (its int8 values' sum, computed while quantizing): the exact dot again. A tile is
// 4 rows x 1 panel (8 s32 accumulators of 32).
//
// AVX2 + FMA: a slice is two 8-lane halves; `vpmaddubsw` (u8 x s8 -> s16 pairs) and
// `vpmaddwd` with ones (-> s32 quads), with llama.cpp's signs: |x| as the unsigned operand and
// x's sign moved onto the weights (`vpsignb`), so no s16 sum can saturate (at most
// 2 * 127 * 127). A tile is 4 rows x 1 slice (8 s32 accumulators of 16), so a slice's quad
// row, read from L2 when the rows are many, serves 4 rows.
//
// AMX-INT8 (`#if defined(__AMX_INT8__)`; inputs of kAmxRows rows or more, where Linux grants
// the tile state, else the VNNI path): `_tile_dpbssd` (signed x signed, no offset) multiplies
// 16 rows x 64 inputs (a tile loaded straight from the quantized rows, padded with zero rows to
// whole tiles) by 64 inputs of a slice (16 quad rows, straight from the panels above, 128 bytes
// apart) into 16 x 16 s32 sums; a block is 32 rows x 1 panel (4 sum tiles), every input of the
// layer summed in the tiles, then stored once and scaled with AVX512.

#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

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
constexpr int kTileSlices = 2;  // slices per tile: a whole panel
#else
constexpr bool kVnni = false;
constexpr int kTileRows = 4;  // 8 accumulators, 2 weight halves, 2 broadcasts, ones: 13 ymm
constexpr int kTileSlices = 1;
#endif
constexpr int64_t kBlock = 32;  // inputs per rotated block
constexpr int64_t kDepth = 64;  // inputs are padded to a multiple of this: one tile product's
constexpr int64_t kSlice = 16;  // output features per slice: one s32 or fp32 lane each
constexpr int64_t kPanel = 2 * kSlice;  // output features per panel, two slices side by side
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

// The Hadamard transform of 32 values (v[0]: 0..7, ... v[3]: 24..31), unnormalized:
// butterflies (a + b, a - b) on pairs i, i + h for h = 1, 2, 4, 8, 16 in that order, in fp32.
// NOTE: w8a8.py's `hadamard32` does the same additions in the same order: the same bits.
inline void hadamard32(__m256 v[4]) {
  // h = 1, 2, 4: partners within a register; a lane whose bit h is set takes partner - self
  for (int i = 0; i < 4; ++i) {
    __m256 p = _mm256_permute_ps(v[i], 0xB1);  // partners i ^ 1
    v[i] = _mm256_blend_ps(_mm256_add_ps(v[i], p), _mm256_sub_ps(p, v[i]), 0xAA);
    p = _mm256_permute_ps(v[i], 0x4E);  // i ^ 2
    v[i] = _mm256_blend_ps(_mm256_add_ps(v[i], p), _mm256_sub_ps(p, v[i]), 0xCC);
    p = _mm256_permute2f128_ps(v[i], v[i], 0x01);  // i ^ 4: the 128-bit halves swapped
    v[i] = _mm256_blend_ps(_mm256_add_ps(v[i], p), _mm256_sub_ps(p, v[i]), 0xF0);
  }
  for (int h = 1; h <= 2; h *= 2) {  // h = 8, 16: partners a register (or two) apart
    for (int i = 0; i < 4; ++i) {
      if (i & h) continue;
      const __m256 a = v[i], b = v[i + h];
      v[i] = _mm256_add_ps(a, b);
      v[i + h] = _mm256_sub_ps(a, b);
    }
  }
}

// The activations, quantized, each [rows, padded] row-major: int8 values and one fp32 scale a
// row, and what the path multiplies by: AVX2 the magnitudes (its unsigned operand), VNNI each
// row's offset, -128 x its values' sum (its sums start there).
struct QuantizedRows {
  at::Tensor q, scale;   // int8 [padded rows, padded]; fp32 [padded rows]
  at::Tensor magnitude;  // AVX2: uint8 [rows, padded]
  at::Tensor offset;     // VNNI: int32 [rows]
};

// Row x (in values) rotated into z, then quantized into q and magnitude (zeros from in to
// padded): amax / 127 as its scale, round(z * (127 / amax)) (nearest even) as its values.
// NOTE: the same fp32 operations as the torch reference, in the same order, so bit for bit.
template <typename T>
void quantize_row(const T* x, int64_t in, int64_t padded, float* z, int8_t* q,
                  uint8_t* magnitude, float* scale, int32_t* offset) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  __m256 amax = _mm256_setzero_ps();
  for (int64_t k = 0; k < in; k += kBlock) {
    __m256 v[4];
    for (int i = 0; i < 4; ++i) v[i] = load8(x + k + 8 * i);
    hadamard32(v);
    for (int i = 0; i < 4; ++i) {
      _mm256_storeu_ps(z + k + 8 * i, v[i]);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[i]));
    }
  }
  const float a = hmax(amax);
  *scale = a / 127.0f;
  const __m256 inv = _mm256_set1_ps(a > 0.0f ? 127.0f / a : 0.0f);
  __m256i sum = _mm256_setzero_si256();
  for (int64_t k = 0; k < in; k += kBlock) {
    __m256i n[4];
    for (int i = 0; i < 4; ++i)
      n[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(z + k + 8 * i), inv));  // even
    // packs interleave 128-bit lanes: the permute puts the 32 bytes back in input order.
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]),
                                              _mm256_packs_epi32(n[2], n[3]));
    const __m256i ordered =
        _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), ordered);
    if constexpr (kVnni) {
      sum = _mm256_add_epi32(sum, _mm256_add_epi32(_mm256_add_epi32(n[0], n[1]),
                                                   _mm256_add_epi32(n[2], n[3])));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(magnitude + k),
                          _mm256_sign_epi8(ordered, ordered));
    }
  }
  std::memset(q + in, 0, padded - in);
  if constexpr (kVnni) {
    *offset = -128 * hsum_epi32(sum);
  } else {
    std::memset(magnitude + in, 0, padded - in);
  }
}

// Inputs padded to whole tile products, as the weights are.
int64_t padded_inputs(int64_t in) { return (in + kDepth - 1) / kDepth * kDepth; }

// x's rows quantized into `padded_rows` rows (>= x's; the extra ones zeros, with zero scales).
template <typename T>
QuantizedRows quantize_rows(const at::Tensor& x, int64_t padded_rows) {
  const int64_t rows = x.size(0), in = x.size(1), padded = padded_inputs(in);
  const at::Tensor xc = x.contiguous();
  QuantizedRows out;
  out.q = at::empty({padded_rows, padded}, x.options().dtype(at::kChar));
  out.scale = at::zeros({padded_rows}, x.options().dtype(at::kFloat));
  if (padded_rows > rows) out.q.narrow(0, rows, padded_rows - rows).zero_();
  if constexpr (kVnni) {
    out.offset = at::empty({rows}, x.options().dtype(at::kInt));
  } else {
    out.magnitude = at::empty({rows, padded}, x.options().dtype(at::kByte));
  }
  const T* xp = xc.data_ptr<T>();
  int8_t* q = out.q.data_ptr<int8_t>();
  float* s = out.scale.data_ptr<float>();
  uint8_t* mag = kVnni ? nullptr : out.magnitude.data_ptr<uint8_t>();
  int32_t* off = kVnni ? out.offset.data_ptr<int32_t>() : nullptr;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> z(in);
    for (int64_t m = begin; m < end; ++m) {
      quantize_row(xp + m * in, in, padded, z.data(), q + m * padded,
                   kVnni ? nullptr : mag + m * padded, s + m, kVnni ? off + m : nullptr);
    }
  });
  return out;
}

struct Layer {
  int64_t rows, in, out;   // in: the padded inputs, a row's stride
  const int8_t* xq;        // [rows, in]
  const uint8_t* xmag;     // AVX2: [rows, in]
  const int32_t* xoffset;  // VNNI: [rows]
  const float* xs;         // [rows]
  const int8_t* w;         // [panels, in / 4, 32, 4]
  const float* ws;         // [panels, 32]
  const float* bias;       // fp32 or nullptr

  // Slice u's quad row at input k (a multiple of 4) is slice(u) + k * kPanel: 64 bytes of the
  // panel's 128-byte quad row.
  const int8_t* slice(int64_t u) const { return w + (u / 2) * in * kPanel + (u % 2) * 4 * kSlice; }
  const float* slice_scales(int64_t u) const { return ws + u * kSlice; }
  int32_t quad(const int8_t* values, int64_t m, int64_t k) const {  // 4 inputs from k
    int32_t v;
    std::memcpy(&v, values + m * in + k, 4);
    return v;
  }
};

// Row m's 16 sums of slice u (fp32 lanes, in order) into `out`, plus the bias where there is
// one; bf16 rounded to nearest even, as c10::BFloat16 rounds; the padding of the last panel is
// dropped. Every path stores through here, so they round alike.
template <typename T>
inline void store(const Layer& L, int64_t m, int64_t u, const float* sums, T* out) {
  const int64_t n0 = u * kSlice, count = std::min<int64_t>(kSlice, L.out - n0);
  if (count <= 0) return;  // the last panel's second slice, all padding
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
// kRows rows (from m0) x kSlices slices (from u0), one zmm of 16 features a row and slice.
template <int kRows, int kSlices, typename T>
inline void tile(const Layer& L, int64_t m0, int64_t u0, T* out) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // w ^ 0x80 == u8(w + 128)
  __m512i dots[kRows][kSlices];
  for (int m = 0; m < kRows; ++m) {
    const __m512i offset = _mm512_set1_epi32(L.xoffset[m0 + m]);
    for (int j = 0; j < kSlices; ++j) dots[m][j] = offset;
  }
  for (int64_t k = 0; k < L.in; k += 4) {
    __m512i w[kSlices];
    for (int j = 0; j < kSlices; ++j)
      w[j] = _mm512_xor_si512(_mm512_loadu_si512(L.slice(u0 + j) + k * kPanel), flip);
    for (int m = 0; m < kRows; ++m) {
      const __m512i a = _mm512_set1_epi32(L.quad(L.xq, m0 + m, k));
      for (int j = 0; j < kSlices; ++j) dots[m][j] = _mm512_dpbusd_epi32(dots[m][j], w[j], a);
    }
  }
  alignas(64) float sums[kSlice];
  for (int j = 0; j < kSlices; ++j) {
    const __m512 ws = _mm512_loadu_ps(L.slice_scales(u0 + j));
    for (int m = 0; m < kRows; ++m) {
      const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(L.xs[m0 + m]), ws);
      _mm512_store_ps(sums, _mm512_mul_ps(_mm512_cvtepi32_ps(dots[m][j]), scale));
      store(L, m0 + m, u0 + j, sums, out);
    }
  }
}
#else
// kRows rows (from m0) x kSlices slices (from u0), two ymm halves of 8 features a row and slice.
template <int kRows, int kSlices, typename T>
inline void tile(const Layer& L, int64_t m0, int64_t u0, T* out) {
  constexpr int kHalves = 2 * kSlices;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i dots[kRows][kHalves];
  for (int m = 0; m < kRows; ++m)
    for (int h = 0; h < kHalves; ++h) dots[m][h] = _mm256_setzero_si256();
  for (int64_t k = 0; k < L.in; k += 4) {
    __m256i w[kHalves];
    for (int h = 0; h < kHalves; ++h)
      w[h] = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(L.slice(u0 + h / 2) + k * kPanel + 32 * (h % 2)));
    for (int m = 0; m < kRows; ++m) {
      const __m256i a = _mm256_set1_epi32(L.quad(L.xq, m0 + m, k));
      const __m256i mag =
          _mm256_set1_epi32(L.quad(reinterpret_cast<const int8_t*>(L.xmag), m0 + m, k));
      for (int h = 0; h < kHalves; ++h) {
        const __m256i pairs = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(w[h], a));
        dots[m][h] = _mm256_add_epi32(dots[m][h], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
  alignas(32) float sums[kSlice];
  for (int m = 0; m < kRows; ++m)
    for (int j = 0; j < kSlices; ++j) {
      for (int h = 0; h < 2; ++h) {
        const __m256 scale = _mm256_mul_ps(_mm256_set1_ps(L.xs[m0 + m]),
                                           _mm256_loadu_ps(L.slice_scales(u0 + j) + 8 * h));
        _mm256_store_ps(sums + 8 * h,
                        _mm256_mul_ps(_mm256_cvtepi32_ps(dots[m][2 * j + h]), scale));
      }
      store(L, m0 + m, u0 + j, sums, out);
    }
}
#endif

// Slices [u0, u0 + kTileSlices) for rows [m_begin, m_end), a tile of rows at a time.
template <typename T>
void slices(const Layer& L, int64_t u0, int64_t m_begin, int64_t m_end, T* out) {
  for (int64_t m0 = m_begin; m0 < m_end; m0 += kTileRows) {
    const int64_t count = std::min<int64_t>(kTileRows, m_end - m0);
    with_rows<kTileRows>(count, [&](auto rows) {
      tile<decltype(rows)::value, kTileSlices>(L, m0, u0, out);
    });
  }
}

// NOTE: loop order: each thread takes a range of tiles' slices, kChunk features at a time;
// within a chunk, a tile of rows meets every slice before the next tile starts, so a chunk's
// weights come from memory once and from L2 for the other tiles, and a tile's activations
// (kTileRows x in bytes) stay in L1.
template <typename T>
void linear(const Layer& L, T* out) {
  static_assert(kPanel % (kSlice * kTileSlices) == 0, "a tile's slices lie in one panel");
  const int64_t num_slices = (L.out + kPanel - 1) / kPanel * (kPanel / kSlice);
  const int64_t steps = num_slices / kTileSlices;
  constexpr int64_t kChunkSteps = std::max<int64_t>(1, kChunk / (kSlice * kTileSlices));
  at::parallel_for(0, steps, 4, [&](int64_t begin, int64_t end) {
    for (int64_t c0 = begin; c0 < end; c0 += kChunkSteps) {
      const int64_t c1 = std::min(end, c0 + kChunkSteps);
      for (int64_t m0 = 0; m0 < L.rows; m0 += kTileRows) {
        const int64_t m1 = std::min(L.rows, m0 + kTileRows);
        for (int64_t c = c0; c < c1; ++c) slices(L, c * kTileSlices, m0, m1, out);
      }
    }
  });
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
// is per thread): 0, 1: activations, 16 rows x 64 inputs; 2, 3: weights, 16 quad rows (64
// inputs) of a panel; 4..7: sums, 16 rows x 16 features of s32. All 16 x 64 bytes.
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

TileConfig tile_shapes() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.rows[t] = kAmxTileRows, c.colsb[t] = kDepth;
  return c;
}

// NOTE: a global, not a local: GCC 12 drops the stores into a local configuration before
// `ldtilecfg` (it does not see the instruction read all 64 bytes), and the tiles then fault.
alignas(64) const TileConfig kTileShapes = tile_shapes();

// One block: kRowTiles x 16 rows (from m0; L.xq padded to whole tiles) x panel p's two slices,
// every input into the same sum tiles, then the sums times both scales, one row at a time,
// with the VNNI path's operations (so the two give the same bits).
// NOTE: literal tile numbers in each branch: GCC's tile intrinsics paste their tile numbers
// into the assembly, so they must be literals, not template arguments.
template <int kRowTiles, typename T>
void amx_block(const Layer& L, int64_t m0, int64_t p, T* out) {
  _tile_zero(4);
  _tile_zero(5);
  if constexpr (kRowTiles == 2) {
    _tile_zero(6);
    _tile_zero(7);
  }
  const int8_t* a = L.xq + m0 * L.in;
  const int8_t* b = L.slice(2 * p);  // the second slice's quad rows 4 * kSlice bytes on
  for (int64_t k = 0; k < L.in; k += kDepth) {
    _tile_loadd(0, a + k, L.in);
    _tile_loadd(2, b + k * kPanel, 4 * kPanel);
    _tile_loadd(3, b + 4 * kSlice + k * kPanel, 4 * kPanel);
    _tile_dpbssd(4, 0, 2);
    _tile_dpbssd(5, 0, 3);
    if constexpr (kRowTiles == 2) {
      _tile_loadd(1, a + kAmxTileRows * L.in + k, L.in);
      _tile_dpbssd(6, 1, 2);
      _tile_dpbssd(7, 1, 3);
    }
  }
  alignas(64) int32_t dots[2][2][kAmxTileRows][kSlice];  // [row tile][slice]
  _tile_stored(4, dots[0][0], 4 * kSlice);
  _tile_stored(5, dots[0][1], 4 * kSlice);
  if constexpr (kRowTiles == 2) {
    _tile_stored(6, dots[1][0], 4 * kSlice);
    _tile_stored(7, dots[1][1], 4 * kSlice);
  }
  alignas(64) float sums[kSlice];
  for (int t = 0; t < kRowTiles; ++t) {
    const int64_t count = std::min<int64_t>(kAmxTileRows, L.rows - m0 - t * kAmxTileRows);
    for (int64_t r = 0; r < count; ++r) {
      const int64_t m = m0 + t * kAmxTileRows + r;
      for (int j = 0; j < 2; ++j) {
        const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(L.xs[m]),
                                           _mm512_loadu_ps(L.slice_scales(2 * p + j)));
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_load_si512(dots[t][j][r]));
        _mm512_store_ps(sums, _mm512_mul_ps(dot, scale));
        store(L, m, 2 * p + j, sums, out);
      }
    }
  }
}

// NOTE: loop order: each thread takes a range of panels; a panel's weights (in x 32 bytes:
// 18 KiB at 576 inputs) stay in L1 while every block of 32 rows meets them, the rows (padded x
// in bytes) in L2.
template <typename T>
void linear_amx(const Layer& L, T* out) {
  const int64_t num_panels = (L.out + kPanel - 1) / kPanel;
  const int64_t padded = (L.rows + kAmxTileRows - 1) / kAmxTileRows * kAmxTileRows;
  at::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
    _tile_loadconfig(&kTileShapes);
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t m0 = 0; m0 < padded; m0 += 2 * kAmxTileRows) {
        if (m0 + kAmxTileRows < padded) {
          amx_block<2>(L, m0, p, out);
        } else {
          amx_block<1>(L, m0, p, out);
        }
      }
    }
    _tile_release();
  });
}
#endif

void check_weights(const at::Tensor& packed, const at::Tensor& scales, int64_t padded,
                   int64_t out) {
  const int64_t num_panels = (out + kPanel - 1) / kPanel;
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.is_contiguous() && packed.dim() == 4 &&
                  packed.size(0) == num_panels && packed.size(1) == padded / 4 &&
                  packed.size(2) == kPanel && packed.size(3) == 4,
              "packed must be contiguous int8 [", num_panels, ", ", padded / 4, ", 32, 4], got ",
              packed.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.dim() == 3 && scales.size(0) == num_panels && scales.size(1) == 1 &&
                  scales.size(2) == kPanel,
              "scales must be contiguous fp32 [", num_panels, ", 1, 32], got ", scales.sizes());
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

// x quantized into `padded_rows` rows (see quantize_rows).
QuantizedRows quantize(const at::Tensor& x, int64_t padded_rows) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-d [rows, in_features]");
  TORCH_CHECK(x.size(1) % kBlock == 0, "in_features must be a multiple of 32, got ", x.size(1));
  if (x.scalar_type() == at::kBFloat16) return quantize_rows<c10::BFloat16>(x, padded_rows);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be bf16 or fp32, got ", x.scalar_type());
  return quantize_rows<float>(x, padded_rows);
}

}  // namespace

// x rotated and quantized as the linear layer does it: (int8 [rows, padded], fp32 scales
// [rows]), padded with zeros to a multiple of 64 inputs.
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
  const int64_t padded = padded_inputs(x.size(1));
  check_weights(packed, scales, padded, out_features);
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) bias_f = bias->to(at::kFloat).contiguous();
  const Layer L{rows,
                padded,
                out_features,
                q.q.data_ptr<int8_t>(),
                kVnni ? nullptr : q.magnitude.data_ptr<uint8_t>(),
                kVnni ? q.offset.data_ptr<int32_t>() : nullptr,
                q.scale.data_ptr<float>(),
                packed.data_ptr<int8_t>(),
                scales.data_ptr<float>(),
                bias_f.defined() ? bias_f.data_ptr<float>() : nullptr};
  auto out = at::empty({rows, out_features}, x.options());
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
  m.def("w8a8_isa() -> str", &w8a8_isa);  // no tensor to dispatch on: one kernel for all
#endif
}

TORCH_LIBRARY_IMPL(kvray, CPU, m) {
#if defined(__AVX2__) && defined(__FMA__)
  m.impl("w8a8_linear", &w8a8_linear);
  m.impl("w8a8_quantize", &w8a8_quantize);
#endif
}
