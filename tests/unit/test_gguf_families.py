"""Each GGUF architecture end to end on the fp32 path: the tiny random-weight models of
test_model_families.py written as GGUF the way llama.cpp's converter writes them (llama's q/k rows
permuted and llama3 RoPE as the `rope_freqs` tensor, Gemma's norms stored as 1 + w), loaded with
`load_model(path.gguf)`, greedy output token-identical to transformers, alone and batched with
chunked prefill across Gemma's window."""
from __future__ import annotations

import pytest
import torch

from rtserve.model.loader import load_model
from tests.unit.conftest import hf_greedy, run_to_completion
from tests.unit.gguf_fixtures import write_hf_as_gguf
from tests.unit.test_model_families import FAMILIES, NEW, PROMPTS, WINDOW, add, assert_no_leaks, make_core


@pytest.fixture(scope="module", params=["llama3", "qwen2", "qwen3", "gemma3"])
def gguf_family(request, tmp_path_factory):
    name = request.param
    torch.manual_seed(0)
    hf = FAMILIES[name][0]().eval()
    if name == "gemma3":  # a GGUF has no key for it: llama.cpp scales queries by 1/sqrt(head_dim)
        hf.config.query_pre_attn_scalar = hf.config.head_dim
        for layer in hf.model.layers:
            layer.self_attn.scaling = hf.config.head_dim ** -0.5
    with torch.no_grad():  # as test_model_families sets them: outputs that depend on attention
        for pname, p in hf.named_parameters():
            if "norm" in pname:
                # Gemma's stored 1 + w read back as (1 + w) - 1: give transformers those fp32 values too
                p.copy_((torch.randn_like(p) * 0.1 + 1) - 1) if name == "gemma3" else p.normal_(1.0, 0.1)
            else:
                embed_std = 0.05 if name == "gemma3" else 0.3
                p.normal_(0.0, embed_std if "embed" in pname or "lm_head" in pname else 0.15)
    state = {k: v for k, v in hf.state_dict().items()
             if not (k == "lm_head.weight" and hf.config.tie_word_embeddings)}
    path = tmp_path_factory.mktemp(name) / f"{name}.gguf"
    write_hf_as_gguf(path, hf.config, state)
    loaded = load_model(str(path), cache_dir=str(path.parent / "cache"))
    return name, loaded, [hf_greedy(hf, p, NEW) for p in PROMPTS]


def test_config_from_the_gguf(gguf_family):
    name, loaded, _ = gguf_family
    cfg = loaded.config
    if name == "llama3":  # recovered from rope_freqs
        assert (cfg.rope_type, cfg.rope_factor, cfg.rope_original_max_position) == ("llama3", 8.0, 64)
    elif name == "gemma3":
        assert cfg.layer_windows == (WINDOW, WINDOW, 0, WINDOW) and cfg.rope_local_theta == 10000.0
        assert cfg.attention_scale == 16 ** -0.5 and cfg.norm_weight_offset == 1.0
    elif name == "qwen2":
        assert cfg.qkv_bias
    elif name == "qwen3":
        assert cfg.qk_norm and cfg.tie_word_embeddings


def test_alone_and_batched_match_hf(gguf_family):
    _, loaded, refs = gguf_family
    for prompt, ref in zip(PROMPTS, refs):
        core = make_core(loaded, prefix_caching=False)
        add(core, "x", prompt)
        assert run_to_completion(core)["x"] == ref
        assert_no_leaks(core)
    core = make_core(loaded, budget=7)  # chunks of 7 cross the window of 8
    for i, prompt in enumerate(PROMPTS):
        add(core, f"r{i}", prompt)
    out = run_to_completion(core)
    assert [out[f"r{i}"] for i in range(len(PROMPTS))] == refs
    assert_no_leaks(core)
