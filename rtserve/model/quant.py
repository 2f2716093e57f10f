"""Quantized linear weights for the CPU fast path, built from a GGUF's own quantized blocks.

A GGUF Q4_1 block stores 32 weights as `w = d * q + m` (fp16 d and m, 4-bit q in 0..15). torch's
group-wise int4 kernels compute `w = (q - 8) * scale + zero`, so one Q4_1 block is exactly one int4
group of 32 with `scale = d` and `zero = m + 8 * d`. No weight is requantized for that kernel.

`FastLinear` keeps one [N, K] matrix in the forms the step shapes want (chosen by measurement on
this CPU, see benchmarks/kernels.py):
  - `small(x)`: M < `LARGE_M` rows: int4 weight-only (`_weight_int4pack_mm_for_cpu`, bf16 act.);
  - `large(x)`: M >= `LARGE_M`: bf16 weights prepacked for oneDNN (AMX/AVX-512 bf16 GEMM).
Both return bf16 [M, N].
"""
from __future__ import annotations

import numpy as np
import torch

Q4_1_BLOCK_LEN, Q4_1_BLOCK_NBYTES = 32, 20
Q8_0_BLOCK_LEN, Q8_0_BLOCK_NBYTES = 32, 34
INT4_INNER_K_TILES = 2
LARGE_M = 8  # rows from which the bf16 GEMM beats the int4 GEMV (benchmarks/kernels.py: between 4 and 8)


def q4_1_unpack(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """blocks: [N, K/32, 20] uint8 (GGUF Q4_1). Returns q [N, K] uint8 (0..15), d and m [N, K/32] fp32."""
    n, num_groups, _ = blocks.shape
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()  # [N, K/32]
    m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
    qs = blocks[..., 4:]                                                           # [N, K/32, 16]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # ggml order: low nibbles are weights 0..15
    return q.reshape(n, num_groups * Q4_1_BLOCK_LEN), d, m


def q4_1_dequantize(blocks: torch.Tensor) -> torch.Tensor:
    """[N, K/32, 20] uint8 -> [N, K] fp32, the same arithmetic as ggml's `dequantize_row_q4_1`."""
    q, d, m = q4_1_unpack(blocks)
    n, k = q.shape
    w = q.view(n, -1, Q4_1_BLOCK_LEN).float() * d.unsqueeze(-1) + m.unsqueeze(-1)
    return w.reshape(n, k)


def q8_0_dequantize(blocks: torch.Tensor) -> torch.Tensor:
    """[N, K/32, 34] uint8 (GGUF Q8_0: fp16 d, 32 x int8) -> [N, K] fp32 (`d * q`)."""
    n = blocks.shape[0]
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()         # [N, K/32, 1]
    q = blocks[..., 2:].contiguous().view(torch.int8).float()              # [N, K/32, 32]
    return (q * d).reshape(n, -1)


def int4pack_from_q4_1(blocks: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16):
    """GGUF Q4_1 blocks [N, K/32, 20] -> (packed [N, K/2] uint8, scales_and_zeros [K/32, N, 2]).

    For `_weight_int4pack_mm_for_cpu(x, packed, 32, scales_and_zeros)`; the activations must have
    `scale_dtype` (bf16 for speed; fp32 reproduces the GGUF dequantization to fp32 rounding).
    """
    q, d, m = q4_1_unpack(blocks)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), INT4_INNER_K_TILES)
    scales_and_zeros = torch.stack([d, m + 8.0 * d], dim=-1).transpose(0, 1)  # [K/32, N, 2]
    return packed, scales_and_zeros.to(scale_dtype).contiguous()


def int4pack_mm(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] (dtype of scales_and_zeros) @ W.T -> [M, N]."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, Q4_1_BLOCK_LEN, scales_and_zeros)


def prepack_bf16(weight: torch.Tensor, batch_size_hint: int = 512) -> torch.Tensor:
    """[N, K] float weight -> bf16 weight reordered for oneDNN's linear (used by `bf16_mm`)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16).contiguous(), batch_size_hint)


def bf16_mm(x: torch.Tensor, prepacked: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 @ W.T -> [M, N] bf16 through oneDNN with a prepacked weight."""
    return torch.ops.mkldnn._linear_pointwise(x, prepacked, None, "none", [], "")


class FastLinear:
    """One [N, K] matrix kept as int4 (small M) and prepacked bf16 (large M); bf16 in and out.

    Plain object, not an nn.Module: the step calls `small`/`large` directly (fewer Python layers).
    """

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, bf16_prepacked: torch.Tensor,
                 out_features: int) -> None:
        self.packed = packed                      # [N, K/2] uint8
        self.scales_and_zeros = scales_and_zeros  # [K/32, N, 2] bf16
        self.bf16_prepacked = bf16_prepacked      # oneDNN-blocked bf16 [N, K]
        self.out_features = out_features

    @classmethod
    def from_q4_1(cls, blocks: torch.Tensor) -> "FastLinear":
        """blocks: [N, K/32, 20] uint8 GGUF Q4_1 (rows already in the model's order)."""
        packed, sz = int4pack_from_q4_1(blocks)
        return cls(packed, sz, prepack_bf16(q4_1_dequantize(blocks)), blocks.shape[0])

    def small(self, x: torch.Tensor) -> torch.Tensor:
        return int4pack_mm(x, self.packed, self.scales_and_zeros)

    def large(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.bf16_prepacked, None, "none", [], "")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.small(x) if x.shape[0] < LARGE_M else self.large(x)


def blocks_view(raw: np.ndarray, rows: int, block_nbytes: int) -> torch.Tensor:
    """A GGUF tensor's raw bytes as [rows, blocks_per_row, block_nbytes] uint8 (a copy: the file map is
    read-only)."""
    return torch.from_numpy(np.array(raw, dtype=np.uint8).reshape(rows, -1, block_nbytes))
