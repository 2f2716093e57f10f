"""GGUF quantized blocks as affine int4 groups of 32, the format of torch's int4 GEMV
(`_weight_int4pack_mm_for_cpu`: w = (q - 8) * scale + zero per group), without an fp32 copy.

Which GGUF types map exactly (every w = q * scale + offset below equals ggml's dequantized value in
fp32, bit for bit unless said):
  - Q4_1: scale = d, offset = m (fp16 each);
  - Q4_0: scale = d, offset = -8 d (w = (q - 8) d: q d and 8 d are exact in fp32, so is their sum;
    only a zero weight can come out as +0 where ggml gives -0);
  - Q4_K: each sub-block of 32 is a group with scale = d * sc and offset = -(dmin * m) (fp16 times a
    6-bit integer: exact in fp32, not in fp16 or bf16).
The kernel then takes scale and zero = offset + 8 scale in the activations' dtype: exact with fp32
activations up to the kernel's own rounding, and rounded to 8 significant bits with bf16.
The CPU fast path (rtserve/model/quantized_loader.py) builds its int4, bf16 and AMX forms from these
groups, so a Llama GGUF whose layer matrices are any mix of the three runs it.
Not mapped here: Q5_0/Q5_1/Q5_K (5-bit) and Q6_K/Q8_0 (6/8-bit) need int8 groups, for which torch
has no group-wise CPU kernel (`_weight_int8pack_mm` scales per row only); they stay on the fp32 path.
"""
from __future__ import annotations

import numpy as np
import torch

from rtserve.model.gguf import GGML_TYPES, _k_scales

GROUP_LEN = 32
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def int4_groups(raw: np.ndarray, ggml_type: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A GGUF tensor's bytes -> (q [rows, K] uint8 in 0..15, scale and offset [rows, K/32] fp32),
    with w = q * scale + offset per group of 32. ValueError for types that are not affine int4."""
    gtype = GGML_TYPES[ggml_type]
    if gtype.name not in INT4_TYPES:
        raise ValueError(f"{gtype.name} is not an affine int4 type ({', '.join(INT4_TYPES)})")
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, gtype.block_nbytes)  # [blocks, nbytes]
    if gtype.name == "Q4_K":
        scale, minimum = _k_scales(b[:, 4:16])                    # [blocks, 8] each
        qs = b[:, 16:144].reshape(-1, 4, 32)                      # 4 chunks -> sub-blocks 2c, 2c+1
        q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)
        group_scale = _f16(b, 0) * scale
        group_offset = -(_f16(b, 2) * minimum)
    else:
        at = 2 if gtype.name == "Q4_0" else 4
        qs = b[:, at:]                                            # [blocks, 16]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)[:, None, :]
        group_scale = _f16(b, 0)
        group_offset = -8.0 * group_scale if gtype.name == "Q4_0" else _f16(b, 2)
    return (torch.from_numpy(np.ascontiguousarray(q.reshape(rows, -1))),
            torch.from_numpy(np.ascontiguousarray(group_scale.reshape(rows, -1), dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(group_offset.reshape(rows, -1), dtype=np.float32)))


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """[rows, K] fp32: q * scale + offset per group (the GGUF values, bit for bit)."""
    rows, k = q.shape
    w = q.view(rows, -1, GROUP_LEN).float() * scale[..., None] + offset[..., None]
    return w.reshape(rows, k)


def int4pack(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16,
             inner_k_tiles: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed [N, K/2] uint8, scales_and_zeros [K/32, N, 2]) for `_weight_int4pack_mm_for_cpu`
    with group size 32; activations must have `scale_dtype`."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), inner_k_tiles)
    scales_and_zeros = torch.stack([scale, offset + 8.0 * scale], dim=-1).transpose(0, 1)  # [K/32, N, 2]
    return packed, scales_and_zeros.to(scale_dtype).contiguous()


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)  # [blocks, 1]
