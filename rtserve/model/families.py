"""Model families: what each architecture chooses over the one decoder (`decoder.py`), and its
`ModelConfig` read from a Hugging Face `config.json`.

A family is a table entry: its norm style, MLP activation, biases, q/k norm, sandwich norms,
embedding scale and how its layers split into sliding-window and full attention. Sizes, RoPE,
window and layer pattern come from the checkpoint's own config, never from here. Adding a family is
an entry in FAMILIES (and, if its config names differ, a few lines below).
"""
from __future__ import annotations

from dataclasses import dataclass

from rtserve.config import ModelConfig

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class Family:
    hidden_act: str = "silu"
    norm_weight_offset: float = 0.0
    qkv_bias: bool | None = None   # None: the config's `attention_bias` (then on o_proj too)
    qk_norm: bool = False
    sandwich_norms: bool = False
    scale_embeddings: bool = False  # by sqrt(hidden_size)
    # Which layers slide when config.json has no `layer_types`: "none", "all" (when sliding_window is
    # set), "qwen" (use_sliding_window: layers from max_window_layers on), "pattern" (every
    # sliding_window_pattern-th layer is full).
    sliding_layers: str = "none"
    # transformers' defaults for keys a checkpoint may leave out (a multimodal wrapper's text_config
    # lists only what differs from them).
    defaults: tuple[tuple[str, object], ...] = ()


_GEMMA3_DEFAULTS = (("vocab_size", 262208), ("hidden_size", 2304), ("intermediate_size", 9216),
                    ("num_hidden_layers", 26), ("num_attention_heads", 8), ("num_key_value_heads", 4),
                    ("head_dim", 256), ("hidden_activation", "gelu_pytorch_tanh"),
                    ("max_position_embeddings", 131072), ("rms_norm_eps", 1e-6), ("query_pre_attn_scalar", 256),
                    ("sliding_window", 4096), ("rope_theta", 1e6), ("rope_local_base_freq", 10000.0),
                    ("tie_word_embeddings", True), ("bos_token_id", 2), ("eos_token_id", 1))

FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(qkv_bias=False, sliding_layers="all"),
    "qwen2": Family(qkv_bias=True, sliding_layers="qwen"),
    "qwen3": Family(qk_norm=True, sliding_layers="qwen"),
    "gemma3_text": Family(hidden_act="gelu_tanh", norm_weight_offset=1.0, qk_norm=True, sandwich_norms=True,
                          scale_embeddings=True, sliding_layers="pattern", defaults=_GEMMA3_DEFAULTS),
}
# Multimodal wrappers whose text model is one of the families (config.json keeps it in text_config).
TEXT_CONFIG_OF = {"gemma3": "gemma3_text"}
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def supported_model_types() -> list[str]:
    return sorted([*FAMILIES, *TEXT_CONFIG_OF])


def config_from_hf(cfg: dict) -> ModelConfig:
    """`ModelConfig` from an HF `config.json` dict; ValueError naming what is not supported."""
    model_type = cfg.get("model_type")
    if model_type in TEXT_CONFIG_OF:
        cfg = {"model_type": TEXT_CONFIG_OF[model_type], **cfg.get("text_config", {})}
        model_type = cfg["model_type"]
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"unsupported model_type {model_type!r} (supported: {', '.join(supported_model_types())})")
    cfg = {**dict(family.defaults), **cfg}
    for key in ("attn_logit_softcapping", "partial_rotary_factor", "use_bidirectional_attention"):
        if cfg.get(key) not in (None, 1.0, False):
            raise ValueError(f"{model_type}: {key}={cfg[key]!r} is not supported")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    if act not in _ACTIVATIONS:
        raise ValueError(f"{model_type}: activation {act!r} is not supported")
    hidden, num_heads, num_layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    attention_bias = bool(cfg.get("attention_bias", False))
    window = cfg.get("sliding_window") or 0
    layer_types = _layer_types(cfg, family, num_layers, window)
    full_rope, local_rope = _rope_parameters(cfg, model_type)
    eos = cfg.get("eos_token_id")
    return ModelConfig(
        vocab_size=cfg["vocab_size"], hidden_size=hidden, intermediate_size=cfg["intermediate_size"],
        num_layers=num_layers, num_heads=num_heads, num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or hidden // num_heads,
        max_position=cfg.get("max_position_embeddings", 2048),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,) if isinstance(eos, int) else (),
        model_type=model_type, hidden_act=_ACTIVATIONS[act], norm_weight_offset=family.norm_weight_offset,
        qkv_bias=attention_bias if family.qkv_bias is None else family.qkv_bias,
        o_bias=attention_bias if family.qkv_bias is None else False,
        mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=family.qk_norm, sandwich_norms=family.sandwich_norms,
        embed_scale=hidden ** 0.5 if family.scale_embeddings else 1.0,
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or 0.0),
        final_logit_softcapping=float(cfg.get("final_logit_softcapping") or 0.0),
        sliding_window=window if SLIDING in layer_types else 0,
        layer_types=layer_types if SLIDING in layer_types else (),
        rope_local_theta=float(local_rope["rope_theta"]) if local_rope else 0.0,
        **full_rope_fields(full_rope),
    )


def _layer_types(cfg: dict, family: Family, num_layers: int, window: int) -> tuple[str, ...]:
    """Per layer FULL or SLIDING; every layer FULL when the model has no window."""
    if not window:
        return (FULL,) * num_layers
    if cfg.get("layer_types"):
        types = tuple(cfg["layer_types"])
        if len(types) != num_layers or set(types) - {FULL, SLIDING}:
            raise ValueError(f"layer_types {list(types)!r} is not supported")
        return types
    if family.sliding_layers == "all":
        return (SLIDING,) * num_layers
    if family.sliding_layers == "qwen":
        first = cfg.get("max_window_layers", num_layers) if cfg.get("use_sliding_window") else num_layers
        return tuple(SLIDING if i >= first else FULL for i in range(num_layers))
    if family.sliding_layers == "pattern":
        every = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6
        return tuple(FULL if (i + 1) % every == 0 else SLIDING for i in range(num_layers))
    return (FULL,) * num_layers


def _rope_parameters(cfg: dict, model_type: str) -> tuple[dict, dict | None]:
    """(full layers' RoPE parameters, sliding layers' own plain RoPE or None), from either config
    style: transformers 5's `rope_parameters` (per layer type for Gemma 3) or `rope_theta` +
    `rope_scaling` (+ Gemma 3's `rope_local_base_freq`)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and FULL in params:
        full, local = dict(params[FULL] or {}), params.get(SLIDING)
    else:
        full = dict(params or cfg.get("rope_scaling") or {})
        full.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
        base = cfg.get("rope_local_base_freq")
        local = {"rope_type": "default", "rope_theta": base} if base else None
    if local is not None and local.get("rope_type", local.get("type", "default")) != "default":
        raise ValueError(f"{model_type}: sliding-layer rope {local!r} is not supported")
    return full, local


def full_rope_fields(rope: dict) -> dict:
    """ModelConfig's RoPE fields from an HF rope parameters dict (`rope_type` or the older `type`)."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    fields = {"rope_theta": float(rope.get("rope_theta", 10000.0))}
    if rope_type == "default":
        return fields
    if rope_type == "linear":
        return fields | {"rope_type": "linear", "rope_factor": float(rope["factor"])}
    if rope_type == "llama3":
        return fields | {"rope_type": "llama3", "rope_factor": float(rope["factor"]),
                         "rope_low_freq_factor": float(rope["low_freq_factor"]),
                         "rope_high_freq_factor": float(rope["high_freq_factor"]),
                         "rope_original_max_position": int(rope["original_max_position_embeddings"])}
    raise ValueError(f"rope scaling {rope_type!r} is not supported (default, linear, llama3)")
