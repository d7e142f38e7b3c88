// Paged decode attention on CPU: one query token per sequence, read straight from the block table.
//
// The torch path gathers every block of every sequence into a contiguous tensor, transposes it
// for the matmul (a second copy) and runs many small batched matmuls; on 2 cores that is 5-10x
// the cost of reading the keys and values once. This kernel reads each cached key and value row
// once, where it lies, and keeps scores, softmax and the weighted sum in fp32. bf16 with
// head_dim 64 or 128 on a CPU with AVX512-BF16 takes a path with far fewer instructions per row
// (`attend_bf16`: 2.7-2.9x the generic one at SmolLM2-135M's shape, 160-256 tokens; 1.9x at 600).
// A CPU with AVX2 + FMA and no AVX-512 takes `attend_avx2` for head_dim a multiple of 32, bf16
// or fp32, built the same way with 8-lane registers. Both prefetch the rows they will read
// (`kPrefetchRows`), and every path hands out its (sequence, kv heads) items longest first, one
// at a time (`WorkQueue`).
//
// Layouts (those of kvray.workers.kv_cache and attention):
//   query        [num_seqs, num_heads, head_dim]            bf16 or fp32
//   key/value    [num_blocks * block_size, num_kv_heads, head_dim], the query's dtype
//   block_table  [num_seqs, max_blocks] int64, padded with any valid block id
//   context_lens [num_seqs] int64: tokens each query attends to (its position + 1)
//   window       > 0: attend to the last `window` tokens only (sliding-window models)
// Returns [num_seqs, num_heads, head_dim] in the query's dtype.

#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "vec.h"

#if defined(__AVX512BF16__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int kLanes = 16;  // head_dim must be a multiple

// A step's work items, heaviest first, handed out one at a time: each thread takes the next
// item when it finishes one. A batch's contexts differ by 10x and more (16 to 768 tokens in a
// mixed batch), and an even split of the items by count left one thread waiting on the other.
class WorkQueue {
 public:
  template <typename Weight>
  WorkQueue(int64_t count, Weight weight) : order_(count) {
    std::iota(order_.begin(), order_.end(), int64_t(0));
    std::stable_sort(order_.begin(), order_.end(),
                     [&](int64_t a, int64_t b) { return weight(a) > weight(b); });
  }
  // Runs body(pop) on each thread; pop() gives the next item, or -1 when none is left.
  template <typename Body>
  void run(Body&& body) {
    const int64_t threads = std::max<int64_t>(
        1, std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(order_.size())));
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      body([&]() -> int64_t {
        const size_t i = next_.fetch_add(1, std::memory_order_relaxed);
        return i < order_.size() ? order_[i] : -1;
      });
    });
  }

 private:
  std::vector<int64_t> order_;
  std::atomic<size_t> next_{0};
};

// Tokens a sequence's query attends to: its last `window` where there is a window.
inline int64_t attended(int64_t len, int64_t window) {
  return window > 0 ? std::min(len, window) : len;
}

#if defined(__AVX512BF16__) || defined(__AVX2__)
// Rows a pass prefetches ahead of the row it reads, into L2: the rows of one kv head are 128 or
// 256 bytes every slot's row apart, in blocks scattered over the cache, so the hardware's
// prefetchers leave most of a step's reads (cold: the cache of 30 layers is far larger than
// L3) waiting on memory. On a 2-core Zen 4, SmolLM2's shape, a mixed batch's step, 30 layers:
// 48 rows ahead read 1.4x (blocks in order) to 1.8x (scattered) as fast as none; 16 rows
// ahead into L1 gained little (the L1's misses in flight are few).
constexpr int64_t kPrefetchRows = 48;

inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t c = 0; c < bytes; c += 64) _mm_prefetch(p + c, _MM_HINT_T1);
}
#endif

// GCC/Clang vector types: one AVX-512 register, or two AVX2 ones, whatever -march=native has.
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline f32x16 load16(const c10::BFloat16* p) {  // exact: a bf16 is the top half of an fp32
  u16x16 half;
  std::memcpy(&half, p, sizeof(half));
  u32x16 bits = __builtin_convertvector(half, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// e^x for x <= 0 (softmax after subtracting the maximum): Cephes' expf polynomial, ~1 ulp.
inline f32x16 exp16(f32x16 x) {
  const f32x16 lowest = f32x16{} - 87.3f;
  x = x < lowest ? lowest : x;
  f32x16 fx = x * 1.44269504088896341f + 0.5f;
  f32x16 n = __builtin_convertvector(__builtin_convertvector(fx, i32x16), f32x16);
  n = n > fx ? n - 1.f : n;  // floor
  f32x16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  f32x16 y = 1.9875691500e-4f * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  i32x16 bits = (__builtin_convertvector(n, i32x16) + 127) << 23;
  f32x16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));

inline float reduce_add(f32x16 v) {  // halving shuffles, not 15 scalar adds
  f32x8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
            __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  f32x4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// s[0:span] = e^(s - top) in place; returns their sum (the softmax's denominator).
inline float softmax_numerators(float* s, int64_t span, float top) {
  f32x16 sum16 = f32x16{};
  int64_t t = 0;
  for (; t + kLanes <= span; t += kLanes) {
    const f32x16 e = exp16(load16(s + t) - top);
    std::memcpy(s + t, &e, sizeof(e));
    sum16 += e;
  }
  float total = reduce_add(sum16);
  for (; t < span; ++t) {
    s[t] = std::exp(s[t] - top);
    total += s[t];
  }
  return total;
}

template <typename T>
inline float dot(const float* q, const T* k, int64_t dim) {
  f32x16 acc = load16(q) * load16(k);
  for (int64_t d = kLanes; d < dim; d += kLanes) acc += load16(q + d) * load16(k + d);
  return reduce_add(acc);
}

// acc[0:dim] += p * v[0:dim]
template <typename T>
inline void axpy(float* acc, float p, const T* v, int64_t dim) {
  for (int64_t d = 0; d < dim; d += kLanes) {
    f32x16 a = load16(acc + d) + p * load16(v + d);
    std::memcpy(acc + d, &a, sizeof(a));
  }
}

template <typename T>
void attend(const at::Tensor& query, const at::Tensor& key_cache,
            const at::Tensor& value_cache, const at::Tensor& block_table,
            const at::Tensor& context_lens, int64_t block_size, double scale, int64_t window,
            at::Tensor& out) {
  const int64_t num_seqs = query.size(0), num_heads = query.size(1), dim = query.size(2);
  const int64_t num_kv_heads = key_cache.size(1), group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_table.size(1);
  const T* q_ptr = query.data_ptr<T>();
  const T* k_ptr = key_cache.data_ptr<T>();
  const T* v_ptr = value_cache.data_ptr<T>();
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  T* out_ptr = out.data_ptr<T>();
  const int64_t row = num_kv_heads * dim;  // elements per cache slot

  // A work item is one sequence and a run of its kv heads; each query head of a group shares
  // the keys its kv head reads. With enough sequences an item takes all kv heads, so it reads
  // whole cache rows in order (prefetch-friendly); with few, one kv head each, to use every core.
  const int64_t heads_per_item =
      num_seqs >= 2 * at::get_num_threads() ? num_kv_heads : 1;
  const int64_t items_per_seq = num_kv_heads / heads_per_item;
  WorkQueue queue(num_seqs * items_per_seq,
                  [&](int64_t item) { return attended(lens[item / items_per_seq], window); });
  queue.run([&](auto pop) {
    const int64_t heads = heads_per_item * group;  // query heads per item
    std::vector<float> q(heads * dim), acc(heads * dim), scores, top(heads), total(heads);
    for (int64_t item; (item = pop()) >= 0;) {
      const int64_t seq = item / items_per_seq;
      const int64_t kv_first = (item % items_per_seq) * heads_per_item;
      const int64_t len = lens[seq];
      const int64_t span = attended(len, window), first = len - span;
      const int64_t* blocks = table + seq * max_blocks;
      const T* q_seq = q_ptr + (seq * num_heads + kv_first * group) * dim;
      for (int64_t i = 0; i < heads * dim; ++i) q[i] = static_cast<float>(q_seq[i]) * float(scale);

      scores.resize(heads * span);
      std::fill(top.begin(), top.end(), -std::numeric_limits<float>::infinity());
      for (int64_t t = first; t < len; ++t) {
        const int64_t slot = blocks[t / block_size] * block_size + t % block_size;
        const T* k_row = k_ptr + slot * row + kv_first * dim;
        for (int64_t h = 0; h < heads; ++h) {  // query head h reads kv head h / group
          const float s = dot(q.data() + h * dim, k_row + (h / group) * dim, dim);
          scores[h * span + (t - first)] = s;
          top[h] = std::max(top[h], s);
        }
      }
      for (int64_t h = 0; h < heads; ++h) {
        total[h] = softmax_numerators(scores.data() + h * span, span, top[h]);
      }

      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = first; t < len; ++t) {
        const int64_t slot = blocks[t / block_size] * block_size + t % block_size;
        const T* v_row = v_ptr + slot * row + kv_first * dim;
        for (int64_t h = 0; h < heads; ++h) {
          axpy(acc.data() + h * dim, scores[h * span + (t - first)], v_row + (h / group) * dim, dim);
        }
      }
      T* o = out_ptr + (seq * num_heads + kv_first * group) * dim;
      for (int64_t h = 0; h < heads; ++h) {
        const float inv = 1.f / total[h];
        for (int64_t d = 0; d < dim; ++d) o[h * dim + d] = static_cast<T>(acc[h * dim + d] * inv);
      }
    }
  });
}

#if defined(__AVX512BF16__)
// ---------------------------------------------------------------- bf16 with AVX512-BF16
// The same attention with far fewer instructions per cached row, for head_dim 64 or 128. One
// work item is a sequence and one kv head (its group of query heads):
// - scores: 4 keys at a time, each query head's dot products by vdpbf16ps on the bf16 rows as
//   they are (fp32 sums), the 4 sums reduced together, then scaled: one reduction per 4 scores,
//   not one per score;
// - weighted sum: up to 256 / head_dim query heads at a time keep their output rows in
//   registers, so each value row is widened once and added to all of them.

using kvray::reduce4;

inline __m512bh load_bh(const c10::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }

inline __m512 widen(const c10::BFloat16* p) {  // 16 bf16 -> fp32, exact
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// scores[h][t - first] for the group's heads, 4 keys at a time; returns nothing, fills top[h].
template <int kDim>
inline void score_rows(const c10::BFloat16* q, int64_t heads, const c10::BFloat16* k_ptr,
                       int64_t row, const int64_t* blocks, int64_t block_size, int64_t first,
                       int64_t len, float scale, float* scores, int64_t span, float* top) {
  constexpr int kChunks = kDim / 32;
  auto key = [&](int64_t t) {
    return k_ptr + (blocks[t / block_size] * block_size + t % block_size) * row;
  };
  int64_t t = first;
  for (; t + 4 <= len; t += 4) {
    if (t + kPrefetchRows + 4 <= len) {
      for (int j = 0; j < 4; ++j) prefetch_row(key(t + kPrefetchRows + j), kDim * 2);
    }
    __m512bh k[4][kChunks];
    for (int j = 0; j < 4; ++j) {
      const c10::BFloat16* k_row = key(t + j);
      for (int c = 0; c < kChunks; ++c) k[j][c] = load_bh(k_row + 32 * c);
    }
    for (int64_t h = 0; h < heads; ++h) {
      __m512 acc[4];
      for (int j = 0; j < 4; ++j) {
        acc[j] = _mm512_setzero_ps();
        for (int c = 0; c < kChunks; ++c) {
          acc[j] = _mm512_dpbf16_ps(acc[j], load_bh(q + h * kDim + 32 * c), k[j][c]);
        }
      }
      const __m128 s = _mm_mul_ps(reduce4(acc[0], acc[1], acc[2], acc[3]), _mm_set1_ps(scale));
      _mm_storeu_ps(scores + h * span + (t - first), s);
      const __m128 m = _mm_max_ps(s, _mm_movehl_ps(s, s));
      top[h] = std::max(top[h], std::max(_mm_cvtss_f32(m), _mm_cvtss_f32(_mm_shuffle_ps(m, m, 1))));
    }
  }
  for (; t < len; ++t) {
    const c10::BFloat16* k_row = key(t);
    for (int64_t h = 0; h < heads; ++h) {
      __m512 acc = _mm512_setzero_ps();
      for (int c = 0; c < kChunks; ++c) {
        acc = _mm512_dpbf16_ps(acc, load_bh(q + h * kDim + 32 * c), load_bh(k_row + 32 * c));
      }
      const float s = _mm512_reduce_add_ps(acc) * scale;
      scores[h * span + (t - first)] = s;
      top[h] = std::max(top[h], s);
    }
  }
}

// out[h] = sum_t p[h][t] * v_t / total[h] for kHeads query heads, their rows in registers.
template <int kDim, int kHeads>
inline void weigh_values(const float* p, int64_t span, const c10::BFloat16* v_ptr, int64_t row,
                         const int64_t* blocks, int64_t block_size, int64_t first,
                         const float* total, c10::BFloat16* out) {
  constexpr int kVecs = kDim / 16;
  __m512 acc[kHeads][kVecs];
  for (int h = 0; h < kHeads; ++h)
    for (int d = 0; d < kVecs; ++d) acc[h][d] = _mm512_setzero_ps();
  for (int64_t i = 0; i < span; ++i) {
    const int64_t t = first + i;
    const c10::BFloat16* v_row = v_ptr + (blocks[t / block_size] * block_size + t % block_size) * row;
    if (i + kPrefetchRows < span) {
      const int64_t a = t + kPrefetchRows;
      prefetch_row(v_ptr + (blocks[a / block_size] * block_size + a % block_size) * row, kDim * 2);
    }
    __m512 v[kVecs];
    for (int d = 0; d < kVecs; ++d) v[d] = widen(v_row + 16 * d);
    for (int h = 0; h < kHeads; ++h) {
      const __m512 w = _mm512_set1_ps(p[h * span + i]);
      for (int d = 0; d < kVecs; ++d) acc[h][d] = _mm512_fmadd_ps(w, v[d], acc[h][d]);
    }
  }
  for (int h = 0; h < kHeads; ++h) {
    const __m512 inv = _mm512_set1_ps(1.f / total[h]);
    for (int d = 0; d < kVecs; d += 2) {
      const __m512i b = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(acc[h][d + 1], inv),
                                                     _mm512_mul_ps(acc[h][d], inv));
      _mm512_storeu_si512(out + h * kDim + 16 * d, b);
    }
  }
}

template <int kDim>
void attend_bf16(const at::Tensor& query, const at::Tensor& key_cache,
                 const at::Tensor& value_cache, const at::Tensor& block_table,
                 const at::Tensor& context_lens, int64_t block_size, double scale,
                 int64_t window, at::Tensor& out) {
  constexpr int kMaxHeads = 256 / kDim;  // output rows kept in registers at once
  const int64_t num_seqs = query.size(0), num_heads = query.size(1);
  const int64_t num_kv_heads = key_cache.size(1), group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_table.size(1), row = num_kv_heads * kDim;
  const auto* q_ptr = query.data_ptr<c10::BFloat16>();
  const auto* k_ptr = key_cache.data_ptr<c10::BFloat16>();
  const auto* v_ptr = value_cache.data_ptr<c10::BFloat16>();
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  auto* out_ptr = out.data_ptr<c10::BFloat16>();
  WorkQueue queue(num_seqs * num_kv_heads,
                  [&](int64_t item) { return attended(lens[item / num_kv_heads], window); });
  queue.run([&](auto pop) {
    std::vector<float> scores, top(group), total(group);
    for (int64_t item; (item = pop()) >= 0;) {
      const int64_t seq = item / num_kv_heads, kv = item % num_kv_heads;
      const int64_t len = lens[seq];
      const int64_t span = attended(len, window), first = len - span;
      const int64_t* blocks = table + seq * max_blocks;
      const int64_t head0 = kv * group;
      scores.resize(group * span);
      std::fill(top.begin(), top.end(), -std::numeric_limits<float>::infinity());
      score_rows<kDim>(q_ptr + (seq * num_heads + head0) * kDim, group, k_ptr + kv * kDim, row,
                       blocks, block_size, first, len, float(scale), scores.data(), span,
                       top.data());
      for (int64_t h = 0; h < group; ++h) {
        total[h] = softmax_numerators(scores.data() + h * span, span, top[h]);
      }
      for (int64_t h = 0; h < group; h += kMaxHeads) {
        const int64_t count = std::min<int64_t>(kMaxHeads, group - h);
        auto run = [&](auto heads) {
          weigh_values<kDim, decltype(heads)::value>(
              scores.data() + h * span, span, v_ptr + kv * kDim, row, blocks, block_size, first,
              total.data() + h, out_ptr + (seq * num_heads + head0 + h) * kDim);
        };
        switch (count) {
          case 1: run(std::integral_constant<int, 1>()); break;
          case 2: run(std::integral_constant<int, 2>()); break;
          case 3: if constexpr (kMaxHeads >= 3) run(std::integral_constant<int, 3>()); break;
          default: if constexpr (kMaxHeads >= 4) run(std::integral_constant<int, 4>()); break;
        }
      }
    }
  });
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// ---------------------------------------------------------------- AVX2 + FMA, no AVX-512
// The generic path's f32x16 is two ymm registers, and it reduces each score on its own and
// adds each value row to memory. Here, as in `attend_bf16`: one work item is a sequence and one
// kv head; up to kMaxHeads query heads of its group at a time share each widened key and value
// chunk (so every cached element is widened once a pass), 4 keys' sums are reduced together,
// and the output rows of a pass are kept in registers (16 ymm: 12 sums, 3 weights, 1 row).

constexpr int kMaxHeads = 3;  // query heads a pass: 3 x 4 sums + 3 + 1 = 16 ymm registers
constexpr int kSpan = 32;     // output dims a pass of the weighted sum keeps in registers

inline __m256 widen8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 widen8(const c10::BFloat16* p) {  // exact: a bf16 is the top half of an fp32
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

inline __m128 reduce4_avx2(__m256 a, __m256 b, __m256 c, __m256 d) {  // [sum a, .., sum d]
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

inline float reduce8(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

// scores[h][t - first] = q_h . k_t for kHeads query heads (q scaled, fp32), 4 keys at a time.
template <int kDim, int kHeads, typename T>
inline void score_rows_avx2(const float* q, const T* k_ptr, int64_t row, const int64_t* blocks,
                            int64_t block_size, int64_t first, int64_t len, float* scores,
                            int64_t span, float* top) {
  auto key = [&](int64_t t) {
    return k_ptr + (blocks[t / block_size] * block_size + t % block_size) * row;
  };
  int64_t t = first;
  for (; t + 4 <= len; t += 4) {
    if (t + kPrefetchRows + 4 <= len) {
      for (int j = 0; j < 4; ++j) prefetch_row(key(t + kPrefetchRows + j), kDim * sizeof(T));
    }
    const T* k[4] = {key(t), key(t + 1), key(t + 2), key(t + 3)};
    __m256 acc[kHeads][4];
    for (int h = 0; h < kHeads; ++h)
      for (int j = 0; j < 4; ++j) acc[h][j] = _mm256_setzero_ps();
    for (int d = 0; d < kDim; d += 8) {
      __m256 qd[kHeads];
      for (int h = 0; h < kHeads; ++h) qd[h] = _mm256_loadu_ps(q + h * kDim + d);
      for (int j = 0; j < 4; ++j) {
        const __m256 kd = widen8(k[j] + d);
        for (int h = 0; h < kHeads; ++h) acc[h][j] = _mm256_fmadd_ps(qd[h], kd, acc[h][j]);
      }
    }
    for (int h = 0; h < kHeads; ++h) {
      const __m128 s = reduce4_avx2(acc[h][0], acc[h][1], acc[h][2], acc[h][3]);
      _mm_storeu_ps(scores + h * span + (t - first), s);
      const __m128 m = _mm_max_ps(s, _mm_movehl_ps(s, s));
      top[h] = std::max(top[h], std::max(_mm_cvtss_f32(m), _mm_cvtss_f32(_mm_movehdup_ps(m))));
    }
  }
  for (; t < len; ++t) {
    const T* k_row = key(t);
    for (int h = 0; h < kHeads; ++h) {
      __m256 acc = _mm256_setzero_ps();
      for (int d = 0; d < kDim; d += 8) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * kDim + d), widen8(k_row + d), acc);
      }
      const float s = reduce8(acc);
      scores[h * span + (t - first)] = s;
      top[h] = std::max(top[h], s);
    }
  }
}

// out[h] = sum_t p[h][t] * v_t / total[h] for kHeads query heads, kSpan dims a pass.
template <int kDim, int kHeads, typename T>
inline void weigh_values_avx2(const float* p, int64_t span, const T* v_ptr, int64_t row,
                              const int64_t* blocks, int64_t block_size, int64_t first,
                              const float* total, T* out) {
  constexpr int kVecs = kSpan / 8;
  for (int d0 = 0; d0 < kDim; d0 += kSpan) {
    __m256 acc[kHeads][kVecs];
    for (int h = 0; h < kHeads; ++h)
      for (int d = 0; d < kVecs; ++d) acc[h][d] = _mm256_setzero_ps();
    for (int64_t i = 0; i < span; ++i) {
      const int64_t t = first + i;
      const T* v_row = v_ptr + (blocks[t / block_size] * block_size + t % block_size) * row + d0;
      if (i + kPrefetchRows < span) {
        const int64_t a = t + kPrefetchRows;
        prefetch_row(v_ptr + (blocks[a / block_size] * block_size + a % block_size) * row + d0,
                     kSpan * sizeof(T));
      }
      __m256 w[kHeads];
      for (int h = 0; h < kHeads; ++h) w[h] = _mm256_broadcast_ss(p + h * span + i);
      for (int d = 0; d < kVecs; ++d) {
        const __m256 v = widen8(v_row + 8 * d);
        for (int h = 0; h < kHeads; ++h) acc[h][d] = _mm256_fmadd_ps(w[h], v, acc[h][d]);
      }
    }
    for (int h = 0; h < kHeads; ++h) {
      const __m256 inv = _mm256_set1_ps(1.f / total[h]);
      alignas(32) float row_out[kSpan];
      for (int d = 0; d < kVecs; ++d) _mm256_store_ps(row_out + 8 * d, _mm256_mul_ps(acc[h][d], inv));
      for (int d = 0; d < kSpan; ++d) out[h * kDim + d0 + d] = static_cast<T>(row_out[d]);
    }
  }
}

template <int kDim, typename T>
void attend_avx2(const at::Tensor& query, const at::Tensor& key_cache,
                 const at::Tensor& value_cache, const at::Tensor& block_table,
                 const at::Tensor& context_lens, int64_t block_size, double scale,
                 int64_t window, at::Tensor& out) {
  const int64_t num_seqs = query.size(0), num_heads = query.size(1);
  const int64_t num_kv_heads = key_cache.size(1), group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_table.size(1), row = num_kv_heads * kDim;
  const T* q_ptr = query.data_ptr<T>();
  const T* k_ptr = key_cache.data_ptr<T>();
  const T* v_ptr = value_cache.data_ptr<T>();
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  T* out_ptr = out.data_ptr<T>();
  WorkQueue queue(num_seqs * num_kv_heads,
                  [&](int64_t item) { return attended(lens[item / num_kv_heads], window); });
  queue.run([&](auto pop) {
    std::vector<float> q(group * kDim), scores, top(group), total(group);
    for (int64_t item; (item = pop()) >= 0;) {
      const int64_t seq = item / num_kv_heads, kv = item % num_kv_heads;
      const int64_t len = lens[seq];
      const int64_t span = attended(len, window), first = len - span;
      const int64_t* blocks = table + seq * max_blocks;
      const int64_t head0 = kv * group;
      const T* q_group = q_ptr + (seq * num_heads + head0) * kDim;
      for (int64_t i = 0; i < group * kDim; ++i) q[i] = static_cast<float>(q_group[i]) * float(scale);
      scores.resize(group * span);
      std::fill(top.begin(), top.end(), -std::numeric_limits<float>::infinity());
      for (int64_t h = 0; h < group; h += kMaxHeads) {
        const int64_t count = std::min<int64_t>(kMaxHeads, group - h);
        kvray::with_rows<kMaxHeads>(count, [&](auto heads) {
          score_rows_avx2<kDim, decltype(heads)::value>(
              q.data() + h * kDim, k_ptr + kv * kDim, row, blocks, block_size, first, len,
              scores.data() + h * span, span, top.data() + h);
        });
      }
      for (int64_t h = 0; h < group; ++h) {
        total[h] = softmax_numerators(scores.data() + h * span, span, top[h]);
      }
      for (int64_t h = 0; h < group; h += kMaxHeads) {
        const int64_t count = std::min<int64_t>(kMaxHeads, group - h);
        kvray::with_rows<kMaxHeads>(count, [&](auto heads) {
          weigh_values_avx2<kDim, decltype(heads)::value>(
              scores.data() + h * span, span, v_ptr + kv * kDim, row, blocks, block_size, first,
              total.data() + h, out_ptr + (seq * num_heads + head0 + h) * kDim);
        });
      }
    }
  });
}

// The head_dims with a path of their own (the common ones); others take the generic path.
template <typename T>
bool attend_avx2_dispatch(const at::Tensor& query, const at::Tensor& key_cache,
                          const at::Tensor& value_cache, const at::Tensor& block_table,
                          const at::Tensor& context_lens, int64_t block_size, double scale,
                          int64_t window, at::Tensor& out) {
  switch (query.size(2)) {
    case 64:
      attend_avx2<64, T>(query, key_cache, value_cache, block_table, context_lens, block_size,
                         scale, window, out);
      return true;
    case 128:
      attend_avx2<128, T>(query, key_cache, value_cache, block_table, context_lens, block_size,
                          scale, window, out);
      return true;
    default:
      return false;
  }
}
#endif
}  // namespace

at::Tensor paged_decode_attention(at::Tensor query, at::Tensor key_cache,
                                  at::Tensor value_cache, at::Tensor block_table,
                                  at::Tensor context_lens, int64_t block_size, double scale,
                                  int64_t window) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 3, "query and caches must be 3-d");
  TORCH_CHECK(query.size(2) % kLanes == 0, "head_dim must be a multiple of ", kLanes);
  TORCH_CHECK(query.size(1) % key_cache.size(1) == 0, "num_heads must be a multiple of kv heads");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(key_cache.scalar_type() == query.scalar_type() &&
                  value_cache.scalar_type() == query.scalar_type(),
              "query and caches must share a dtype");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block_table and context_lens must be int64");
  query = query.contiguous();
  block_table = block_table.contiguous();
  context_lens = context_lens.contiguous();
  auto out = at::empty_like(query);
  if (query.scalar_type() == at::kBFloat16) {
#if defined(__AVX512BF16__)
    if (query.size(2) == 64) {
      attend_bf16<64>(query, key_cache, value_cache, block_table, context_lens, block_size, scale,
                      window, out);
      return out;
    }
    if (query.size(2) == 128) {
      attend_bf16<128>(query, key_cache, value_cache, block_table, context_lens, block_size,
                       scale, window, out);
      return out;
    }
#endif
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
    if (attend_avx2_dispatch<c10::BFloat16>(query, key_cache, value_cache, block_table,
                                            context_lens, block_size, scale, window, out)) {
      return out;
    }
#endif
    attend<c10::BFloat16>(query, key_cache, value_cache, block_table, context_lens, block_size,
                          scale, window, out);
  } else {
    TORCH_CHECK(query.scalar_type() == at::kFloat, "query must be bf16 or fp32");
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
    if (attend_avx2_dispatch<float>(query, key_cache, value_cache, block_table, context_lens,
                                    block_size, scale, window, out)) {
      return out;
    }
#endif
    attend<float>(query, key_cache, value_cache, block_table, context_lens, block_size, scale,
                  window, out);
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(kvray, m) {
  m.def(
      "paged_decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_table, Tensor context_lens, int block_size, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvray, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
