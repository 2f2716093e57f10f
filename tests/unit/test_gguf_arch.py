"""GGUF metadata -> HF config dict, GGUF tensors -> HF weights, for llama (llama3 RoPE scaling via
rope_freqs), qwen2, qwen3 and gemma3: tiny random HF models written as GGUF the way llama.cpp's
converter writes them (tests/unit/gguf_fixtures.py), read back and compared with the originals."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config,
                          Qwen3Config)

from rtserve.model.gguf import GGUFFile
from rtserve.model.gguf_arch import (hf_config_from_gguf, llama3_rope_divisors, llama3_rope_scaling,
                                     load_gguf_hf)
from tests.unit.gguf_fixtures import write_hf_as_gguf

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
CONFIGS = {
    "llama3": lambda: LlamaConfig(**{**TINY, "head_dim": 64, "num_attention_heads": 2,  # >= 2 smooth freqs
                                     "num_key_value_heads": 1}, rope_parameters=dict(LLAMA3),
                                  tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**{**TINY, "head_dim": 16}, rope_parameters={
        "rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**TINY, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                 tie_word_embeddings=True),
    "gemma3": lambda: Gemma3TextConfig(**{**TINY, "num_hidden_layers": 4}, sliding_window=8,
                                       layer_types=["sliding_attention", "sliding_attention",
                                                    "full_attention", "sliding_attention"],
                                       query_pre_attn_scalar=16, rope_parameters={
                                           "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                           "sliding_attention": {"rope_type": "default",
                                                                 "rope_theta": 1e4}}),
}


def tiny_model(name: str):
    torch.manual_seed(0)
    config = CONFIGS[name]()
    model = AutoModelForCausalLM.from_config(config).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k, v in state.items():  # norms start at 0 or 1: randomize so the +1/-1 and names are tested
        if "norm" in k:
            state[k] = torch.randn_like(v) * 0.1 + (0.0 if name == "gemma3" else 1.0)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return config, state


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_and_weights_round_trip(tmp_path, name):
    config, state = tiny_model(name)
    path = tmp_path / f"{name}.gguf"
    write_hf_as_gguf(path, config, state)
    got_config, weights = load_gguf_hf(str(path))
    # The dict builds the same HF config class with the same architecture.
    rebuilt = type(config)(**{k: v for k, v in got_config.items() if k != "model_type"})
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                  "tie_word_embeddings", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(rebuilt, field) == pytest.approx(getattr(config, field)), field
    assert rebuilt.rope_parameters == config.rope_parameters
    if name == "gemma3":
        for field in ("layer_types", "sliding_window", "query_pre_attn_scalar", "hidden_activation"):
            assert getattr(rebuilt, field) == getattr(config, field), field
    assert set(weights) == set(state)
    for key, value in state.items():
        expected = (value + 1.0) - 1.0 if name == "gemma3" and "norm" in key else value  # fp32 as stored
        assert torch.equal(weights[key], expected), key
    if name == "qwen2":
        assert got_config["attention_bias"] and "model.layers.0.self_attn.q_proj.bias" in weights


def test_llama3_scaling_is_recovered_from_rope_freqs():
    for theta, head_dim, factor, high, orig in ((500000.0, 64, 32.0, 4.0, 8192),
                                                (500000.0, 128, 8.0, 4.0, 8192),
                                                (10000.0, 128, 16.0, 2.0, 4096)):
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                   "high_freq_factor": high, "original_max_position_embeddings": orig}
        divisors = llama3_rope_divisors(theta, head_dim, scaling).astype(np.float32)
        assert llama3_rope_scaling(divisors, theta, head_dim) == scaling
    with pytest.raises(ValueError, match="llama3"):
        llama3_rope_scaling(np.linspace(1, 3, 32).astype(np.float32) ** 3, 500000.0, 64)


def test_quantized_tensors_load_as_the_reference_dequantizes_them(tmp_path):
    config, state = tiny_model("qwen3")
    path = tmp_path / "q.gguf"
    write_hf_as_gguf(path, config, state, qtypes={"attn_q.weight": QT.Q8_0, "ffn_up.weight": QT.Q4_0})
    _, weights = load_gguf_hf(str(path))
    f = GGUFFile(str(path))
    for gguf_name, hf in (("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight"),
                          ("blk.2.ffn_up.weight", "model.layers.2.mlp.up_proj.weight")):
        info = f.tensors[gguf_name]
        expected = gguf.quants.dequantize(f.raw(gguf_name).reshape(info.shape[0], -1), QT(info.ggml_type))
        assert torch.equal(weights[hf], torch.from_numpy(expected))


def test_unsupported_architecture_and_tensor(tmp_path):
    config, state = tiny_model("qwen3")
    path = tmp_path / "x.gguf"
    write_hf_as_gguf(path, config, state)
    w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'phi3'; supported: llama, qwen2"):
        hf_config_from_gguf(GGUFFile(str(tmp_path / "phi.gguf")))
    w = gguf.GGUFWriter(str(tmp_path / "extra.gguf"), "qwen3")
    reader = GGUFFile(str(path))
    for key, value in reader.metadata.items():
        if key.startswith("qwen3.") and not isinstance(value, list):
            w.add_uint32(key, value) if isinstance(value, int) else w.add_float32(key, value)
    w.add_uint32("qwen3.vocab_size", 96)
    w.add_tensor("blk.0.mystery.weight", np.zeros((2, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported GGUF tensor 'blk.0.mystery.weight'"):
        load_gguf_hf(str(tmp_path / "extra.gguf"))
