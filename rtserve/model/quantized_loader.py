"""Load a GGUF for the CPU fast path without dequantizing its 4-bit layers.

`load_fast_checkpoint(path)` returns `FastCheckpoint` (config + flat tensor dict, names below) or None
when the file does not qualify (every layer matrix must be Q4_0, Q4_1 or Q4_K, the types that are
affine int4 groups of 32, rtserve/model/quant_groups.py; else the reference fp32 path runs).
Building the packed forms takes seconds, so the result is cached as safetensors next to the fp32
cache (`<key>.fast.safetensors`); a second start only maps that file.

Tensor names (N x K per matrix; <m> in qkv, o, gate_up, down, each fused as in `DecoderForCausalLM`):
  layers.<i>.<m>.int4 [N, K/2] uint8 and .scales_zeros [K/32, N, 2] bf16   (from the int4 groups)
  layers.<i>.<m>.bf16 [N, K] bf16                                           (the exact dequantization)
  layers.<i>.<m>.amx_q [N/16, K/32, 16, 16] uint8, .amx_dm [N/16, K/32, 64] fp32  (AMX layout; N % 32 == 0,
                                                             only on a CPU with AMX tiles)
  layers.<i>.<m>.panel_q [N/16, K/32, 32, 8] uint8, .panel_dm [N/16, K/32, 32] fp32  (int4 panel layout;
                                                             N % 16 == 0, only where `quant.panel_kernel_runs`)
  layers.<i>.input_layernorm / .post_attention_layernorm [H] fp32, norm [H] fp32
  embed_tokens [V, H] fp32; lm_head.int8 [V, H] int8, lm_head.scale [V] fp32, lm_head.bf16 [V, H] bf16,
  lm_head.outlier_idx [16] int64 (the head input's outlier channels, see FastLlamaForCausalLM)
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from rtserve.config import ModelConfig
from rtserve.kernels import cpu_has_amx
from rtserve.model.tensor_cache import read_tensor_cache, write_tensor_cache
from rtserve.model import quant
from rtserve.model.gguf import GGUFFile, cache_key, default_cache_dir
from rtserve.model.gguf_arch import unpermute_rope_rows
from rtserve.model.loader import config_from_gguf
from rtserve.model.quant_groups import INT4_TYPES, dequantize_groups, int4_groups, int4pack

logger = logging.getLogger(__name__)

FAST_FORMAT_VERSION = "6"  # bump when the packed layout changes (6: no AMX layout without AMX)
FUSED = {"qkv": ("attn_q", "attn_k", "attn_v"), "o": ("attn_output",), "gate_up": ("ffn_gate", "ffn_up"),
         "down": ("ffn_down",)}


@dataclass
class FastCheckpoint:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]


def load_fast_checkpoint(path: str, cache_dir: str = "") -> FastCheckpoint | None:
    """The fast-path tensors of a GGUF whose layer matrices are all 4-bit groups; None otherwise."""
    if not path.endswith(".gguf") or os.path.isdir(path):
        return None
    # torch packs int4 weights for the ISA it runs on (`_convert_weight_to_int4pack_for_cpu`: an
    # AVX-512 layout read on an AVX2 CPU gives garbage), so the cache is per ISA.
    # torch reports AVX512 on AMX machines too: whether the AMX layout is in the file is part of the name.
    # So is whether the panel layout is (CPUs with neither AMX nor oneDNN's bf16 linear).
    isa = torch.backends.cpu.get_cpu_capability() + (
        "-amx" if cpu_has_amx() else "-panel" if quant.panel_kernel_runs() else "")
    cache_name = f"{cache_key(path)}.fast{FAST_FORMAT_VERSION}.{isa}.safetensors"
    cache_path = os.path.join(default_cache_dir(cache_dir), cache_name)
    cached = _read(cache_path)
    if cached is not None:
        return cached
    gguf = GGUFFile(path)
    if any(info.type_name not in INT4_TYPES for name, info in gguf.tensors.items()
           if name.startswith("blk.") and len(info.shape) == 2):
        logger.info("%s: layer matrices are not all %s; using the fp32 reference path", path, "/".join(INT4_TYPES))
        return None
    from rtserve.model.fast_llama import FastLlamaForCausalLM, unsupported_features
    config = config_from_gguf(gguf)
    missing = unsupported_features(config)
    if missing:
        logger.info("%s: the CPU fast path does not implement %s; using the fp32 reference path",
                    path, ", ".join(missing))
        return None
    checkpoint = FastCheckpoint(config, build_tensors(gguf))
    # The model calibrates its LM head once; the cache keeps the result.
    outlier_idx = FastLlamaForCausalLM(checkpoint.config, checkpoint.tensors).outlier_idx
    if outlier_idx is not None:
        checkpoint.tensors["lm_head.outlier_idx"] = outlier_idx
    try:
        _write(cache_path, checkpoint)
    except OSError as e:
        logger.warning("could not write the fast-path cache %s: %s", cache_path, e)
    return checkpoint


def build_tensors(gguf: GGUFFile) -> dict[str, torch.Tensor]:
    config = config_from_gguf(gguf)
    amx, panel = cpu_has_amx(), quant.panel_kernel_runs()
    out: dict[str, torch.Tensor] = {"norm": gguf.dequantize("output_norm.weight")}
    embed = gguf.dequantize("token_embd.weight")
    head = gguf.dequantize("output.weight") if "output.weight" in gguf.tensors else embed
    out["embed_tokens"] = embed
    scale = (head.abs().amax(1) / 127).clamp_min(1e-12)  # per-row int8 for the few-row head
    out["lm_head.int8"] = torch.round(head / scale[:, None]).clamp(-127, 127).to(torch.int8)
    out["lm_head.scale"] = scale
    out["lm_head.bf16"] = head.to(torch.bfloat16)
    for i in range(config.num_layers):
        for norm, hf in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            out[f"layers.{i}.{hf}"] = gguf.dequantize(f"blk.{i}.{norm}.weight")
        for fused, parts in FUSED.items():
            groups = [int4_groups_of(gguf, f"blk.{i}.{part}.weight", config) for part in parts]
            q, d, m = (torch.cat(parts_of) for parts_of in zip(*groups))  # [N, K] and [N, K/32] x 2
            packed, scales_zeros = int4pack(q, d, m)
            out[f"layers.{i}.{fused}.int4"] = packed
            out[f"layers.{i}.{fused}.scales_zeros"] = scales_zeros
            out[f"layers.{i}.{fused}.bf16"] = dequantize_groups(q, d, m).to(torch.bfloat16)
            if q.shape[0] % 32 == 0 and amx:  # only where the AMX kernel can run
                out[f"layers.{i}.{fused}.amx_q"], out[f"layers.{i}.{fused}.amx_dm"] = quant.pack_q4_amx_groups(q, d, m)
            if q.shape[0] % 16 == 0 and panel:  # only where the panel kernel runs
                out[f"layers.{i}.{fused}.panel_q"], out[f"layers.{i}.{fused}.panel_dm"] = quant.pack_q4_panel(q, d, m)
    return out


def int4_groups_of(gguf: GGUFFile, name: str, config: ModelConfig) -> tuple[torch.Tensor, ...]:
    """(q [N, K] uint8, d and m [N, K/32] fp32), w = d * q + m, with q/k rows put in HF order like
    the fp32 loader does."""
    info = gguf.tensors[name]
    groups = int4_groups(gguf.raw(name), info.ggml_type, info.shape[0])
    if ".attn_q." in name:
        return tuple(unpermute_rope_rows(t, config.num_heads) for t in groups)
    if ".attn_k." in name:
        return tuple(unpermute_rope_rows(t, config.num_kv_heads) for t in groups)
    return groups


def _read(cache_path: str) -> FastCheckpoint | None:
    cached = read_tensor_cache(cache_path)
    return None if cached is None else FastCheckpoint(*cached)


def _write(cache_path: str, checkpoint: FastCheckpoint) -> None:
    write_tensor_cache(cache_path, checkpoint.config, checkpoint.tensors)
