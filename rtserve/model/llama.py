"""Llama-family decoder (SmolLM2, Llama 2/3 shapes) reading and writing a paged KV cache.

The forward takes a flat batch of T tokens from any mix of prefill chunks and decodes, and returns
logits only for the rows the sampler needs (`logit_indices`), which keeps the LM head off prefill
tokens. Weights use Hugging Face names; q/k/v and gate/up are fused at load time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtserve.config import ModelConfig
from rtserve.model.layers import RMSNorm, RotaryEmbedding, paged_attention
from rtserve.runner.attention_metadata import AttentionMetadata


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=False)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x, positions, rope: RotaryEmbedding, kv_cache, meta: AttentionMetadata):
        cfg = self.cfg
        qkv = self.qkv_proj(x)                                   # [T, q_size + 2 * kv_size]
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(-1, cfg.num_heads, cfg.head_dim)              # [T, H, hd]
        k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)           # [T, KVH, hd]
        v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)
        q, k = rope(positions, q, k)
        o = paged_attention(q, k, v, kv_cache, meta, self.scale)  # [T, H, hd]
        return self.o_proj(o.reshape(-1, cfg.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, positions, rope, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_theta)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, logit_indices: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T]; logit_indices: [S] rows of T to project. Returns logits [S, V] fp32."""
        x = self.embed_tokens(input_ids)                          # [T, hidden]
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, positions, self.rope, kv_cache, meta)
        x = self.norm(x[logit_indices])                           # [S, hidden]
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, head).float()

    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up. Every parameter must be filled."""
        own = dict(self.named_parameters())
        filled: set[str] = set()

        def put(name: str, tensor: torch.Tensor) -> None:
            param = own[name]
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(f"weight {name}: expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}")
            with torch.no_grad():
                param.copy_(tensor)
            filled.add(name)

        put("embed_tokens.weight", weights["model.embed_tokens.weight"])
        put("norm.weight", weights["model.norm.weight"])
        if self.lm_head is not None:
            put("lm_head.weight", weights["lm_head.weight"])
        for i in range(self.cfg.num_layers):
            p = f"model.layers.{i}."
            put(f"layers.{i}.input_layernorm.weight", weights[p + "input_layernorm.weight"])
            put(f"layers.{i}.post_attention_layernorm.weight", weights[p + "post_attention_layernorm.weight"])
            put(f"layers.{i}.self_attn.qkv_proj.weight", torch.cat(
                [weights[p + f"self_attn.{n}_proj.weight"] for n in ("q", "k", "v")], dim=0))
            put(f"layers.{i}.self_attn.o_proj.weight", weights[p + "self_attn.o_proj.weight"])
            put(f"layers.{i}.mlp.gate_up_proj.weight", torch.cat(
                [weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"]], dim=0))
            put(f"layers.{i}.mlp.down_proj.weight", weights[p + "mlp.down_proj.weight"])
        missing = set(own) - filled
        if missing:
            raise ValueError(f"weights missing for parameters: {sorted(missing)[:5]}")
