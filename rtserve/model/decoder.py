"""One decoder-only transformer for every supported family (Llama, Mistral, Qwen2, Qwen3, Gemma 3),
reading and writing a paged KV cache. What differs per family is in `ModelConfig` (norm style,
activation, biases, q/k norm, sandwich norms, embedding scale, RoPE variant, sliding-window layers).

The forward takes a flat batch of T tokens from any mix of prefill chunks and decodes, and returns
logits only for the rows the sampler needs (`logit_indices`), which keeps the LM head off prefill
tokens. Weights use Hugging Face names (`hf_weight_shapes`); q/k/v and gate/up are fused at load time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtserve.config import ModelConfig
from rtserve.model.layers import RMSNorm, RotaryEmbedding, gated_activation, paged_attention, rope_inv_freq
from rtserve.runner.attention_metadata import AttentionMetadata


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.window = window  # 0: the whole context
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_weight_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_weight_offset)
        self.scale = cfg.attention_scale

    def forward(self, x, positions, rope: RotaryEmbedding, kv_cache, meta: AttentionMetadata):
        cfg = self.cfg
        qkv = self.qkv_proj(x)                                   # [T, q_size + 2 * kv_size]
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(-1, cfg.num_heads, cfg.head_dim)              # [T, H, hd]
        k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)           # [T, KVH, hd]
        v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(positions, q, k)
        o = paged_attention(q, k, v, kv_cache, meta.for_window(self.window), self.scale)  # [T, H, hd]
        return self.o_proj(o.reshape(-1, cfg.q_size))


class GatedMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.hidden_act = cfg.hidden_act
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(gated_activation(self.hidden_act, gate) * up)


class DecoderLayer(nn.Module):
    """x + [post_norm](attn(attn_norm(x))), then the same around the MLP (post norms: sandwich_norms)."""

    def __init__(self, cfg: ModelConfig, window: int) -> None:
        super().__init__()

        def norm() -> RMSNorm:
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_offset)

        self.attn_norm = norm()
        self.self_attn = Attention(cfg, window)
        self.mlp_norm = norm()
        self.mlp = GatedMLP(cfg)
        self.attn_post_norm = norm() if cfg.sandwich_norms else None
        self.mlp_post_norm = norm() if cfg.sandwich_norms else None

    def forward(self, x, positions, rope, kv_cache, meta):
        h = self.self_attn(self.attn_norm(x), positions, rope, kv_cache, meta)
        x = x + (h if self.attn_post_norm is None else self.attn_post_norm(h))
        h = self.mlp(self.mlp_norm(x))
        return x + (h if self.mlp_post_norm is None else self.mlp_post_norm(h))


class DecoderForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, w) for w in cfg.layer_windows)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_offset)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position, inv_freq=rope_inv_freq(cfg))
        # Sliding layers have their own RoPE base in Gemma 3; elsewhere they share the full layers'.
        self.local_rope = RotaryEmbedding(cfg.head_dim, cfg.max_position, inv_freq=rope_inv_freq(cfg, sliding=True)) \
            if cfg.rope_local_theta else None
        self._layer_ropes = [self.local_rope if w and self.local_rope is not None else self.rope
                             for w in cfg.layer_windows]

    def to(self, *args, **kwargs) -> "DecoderForCausalLM":
        """`nn.Module.to`, keeping the RoPE cos/sin tables in fp32 whatever dtype the weights take."""
        super().to(*args, **kwargs)
        for rope in (self.rope, self.local_rope):
            if rope is not None:
                rope.to(torch.float32)
        return self

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, logit_indices: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T]; logit_indices: [S] rows of T to project. Returns logits [S, V] fp32."""
        x = self.embed_tokens(input_ids)                          # [T, hidden]
        if self.cfg.embed_scale != 1.0:  # scaled in the weights' dtype, as HF does
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype, device=x.device)
        for layer, rope, kv_cache in zip(self.layers, self._layer_ropes, kv_caches):
            x = layer(x, positions, rope, kv_cache, meta)
        x = self.norm(x[logit_indices])                           # [S, hidden]
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, head).float()                        # [S, V]
        cap = self.cfg.final_logit_softcapping
        return logits if not cap else torch.tanh(logits / cap) * cap

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
            for ours, hf in _norm_names(self.cfg).items():
                put(f"layers.{i}.{ours}.weight", weights[p + hf + ".weight"])
            for kind in ("weight", "bias") if self.cfg.qkv_bias else ("weight",):
                put(f"layers.{i}.self_attn.qkv_proj.{kind}", torch.cat(
                    [weights[p + f"self_attn.{n}_proj.{kind}"] for n in ("q", "k", "v")], dim=0))
            for kind in ("weight", "bias") if self.cfg.o_bias else ("weight",):
                put(f"layers.{i}.self_attn.o_proj.{kind}", weights[p + f"self_attn.o_proj.{kind}"])
            for kind in ("weight", "bias") if self.cfg.mlp_bias else ("weight",):
                put(f"layers.{i}.mlp.gate_up_proj.{kind}", torch.cat(
                    [weights[p + f"mlp.gate_proj.{kind}"], weights[p + f"mlp.up_proj.{kind}"]], dim=0))
                put(f"layers.{i}.mlp.down_proj.{kind}", weights[p + f"mlp.down_proj.{kind}"])
        missing = set(own) - filled
        if missing:
            raise ValueError(f"weights missing for parameters: {sorted(missing)[:5]}")


def _norm_names(cfg: ModelConfig) -> dict[str, str]:
    """Our per-layer norm modules -> their HF names (Llama's post_attention_layernorm is the norm
    before the MLP; Gemma's is the one after attention)."""
    names = {"self_attn.q_norm": "self_attn.q_norm", "self_attn.k_norm": "self_attn.k_norm"} if cfg.qk_norm else {}
    if cfg.sandwich_norms:
        return names | {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
                        "mlp_norm": "pre_feedforward_layernorm", "mlp_post_norm": "post_feedforward_layernorm"}
    return names | {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


def hf_weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF-named tensor the decoder of this config loads, with its shape."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (cfg.q_size, h),
            p + "self_attn.k_proj.weight": (cfg.kv_size, h),
            p + "self_attn.v_proj.weight": (cfg.kv_size, h),
            p + "self_attn.o_proj.weight": (h, cfg.q_size),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
        for ours, hf in _norm_names(cfg).items():
            shapes[p + hf + ".weight"] = (cfg.head_dim,) if ours.startswith("self_attn.") else (h,)
        if cfg.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (cfg.q_size,), p + "self_attn.k_proj.bias": (cfg.kv_size,),
                           p + "self_attn.v_proj.bias": (cfg.kv_size,)})
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if cfg.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (i,), p + "mlp.up_proj.bias": (i,), p + "mlp.down_proj.bias": (h,)})
    return shapes
