// SIMD helpers shared by the kernels: bf16 -> fp32 and exp for 16 lanes (AVX-512) or 8 (AVX2 + FMA).
// Every kernel keeps a scalar path for builds with neither.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define RTSERVE_HAVE_AVX512 1
#include <immintrin.h>
#else
#define RTSERVE_HAVE_AVX512 0
#endif

// AVX2 with FMA (x86-64-v3: Zen 1-3, Haswell and later): 8-lane versions for builds without AVX-512.
#if !RTSERVE_HAVE_AVX512 && defined(__AVX2__) && defined(__FMA__)
#define RTSERVE_HAVE_AVX2 1
#include <immintrin.h>
#else
#define RTSERVE_HAVE_AVX2 0
#endif

namespace rtserve {

inline float bf16_bits_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

#if RTSERVE_HAVE_AVX512
// 16 bf16 (raw bits) -> 16 fp32
inline __m512 load_bf16(const void* src) {
  __m256i raw = _mm256_loadu_si256(static_cast<const __m256i*>(src));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// 16 fp32 -> 16 bf16, round to nearest even (NaN stays NaN), as c10::BFloat16(float) rounds.
inline void store_bf16(void* dst, __m512 v) {
  __m512i bits = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc00000));
  _mm256_storeu_si256(static_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

// exp(x) for 16 lanes: 2^k * 2^f with k = round(x log2 e), 2^f by a degree-6 polynomial on
// [-0.5, 0.5]; relative error ~2e-7. Inputs below -87 flush towards 0 (2^-126).
inline __m512 exp16(__m512 x) {
  const __m512 y = _mm512_max_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _mm512_set1_ps(-126.f));
  const __m512 k = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, k);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.000154035304f), f, _mm512_set1_ps(0.00133335581f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.00961812911f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.0555041087f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.240226507f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.693147182f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, k);
}
#endif

#if RTSERVE_HAVE_AVX2
// 8 bf16 (raw bits) -> 8 fp32
inline __m256 load_bf16x8(const void* src) {
  __m128i raw = _mm_loadu_si128(static_cast<const __m128i*>(src));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline float reduce_add8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for 8 lanes: as exp16, with 2^k built in the exponent bits, so x log2 e is clamped to
// [-126, 127] (the biased exponent stays in 1..254): inputs above ~88 give 2^127 * 2^f, not inf.
inline __m256 exp8(__m256 x) {
  const __m256 y = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                                _mm256_set1_ps(-126.f)), _mm256_set1_ps(127.f));
  const __m256 k = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(y, k);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(0.000154035304f), f, _mm256_set1_ps(0.00133335581f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.00961812911f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.0555041087f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.240226507f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.693147182f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i two_k = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_k));
}
#endif

}  // namespace rtserve
