// Paged decode attention for the CPU fast path: one query token per sequence, K/V read in place
// from the block-paged bf16 cache (no gather, no padding to the longest sequence).
//
//   q          [D, H, hd]          bf16   (RoPE applied)
//   k_cache    [num_slots, KVH, hd] bf16  slot = block_id * block_size + offset
//   v_cache    [num_slots, KVH, hd] bf16
//   block_table[D, B]              int64  sequence d's blocks (entries past its length unused)
//   seq_lens   [D]                 int64  context length of sequence d (its new token included)
//   returns    [D, H, hd]          bf16
//
// Work is split over (sequence, kv head) pairs with at::parallel_for (torch's own thread pool).
// Per pair: the G = H / KVH query heads that share the kv head; scores in fp32, an exact softmax
// (max-subtracted), then the probability-weighted sum of V rows in fp32, rounded once to bf16.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec.h"

namespace {

using rtserve::bf16_bits_to_float;

// dst[0:n] = float(src[0:n])
inline void load_row(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#if RTSERVE_HAVE_AVX512
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, rtserve::load_bf16(src + i));
#elif RTSERVE_HAVE_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, rtserve::load_bf16x8(src + i));
#endif
  for (; i < n; ++i) dst[i] = bf16_bits_to_float(src[i]);
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#if RTSERVE_HAVE_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  sum = _mm512_reduce_add_ps(acc);
#elif RTSERVE_HAVE_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  sum = rtserve::reduce_add8(acc);
#endif
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// s[0:n] = exp(s[0:n] - m); returns the sum. AVX-512 and AVX2: exp(x) = 2^k * 2^f, k = round(x log2 e),
// 2^f by a degree-6 polynomial on [-0.5, 0.5] (relative error ~2e-7, below bf16's 4e-3 output step).
inline float exp_shifted_sum(float* s, int64_t n, float m) {
  int64_t i = 0;
  float sum = 0.f;
#if RTSERVE_HAVE_AVX512
  const __m512 mv = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 e = rtserve::exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i), mv));
    _mm512_storeu_ps(s + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#elif RTSERVE_HAVE_AVX2
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = rtserve::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), mv));
    _mm256_storeu_ps(s + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = rtserve::reduce_add8(acc);
#endif
  for (; i < n; ++i) sum += (s[i] = std::exp(s[i] - m));
  return sum;
}

// Each of the `rows` rows of s [rows, n] becomes its softmax, in place.
inline void softmax_rows(float* s, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r, s += n) {
    const float inv = 1.f / exp_shifted_sum(s, n, *std::max_element(s, s + n));
    for (int64_t t = 0; t < n; ++t) s[t] *= inv;
  }
}

// acc[0:n] += p * row[0:n]
inline void axpy(float p, const float* row, float* acc, int64_t n) {
  int64_t i = 0;
#if RTSERVE_HAVE_AVX512
  __m512 pv = _mm512_set1_ps(p);
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(pv, _mm512_loadu_ps(row + i), _mm512_loadu_ps(acc + i)));
#elif RTSERVE_HAVE_AVX2
  __m256 pv = _mm256_set1_ps(p);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(row + i), _mm256_loadu_ps(acc + i)));
#endif
  for (; i < n; ++i) acc[i] += p * row[i];
}

// One (sequence, kv head) task, generic in group size and head_dim: pass 1 scores, softmax, pass 2.
void attend_generic(const uint16_t* qp, const uint16_t* kp, const uint16_t* vp, at::BFloat16* op,
                    const int64_t* blocks, int64_t len, int64_t block_size, int64_t group, int64_t head_dim,
                    int64_t kv_stride, float scale, std::vector<float>& scores) {
  std::vector<float> qf(group * head_dim), acc(group * head_dim, 0.f), row(head_dim);
  scores.resize(group * len);
  for (int64_t g = 0; g < group; ++g) {
    load_row(qp + g * head_dim, qf.data() + g * head_dim, head_dim);
    for (int64_t i = 0; i < head_dim; ++i) qf[g * head_dim + i] *= scale;
  }
  for (int64_t t = 0; t < len; ++t) {
    const int64_t slot = blocks[t / block_size] * block_size + t % block_size;
    load_row(kp + slot * kv_stride, row.data(), head_dim);
    for (int64_t g = 0; g < group; ++g) scores[g * len + t] = dot(qf.data() + g * head_dim, row.data(), head_dim);
  }
  softmax_rows(scores.data(), group, len);
  for (int64_t t = 0; t < len; ++t) {
    const int64_t slot = blocks[t / block_size] * block_size + t % block_size;
    load_row(vp + slot * kv_stride, row.data(), head_dim);
    for (int64_t g = 0; g < group; ++g) axpy(scores[g * len + t], row.data(), acc.data() + g * head_dim, head_dim);
  }
  for (int64_t i = 0; i < group * head_dim; ++i) op[i] = c10::BFloat16(acc[i]);
}

#if RTSERVE_HAVE_AVX512
// The same task with G query heads and NV * 16 = head_dim held in registers: q, and in pass 2 the
// G x NV accumulators, never leave them; each K and V row is converted once and used by all G heads.
template <int G, int NV>
void attend_avx512(const uint16_t* qp, const uint16_t* kp, const uint16_t* vp, at::BFloat16* op,
                   const int64_t* blocks, int64_t len, int64_t block_size, int64_t kv_stride, float scale,
                   std::vector<float>& scores) {
  constexpr int HD = NV * 16;
  scores.resize(G * len);
  __m512 q[G][NV];
  const __m512 sv = _mm512_set1_ps(scale);
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < NV; ++j) q[g][j] = _mm512_mul_ps(rtserve::load_bf16(qp + g * HD + j * 16), sv);
  for (int64_t b = 0, t = 0; t < len; ++b) {
    const uint16_t* base = kp + blocks[b] * block_size * kv_stride;
    for (int64_t o = 0; o < block_size && t < len; ++o, ++t) {
      __m512 k[NV];
      for (int j = 0; j < NV; ++j) k[j] = rtserve::load_bf16(base + o * kv_stride + j * 16);
      for (int g = 0; g < G; ++g) {
        __m512 a = _mm512_mul_ps(q[g][0], k[0]);
        for (int j = 1; j < NV; ++j) a = _mm512_fmadd_ps(q[g][j], k[j], a);
        scores[g * len + t] = _mm512_reduce_add_ps(a);
      }
    }
  }
  softmax_rows(scores.data(), G, len);
  __m512 acc[G][NV];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < NV; ++j) acc[g][j] = _mm512_setzero_ps();
  for (int64_t b = 0, t = 0; t < len; ++b) {
    const uint16_t* base = vp + blocks[b] * block_size * kv_stride;
    for (int64_t o = 0; o < block_size && t < len; ++o, ++t) {
      __m512 v[NV];
      for (int j = 0; j < NV; ++j) v[j] = rtserve::load_bf16(base + o * kv_stride + j * 16);
      for (int g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(scores[g * len + t]);
        for (int j = 0; j < NV; ++j) acc[g][j] = _mm512_fmadd_ps(p, v[j], acc[g][j]);
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < NV; ++j) rtserve::store_bf16(op + g * HD + j * 16, acc[g][j]);
}

#if defined(__AVX512BF16__)
// The sums of 16 vectors, one per lane, in a shuffled lane order (attend_bf16 permutes it back).
inline __m512 reduce16(const __m512* v) {
  __m512 c[8], d[4], e[2];
  for (int i = 0; i < 8; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    e[i] = _mm512_add_ps(_mm512_shuffle_ps(d[2 * i], d[2 * i + 1], 0x44), _mm512_shuffle_ps(d[2 * i], d[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x88), _mm512_shuffle_ps(e[0], e[1], 0xDD));
}

// The same task on CPUs with AVX512_BF16, with fewer instructions per cached token:
//   pass 1: 16 tokens at a time; each K row is multiplied by the bf16 query straight from the cache
//     (VDPBF16PS: bf16 pair products accumulated in fp32, no conversion), and the 16 per-token
//     partial vectors are summed by one transposing shuffle tree instead of 16 horizontal sums; the
//     running max is kept in vectors, and the next block's rows are prefetched (blocks are scattered);
//   softmax: exp in place, normalisation folded into the output (one multiply per output, not per score);
//   pass 2: each 32-element V load is split into its even and odd elements as fp32 with one shift and
//     one mask (no widening), accumulated de-interleaved, and re-interleaved once at the end.
template <int G, int NW>
void attend_bf16(const uint16_t* qp, const uint16_t* kp, const uint16_t* vp, at::BFloat16* op,
                 const int64_t* blocks, int64_t len, int64_t block_size, int64_t kv_stride, float scale,
                 std::vector<float>& scores) {
  constexpr int HD = NW * 32;
  const int64_t padded = (len + 15) & ~int64_t(15);
  scores.resize(G * padded);
  __m512bh q[G][NW];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < NW; ++j) q[g][j] = (__m512bh)_mm512_loadu_si512(qp + g * HD + j * 32);
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  const __m512 sv = _mm512_set1_ps(scale), neg_inf = _mm512_set1_ps(-INFINITY);
  __m512 mx[G];
  for (int g = 0; g < G; ++g) mx[g] = neg_inf;
  const uint16_t* rows[16];
  int64_t b = 0, off = 0;  // block index and offset of token t0
  for (int64_t t0 = 0; t0 < len; t0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, len - t0));
    for (int o = 0; o < 16; ++o) {
      rows[o] = kp + (blocks[b] * block_size + off) * kv_stride;  // past the end: repeats a valid row
      if (o + 1 < n && ++off == block_size) off = 0, ++b;
    }
    if (n == 16 && ++off == block_size) off = 0, ++b;  // advance to token t0 + 16
    if (t0 + 16 < len) {
      const char* next = reinterpret_cast<const char*>(kp + (blocks[b] * block_size + off) * kv_stride);
      for (int o = 0; o < 16 && o < block_size - off; ++o)
        for (int l = 0; l < HD * 2; l += 64) _mm_prefetch(next + o * kv_stride * 2 + l, _MM_HINT_T0);
    }
    const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
    for (int g = 0; g < G; ++g) {
      __m512 a[16];
      for (int o = 0; o < 16; ++o) {
        __m512 s = _mm512_dpbf16_ps(_mm512_setzero_ps(), q[g][0], (__m512bh)_mm512_loadu_si512(rows[o]));
        for (int j = 1; j < NW; ++j) s = _mm512_dpbf16_ps(s, q[g][j], (__m512bh)_mm512_loadu_si512(rows[o] + 32 * j));
        a[o] = s;
      }
      const __m512 r = _mm512_mask_mov_ps(neg_inf, valid, _mm512_mul_ps(_mm512_permutexvar_ps(order, reduce16(a)), sv));
      mx[g] = _mm512_max_ps(mx[g], r);
      _mm512_storeu_ps(scores.data() + g * padded + t0, r);
    }
  }
  float inv[G];
  for (int g = 0; g < G; ++g) {
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx[g]));
    float* s = scores.data() + g * padded;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < padded; i += 16) {  // padding lanes are -inf: exp gives 0
      const __m512 e = rtserve::exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i), m));
      _mm512_storeu_ps(s + i, e);
      sum = _mm512_add_ps(sum, e);
    }
    inv[g] = 1.f / _mm512_reduce_add_ps(sum);
  }
  const __m512i high_half = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  __m512 acc[G][2 * NW];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < 2 * NW; ++j) acc[g][j] = _mm512_setzero_ps();
  for (int64_t blk = 0, t = 0; t < len; ++blk) {
    const uint16_t* base = vp + blocks[blk] * block_size * kv_stride;
    if (t + block_size < len) {  // the next block's rows, up to 16 of them
      const char* next = reinterpret_cast<const char*>(vp + blocks[blk + 1] * block_size * kv_stride);
      for (int64_t o = 0; o < std::min<int64_t>(16, block_size); ++o)
        for (int l = 0; l < HD * 2; l += 64) _mm_prefetch(next + o * kv_stride * 2 + l, _MM_HINT_T0);
    }
    for (int64_t o = 0; o < block_size && t < len; ++o, ++t) {
      __m512 v[2 * NW];
      for (int j = 0; j < NW; ++j) {
        const __m512i raw = _mm512_loadu_si512(base + o * kv_stride + j * 32);
        v[2 * j] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));          // elements 2i
        v[2 * j + 1] = _mm512_castsi512_ps(_mm512_and_si512(raw, high_half));  // elements 2i + 1
      }
      for (int g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(scores[g * padded + t]);
        for (int j = 0; j < 2 * NW; ++j) acc[g][j] = _mm512_fmadd_ps(p, v[j], acc[g][j]);
      }
    }
  }
  const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (int g = 0; g < G; ++g) {
    const __m512 iv = _mm512_set1_ps(inv[g]);
    for (int j = 0; j < NW; ++j) {
      const __m512 even = _mm512_mul_ps(acc[g][2 * j], iv), odd = _mm512_mul_ps(acc[g][2 * j + 1], iv);
      rtserve::store_bf16(op + g * HD + 32 * j, _mm512_permutex2var_ps(even, first, odd));
      rtserve::store_bf16(op + g * HD + 32 * j + 16, _mm512_permutex2var_ps(even, second, odd));
    }
  }
}
#endif

using AttendFn = void (*)(const uint16_t*, const uint16_t*, const uint16_t*, at::BFloat16*, const int64_t*,
                          int64_t, int64_t, int64_t, float, std::vector<float>&);

// The kernel families, as (group, width) -> function tables for `pick_group`.
struct Avx512Kernels {
  template <int G, int NV>
  static constexpr AttendFn fn = attend_avx512<G, NV>;
};
#if defined(__AVX512BF16__)
struct Bf16Kernels {
  template <int G, int NW>
  static constexpr AttendFn fn = attend_bf16<G, NW>;
};
#endif

template <class Kernels, int N>
AttendFn pick_group(int64_t group) {
  switch (group) {
    case 1: return Kernels::template fn<1, N>;
    case 2: return Kernels::template fn<2, N>;
    case 3: return Kernels::template fn<3, N>;
    case 4: return Kernels::template fn<4, N>;
    case 5: return Kernels::template fn<5, N>;
    case 6: return Kernels::template fn<6, N>;
    case 8: return Kernels::template fn<8, N>;
    default: return nullptr;
  }
}

AttendFn pick_kernel(int64_t group, int64_t head_dim) {
#if defined(__AVX512BF16__)
  if (head_dim == 64) return pick_group<Bf16Kernels, 2>(group);
  if (head_dim == 128 && group <= 4) return pick_group<Bf16Kernels, 4>(group);
#endif
  if (head_dim == 64) return pick_group<Avx512Kernels, 4>(group);
  if (head_dim == 128 && group <= 4) return pick_group<Avx512Kernels, 8>(group);  // 2 x G x 8 registers fit in 32
  return nullptr;
}
#elif RTSERVE_HAVE_AVX2
// AVX2 (8 lanes, 16 registers): the same task with the G query heads' scaled q in an fp32 buffer.
// Scores: T tokens at a time, each K row converted once for all G heads, G x T independent
// accumulator chains (one chain per dot product would wait on the FMA latency every step).
// Weighted V sum: W vectors of each V row per pass over the tokens, G x W accumulators in registers.
template <int G, int HD>
void attend_avx2(const uint16_t* qp, const uint16_t* kp, const uint16_t* vp, at::BFloat16* op,
                 const int64_t* blocks, int64_t len, int64_t block_size, int64_t kv_stride, float scale,
                 std::vector<float>& scores) {
  constexpr int NV = HD / 8;
  constexpr int T = G <= 3 ? 4 : (G <= 6 ? 2 : 1);
  constexpr int W = G <= 2 ? 4 : (G <= 6 ? 2 : 1);
  scores.resize(G * len);
  alignas(32) float qf[G * HD];
  for (int i = 0; i < G * HD; ++i) qf[i] = bf16_bits_to_float(qp[i]) * scale;
  // Token t's slot, walked block by block (a division per token cost more than its dot products).
  int64_t b = 0, o = 0;
  auto next_slot = [&]() {
    const int64_t s = blocks[b] * block_size + o;
    if (++o == block_size) o = 0, ++b;
    return s;
  };
  int64_t t = 0;
  for (; t + T <= len; t += T) {
    const uint16_t* kr[T];
    for (int u = 0; u < T; ++u) kr[u] = kp + next_slot() * kv_stride;
    __m256 acc[G][T];
    for (int g = 0; g < G; ++g)
      for (int u = 0; u < T; ++u) acc[g][u] = _mm256_setzero_ps();
    for (int j = 0; j < NV; ++j) {
      __m256 k[T];
      for (int u = 0; u < T; ++u) k[u] = rtserve::load_bf16x8(kr[u] + 8 * j);
      for (int g = 0; g < G; ++g) {
        const __m256 qv = _mm256_load_ps(qf + g * HD + 8 * j);
        for (int u = 0; u < T; ++u) acc[g][u] = _mm256_fmadd_ps(qv, k[u], acc[g][u]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int u = 0; u < T; ++u) scores[g * len + t + u] = rtserve::reduce_add8(acc[g][u]);
  }
  for (; t < len; ++t) {
    const uint16_t* kr = kp + next_slot() * kv_stride;
    __m256 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
    for (int j = 0; j < NV; ++j) {
      const __m256 k = rtserve::load_bf16x8(kr + 8 * j);
      for (int g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_load_ps(qf + g * HD + 8 * j), k, acc[g]);
    }
    for (int g = 0; g < G; ++g) scores[g * len + t] = rtserve::reduce_add8(acc[g]);
  }
  softmax_rows(scores.data(), G, len);
  for (int j0 = 0; j0 < NV; j0 += W) {
    __m256 acc[G][W];
    for (int g = 0; g < G; ++g)
      for (int w = 0; w < W; ++w) acc[g][w] = _mm256_setzero_ps();
    b = o = 0;
    for (int64_t t = 0; t < len; ++t) {
      const uint16_t* vr = vp + next_slot() * kv_stride + 8 * j0;
      __m256 v[W];
      for (int w = 0; w < W; ++w) v[w] = rtserve::load_bf16x8(vr + 8 * w);
      for (int g = 0; g < G; ++g) {
        const __m256 p = _mm256_broadcast_ss(&scores[g * len + t]);
        for (int w = 0; w < W; ++w) acc[g][w] = _mm256_fmadd_ps(p, v[w], acc[g][w]);
      }
    }
    alignas(32) float out[8];
    for (int g = 0; g < G; ++g)
      for (int w = 0; w < W; ++w) {
        _mm256_store_ps(out, acc[g][w]);
        for (int i = 0; i < 8; ++i) op[g * HD + 8 * (j0 + w) + i] = c10::BFloat16(out[i]);
      }
  }
}

using AttendFn = void (*)(const uint16_t*, const uint16_t*, const uint16_t*, at::BFloat16*, const int64_t*,
                          int64_t, int64_t, int64_t, float, std::vector<float>&);

template <int HD>
AttendFn pick_group_avx2(int64_t group) {
  switch (group) {
    case 1: return attend_avx2<1, HD>;
    case 2: return attend_avx2<2, HD>;
    case 3: return attend_avx2<3, HD>;
    case 4: return attend_avx2<4, HD>;
    case 5: return attend_avx2<5, HD>;
    case 6: return attend_avx2<6, HD>;
    case 8: return attend_avx2<8, HD>;
    default: return nullptr;
  }
}

AttendFn pick_kernel(int64_t group, int64_t head_dim) {
  if (head_dim == 64) return pick_group_avx2<64>(group);
  if (head_dim == 128) return pick_group_avx2<128>(group);
  if (head_dim == 256) return pick_group_avx2<256>(group);
  return nullptr;
}
#else
using AttendFn = void*;
AttendFn pick_kernel(int64_t, int64_t) { return nullptr; }
#endif

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_table, const at::Tensor& seq_lens,
                                  int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "q, k_cache, v_cache must be 3-d");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 &&
                  v_cache.scalar_type() == at::kBFloat16, "q and the caches must be bfloat16");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong,
              "block_table and seq_lens must be int64");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  block_table.is_contiguous() && seq_lens.is_contiguous(), "inputs must be contiguous");
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(1), num_slots = k_cache.size(0);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.size(2) == head_dim, "cache shape mismatch");
  TORCH_CHECK(num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == num_seqs && seq_lens.numel() == num_seqs,
              "block_table must be [D, B] and seq_lens [D]");
  TORCH_CHECK(block_size >= 1, "block_size must be positive");
  const int64_t max_blocks = block_table.size(1);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* table = block_table.data_ptr<int64_t>();
  for (int64_t d = 0; d < num_seqs; ++d) {  // bounds: a bad table must fail loudly, not read garbage
    TORCH_CHECK(lens[d] >= 1 && lens[d] <= max_blocks * block_size, "seq_lens out of range");
    for (int64_t b = 0; b < (lens[d] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(table[d * max_blocks + b] >= 0 && (table[d * max_blocks + b] + 1) * block_size <= num_slots,
                  "block id out of range");
  }
  at::Tensor out = at::empty({num_seqs, num_heads, head_dim}, q.options());
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const auto* kp = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>());
  auto* op = out.data_ptr<at::BFloat16>();
  const float fscale = static_cast<float>(scale);
  const int64_t kv_stride = num_kv_heads * head_dim;  // elements between consecutive slots
  const AttendFn fast = pick_kernel(group, head_dim);

  int64_t total_len = 0;
  for (int64_t d = 0; d < num_seqs; ++d) total_len += lens[d];
  // Small batches run inline: waking the thread pool (~10-20 us) costs more than ~2k cached token
  // rows of work (~30 ns each).
  const int64_t grain = total_len * num_kv_heads < 2048 ? num_seqs * num_kv_heads : 1;
  at::parallel_for(0, num_seqs * num_kv_heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t d = task / num_kv_heads, kvh = task % num_kv_heads;
      const int64_t head0 = d * num_heads + kvh * group;
      const uint16_t *q_row = qp + head0 * head_dim, *k_base = kp + kvh * head_dim, *v_base = vp + kvh * head_dim;
#if RTSERVE_HAVE_AVX512 || RTSERVE_HAVE_AVX2
      if (fast != nullptr) {
        fast(q_row, k_base, v_base, op + head0 * head_dim, table + d * max_blocks, lens[d], block_size,
             kv_stride, fscale, scores);
        continue;
      }
#endif
      attend_generic(q_row, k_base, v_base, op + head0 * head_dim, table + d * max_blocks, lens[d], block_size,
                     group, head_dim, kv_stride, fscale, scores);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rtserve, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
        "Tensor seq_lens, int block_size, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(rtserve, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
