// Row-wise argmax of fp32 logits, vectorized (torch's CPU argmax is ~10x slower than its amax on
// [B, 49152]). Ties resolve to the lowest index and a NaN counts as the maximum, as torch.argmax does.
//
//   argmax_rows(logits [B, V] fp32) -> [B] int64
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "vec.h"

namespace {

int64_t argmax_row(const float* x, int64_t n) {
  int64_t i = 0;
  float m = -std::numeric_limits<float>::infinity();
#if RTSERVE_HAVE_AVX512
  __m512 mv = _mm512_set1_ps(m);
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) {  // a NaN: its first occurrence wins
      for (int64_t j = i;; ++j)
        if (std::isnan(x[j])) return j;
    }
    mv = _mm512_max_ps(mv, v);
  }
  m = _mm512_reduce_max_ps(mv);
#endif
  for (int64_t j = i; j < n; ++j) {
    if (std::isnan(x[j])) return j;
    m = x[j] > m ? x[j] : m;
  }
  for (int64_t j = 0; j < n; ++j)  // the first index holding the maximum
    if (x[j] == m) return j;
  return 0;  // unreachable for n >= 1 (all -inf: index 0 equals m)
}

at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1 && logits.size(1) > 0,
              "logits must be fp32 [B, V] with unit inner stride");
  const int64_t rows = logits.size(0), vocab = logits.size(1), stride = logits.stride(0);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* lp = logits.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) op[r] = argmax_row(lp + r * stride, vocab);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rtserve, m) { m.def("argmax_rows(Tensor logits) -> Tensor"); }

TORCH_LIBRARY_IMPL(rtserve, CPU, m) { m.impl("argmax_rows", &argmax_rows); }
