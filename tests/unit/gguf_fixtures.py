"""Writing tiny GGUF files in tests (gguf's GGUFWriter is a test-only dependency)."""
from __future__ import annotations

import math

import gguf
import numpy as np
import torch

from rtserve.config import ModelConfig


def llama_gguf_writer(path, config: ModelConfig) -> gguf.GGUFWriter:
    """A GGUFWriter with the llama.* hyperparameters and a placeholder vocabulary of `config` written."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(config.num_layers)
    w.add_context_length(config.max_position)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    return w


# --- An HF checkpoint written as GGUF the way llama.cpp's convert_hf_to_gguf.py writes it ----------

_HF_TO_GGUF_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GEMMA3_TO_GGUF_LAYER = {**_HF_TO_GGUF_LAYER, "pre_feedforward_layernorm": "ffn_norm",
                         "post_attention_layernorm": "post_attention_norm",
                         "post_feedforward_layernorm": "post_ffw_norm"}
_HF_TO_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
                      "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def permute_rope_rows(w, num_heads: int):
    """llama.cpp's `LlamaModel.permute`: per head, rotate-half halves -> interleaved pairs."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_hf_as_gguf(path, hf_config, state_dict: dict, qtypes: dict | None = None,
                     tokens: list[str] | None = None) -> None:
    """Writes `state_dict` (HF names, fp32 tensors) of an HF `LlamaConfig`/`Qwen2Config`/
    `Qwen3Config`/`Gemma3TextConfig` as a GGUF: q/k permuted for llama, Gemma's norms stored as
    1 + w, llama3 RoPE scaling as the `rope_freqs` tensor. `qtypes` maps a GGUF tensor-name
    suffix (e.g. "attn_q.weight") to a `GGMLQuantizationType` (others are F32)."""
    model_type = hf_config.model_type
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
            "gemma3_text": "gemma3"}[model_type]
    c = hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    rope = c.rope_parameters or {}
    if arch == "gemma3":
        if c.query_pre_attn_scalar != head_dim:
            raise ValueError("a GGUF cannot carry query_pre_attn_scalar != head_dim (llama.cpp derives it)")
        w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
        w.add_sliding_window(c.sliding_window)
        pattern = [t == "sliding_attention" for t in c.layer_types]
        w.add_array(f"{arch}.attention.sliding_window_pattern", pattern)
        w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    else:
        w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    vocab = tokens or [f"t{i}" for i in range(c.vocab_size)]
    w.add_token_list(vocab)
    w.add_token_types([1] * len(vocab))
    w.add_bos_token_id(c.bos_token_id if c.bos_token_id is not None else 1)
    eos = c.eos_token_id if c.eos_token_id is not None else 2
    w.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)
    tensors = {}
    if rope.get("rope_type") == "llama3":  # llama.cpp's LlamaModel.generate_extra_tensors
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        orig = rope["original_max_position_embeddings"]
        freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
        divisors = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < orig / high:
                divisors.append(1.0)
            elif wavelen > orig / low:
                divisors.append(factor)
            else:
                smooth = (orig / wavelen - low) / (high - low)
                divisors.append(1 / ((1 - smooth) / factor + smooth))
        tensors["rope_freqs.weight"] = np.array(divisors, dtype=np.float32)
    layer_names = _GEMMA3_TO_GGUF_LAYER if arch == "gemma3" else _HF_TO_GGUF_LAYER
    for name, value in state_dict.items():
        x = value.detach().to(torch.float32).numpy()
        if name in _HF_TO_GGUF_GLOBAL:
            gguf_name = _HF_TO_GGUF_GLOBAL[name]
        else:
            _, _, i, *mid, kind = name.split(".")
            gguf_name = f"blk.{i}.{layer_names['.'.join(mid)]}.{kind}"
        if arch == "llama" and ".attn_q." in gguf_name:
            x = permute_rope_rows(x, c.num_attention_heads)
        elif arch == "llama" and ".attn_k." in gguf_name:
            x = permute_rope_rows(x, c.num_key_value_heads)
        if arch == "gemma3" and gguf_name.endswith("norm.weight"):
            x = x + 1.0
        tensors[gguf_name] = x
    for gguf_name, x in tensors.items():
        qtype = next((q for suffix, q in (qtypes or {}).items() if gguf_name.endswith(suffix)), None)
        if qtype is None or x.ndim != 2:
            w.add_tensor(gguf_name, np.ascontiguousarray(x, dtype=np.float32))
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
