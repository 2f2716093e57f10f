// Fused elementwise ops of the fast path's decoder layer, so a decode step is ~9 ops per layer instead
// of ~25 (at batch 1 each op's dispatch costs as much as its arithmetic). Shapes use T rows (tokens).
//
//   add_rms_norm(x, residual?, w)  x [T, H] fp32 (+= residual [T, H] bf16, in place when given);
//                                  returns bf16 x * w / ||x||  (w pre-scaled by sqrt(H): RMSNorm
//                                  without eps, as the PyTorch path computes it)
//   rope_kv_write(qkv, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads)
//                                  qkv [T, (H + 2 KVH) hd] bf16; cos, sin [T, hd] bf16 (sin signed
//                                  for the half swap); writes roped K and V to the caches' slots;
//                                  returns roped q [T, H, hd] bf16
//   silu_mul(gate_up)              [T, 2 I] bf16 -> silu(gate) * up [T, I] bf16
// All arithmetic in fp32, one rounding to bf16 per output.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>

#include "vec.h"

namespace {

inline float bf(const at::BFloat16 v) { return static_cast<float>(v); }

// Rows per parallel task: enough work per task that small batches run inline, without a thread fork.
inline int64_t grain(int64_t row_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_elems)); }

at::Tensor add_rms_norm(at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 [T, H]");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.numel() == x.size(1) && weight.is_contiguous(),
              "weight must be fp32 [H]");
  const int64_t rows = x.size(0), hidden = x.size(1);
  const at::BFloat16* rp = nullptr;
  if (residual.has_value()) {
    TORCH_CHECK(residual->scalar_type() == at::kBFloat16 && residual->is_contiguous() &&
                    residual->sizes() == x.sizes(), "residual must be contiguous bf16 shaped like x");
    rp = residual->data_ptr<at::BFloat16>();
  }
  at::Tensor out = at::empty({rows, hidden}, x.options().dtype(at::kBFloat16));
  float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, rows, grain(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* xr = xp + r * hidden;
      const at::BFloat16* rr = rp != nullptr ? rp + r * hidden : nullptr;
      at::BFloat16* orow = op + r * hidden;
      int64_t i = 0;
      float ss = 0.f;
#if RTSERVE_HAVE_AVX512
      __m512 acc = _mm512_setzero_ps();
      for (; i + 16 <= hidden; i += 16) {
        __m512 v = _mm512_loadu_ps(xr + i);
        if (rr != nullptr) {
          v = _mm512_add_ps(v, rtserve::load_bf16(rr + i));
          _mm512_storeu_ps(xr + i, v);
        }
        acc = _mm512_fmadd_ps(v, v, acc);
      }
      ss = _mm512_reduce_add_ps(acc);
#endif
      for (; i < hidden; ++i) {
        if (rr != nullptr) xr[i] += bf(rr[i]);
        ss += xr[i] * xr[i];
      }
      const float inv = 1.f / std::sqrt(ss);
      i = 0;
#if RTSERVE_HAVE_AVX512
      const __m512 iv = _mm512_set1_ps(inv);
      for (; i + 16 <= hidden; i += 16)
        rtserve::store_bf16(orow + i, _mm512_mul_ps(_mm512_loadu_ps(xr + i), _mm512_mul_ps(_mm512_loadu_ps(wp + i), iv)));
#endif
      for (; i < hidden; ++i) orow[i] = at::BFloat16(xr[i] * (wp[i] * inv));
    }
  });
  return out;
}

at::Tensor rope_kv_write(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                         at::Tensor& v_cache, const at::Tensor& slots, int64_t num_heads, int64_t num_kv_heads) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == at::kBFloat16 && qkv.stride(1) == 1, "qkv must be bf16 [T, N] with unit inner stride");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == at::kBFloat16 &&
                  v_cache.scalar_type() == at::kBFloat16, "caches must be contiguous bf16 [num_slots, KVH, hd]");
  const int64_t rows = qkv.size(0), head_dim = k_cache.size(2), num_slots = k_cache.size(0);
  TORCH_CHECK(k_cache.size(1) == num_kv_heads && qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim,
              "qkv width does not match the head counts");
  TORCH_CHECK(cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16 && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == rows * head_dim && sin.numel() == rows * head_dim,
              "cos and sin must be contiguous bf16 [T, hd]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == rows && slots.is_contiguous(), "slots must be int64 [T]");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) TORCH_CHECK(sp[r] >= 0 && sp[r] < num_slots, "slot out of range");
  at::Tensor q = at::empty({rows, num_heads, head_dim}, qkv.options().memory_format(c10::MemoryFormat::Contiguous));
  const at::BFloat16* in = qkv.data_ptr<at::BFloat16>();
  const int64_t in_stride = qkv.stride(0), half = head_dim / 2;
  const at::BFloat16 *cp = cos.data_ptr<at::BFloat16>(), *snp = sin.data_ptr<at::BFloat16>();
  at::BFloat16 *qp = q.data_ptr<at::BFloat16>(), *kp = k_cache.data_ptr<at::BFloat16>(),
               *vp = v_cache.data_ptr<at::BFloat16>();
  const int64_t width = (num_heads + 2 * num_kv_heads) * head_dim;
  at::parallel_for(0, rows, grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const at::BFloat16* row = in + r * in_stride;
      const at::BFloat16 *c = cp + r * head_dim, *s = snp + r * head_dim;
      for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
        const at::BFloat16* src = row + h * head_dim;
        at::BFloat16* dst = h < num_heads ? qp + (r * num_heads + h) * head_dim
                                          : kp + (sp[r] * num_kv_heads + (h - num_heads)) * head_dim;
        int64_t i = 0;
#if RTSERVE_HAVE_AVX512
        if (half % 16 == 0) {
          for (; i < head_dim; i += 16) {
            const int64_t j = i < half ? i + half : i - half;  // rotate-half partner (sign is in sin)
            rtserve::store_bf16(dst + i, _mm512_fmadd_ps(rtserve::load_bf16(src + i), rtserve::load_bf16(c + i),
                                                         _mm512_mul_ps(rtserve::load_bf16(src + j), rtserve::load_bf16(s + i))));
          }
        }
#endif
        for (; i < head_dim; ++i) {
          const int64_t j = i < half ? i + half : i - half;
          dst[i] = at::BFloat16(bf(src[i]) * bf(c[i]) + bf(src[j]) * bf(s[i]));
        }
      }
      std::memcpy(vp + sp[r] * num_kv_heads * head_dim, row + (num_heads + num_kv_heads) * head_dim,
                  num_kv_heads * head_dim * sizeof(at::BFloat16));
    }
  });
  return q;
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.scalar_type() == at::kBFloat16 && gate_up.is_contiguous() &&
                  gate_up.size(1) % 2 == 0, "gate_up must be contiguous bf16 [T, 2 I]");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, inter}, gate_up.options());
  const at::BFloat16* in = gate_up.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, rows, grain(2 * inter), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const at::BFloat16 *g = in + r * 2 * inter, *u = g + inter;
      at::BFloat16* o = op + r * inter;
      int64_t i = 0;
#if RTSERVE_HAVE_AVX512
      const __m512 one = _mm512_set1_ps(1.f);
      for (; i + 16 <= inter; i += 16) {
        const __m512 gv = rtserve::load_bf16(g + i);
        const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, rtserve::exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        rtserve::store_bf16(o + i, _mm512_mul_ps(_mm512_mul_ps(gv, sig), rtserve::load_bf16(u + i)));
      }
#elif RTSERVE_HAVE_AVX2
      const __m256 one = _mm256_set1_ps(1.f);
      alignas(32) float res[8];
      for (; i + 8 <= inter; i += 8) {
        const __m256 gv = rtserve::load_bf16x8(g + i);
        const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, rtserve::exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
        _mm256_store_ps(res, _mm256_mul_ps(_mm256_mul_ps(gv, sig), rtserve::load_bf16x8(u + i)));
        for (int j = 0; j < 8; ++j) o[i + j] = at::BFloat16(res[j]);
      }
#endif
      for (; i < inter; ++i) {
        const float gv = bf(g[i]);
        o[i] = at::BFloat16(gv / (1.f + std::exp(-gv)) * bf(u[i]));
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rtserve, m) {
  m.def("add_rms_norm(Tensor(a!) x, Tensor? residual, Tensor weight) -> Tensor");
  m.def("rope_kv_write(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slots, int num_heads, int num_kv_heads) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(rtserve, CPU, m) {
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rope_kv_write", &rope_kv_write);
  m.impl("silu_mul", &silu_mul);
}
