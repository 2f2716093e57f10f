"""Decode-only steps of the fast path as one TorchScript function over all layers.

A batch-1 decode step is ~40 small tensor ops per layer (1,200 per step) around 120 quantized
GEMVs; from Python each op costs several microseconds of interpreter and binding overhead, about a
third of the step. TorchScript runs the same ops without the interpreter. Scripting takes ~20 ms at
start (no on-disk cache needed). If scripting ever fails (TorchScript is deprecated), the same
function runs eagerly: identical results, only slower.

Numerics are those of `FastLlamaForCausalLM`'s eager loop (which prefill and mixed steps use):
fp32 residual and RMSNorm (as a vector norm), bf16 matmul inputs, RoPE, attention and KV cache.
"""
from __future__ import annotations

import logging
import warnings
from typing import List, Optional, Union

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def decode_layers(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                  block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int, kernel: int,
                  norms: List[torch.Tensor], packed: List[torch.Tensor], scales_zeros: List[torch.Tensor],
                  bf16_weights: List[torch.Tensor], int4_q: List[torch.Tensor], int4_dm: List[torch.Tensor],
                  k_caches: List[torch.Tensor], v_caches: List[torch.Tensor], num_heads: int,
                  num_kv_heads: int, head_dim: int, scale: float) -> torch.Tensor:
    """All layers for D single-token decodes. x: [D, H] fp32 (embeddings) -> [D, H] fp32.

    cos, sin: [D, hd] bf16 (sin signed for the half swap); norms: 2 per layer, weights
    pre-scaled by sqrt(H); packed/scales_zeros/bf16_weights/int4_q/int4_dm: 4 per layer (qkv, o,
    gate_up, down), used by the matmul `kernel` (see `_mm`); int4_q/int4_dm hold the AMX layout or
    the panel layout, whichever native int4 kernel this machine runs;
    k_caches/v_caches: per layer [num_slots, KVH, hd] bf16, written in place. Attention is the
    `rtserve.paged_decode_attention` op, reading each sequence's seq_lens[d] cached tokens in place
    through block_table [D, B]; norms, RoPE with the cache write, and SiLU-mul are fused ops too
    (rtserve/kernels). x is updated in place.
    """
    num_tokens = x.shape[0]
    q_size = num_heads * head_dim
    pending: Optional[torch.Tensor] = None  # the last layer's MLP output, added to x by the next norm
    for i in range(len(k_caches)):
        h = torch.ops.rtserve.add_rms_norm(x, pending, norms[2 * i])                # x += pending; [D, H] bf16
        qkv = _mm(h, 4 * i, kernel, packed, scales_zeros, bf16_weights, int4_q, int4_dm)       # [D, qkv] bf16
        q = torch.ops.rtserve.rope_kv_write(qkv, cos, sin, k_caches[i], v_caches[i], slot_mapping,
                                            num_heads, num_kv_heads)                   # [D, H, hd] bf16
        o = torch.ops.rtserve.paged_decode_attention(q, k_caches[i], v_caches[i], block_table, seq_lens,
                                                     block_size, scale)                # [D, H, hd] bf16
        o = _mm(o.view(num_tokens, q_size), 4 * i + 1, kernel, packed, scales_zeros, bf16_weights, int4_q, int4_dm)
        h = torch.ops.rtserve.add_rms_norm(x, o, norms[2 * i + 1])                       # x += o; [D, H] bf16
        gate_up = _mm(h, 4 * i + 2, kernel, packed, scales_zeros, bf16_weights, int4_q, int4_dm)  # [D, 2 I] bf16
        act = torch.ops.rtserve.silu_mul(gate_up)                                       # [D, I] bf16
        pending = _mm(act, 4 * i + 3, kernel, packed, scales_zeros, bf16_weights, int4_q, int4_dm)
    if pending is not None:
        x.add_(pending)
    return x


def _mm(x: torch.Tensor, j: int, kernel: int, packed: List[torch.Tensor], scales_zeros: List[torch.Tensor],
        bf16_weights: List[torch.Tensor], int4_q: List[torch.Tensor], int4_dm: List[torch.Tensor]) -> torch.Tensor:
    """Matrix j through `kernel` (quant.SMALL: int4 GEMV, AMX: int4 on AMX tiles, LARGE: oneDNN bf16
    prepacked, PANEL: the int4 panel GEMM); bf16 in and out."""
    if kernel == 0:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed[j], 32, scales_zeros[j])
    if kernel == 1:
        return torch.ops.rtserve.int4_linear(x, int4_q[j], int4_dm[j])
    if kernel == 3:
        return torch.ops.rtserve.int4_panel_linear(x, int4_q[j], int4_dm[j])
    no_scalars = torch.jit.annotate(List[Optional[Union[int, float, complex]]], [])
    return torch.ops.mkldnn._linear_pointwise(x, bf16_weights[j], None, "none", no_scalars, "")


def compile_decode_layers():
    """`decode_layers` scripted, or the plain function if TorchScript is unavailable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script is deprecated; it still works and helps
            return torch.jit.script(decode_layers)
    except Exception as e:  # noqa: BLE001 - any scripting failure falls back to eager
        logger.warning("TorchScript unavailable for the decode step (%s); running it eagerly", e)
        return decode_layers
