"""Quantized linear weights for the CPU fast path, built from a GGUF's own quantized blocks.

A GGUF Q4_1 block stores 32 weights as `w = d * q + m` (fp16 d and m, 4-bit q in 0..15). torch's
group-wise int4 kernels compute `w = (q - 8) * scale + zero`, so one Q4_1 block is exactly one int4
group of 32 with `scale = d` and `zero = m + 8 * d`. No weight is requantized for that kernel.

`FastLinear` keeps one [N, K] matrix in the forms the step shapes want (chosen by measurement on
this CPU, see benchmarks/kernels.py; `kernel_for_rows` picks):
  - `small(x)`: M < `AMX_MIN_M` rows: int4 weight-only GEMV (`_weight_int4pack_mm_for_cpu`);
  - `amx(x)`: AMX_MIN_M <= M <= `AMX_MAX_M`, on CPUs with AMX: the 4-bit weights expanded to bf16 on
    the fly into AMX tiles (`torch.ops.rtserve.int4_linear`, rtserve/kernels/int4_gemm.cpp); decode
    batches are bound by weight bytes, and this reads a quarter of the bf16 GEMM's;
  - `large(x)`: more rows (prefill) or no AMX: bf16 weights prepacked for oneDNN (AMX/AVX-512 GEMM).
All return bf16 [M, N]. Where oneDNN's bf16 linear cannot run (`onednn_bf16`: torch refuses its
weight reorder on x86 CPUs without AVX-512 BW/VL/DQ or AVX-NE-CONVERT, the AVX2-only laptops and VMs)
no bf16 copy of the layer matrices is kept, and from `LARGE_M` rows the native int4 panel GEMM serves
(`panel(x)`, `torch.ops.rtserve.int4_panel_linear`, rtserve/kernels/int4_panel.cpp: fp32 FMAs over
weights expanded once per 16 columns). torch's int4 kernel costs the same per row at any row count
there, so on an AVX2-only AMD EPYC (2 threads) the panel kernel runs SmolLM2's 16-row gate_up in
0.69 ms against 1.37 and 512 rows in 15 ms against 40. Without the native build (no compiler),
`small` serves every row count: one op falls back, not the process.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch
import torch.nn.functional as F

from rtserve import kernels
from rtserve.kernels import cpu_has_amx

Q4_1_BLOCK_LEN, Q4_1_BLOCK_NBYTES = 32, 20
Q8_0_BLOCK_LEN, Q8_0_BLOCK_NBYTES = 32, 34
INT4_INNER_K_TILES = 2
LARGE_M = 8  # without AMX: rows from which the bf16 GEMM (or the panel GEMM) beats the int4 GEMV
AMX_MIN_M = 4  # with AMX: rows from which the AMX int4 kernel beats the int4 GEMV (equal at 4, 1.7x at 8)
AMX_MAX_M = 32  # the AMX int4 kernel's limit (two 16-row tiles); beyond, the oneDNN bf16 GEMM
SMALL, AMX, LARGE, PANEL = 0, 1, 2, 3  # kernel ids (`kernel_for_rows`)


@functools.cache
def onednn_bf16() -> bool:
    """Whether oneDNN's bf16 linear (prepacked weight) runs on this CPU: tried once on a tiny matrix,
    as torch's own checks decide (CPUID, not /proc/cpuinfo, so it holds under emulation too).
    `RTSERVE_ONEDNN_BF16=0` turns it off, to run the fallback on any CPU."""
    if os.environ.get("RTSERVE_ONEDNN_BF16", "1") == "0":
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 32, dtype=torch.bfloat16), 1)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 32, dtype=torch.bfloat16), w, None, "none", [], "")
        return bool(y.shape == (1, 16) and float(y[0, 0]) == 32.0)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def panel_kernel_runs() -> bool:
    """Whether the int4 panel GEMM serves the fast path's larger steps on this CPU: no AMX, no oneDNN
    bf16 linear, and the native kernels built with their SIMD path (AVX2 and FMA). Only then is its
    weight layout built (`rtserve.model.quantized_loader`)."""
    return (not cpu_has_amx() and not onednn_bf16() and kernels.native_available()
            and bool(torch.ops.rtserve.int4_panel_simd()))


def kernel_for_rows(num_rows: int, have_amx: bool, have_panel: bool = False) -> int:
    """Which matmul serves a step of `num_rows` tokens: SMALL, AMX, LARGE or PANEL. LARGE only where
    `onednn_bf16`; else PANEL from `LARGE_M` rows where the panel layout is there (`have_panel`),
    else the int4 GEMV serves the rows AMX does not."""
    large = LARGE if onednn_bf16() else PANEL if have_panel else SMALL
    if have_amx:
        return SMALL if num_rows < AMX_MIN_M else AMX if num_rows <= AMX_MAX_M else large
    return SMALL if num_rows < LARGE_M else large


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


def pack_q4_amx(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q4_1 blocks [N, K/32, 20] -> (qw [N/16, K/32, 16, 16] uint8, dm [N/16, K/32, 64] fp32), the
    layout of the AMX kernel `torch.ops.rtserve.int4_linear` (rtserve/kernels/int4_gemm.cpp, which
    documents it): per 16 columns and group, pair-row r byte i holds q[col i//2][k 2r + i%2] (low
    nibble) and q[col 8 + i//2][k 2r + i%2] (high); dm has d and m repeated per pair lane.
    N must be a multiple of 16."""
    return pack_q4_amx_groups(*q4_1_unpack(blocks))


def pack_q4_amx_groups(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`pack_q4_amx` from affine int4 groups: q [N, K] uint8 (0..15), d and m [N, K/32] fp32 with
    w = d * q + m (rtserve/model/quant_groups.py makes them from Q4_0, Q4_1 and Q4_K)."""
    n, k = q.shape
    g = k // Q4_1_BLOCK_LEN
    q = q.view(n // 16, 2, 8, g, 16, 2).permute(0, 3, 4, 1, 2, 5)             # [N/16, G, r, half, c, e]
    q = q.reshape(n // 16, g, 16, 2, 16)                                      # lane i = 2 c + e
    qw = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).contiguous()                  # [N/16, G, 16, 16]
    rep = [t.view(n // 16, 16, g).transpose(1, 2).repeat_interleave(2, dim=-1) for t in (d, m)]
    return qw, torch.cat(rep, dim=-1).contiguous()                            # dm [N/16, G, 64]


def pack_q4_panel(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine int4 groups (q [N, K] uint8 0..15, d and m [N, K/32] fp32, w = d * q + m) -> (qw [N/16,
    K/32, 32, 8] uint8, dm [N/16, K/32, 32] fp32), the layout of the int4 panel kernel
    `torch.ops.rtserve.int4_panel_linear` (rtserve/kernels/int4_panel.cpp, which documents it):
    per 16-column panel, group and k, byte j holds q of column j (low nibble) and 8 + j (high).
    N must be a multiple of 16."""
    n, k = q.shape
    g = k // Q4_1_BLOCK_LEN
    q = q.view(n // 16, 16, g, Q4_1_BLOCK_LEN).permute(0, 2, 3, 1)         # [N/16, G, 32 (k), 16 (c)]
    qw = (q[..., :8] | (q[..., 8:] << 4)).contiguous()                      # [N/16, G, 32, 8]
    d, m = (t.view(n // 16, 16, g).transpose(1, 2) for t in (d, m))         # [N/16, G, 16]
    return qw, torch.cat([d, m], dim=-1).float().contiguous()


def int4pack_mm(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] (dtype of scales_and_zeros) @ W.T -> [M, N]."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, Q4_1_BLOCK_LEN, scales_and_zeros)


def prepack_bf16(weight: torch.Tensor, batch_size_hint: int = 512) -> torch.Tensor:
    """[N, K] float weight -> bf16 weight reordered for oneDNN's linear (used by `bf16_mm`); plain
    bf16 [N, K] where oneDNN's bf16 linear cannot run."""
    weight = weight.to(torch.bfloat16).contiguous()
    return torch.ops.mkldnn._reorder_linear_weight(weight, batch_size_hint) if onednn_bf16() else weight


def bf16_mm(x: torch.Tensor, prepacked: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 @ W.T -> [M, N] bf16 through oneDNN with a prepacked weight (`prepack_bf16`),
    or torch's own bf16 matmul where oneDNN's cannot run."""
    if onednn_bf16():
        return torch.ops.mkldnn._linear_pointwise(x, prepacked, None, "none", [], "")
    return F.linear(x, prepacked)


class FastLinear:
    """One [N, K] matrix kept as int4 (GEMV layout), int4 (AMX layout or panel layout) and prepacked
    bf16; bf16 in and out. The AMX form is None when N is not a multiple of 32 or the CPU has no AMX
    tiles (then `amx` is never chosen); the panel form None unless `panel_kernel_runs` and N is a
    multiple of 16 (then `panel` is never chosen).

    Plain object, not an nn.Module: the step calls `small`/`amx`/`large`/`panel` directly.
    """

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, bf16_prepacked: torch.Tensor,
                 out_features: int, amx_q: torch.Tensor | None = None, amx_dm: torch.Tensor | None = None,
                 panel_q: torch.Tensor | None = None, panel_dm: torch.Tensor | None = None) -> None:
        self.packed = packed                      # [N, K/2] uint8
        self.scales_and_zeros = scales_and_zeros  # [K/32, N, 2] bf16
        self.bf16_prepacked = bf16_prepacked      # oneDNN-blocked bf16 [N, K]
        self.out_features = out_features
        self.amx_q, self.amx_dm = amx_q, amx_dm   # `pack_q4_amx` layout, or None
        self.panel_q, self.panel_dm = panel_q, panel_dm  # `pack_q4_panel` layout, or None

    @classmethod
    def from_q4_1(cls, blocks: torch.Tensor) -> "FastLinear":
        """blocks: [N, K/32, 20] uint8 GGUF Q4_1 (rows already in the model's order)."""
        packed, sz = int4pack_from_q4_1(blocks)
        amx_q, amx_dm = pack_q4_amx(blocks) if blocks.shape[0] % 32 == 0 and cpu_has_amx() else (None, None)
        panel_q, panel_dm = (pack_q4_panel(*q4_1_unpack(blocks)) if blocks.shape[0] % 16 == 0
                             and panel_kernel_runs() else (None, None))
        bf16 = prepack_bf16(q4_1_dequantize(blocks)) if onednn_bf16() else torch.empty(0, dtype=torch.bfloat16)
        return cls(packed, sz, bf16, blocks.shape[0], amx_q, amx_dm, panel_q, panel_dm)

    def small(self, x: torch.Tensor) -> torch.Tensor:
        return int4pack_mm(x, self.packed, self.scales_and_zeros)

    def amx(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.rtserve.int4_linear(x, self.amx_q, self.amx_dm)

    def large(self, x: torch.Tensor) -> torch.Tensor:
        return bf16_mm(x, self.bf16_prepacked)

    def panel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.rtserve.int4_panel_linear(x, self.panel_q, self.panel_dm)

    def __call__(self, x: torch.Tensor, have_amx: bool = False) -> torch.Tensor:
        kernel = kernel_for_rows(x.shape[0], have_amx and self.amx_q is not None, self.panel_q is not None)
        return (self.small, self.amx, self.large, self.panel)[kernel](x)


def blocks_view(raw: np.ndarray, rows: int, block_nbytes: int) -> torch.Tensor:
    """A GGUF tensor's raw bytes as [rows, blocks_per_row, block_nbytes] uint8 (a copy: the file map is
    read-only)."""
    return torch.from_numpy(np.array(raw, dtype=np.uint8).reshape(rows, -1, block_nbytes))
