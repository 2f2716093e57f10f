"""Building blocks of a decoder: RMSNorm, rotary embedding, paged attention, gated MLP activation.

Numerics follow Hugging Face's modelling code exactly in float32 (RMSNorm in fp32, rotate-half RoPE
with inv_freq computed as HF does, for each RoPE variant) so greedy output can be compared token
for token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rtserve.config import ModelConfig
from rtserve.runner.attention_metadata import AttentionMetadata


class RMSNorm(nn.Module):
    """x / rms(x) * (weight_offset + weight). Llama casts before scaling; Gemma (offset 1) scales in
    fp32 and casts after, as HF does for each (identical in fp32)."""

    def __init__(self, size: int, eps: float, weight_offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size) if weight_offset == 0.0 else torch.zeros(size))
        self.eps = eps
        self.weight_offset = weight_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_offset:
            return (x32 * (self.weight_offset + self.weight.float())).to(dtype)
        return self.weight * x32.to(dtype)


def gated_activation(name: str, gate: torch.Tensor) -> torch.Tensor:
    """The MLP gate's nonlinearity: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, HF's gelu_pytorch_tanh)."""
    return F.silu(gate) if name == "silu" else F.gelu(gate, approximate="tanh")


def rope_inv_freq(cfg: ModelConfig, sliding: bool = False) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] fp32 of a full-attention layer, or of a sliding one (plain
    RoPE at `rope_local_theta` when the config sets it), computed as HF's rope init functions do."""
    dim = cfg.head_dim
    theta = cfg.rope_local_theta if sliding and cfg.rope_local_theta else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if sliding and cfg.rope_local_theta:
        return inv_freq
    if cfg.rope_freq_factors:
        return inv_freq / torch.tensor(cfg.rope_freq_factors, dtype=torch.float32)
    if cfg.rope_type == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_type == "llama3":
        factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_len = cfg.rope_original_max_position
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE; cos/sin tables [max_position, head_dim] precomputed in fp32 (plain RoPE at
    `theta`, or from the given inverse frequencies)."""

    def __init__(self, head_dim: int, max_position: int, theta: float = 10000.0,
                 inv_freq: torch.Tensor | None = None) -> None:
        super().__init__()
        if inv_freq is None:
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        t = torch.arange(max_position, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)            # [max_position, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)     # [max_position, head_dim]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        # q: [T, H, D], k: [T, KVH, D], positions: [T]
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend through the block tables.

    q: [T, H, D]; k, v: [T, KVH, D]; kv_cache: [2, num_blocks, block_size, KVH, D] (modified in place).
    Returns [T, H, D].
    """
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_slots = kv_cache[0].view(-1, num_kv_heads, head_dim)  # [num_slots, KVH, D]
    v_slots = kv_cache[1].view(-1, num_kv_heads, head_dim)
    return paged_attention_slots(q, k, v, k_slots, v_slots, meta, scale)


def paged_attention_slots(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, k_slots: torch.Tensor,
                          v_slots: torch.Tensor, meta: AttentionMetadata, scale: float,
                          decode_kernel: bool = False) -> torch.Tensor:
    """`paged_attention` on slot views [num_slots, KVH, D] of the K and V caches (modified in place).

    k, v: this step's keys and values to write first, or both None when the caller has already
    written them. decode_kernel: decodes go through `torch.ops.rtserve.paged_decode_attention` (bf16
    caches; the fast path registers it), which reads the blocks in place instead of gathering them."""
    if k is not None:
        k_slots.index_copy_(0, meta.slot_mapping, k)
        v_slots.index_copy_(0, meta.slot_mapping, v)
    d = meta.num_decodes
    if d == q.shape[0] and meta.decode_slot_range is not None and not decode_kernel:
        # One decode whose slots are consecutive: attend to a slice of the cache, no gather, no mask.
        start, end = meta.decode_slot_range
        kd = k_slots[start:end].transpose(0, 1).unsqueeze(0)     # [1, KVH, L, hd]
        vd = v_slots[start:end].transpose(0, 1).unsqueeze(0)
        od = F.scaled_dot_product_attention(q.unsqueeze(2), kd, vd, scale=scale, enable_gqa=True)
        return od.view(q.shape)
    if d == q.shape[0]:
        return _decode_attention(q, k_slots, v_slots, meta, scale, decode_kernel)
    out = torch.empty_like(q)
    if d:
        out[:d] = _decode_attention(q[:d], k_slots, v_slots, meta, scale, decode_kernel)
    for p in meta.prefills:
        s, e = p.query_start, p.query_start + p.query_len
        qp = q[s:e].transpose(0, 1).unsqueeze(0)                          # [1, H, q, hd]
        kp = k_slots.index_select(0, p.gather_idx).transpose(0, 1).unsqueeze(0)  # [1, KVH, L, hd]
        vp = v_slots.index_select(0, p.gather_idx).transpose(0, 1).unsqueeze(0)
        if p.causal_mask is None:
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.causal_mask, scale=scale,
                                                enable_gqa=True)
        out[s:e] = op.squeeze(0).transpose(0, 1)
    return out


def _decode_attention(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor, meta: AttentionMetadata,
                      scale: float, use_kernel: bool) -> torch.Tensor:
    """The D single-token decodes (q [D, H, hd]) through their block tables -> [D, H, hd]."""
    if use_kernel:
        return torch.ops.rtserve.paged_decode_attention(q.contiguous(), k_slots, v_slots, meta.decode_block_table,
                                                        meta.decode_seq_lens, meta.block_size, scale)
    d, (num_kv_heads, head_dim) = q.shape[0], k_slots.shape[1:]
    table = meta.decode_block_table                          # [D, B]
    width = meta.decode_mask.shape[-1]                       # B * block_size
    blocks = table.view(-1)
    k_blocks = k_slots.view(-1, width // table.shape[1], num_kv_heads, head_dim)
    v_blocks = v_slots.view(k_blocks.shape)
    kd = k_blocks.index_select(0, blocks).view(d, width, num_kv_heads, head_dim).transpose(1, 2)
    vd = v_blocks.index_select(0, blocks).view(d, width, num_kv_heads, head_dim).transpose(1, 2)
    od = F.scaled_dot_product_attention(q.unsqueeze(2), kd, vd, attn_mask=meta.decode_mask, scale=scale,
                                        enable_gqa=True)     # [D, H, 1, hd]
    return od.view(q.shape)
