"""A GGUF file as a Hugging Face checkpoint: `config.json`-style dict plus fp32 weights in HF naming.

Everything is read from the file's metadata and tensor table (`<arch>.*` keys), nothing per
checkpoint. Architectures: `llama` (Llama 2/3.x and Mistral, which llama.cpp writes as `llama`),
`qwen2`, `qwen3` and `gemma3` (text). What llama.cpp's converter changed on the way in is undone
here, as transformers' GGUF loader undoes it:
  - llama: q/k rows were permuted to interleaved RoPE pairs (qwen2/qwen3/gemma3 are not permuted);
    Llama 3.1/3.2 RoPE scaling was written as the `rope_freqs` tensor of per-frequency divisors,
    which is read back into `rope_scaling = {"rope_type": "llama3", ...}`;
  - gemma3: every `*norm.weight` was stored as (1 + w); HF keeps w and computes (1 + w).
Values llama.cpp itself hard-codes for a family when the file does not carry them are the
documented defaults below (`_GEMMA3_*`), each overridden by the file's key where one exists.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from rtserve.model.gguf import GGUFFile, end_of_turn_token_ids

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
HF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}

# Gemma 3 constants llama.cpp uses when the file has no key for them (llama-model.cpp): every 6th
# layer global, local layers' RoPE base 10k, query scaled by 1/sqrt(head_dim) except the 62-layer
# 27B model, which scales by 1/sqrt(hidden / heads).
_GEMMA3_WINDOW_PATTERN = 6
_GEMMA3_LOCAL_ROPE_BASE = 10000.0
_GEMMA3_27B_LAYERS = 62

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# Gemma 3 normalizes before and after attention and MLP: ffn_norm is the pre-MLP norm there.
_GEMMA3_LAYER_NAMES = {**_LAYER_NAMES, "ffn_norm": "pre_feedforward_layernorm",
                       "post_attention_norm": "post_attention_layernorm",
                       "post_ffw_norm": "post_feedforward_layernorm"}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
ROPE_FREQS = "rope_freqs.weight"


def architecture(metadata: dict[str, Any]) -> str:
    """`general.architecture`, or ValueError naming it and the supported ones."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    return arch


def hf_config_from_gguf(gguf: GGUFFile) -> dict[str, Any]:
    """The HF `config.json` this GGUF was converted from, as far as the file records it."""
    md, arch = gguf.metadata, architecture(gguf.metadata)

    def get(key: str, default: Any = None) -> Any:
        value = md.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{gguf.path}: GGUF metadata lacks {arch}.{key}")
        return value

    hidden, num_heads = get("embedding_length"), get("attention.head_count")
    num_kv_heads = get("attention.head_count_kv", num_heads)
    if isinstance(num_heads, list) or isinstance(num_kv_heads, list):
        raise ValueError(f"{gguf.path}: per-layer head counts are not supported")
    head_dim = get("attention.key_length", hidden // num_heads)
    if get("attention.value_length", head_dim) != head_dim:
        raise ValueError(f"{gguf.path}: key and value head sizes differ")
    if get("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{gguf.path}: partial rotary embeddings are not supported")
    tokens = md.get("tokenizer.ggml.tokens")
    eos_ids = list(end_of_turn_token_ids(md))
    bos = md.get("tokenizer.ggml.bos_token_id")
    config: dict[str, Any] = {
        "model_type": HF_MODEL_TYPES[arch],
        "vocab_size": len(tokens) if isinstance(tokens, list) else get("vocab_size"),
        "hidden_size": hidden, "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"), "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads, "head_dim": head_dim,
        "max_position_embeddings": get("context_length"),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "bos_token_id": bos if type(bos) is int else None,
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids or None,
        "attention_bias": "blk.0.attn_q.bias" in gguf.tensors,
        "rope_scaling": _rope_scaling(gguf, arch, head_dim),
    }
    if arch == "gemma3":
        config.update(_gemma3_fields(gguf, get, config))
    elif get("attention.sliding_window", 0):
        config["sliding_window"] = get("attention.sliding_window")
    return config


def _gemma3_fields(gguf: GGUFFile, get, config: dict[str, Any]) -> dict[str, Any]:
    num_layers = config["num_hidden_layers"]
    pattern = get("attention.sliding_window_pattern", _GEMMA3_WINDOW_PATTERN)
    if isinstance(pattern, list):  # per layer: true where the layer is local
        if len(pattern) != num_layers:
            raise ValueError(f"{gguf.path}: sliding_window_pattern has {len(pattern)} entries, "
                             f"expected {num_layers}")
        local = [bool(p) for p in pattern]
    else:
        local = [bool((i + 1) % pattern) for i in range(num_layers)]
    scalar = (config["hidden_size"] // config["num_attention_heads"]
              if num_layers == _GEMMA3_27B_LAYERS else config["head_dim"])
    return {
        "sliding_window": get("attention.sliding_window"),
        "layer_types": ["sliding_attention" if x else "full_attention" for x in local],
        "rope_local_base_freq": float(get("rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_BASE)),
        "query_pre_attn_scalar": scalar,
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": get("final_logit_softcapping", 0.0) or None,
        "attn_logit_softcapping": get("attn_logit_softcapping", 0.0) or None,
    }


def _rope_scaling(gguf: GGUFFile, arch: str, head_dim: int) -> dict[str, Any] | None:
    kind = gguf.metadata.get(f"{arch}.rope.scaling.type", "none")
    factor = float(gguf.metadata.get(f"{arch}.rope.scaling.factor", 1.0))
    if ROPE_FREQS in gguf.tensors:
        if arch != "llama":
            raise ValueError(f"{gguf.path}: rope_freqs is only supported for llama (llama3 scaling)")
        theta = float(gguf.metadata.get(f"{arch}.rope.freq_base", 10000.0))
        return llama3_rope_scaling(gguf.dequantize(ROPE_FREQS).numpy(), theta, head_dim)
    if kind == "none" or (kind == "linear" and factor == 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    raise ValueError(f"{gguf.path}: RoPE scaling {kind!r} is not supported (none, linear, llama3)")


def llama3_rope_divisors(theta: float, head_dim: int, scaling: dict[str, Any]) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter writes as `rope_freqs` (and HF's llama3
    RoPE applies): 1 for short wavelengths, `factor` for long ones, smooth in between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    orig = scaling["original_max_position_embeddings"]
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (orig / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, mid))


def llama3_rope_scaling(divisors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """Recovers `rope_scaling` from a `rope_freqs` tensor (ValueError if it is not llama3's shape).

    The smooth band is linear in 1/wavelength: s = (orig / wavelen - low) / (high - low), with the
    divisor d = 1 / ((1 - s) / factor + s). Only orig/low and orig/high are identifiable (scaling all
    three together changes nothing), so low_freq_factor is taken as 1, as every Llama 3.x uses.
    """
    divisors = np.asarray(divisors, dtype=np.float64).reshape(-1)
    if divisors.shape != (head_dim // 2,) or not np.all(divisors >= 1.0 - 1e-6):
        raise ValueError(f"rope_freqs has shape {divisors.shape} or values below 1: not llama3 scaling")
    factor = float(divisors.max())
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    band = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    if factor <= 1 + 1e-6 or band.sum() < 2:
        raise ValueError("rope_freqs has fewer than two smoothly scaled frequencies: cannot recover "
                         "the llama3 scaling parameters")
    smooth = (1 / divisors[band] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(freqs[band] / (2 * math.pi), smooth, 1)  # s = slope * (1/wavelen) + b
    high = 1.0 - 1.0 / intercept
    orig = -slope / intercept
    scaling = {"rope_type": "llama3", "factor": _tidy(factor), "low_freq_factor": 1.0,
               "high_freq_factor": _tidy(high), "original_max_position_embeddings": int(round(orig))}
    if not np.allclose(llama3_rope_divisors(theta, head_dim, scaling), divisors, rtol=1e-5, atol=0):
        raise ValueError("rope_freqs does not follow llama3 RoPE scaling")
    return scaling


def _tidy(x: float) -> float:
    """`x` rounded to 6 significant digits: undoes float32 storage of a configured constant."""
    return float(f"{x:.6g}")


def hf_weight_name(arch: str, gguf_name: str) -> str:
    """HF parameter name of a GGUF tensor; ValueError for tensors the decoder has no place for."""
    parts = gguf_name.split(".")
    names = _GEMMA3_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] in ("weight", "bias") \
            and parts[2] in names:
        return f"model.layers.{int(parts[1])}.{names[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[1] == "weight" and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.weight"
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r} for architecture {arch!r}")


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's llama q/k row permutation (interleaved RoPE pairs -> HF's rotate-half).

    Per head, llama.cpp stores rows as (pair, 2) where HF stores (2, pair); swap them back. Works on
    weights [rows, K], biases [rows] and quantized blocks [rows, K/32, nbytes] alike.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    w = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape).contiguous()


def hf_weight(gguf: GGUFFile, arch: str, name: str, config: dict[str, Any]) -> torch.Tensor:
    """One tensor dequantized to fp32 with llama.cpp's conversion changes undone."""
    weight = gguf.dequantize(name)
    if arch == "llama" and ".attn_q." in name:
        weight = unpermute_rope_rows(weight, config["num_attention_heads"])
    elif arch == "llama" and ".attn_k." in name:
        weight = unpermute_rope_rows(weight, config["num_key_value_heads"])
    elif arch == "gemma3" and name.endswith("norm.weight"):
        weight = weight - 1.0  # stored as 1 + w
    return weight


def load_gguf_hf(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(HF config dict, fp32 state dict in HF naming) of a GGUF of a supported architecture.

    Raises ValueError at once for an unsupported architecture, tensor or quantization type.
    """
    gguf = GGUFFile(path)
    config = hf_config_from_gguf(gguf)
    arch = architecture(gguf.metadata)
    names = tuple(n for n in gguf.tensors if n != ROPE_FREQS)
    hf_names = {name: hf_weight_name(arch, name) for name in names}  # fails before reading data
    gguf.check_types(names)
    return config, {hf_names[name]: hf_weight(gguf, arch, name, config) for name in names}
