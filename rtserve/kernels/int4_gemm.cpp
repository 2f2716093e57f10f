// GEMM with 4-bit weights on AMX: y [M, N] bf16 = x [M, K] bf16 @ W^T, where W is a
// GGUF Q4_1 matrix (w = d * q + m per group of 32 along K) kept at 4 bits in memory.
//
// Decode steps are bound by weight bytes (bf16 weights stream at ~15 GB/s here, whatever M is), so
// the weights stay 4-bit (1/4 of the bytes) and are expanded on the fly, one 32 x 32 block at a time,
// into the bf16 pair-interleaved layout AMX's TDPBF16PS reads; the products accumulate in fp32 tiles.
// Expansion is exact: d * q + m is exact in fp32 (fp16 d, q < 16), then rounded to nearest-even bf16,
// so the effective weights are bit-identical to the fast path's bf16 dequantization.
//
// Packed layout (built by rtserve/model/quant.py `pack_q4_amx`), for 16-column block nb and K group g:
//   qw [N/16, K/32, 16, 16] uint8: pair-row r (k = 32 g + 2 r + e), byte i: low nibble q of column
//      i / 2, k offset e = i % 2; high nibble the same for column 8 + i / 2
//   dm [N/16, K/32, 64] fp32: d per lane of the low vector (d0 d0 d1 d1 .. d7 d7), of the high vector
//      (d8 d8 .. d15 d15), then m in the same two orders
//
//   int4_linear(x, qw, dm) -> y
//   amx_available() -> bool
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

#include "vec.h"

#if RTSERVE_HAVE_AVX512 && defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define RTSERVE_HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define RTSERVE_HAVE_AMX 0
#endif

namespace {

#if RTSERVE_HAVE_AMX
// Linux hands out AMX tile state only on request (once per process).
bool request_amx() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: C (fp32 16 x 16) for (row block, column block) (0,0) (0,1) (1,0) (1,1); 4, 5: A row
// blocks (16 x 32 bf16); 6, 7: B column blocks (16 pair-rows x 16 columns x 2 bf16).
void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// One B tile (16 pair-rows x 16 columns): 256 packed bytes -> 16 x 64 bytes of interleaved bf16.
// Byte i of a row holds lane i of the "low" vector (columns 0-7, as (k even, k odd) pairs) in its low
// nibble and lane i of the "high" vector (columns 8-15) in its high nibble, so after the fp32
// arithmetic one cvtne2ps2bf16 yields the row in AMX's pair-interleaved order directly.
inline void expand_tile(const uint8_t* src, const float* dm, uint16_t* dst) {
  const __m512 d_lo = _mm512_loadu_ps(dm), d_hi = _mm512_loadu_ps(dm + 16);
  const __m512 m_lo = _mm512_loadu_ps(dm + 32), m_hi = _mm512_loadu_ps(dm + 48);
  const __m512i low4 = _mm512_set1_epi32(15);
  for (int r = 0; r < 16; ++r) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * r)));
    const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, low4)), d_lo, m_lo);
    const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), d_hi, m_hi);
    _mm512_store_si512(reinterpret_cast<__m512i*>(dst + 32 * r), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}
#endif

bool amx_available() {
#if RTSERVE_HAVE_AMX
  return request_amx();
#else
  return false;
#endif
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& dm) {
  TORCH_CHECK(amx_available(), "int4_linear needs AMX (check rtserve::amx_available first)");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x must be contiguous bf16 [M, K]");
  TORCH_CHECK(qw.dim() == 4 && qw.scalar_type() == at::kByte && qw.is_contiguous() && qw.size(2) == 16 &&
                  qw.size(3) == 16, "qw must be contiguous uint8 [N/16, K/32, 16, 16]");
  TORCH_CHECK(dm.dim() == 3 && dm.scalar_type() == at::kFloat && dm.is_contiguous() && dm.size(0) == qw.size(0) &&
                  dm.size(1) == qw.size(1) && dm.size(2) == 64, "dm must be contiguous fp32 [N/16, K/32, 64]");
  const int64_t rows = x.size(0), k = x.size(1), groups = qw.size(1), col_blocks = qw.size(0), n = 16 * col_blocks;
  TORCH_CHECK(rows >= 1, "int4_linear needs at least one row");
  TORCH_CHECK(k == 32 * groups, "x's K does not match the packed weight");
  TORCH_CHECK(col_blocks % 2 == 0, "N must be a multiple of 32");
  at::Tensor out = at::empty({rows, n}, x.options());
#if RTSERVE_HAVE_AMX
  at::Tensor padded = x;  // A tiles read 16 rows at a time: pad with zero rows
  const int64_t tile_rows = (rows + 15) / 16 * 16;
  if (rows != tile_rows) {
    padded = at::zeros({tile_rows, k}, x.options());
    std::memcpy(padded.data_ptr(), x.data_ptr(), rows * k * sizeof(uint16_t));
  }
  const auto* xp = reinterpret_cast<const uint16_t*>(padded.data_ptr());
  const uint8_t* qp = qw.data_ptr<uint8_t>();
  const float* dp = dm.data_ptr<float>();
  auto* op = out.data_ptr<at::BFloat16>();
  const int64_t x_stride = k * 2;  // bytes between A rows
  // Up to 32 rows, each K group's two B tiles are expanded right before use (double-buffered). With
  // more rows, a column pair's B tiles for all groups are expanded once into `b_all` (36 KB at K =
  // 576) and reused by every 32-row block.
  const bool reuse = tile_rows > 32;
  at::parallel_for(0, col_blocks / 2, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();  // per call: other AMX users (oneDNN) load their own configurations
    alignas(64) uint16_t b_buf[2][2][16 * 32];
    alignas(64) float c[32][32];
    std::vector<uint16_t> b_store(reuse ? static_cast<size_t>(groups) * 2 * 512 + 32 : 0);
    uint16_t* b_all = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(b_store.data()) + 63) & ~uintptr_t(63));
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t nb0 = 2 * pair;
      if (reuse) {
        for (int64_t g = 0; g < groups; ++g) {
          expand_tile(qp + (nb0 * groups + g) * 256, dp + (nb0 * groups + g) * 64, b_all + (2 * g) * 512);
          expand_tile(qp + ((nb0 + 1) * groups + g) * 256, dp + ((nb0 + 1) * groups + g) * 64, b_all + (2 * g + 1) * 512);
        }
      }
      for (int64_t row0 = 0; row0 < tile_rows; row0 += 32) {
        const bool two = row0 + 16 < tile_rows;  // a second 16-row A tile in this block
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t g = 0; g < groups; ++g) {
          const uint16_t *b0, *b1;
          if (reuse) {
            b0 = b_all + (2 * g) * 512;
            b1 = b0 + 512;
          } else {
            uint16_t(*b_tiles)[16 * 32] = b_buf[g & 1];
            expand_tile(qp + (nb0 * groups + g) * 256, dp + (nb0 * groups + g) * 64, b_tiles[0]);
            expand_tile(qp + ((nb0 + 1) * groups + g) * 256, dp + ((nb0 + 1) * groups + g) * 64, b_tiles[1]);
            b0 = b_tiles[0];
            b1 = b_tiles[1];
          }
          _tile_loadd(6, b0, 64);
          _tile_loadd(7, b1, 64);
          _tile_loadd(4, xp + row0 * k + 32 * g, x_stride);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          if (two) {
            _tile_loadd(5, xp + (row0 + 16) * k + 32 * g, x_stride);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, &c[0][0], 128);
        _tile_stored(1, &c[0][16], 128);
        if (two) {
          _tile_stored(2, &c[16][0], 128);
          _tile_stored(3, &c[16][16], 128);
        }
        for (int64_t r = row0; r < std::min(rows, row0 + 32); ++r) {
          rtserve::store_bf16(op + r * n + 32 * pair, _mm512_load_ps(&c[r - row0][0]));
          rtserve::store_bf16(op + r * n + 32 * pair + 16, _mm512_load_ps(&c[r - row0][16]));
        }
      }
    }
    _tile_release();
  });
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rtserve, m) {
  m.def("int4_linear(Tensor x, Tensor qw, Tensor dm) -> Tensor");
  m.def("amx_available() -> bool", &amx_available);  // no tensor arguments: a catch-all kernel
}

TORCH_LIBRARY_IMPL(rtserve, CPU, m) { m.impl("int4_linear", &int4_linear); }
