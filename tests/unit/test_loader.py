"""Loader on tiny synthetic models: GGUF naming and q/k un-permutation, config, the weights cache,
and HF safetensors directories."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rtserve.config import ModelConfig
from rtserve.model.loader import expected_shapes, load_model, unpermute_rope_rows
from tests.unit.gguf_fixtures import llama_gguf_writer

# rms_norm_eps is exact in float32, so it survives the GGUF round trip unchanged.
CFG = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position=128, rope_theta=5e4, rms_norm_eps=2.0**-17,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2, 3))
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `permute` (HF rotate-half rows -> interleaved pairs)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        return f"blk.{i}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


def hf_weights(config: ModelConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g) for name, shape in expected_shapes(config).items()}


def write_tiny_gguf(path, config: ModelConfig, weights: dict[str, torch.Tensor], extra=()) -> None:
    w = llama_gguf_writer(path, config)
    w.add_uint32("tokenizer.ggml.eot_token_id", 3)
    for name, tensor in weights.items():
        array = tensor.numpy()
        if ".q_proj." in name:
            array = llama_cpp_permute(array, config.num_heads)
        elif ".k_proj." in name:
            array = llama_cpp_permute(array, config.num_kv_heads)
        w.add_tensor(gguf_name(name), np.ascontiguousarray(array))
    for name, array in extra:
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_round_trip_and_cache(tmp_path, tied):
    import dataclasses
    config = dataclasses.replace(CFG, tie_word_embeddings=tied)
    weights = hf_weights(config)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, config, weights)
    cache_dir = str(tmp_path / "cache")
    first = load_model(str(path), cache_dir=cache_dir)
    assert first.config == config
    assert_same(first.weights, weights)
    assert len([f for f in os.listdir(cache_dir) if f.endswith(".safetensors")]) == 1
    second = load_model(str(path), cache_dir=cache_dir)
    assert second.config == config
    assert_same(second.weights, weights)


def test_torn_cache_is_rebuilt(tmp_path):
    weights = hf_weights(CFG)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, CFG, weights)
    cache_dir = tmp_path / "cache"
    load_model(str(path), cache_dir=str(cache_dir))
    (cached,) = cache_dir.iterdir()
    cached.write_bytes(cached.read_bytes()[:100])
    assert_same(load_model(str(path), cache_dir=str(cache_dir)).weights, weights)
    assert cached.stat().st_size > 100


def test_unpermute_inverts_llama_cpp_permute():
    w = torch.randn(24, 5)
    for heads in (1, 3, 6):
        permuted = torch.from_numpy(llama_cpp_permute(w.numpy(), heads))
        assert torch.equal(unpermute_rope_rows(permuted, heads), w)


def test_unknown_tensor_is_rejected(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, CFG, hf_weights(CFG), extra=[("blk.0.mystery.weight", np.ones(4, np.float32))])
    with pytest.raises(ValueError, match="mystery"):
        load_model(str(path), cache_dir=str(tmp_path / "cache"))


def test_hf_directory(tmp_path):
    weights = hf_weights(CFG)
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 40, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "rope_theta": 5e4, "rms_norm_eps": 2.0**-17,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": [2, 3]}))
    model = load_model(str(tmp_path))
    assert model.config == CFG
    assert_same(model.weights, {k: v.to(torch.bfloat16).float() for k, v in weights.items()})
