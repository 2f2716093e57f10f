// GEMM with 4-bit weights for CPUs without a bf16 GEMM: y [M, N] bf16 = x [M, K] @ W^T, where W is
// an affine int4 matrix (w = d * q + m per group of 32 along K: GGUF Q4_1, Q4_0 and Q4_K sub-blocks,
// see rtserve/model/quant_groups.py) kept at 4 bits in memory.
//
// On x86 CPUs without AVX-512 BW/VL/DQ (AVX2-only: Zen 1-3, most laptops and many cloud VMs) torch
// has no fast bf16 GEMM and its int4 weight-only kernel is a GEMV that costs the same per row
// whatever the row count; a 16-stream decode step or a prefill chunk then runs at the speed of that
// many batch-1 steps. This kernel does what a GEMM does instead: for each 16-column panel it expands
// the 4-bit weights once into fp32 ([K, 16], in L1/L2), then runs every row of x over it with a 6 x 16
// register tile of fp32 FMAs (12 accumulators), so the expansion is shared by all rows.
// Expansion is exact: d * q is exact in fp32 (fp16 d, q < 16), and fma(q, d, m) rounds once, as
// ggml's `d * q + m` does. Activations are taken to fp32, products accumulate in fp32 along K in
// order, and each output is rounded once to bf16 (nearest even).
//
// Packed layout (built by rtserve/model/quant.py `pack_q4_panel`), for 16-column panel p and group g:
//   qw [N/16, K/32, 32, 8] uint8: row k of the group, byte j: low nibble q of column j, high nibble q
//      of column 8 + j
//   dm [N/16, K/32, 32] fp32: d of columns 0..15, then m of columns 0..15
//
//   int4_panel_linear(x, qw, dm) -> y      x: [M, K] bf16 or fp32; y: [M, N] bf16
//   int4_panel_simd() -> bool              whether this build has the AVX2/FMA path (else scalar C++)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define RTSERVE_PANEL_SIMD 1
#else
#define RTSERVE_PANEL_SIMD 0
#endif

namespace {

constexpr int64_t kCols = 16;   // columns per panel
constexpr int64_t kGroup = 32;  // K per quantization group
constexpr int64_t kRows = 6;    // rows per register tile
constexpr int64_t kRowBlock = 96;  // rows of x per pass over the panels (fp32 x block stays in L2)

inline uint16_t bf16_round(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(bits >> 16);
}

// Expand panel p (all K/32 groups) into w [K, 16] fp32.
void expand_panel(const uint8_t* qp, const float* dp, int64_t groups, float* w) {
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* q = qp + g * kGroup * 8;
    const float* d = dp + g * 2 * kCols;
    float* out = w + g * kGroup * kCols;
#if RTSERVE_PANEL_SIMD
    const __m256 d0 = _mm256_loadu_ps(d), d1 = _mm256_loadu_ps(d + 8);
    const __m256 m0 = _mm256_loadu_ps(d + 16), m1 = _mm256_loadu_ps(d + 24);
    const __m128i low = _mm_set1_epi8(0x0f);
    for (int64_t k = 0; k < kGroup; ++k) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k * 8));
      const __m128i lo = _mm_and_si128(b, low);
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
      const __m256 flo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
      const __m256 fhi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
      _mm256_storeu_ps(out + k * kCols, _mm256_fmadd_ps(flo, d0, m0));
      _mm256_storeu_ps(out + k * kCols + 8, _mm256_fmadd_ps(fhi, d1, m1));
    }
#else
    for (int64_t k = 0; k < kGroup; ++k) {
      for (int64_t j = 0; j < 8; ++j) {
        const uint8_t b = q[k * 8 + j];
        out[k * kCols + j] = std::fma(static_cast<float>(b & 0x0f), d[j], d[16 + j]);
        out[k * kCols + 8 + j] = std::fma(static_cast<float>(b >> 4), d[8 + j], d[24 + j]);
      }
    }
#endif
  }
}

// Up to 6 rows of x (row stride ldx) times the expanded panel w [K, 16] -> y rows (stride ldy), bf16.
// Always computes 6 rows (missing ones repeat row 0) with 12 named accumulators: written as an array,
// GCC kept them in memory and stored all 12 every k step, at half the FMA rate.
void panel_tile(int64_t rows, const float* x, int64_t ldx, const float* w, int64_t k_len, uint16_t* y, int64_t ldy) {
  const float* xr[kRows];
  for (int64_t r = 0; r < kRows; ++r) xr[r] = x + (r < rows ? r : 0) * ldx;
  alignas(32) float acc_out[kRows][kCols];
#if RTSERVE_PANEL_SIMD
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
  __m256 a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
  const float *x0 = xr[0], *x1 = xr[1], *x2 = xr[2], *x3 = xr[3], *x4 = xr[4], *x5 = xr[5];
  for (int64_t k = 0; k < k_len; ++k) {
    const __m256 w0 = _mm256_loadu_ps(w + k * kCols), w1 = _mm256_loadu_ps(w + k * kCols + 8);
    __m256 xv = _mm256_broadcast_ss(x0 + k);
    a00 = _mm256_fmadd_ps(xv, w0, a00);
    a01 = _mm256_fmadd_ps(xv, w1, a01);
    xv = _mm256_broadcast_ss(x1 + k);
    a10 = _mm256_fmadd_ps(xv, w0, a10);
    a11 = _mm256_fmadd_ps(xv, w1, a11);
    xv = _mm256_broadcast_ss(x2 + k);
    a20 = _mm256_fmadd_ps(xv, w0, a20);
    a21 = _mm256_fmadd_ps(xv, w1, a21);
    xv = _mm256_broadcast_ss(x3 + k);
    a30 = _mm256_fmadd_ps(xv, w0, a30);
    a31 = _mm256_fmadd_ps(xv, w1, a31);
    xv = _mm256_broadcast_ss(x4 + k);
    a40 = _mm256_fmadd_ps(xv, w0, a40);
    a41 = _mm256_fmadd_ps(xv, w1, a41);
    xv = _mm256_broadcast_ss(x5 + k);
    a50 = _mm256_fmadd_ps(xv, w0, a50);
    a51 = _mm256_fmadd_ps(xv, w1, a51);
  }
  _mm256_store_ps(acc_out[0], a00);
  _mm256_store_ps(acc_out[0] + 8, a01);
  _mm256_store_ps(acc_out[1], a10);
  _mm256_store_ps(acc_out[1] + 8, a11);
  _mm256_store_ps(acc_out[2], a20);
  _mm256_store_ps(acc_out[2] + 8, a21);
  _mm256_store_ps(acc_out[3], a30);
  _mm256_store_ps(acc_out[3] + 8, a31);
  _mm256_store_ps(acc_out[4], a40);
  _mm256_store_ps(acc_out[4] + 8, a41);
  _mm256_store_ps(acc_out[5], a50);
  _mm256_store_ps(acc_out[5] + 8, a51);
#else
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t c = 0; c < kCols; ++c) acc_out[r][c] = 0.0f;
  for (int64_t k = 0; k < k_len; ++k)
    for (int64_t r = 0; r < kRows; ++r)
      for (int64_t c = 0; c < kCols; ++c) acc_out[r][c] = std::fma(xr[r][k], w[k * kCols + c], acc_out[r][c]);
#endif
  for (int64_t r = 0; r < std::min(rows, kRows); ++r)
    for (int64_t c = 0; c < kCols; ++c) y[r * ldy + c] = bf16_round(acc_out[r][c]);
}

void run_rows(int64_t rows, const float* x, int64_t ldx, const float* w, int64_t k_len, uint16_t* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; r += kRows)
    panel_tile(rows - r, x + r * ldx, ldx, w, k_len, y + r * ldy, ldy);
}

at::Tensor int4_panel_linear(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& dm) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "int4_panel_linear: x must be [M, K] bf16 or fp32");
  TORCH_CHECK(qw.dim() == 4 && qw.scalar_type() == at::kByte && qw.size(2) == kGroup && qw.size(3) == 8 &&
                  qw.is_contiguous(),
              "int4_panel_linear: qw must be contiguous [N/16, K/32, 32, 8] uint8");
  const int64_t panels = qw.size(0), groups = qw.size(1), k = groups * kGroup, n = panels * kCols;
  TORCH_CHECK(dm.scalar_type() == at::kFloat && dm.is_contiguous() && dm.dim() == 3 && dm.size(0) == panels &&
                  dm.size(1) == groups && dm.size(2) == 2 * kCols,
              "int4_panel_linear: dm must be contiguous [N/16, K/32, 32] fp32");
  TORCH_CHECK(x.size(1) == k, "int4_panel_linear: x has ", x.size(1), " columns, the weight K is ", k);
  const int64_t rows = x.size(0);
  at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({rows, n}, x.options().dtype(at::kBFloat16));
  if (rows == 0 || n == 0) return out;
  const float* xp = xf.data_ptr<float>();
  const uint8_t* qp = qw.data_ptr<uint8_t>();
  const float* dp = dm.data_ptr<float>();
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const bool reexpand = rows > kRowBlock;  // several row blocks: each pass re-expands its panels
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(static_cast<size_t>(k * kCols));
    if (!reexpand) {
      for (int64_t p = begin; p < end; ++p) {
        expand_panel(qp + p * groups * kGroup * 8, dp + p * groups * 2 * kCols, groups, w.data());
        run_rows(rows, xp, k, w.data(), k, op + p * kCols, n);
      }
      return;
    }
    // Long x (prefill): row blocks outermost within this thread's panels, so the block of x stays in
    // cache while the panels pass over it; each panel is expanded once per block.
    for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
      const int64_t nr = std::min(kRowBlock, rows - r0);
      for (int64_t p = begin; p < end; ++p) {
        expand_panel(qp + p * groups * kGroup * 8, dp + p * groups * 2 * kCols, groups, w.data());
        run_rows(nr, xp + r0 * k, k, w.data(), k, op + r0 * n + p * kCols, n);
      }
    }
  });
  return out;
}

bool int4_panel_simd() { return RTSERVE_PANEL_SIMD; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(rtserve, m) {
  m.def("int4_panel_linear(Tensor x, Tensor qw, Tensor dm) -> Tensor");
  m.def("int4_panel_simd() -> bool", &int4_panel_simd);  // no tensor arguments: a catch-all kernel
}

TORCH_LIBRARY_IMPL(rtserve, CPU, m) { m.impl("int4_panel_linear", &int4_panel_linear); }
