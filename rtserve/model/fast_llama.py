"""The CPU fast path of the Llama decoder: the GGUF's Q4_1 weights kept quantized, kernels per step shape.

Same contract as `DecoderForCausalLM.forward` (flat batch of T tokens, paged KV cache, logits [S, V]
fp32 for `logit_indices`), different numerics:
  - the residual stream and RMSNorm are fp32; matmul inputs/outputs, RoPE, attention and the KV
    cache are bf16 (half the KV bytes to gather and read per step);
  - linear layers: the Q4_1 blocks as they are (int4 group-32) for steps of up to 32 tokens (an int4
    GEMV below 4 rows, the AMX int4 kernel from 4, see `quant.kernel_for_rows`), the exact bf16
    dequantization through oneDNN for longer steps; on CPUs where oneDNN's bf16 linear cannot run,
    the int4 GEMV below 8 rows and the int4 panel GEMM (fp32 arithmetic) from 8;
  - the LM head (the GGUF's Q8_0 embedding) is int8 per row with dynamic int8 activations (fbgemm)
    for fewer than `HEAD_LARGE_M` rows, with 16 outlier hidden channels (calibrated once) in fp32;
    bf16 oneDNN for more rows. Without oneDNN's bf16 linear the int8 head serves every row count
    (torch's plain bf16 matmul there took 75 ms for a 16-row head against int8's 7 ms on an AVX2-only
    AMD EPYC).
It is a plain object, not an nn.Module tree, and the layer loop is one function: at batch 1 a step is
~20 small ops per layer, so Python and dispatch overhead matter as much as the matmuls.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from rtserve import kernels
from rtserve.config import ModelConfig
from rtserve.model import fast_decode, quant
from rtserve.model.layers import RotaryEmbedding, paged_attention_slots, rope_inv_freq
from rtserve.runner.attention_metadata import AttentionMetadata, PrefillChunk


NUM_OUTLIER_CHANNELS = 16  # hidden channels kept out of the int8 LM head (see _lm_head_int8)
HEAD_LARGE_M = 16  # rows from which the bf16 LM head beats int8 (in a 32-stream step: int8 5.6 ms, bf16 3.6 ms)


class FastLayer:
    __slots__ = ("input_norm", "post_norm", "qkv", "o", "gate_up", "down")

    def __init__(self, tensors: dict[str, torch.Tensor], i: int) -> None:
        p = f"layers.{i}."
        sqrt_h = tensors[p + "input_layernorm"].shape[0] ** 0.5  # RMSNorm as a vector norm (add_rms_norm)
        self.input_norm = tensors[p + "input_layernorm"] * sqrt_h
        self.post_norm = tensors[p + "post_attention_layernorm"] * sqrt_h
        self.qkv, self.o, self.gate_up, self.down = (
            quant.FastLinear(tensors[f"{p}{m}.int4"], tensors[f"{p}{m}.scales_zeros"],
                             _layer_bf16(tensors[f"{p}{m}.bf16"]), tensors[f"{p}{m}.bf16"].shape[0],
                             tensors.get(f"{p}{m}.amx_q"), tensors.get(f"{p}{m}.amx_dm"),
                             tensors.get(f"{p}{m}.panel_q"), tensors.get(f"{p}{m}.panel_dm"))
            for m in ("qkv", "o", "gate_up", "down"))


def _layer_bf16(weight: torch.Tensor) -> torch.Tensor:
    """A layer matrix prepacked for oneDNN's bf16 GEMM, or nothing where that cannot run (the int4
    GEMV and panel kernels then serve every row count: `quant.kernel_for_rows`)."""
    return quant.prepack_bf16(weight) if quant.onednn_bf16() else torch.empty(0, dtype=torch.bfloat16)


def unsupported_features(cfg: ModelConfig) -> list[str]:
    """What `cfg` needs that this fast path does not implement (empty: it runs the model). It covers
    the Llama layer (SwiGLU, plain RMSNorm, no biases) with any RoPE variant and tied or untied
    embeddings, as llama.cpp writes Llama and Mistral (q/k rows permuted, undone at load); the other
    families run on the fp32 reference path."""
    checks = {f"the {cfg.model_type} architecture": cfg.model_type not in ("llama", "mistral"),
              "q/k/v or output bias": cfg.qkv_bias or cfg.o_bias, "MLP bias": cfg.mlp_bias,
              "q/k norm": cfg.qk_norm, "norms after attention and MLP": cfg.sandwich_norms,
              f"{cfg.hidden_act} activation": cfg.hidden_act != "silu",
              "(1 + weight) RMSNorm": cfg.norm_weight_offset != 0.0, "embedding scale": cfg.embed_scale != 1.0,
              "logit soft-capping": bool(cfg.final_logit_softcapping),
              "sliding-window attention": any(cfg.layer_windows)}
    return [name for name, needed in checks.items() if needed]


class FastLlamaForCausalLM:
    """Built from `quantized_loader.FastCheckpoint.tensors`; see the module docstring."""

    def __init__(self, cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
        missing = unsupported_features(cfg)
        if missing:  # never run a model whose layers this loop would compute wrongly
            raise ValueError(f"the CPU fast path does not implement {', '.join(missing)} ({cfg.model_type})")
        self.cfg = cfg
        self.embed_tokens = tensors["embed_tokens"]  # [V, H] fp32
        self.norm_scaled = tensors["norm"] * cfg.hidden_size ** 0.5
        self.layers = [FastLayer(tensors, i) for i in range(cfg.num_layers)]
        self.head_int8 = _prepack_int8_dynamic(tensors["lm_head.int8"], tensors["lm_head.scale"])
        # Without VNNI, fbgemm multiplies u8 x s8 pairs into saturating int16 sums (vpmaddubsw): 7-bit
        # activations keep them in range. On the AVX2-only EPYC the tiny test model's logits erred
        # 4.4% with 8 bits, 1.9% with 7 (the fp32 head: 1.7%).
        is_vnni = getattr(torch.cpu, "_is_vnni_supported", None)
        self.head_reduce_range = not (is_vnni is not None and bool(is_vnni()))
        self.head_bf16 = quant.prepack_bf16(tensors["lm_head.bf16"])
        rope = RotaryEmbedding(cfg.head_dim, cfg.max_position, inv_freq=rope_inv_freq(cfg))
        half = cfg.head_dim // 2
        # rotate_half(x) * sin == swap_halves(x) * [-sin_lo, sin_hi]: one flip instead of split/neg/cat.
        self.cos = rope.cos.to(torch.bfloat16)                                # [max_pos, hd]
        self.sin_signed = torch.cat([-rope.sin[:, :half], rope.sin[:, half:]], dim=-1).to(torch.bfloat16)
        self.scale = cfg.attention_scale
        linears = [lin for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        kernels.native_available()  # registers torch.ops.rtserve.* (native, or PyTorch fallbacks)
        # The AMX int4 kernel for 4-32 row steps: needs the CPU feature and every matrix in its layout.
        self.have_amx = bool(torch.ops.rtserve.amx_available()) and all(lin.amx_q is not None for lin in linears)
        # The int4 panel kernel for 8+ row steps where oneDNN's bf16 linear cannot run (`quant.panel_kernel_runs`).
        self.have_panel = (not self.have_amx and bool(torch.ops.rtserve.int4_panel_simd())
                           and all(lin.panel_q is not None for lin in linears))
        # The native int4 kernel's weights, one layout per machine: AMX's or the panel kernel's.
        int4_q = [lin.amx_q if self.have_amx else lin.panel_q if self.have_panel else torch.empty(0) for lin in linears]
        int4_dm = [lin.amx_dm if self.have_amx else lin.panel_dm if self.have_panel else torch.empty(0)
                   for lin in linears]
        self._decode_weights = ([n for layer in self.layers for n in (layer.input_norm, layer.post_norm)],
                                [lin.packed for lin in linears], [lin.scales_and_zeros for lin in linears],
                                [lin.bf16_prepacked for lin in linears], int4_q, int4_dm)
        self._decode_layers = fast_decode.compile_decode_layers()
        if "lm_head.outlier_idx" in tensors:  # calibrated when the checkpoint was built
            self.outlier_idx = tensors["lm_head.outlier_idx"]
        else:
            self.outlier_idx = self._calibrate_head_outliers()
        self.head_outliers = None if self.outlier_idx is None else \
            tensors["lm_head.bf16"].index_select(1, self.outlier_idx).t().float().contiguous()  # [k, V]

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 kv_slots: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                 logit_indices: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T]; kv_slots: per layer (K, V) slot views [num_slots, KVH, hd] bf16
        (written in place). Returns logits [S, V] fp32 for the S rows `logit_indices`."""
        x = self.hidden_states(input_ids, positions, kv_slots, meta, logit_indices)  # [S, H] fp32
        if (x.shape[0] < HEAD_LARGE_M or not quant.onednn_bf16()) and self.outlier_idx is not None:
            return self._lm_head_int8(x)
        return quant.bf16_mm(x.to(torch.bfloat16), self.head_bf16).float()

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      kv_slots: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                      logit_indices: torch.Tensor) -> torch.Tensor:
        """The final-normed hidden states [S, H] fp32 of rows `logit_indices` (the LM head's input)."""
        cfg = self.cfg
        num_tokens = input_ids.shape[0]
        x = F.embedding(input_ids, self.embed_tokens)                         # [T, H] fp32
        cos, sin = self.cos[positions], self.sin_signed[positions]            # [T, hd] bf16
        if meta.num_decodes == num_tokens:  # decode-only step: the scripted layer stack
            x = self._run_decode_layers(x, cos, sin, kv_slots, meta)[logit_indices]
            return x * (self.norm_scaled / torch.linalg.vector_norm(x, dim=-1, keepdim=True))
        mm = (quant.FastLinear.small, quant.FastLinear.amx, quant.FastLinear.large, quant.FastLinear.panel)[
            quant.kernel_for_rows(num_tokens, self.have_amx, self.have_panel)]
        ops = torch.ops.rtserve
        pending = None  # the previous layer's MLP output, added into x by the next norm
        for layer, (k_slots, v_slots) in zip(self.layers, kv_slots):
            qkv = mm(layer.qkv, ops.add_rms_norm(x, pending, layer.input_norm))   # [T, q + 2 kv] bf16
            q = ops.rope_kv_write(qkv, cos, sin, k_slots, v_slots, meta.slot_mapping, cfg.num_heads,
                                  cfg.num_kv_heads)                                # [T, H, hd]; K/V cached
            attn = paged_attention_slots(q, None, None, k_slots, v_slots, meta, self.scale,
                                         decode_kernel=True)                      # [T, H, hd] bf16
            gate_up = mm(layer.gate_up, ops.add_rms_norm(x, mm(layer.o, attn.view(num_tokens, cfg.q_size)),
                                                         layer.post_norm))         # [T, 2 I] bf16
            pending = mm(layer.down, ops.silu_mul(gate_up))
        x.add_(pending)
        x = x[logit_indices]
        return x * (self.norm_scaled / torch.linalg.vector_norm(x, dim=-1, keepdim=True))

    def _run_decode_layers(self, x, cos, sin, kv_slots, meta: AttentionMetadata) -> torch.Tensor:
        cfg = self.cfg
        return self._decode_layers(
            x, cos, sin, meta.slot_mapping, meta.decode_block_table, meta.decode_seq_lens, meta.block_size,
            quant.kernel_for_rows(x.shape[0], self.have_amx, self.have_panel), *self._decode_weights,
            [k for k, _ in kv_slots], [v for _, v in kv_slots], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            self.scale)

    def _lm_head_int8(self, x: torch.Tensor) -> torch.Tensor:
        """[S, H] fp32 -> [S, V] fp32 logits through int8 with dynamic activations, outliers apart.

        fbgemm quantizes activations per tensor, and a few hidden channels are 10-15x larger than the
        rest (channel 199 of SmolLM2), which alone costs ~15x the KL of a bf16 head. Those channels
        (found once by `_calibrate_head_outliers`) go through a small fp32 matmul instead (their
        weights are the bf16 head's columns).
        """
        logits = torch.ops.quantized.linear_dynamic(x.index_fill(1, self.outlier_idx, 0.0), self.head_int8,
                                                    self.head_reduce_range)
        return logits.addmm_(x.index_select(1, self.outlier_idx), self.head_outliers)

    @torch.inference_mode()
    def _calibrate_head_outliers(self) -> torch.Tensor | None:
        """The LM head input's `NUM_OUTLIER_CHANNELS` largest channels [k] (sorted), measured on one
        synthetic 64-token prefill (ids spread over the vocabulary); None for models too small to need
        it (their head runs in bf16)."""
        cfg = self.cfg
        if cfg.hidden_size < 4 * NUM_OUTLIER_CHANNELS:
            return None
        num_tokens = 64
        ids = torch.linspace(0, cfg.vocab_size - 1, num_tokens).long()
        slots = torch.arange(num_tokens)
        meta = AttentionMetadata(slot_mapping=slots,
                                 prefills=[PrefillChunk(0, num_tokens, num_tokens, slots, None)])
        scratch = torch.zeros(2, num_tokens, cfg.num_kv_heads, cfg.head_dim, dtype=torch.bfloat16)
        # Every layer writes all 64 slots before reading them, so one scratch cache serves all layers.
        hidden = self.hidden_states(ids, slots, [(scratch[0], scratch[1])] * cfg.num_layers, meta, slots)
        return hidden.abs().amax(0).topk(NUM_OUTLIER_CHANNELS).indices.sort().values


def _prepack_int8_dynamic(weight_int8: torch.Tensor, scale: torch.Tensor):
    """fbgemm packed params for `quantized.linear_dynamic` from int8 [N, K] and per-row scales [N]."""
    with warnings.catch_warnings():  # quantized tensors are deprecated, the fbgemm kernel is not gone
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(
            weight_int8, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qweight, None)
