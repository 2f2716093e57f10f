"""The CPU fast path of the Llama decoder: the GGUF's Q4_1 weights kept quantized, kernels per step shape.

Same contract as `LlamaForCausalLM.forward` (flat batch of T tokens, paged KV cache, logits [S, V]
fp32 for `logit_indices`), different numerics:
  - the residual stream, RMSNorm, RoPE, attention and the KV cache stay fp32;
  - linear layers take bf16 activations: int4 group-32 (the Q4_1 blocks as they are) when the step
    has fewer than `quant.LARGE_M` tokens, the exact bf16 dequantization through oneDNN otherwise;
  - the LM head (the GGUF's Q8_0 embedding) is int8 per row with dynamic int8 activations (fbgemm)
    for few rows, the step's 16 outlier hidden channels in fp32; bf16 oneDNN for many rows.
It is a plain object, not an nn.Module tree, and the layer loop is one function: at batch 1 a step is
~20 small ops per layer, so Python and dispatch overhead matter as much as the matmuls.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from rtserve.config import ModelConfig
from rtserve.model import quant
from rtserve.model.layers import RotaryEmbedding, paged_attention_slots
from rtserve.runner.attention_metadata import AttentionMetadata


NUM_OUTLIER_CHANNELS = 16  # hidden channels kept out of the int8 LM head (see _lm_head_int8)


class FastLayer:
    __slots__ = ("input_norm", "post_norm", "qkv", "o", "gate_up", "down")

    def __init__(self, tensors: dict[str, torch.Tensor], i: int) -> None:
        p = f"layers.{i}."
        self.input_norm = tensors[p + "input_layernorm"]
        self.post_norm = tensors[p + "post_attention_layernorm"]
        self.qkv, self.o, self.gate_up, self.down = (
            quant.FastLinear(tensors[f"{p}{m}.int4"], tensors[f"{p}{m}.scales_zeros"],
                             quant.prepack_bf16(tensors[f"{p}{m}.bf16"]), tensors[f"{p}{m}.bf16"].shape[0])
            for m in ("qkv", "o", "gate_up", "down"))


class FastLlamaForCausalLM:
    """Built from `quantized_loader.FastCheckpoint.tensors`; see the module docstring."""

    def __init__(self, cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
        self.cfg = cfg
        self.embed_tokens = tensors["embed_tokens"]  # [V, H] fp32
        self.norm = tensors["norm"]
        self.layers = [FastLayer(tensors, i) for i in range(cfg.num_layers)]
        self.head_int8 = _prepack_int8_dynamic(tensors["lm_head.int8"], tensors["lm_head.scale"])
        self.head_bf16 = quant.prepack_bf16(tensors["lm_head.bf16"])
        self.head_t = tensors["lm_head.t"]  # [H, V] fp32: rows are the LM head's input channels
        rope = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_theta)
        half = cfg.head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * [-sin_lo, sin_hi]: one roll instead of split/neg/cat.
        self.cos = rope.cos                                                   # [max_pos, hd] fp32
        self.sin_signed = torch.cat([-rope.sin[:, :half], rope.sin[:, half:]], dim=-1)
        self.scale = cfg.head_dim ** -0.5

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 kv_slots: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                 logit_indices: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T]; kv_slots: per layer (K, V) slot views [num_slots, KVH, hd] fp32
        (written in place). Returns logits [S, V] fp32 for the S rows `logit_indices`."""
        cfg = self.cfg
        num_tokens = input_ids.shape[0]
        small = num_tokens < quant.LARGE_M
        mm = quant.FastLinear.small if small else quant.FastLinear.large
        x = F.embedding(input_ids, self.embed_tokens)                         # [T, H] fp32
        cos = self.cos[positions].unsqueeze(1)                                 # [T, 1, hd]
        sin = self.sin_signed[positions].unsqueeze(1)
        hidden, eps, half = (cfg.hidden_size,), cfg.rms_norm_eps, cfg.head_dim // 2
        q_size, kv_size, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
        num_qk_heads = cfg.num_heads + cfg.num_kv_heads
        bf16 = torch.bfloat16
        for layer, (k_slots, v_slots) in zip(self.layers, kv_slots):
            h = F.rms_norm(x, hidden, layer.input_norm, eps).to(bf16)
            qkv = mm(layer.qkv, h).float()                                     # [T, q + 2 kv]
            qk = qkv[:, :q_size + kv_size].view(num_tokens, num_qk_heads, cfg.head_dim)
            qk = qk * cos + qk.roll(half, -1) * sin                            # RoPE on q and k at once
            v = qkv[:, q_size + kv_size:].view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            attn = paged_attention_slots(qk[:, :cfg.num_heads], qk[:, cfg.num_heads:], v,
                                         k_slots, v_slots, meta, self.scale)  # [T, H, hd]
            x = x + mm(layer.o, attn.reshape(num_tokens, q_size).to(bf16))
            h = F.rms_norm(x, hidden, layer.post_norm, eps).to(bf16)
            gate_up = mm(layer.gate_up, h)                                     # [T, 2 I] bf16
            x = x + mm(layer.down, F.silu(gate_up[:, :inter]) * gate_up[:, inter:])
        x = F.rms_norm(x[logit_indices], hidden, self.norm, eps)              # [S, H] fp32
        if x.shape[0] < quant.LARGE_M:
            return self._lm_head_int8(x)
        return quant.bf16_mm(x.to(bf16), self.head_bf16).float()

    def _lm_head_int8(self, x: torch.Tensor) -> torch.Tensor:
        """[S, H] fp32 -> [S, V] fp32 logits through int8 with dynamic activations, outliers apart.

        fbgemm quantizes activations per tensor, and a few hidden channels are 10-15x larger than the
        rest (channel 199 of SmolLM2), which alone costs ~15x the KL of a bf16 head. The
        `NUM_OUTLIER_CHANNELS` largest channels of this step go through an fp32 matmul instead.
        """
        idx = x.abs().amax(0).topk(NUM_OUTLIER_CHANNELS).indices              # [k]
        logits = torch.ops.quantized.linear_dynamic(x.index_fill(1, idx, 0.0), self.head_int8)
        return logits.addmm_(x.index_select(1, idx), self.head_t.index_select(0, idx))


def _prepack_int8_dynamic(weight_int8: torch.Tensor, scale: torch.Tensor):
    """fbgemm packed params for `quantized.linear_dynamic` from int8 [N, K] and per-row scales [N]."""
    with warnings.catch_warnings():  # quantized tensors are deprecated, the fbgemm kernel is not gone
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(
            weight_int8, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qweight, None)
