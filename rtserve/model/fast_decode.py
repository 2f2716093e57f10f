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
                  slot_start: int, slot_end: int, block_table: Optional[torch.Tensor],
                  mask: Optional[torch.Tensor], small: bool, norms: List[torch.Tensor],
                  packed: List[torch.Tensor], scales_zeros: List[torch.Tensor],
                  bf16_weights: List[torch.Tensor],
                  k_caches: List[torch.Tensor], v_caches: List[torch.Tensor], num_heads: int,
                  num_kv_heads: int, head_dim: int, intermediate_size: int, scale: float) -> torch.Tensor:
    """All layers for D single-token decodes. x: [D, H] fp32 (embeddings) -> [D, H] fp32.

    cos, sin: [D, 1, 2, hd/2] bf16 (sin signed for the half swap); norms: 2 per layer, weights
    pre-scaled by sqrt(H); packed/scales_zeros/bf16_weights: 4 per layer (qkv, o, gate_up, down);
    k_caches/v_caches: per layer [num_slots, KVH, hd] bf16, written in place. Attention reads slots
    [slot_start, slot_end) when `block_table` is None (D == 1, consecutive slots), else whole blocks
    through block_table [D, B] with mask [D, 1, 1, B * block_size].
    """
    num_tokens = x.shape[0]
    q_size = num_heads * head_dim
    qk_size = q_size + num_kv_heads * head_dim
    for i in range(len(k_caches)):
        h = torch.empty(x.shape, dtype=torch.bfloat16)
        torch.mul(x, norms[2 * i] / torch.linalg.vector_norm(x, dim=-1, keepdim=True), out=h)
        qkv = _mm(h, 4 * i, small, packed, scales_zeros, bf16_weights)                 # [D, qkv] bf16
        qk = qkv[:, :qk_size].view(num_tokens, num_heads + num_kv_heads, 2, head_dim // 2)
        qk = torch.addcmul(qk * cos, qk.flip(2), sin).view(num_tokens, num_heads + num_kv_heads, head_dim)
        k_cache, v_cache = k_caches[i], v_caches[i]
        k_cache.index_copy_(0, slot_mapping, qk[:, num_heads:])
        v_cache.index_copy_(0, slot_mapping, qkv[:, qk_size:].view(num_tokens, num_kv_heads, head_dim))
        if block_table is None:
            kd = k_cache[slot_start:slot_end].transpose(0, 1).unsqueeze(0)             # [1, KVH, L, hd]
            vd = v_cache[slot_start:slot_end].transpose(0, 1).unsqueeze(0)
        else:
            blocks = block_table.view(-1)
            block_size = mask.shape[-1] // block_table.shape[1] if mask is not None else 1
            kd = k_cache.view(-1, block_size, num_kv_heads, head_dim).index_select(0, blocks).view(
                num_tokens, -1, num_kv_heads, head_dim).transpose(1, 2)                 # [D, KVH, W, hd]
            vd = v_cache.view(-1, block_size, num_kv_heads, head_dim).index_select(0, blocks).view(
                num_tokens, -1, num_kv_heads, head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(qk[:, :num_heads].unsqueeze(2), kd, vd, attn_mask=mask,
                                           scale=scale, enable_gqa=True)                # [D, H, 1, hd]
        x = x + _mm(o.view(num_tokens, q_size), 4 * i + 1, small, packed, scales_zeros, bf16_weights)
        h = torch.empty(x.shape, dtype=torch.bfloat16)
        torch.mul(x, norms[2 * i + 1] / torch.linalg.vector_norm(x, dim=-1, keepdim=True), out=h)
        gate_up = _mm(h, 4 * i + 2, small, packed, scales_zeros, bf16_weights)         # [D, 2 I] bf16
        act = F.silu(gate_up[:, :intermediate_size]) * gate_up[:, intermediate_size:]
        x = x + _mm(act, 4 * i + 3, small, packed, scales_zeros, bf16_weights)
    return x


def _mm(x: torch.Tensor, j: int, small: bool, packed: List[torch.Tensor], scales_zeros: List[torch.Tensor],
        bf16_weights: List[torch.Tensor]) -> torch.Tensor:
    """Matrix j: int4 group-32 for few rows, oneDNN bf16 (prepacked) otherwise; bf16 in and out."""
    if small:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed[j], 32, scales_zeros[j])
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
