"""Every supported family on the fp32 path, token-identical to Hugging Face transformers.

For each architecture a tiny random-weight model is built from its HF config class, saved with
`save_pretrained` (safetensors) and loaded back through `load_model(DIR)`, as `--model DIR` does.
Greedy output must equal transformers' `generate` alone, batched with chunked prefill (chunks
computed as decode rows, masked chunks starting past the window, whole prompts), with prefix-cache
hits and under forced preemption. Gemma 3 and Mistral have a sliding window shorter than the
prompts, so local layers must drop the keys that left it in prefill and in decode.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rtserve.client.async_llm import model_path
from rtserve.config import CacheConfig, EngineConfig, RTConfig, SchedulerConfig
from rtserve.engine.core import EngineCore
from rtserve.model.fast_llama import FastLlamaForCausalLM, unsupported_features
from rtserve.model.families import config_from_hf
from rtserve.model.loader import load_model
from rtserve.protocol import EngineCoreRequest
from rtserve.sampling_params import SamplingParams
from tests.unit.conftest import hf_greedy, run_to_completion

WINDOW = 8
NEW = 12
SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
PROMPTS = [
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    [5, 9, 200, 3],
    [250, 17, 33, 91, 4, 4, 4, 180, 66, 12, 8, 199, 3, 77, 41, 9, 100, 2],
    [7, 100, 3, 3, 61, 240, 18, 9, 9, 130, 45, 2, 88, 17, 203, 64, 5, 31, 150, 12, 77, 8, 190, 42, 6, 3, 99, 11],
    [60, 61, 62] * 8,
]


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(**SIZES, num_hidden_layers=2, tie_word_embeddings=False, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM
    return MistralForCausalLM(MistralConfig(**SIZES, num_hidden_layers=2, head_dim=16, sliding_window=WINDOW + 4))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(**SIZES, num_hidden_layers=2, tie_word_embeddings=False))


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM
    return Qwen3ForCausalLM(Qwen3Config(**SIZES, num_hidden_layers=2, head_dim=16, tie_word_embeddings=True))


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    return Gemma3ForCausalLM(Gemma3TextConfig(
        **SIZES, num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]))


# name -> (builder, dtype the checkpoint is saved in: bf16/fp16 are upcast to fp32 by the loader)
FAMILIES = {"llama3": (_llama, torch.float32), "mistral": (_mistral, torch.float32),
            "qwen2": (_qwen2, torch.float32), "qwen3": (_qwen3, torch.bfloat16),
            "gemma3": (_gemma3, torch.float16)}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(HF model in fp32, loaded rtserve model, greedy references for PROMPTS)."""
    build, dtype = FAMILIES[request.param]
    torch.manual_seed(0)
    hf = build().eval()
    with torch.no_grad():  # the default 0.02 init makes every greedy output repeat one token
        for name, p in hf.named_parameters():
            if "norm" in name:  # Gemma's norms scale by (1 + weight): keep both styles near 1
                p.normal_(0.0, 0.1) if request.param == "gemma3" else p.normal_(1.0, 0.1)
            else:
                # Gemma scales embeddings by sqrt(hidden): smaller ones leave attention a say in the output
                embed_std = 0.05 if request.param == "gemma3" else 0.3
                p.normal_(0.0, embed_std if "embed" in name or "lm_head" in name else 0.15)
    path = tmp_path_factory.mktemp(request.param)
    hf.to(dtype).save_pretrained(path)
    hf = hf.float().eval()  # the weights as saved, upcast: what rtserve loads
    loaded = load_model(str(path))
    refs = [hf_greedy(hf, p, NEW) for p in PROMPTS]
    return hf, loaded, refs


def make_core(loaded, num_blocks=64, block_size=4, budget=16, prefix_caching=True) -> EngineCore:
    cfg = EngineConfig(cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                                         enable_prefix_caching=prefix_caching),
                       scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8, max_model_len=512),
                       rt=RTConfig(policy="fcfs"))
    return EngineCore(cfg, loaded.config, loaded.weights)


def add(core, rid, prompt):
    core.add_request(EngineCoreRequest(rid, prompt, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True), 0.0))


def assert_no_leaks(core):
    assert not core.has_unfinished
    assert core.kv.num_free_blocks == core.kv.pool.num_blocks


def test_config_is_read_from_the_checkpoint(family, request):
    cfg = family[1].config
    name = request.node.callspec.params["family"]
    if name == "gemma3":
        assert cfg.layer_windows == (WINDOW, WINDOW, 0, WINDOW) and cfg.sandwich_norms and cfg.qk_norm
        assert cfg.rope_local_theta == 10000.0 and cfg.rope_theta == 1e6 and cfg.embed_scale == 8.0
        assert cfg.hidden_act == "gelu_tanh" and cfg.norm_weight_offset == 1.0 and cfg.attention_scale == 24 ** -0.5
    elif name == "mistral":
        assert cfg.layer_windows == (WINDOW + 4,) * 2
    elif name == "llama3":
        assert cfg.rope_type == "llama3" and cfg.rope_original_max_position == 64 and not cfg.tie_word_embeddings
    elif name == "qwen2":
        assert cfg.qkv_bias and not cfg.o_bias and cfg.layer_windows == (0, 0)
    elif name == "qwen3":
        assert cfg.qk_norm and not cfg.qkv_bias and cfg.tie_word_embeddings


def test_alone_matches_hf(family):
    _, loaded, refs = family
    for prompt, ref in zip(PROMPTS, refs):
        core = make_core(loaded, prefix_caching=False)
        add(core, "x", prompt)
        assert run_to_completion(core)["x"] == ref
        assert_no_leaks(core)


@pytest.mark.parametrize("budget", [5, 16, 64])
def test_batched_with_chunked_prefill_matches_hf(family, budget):
    _, loaded, refs = family
    core = make_core(loaded, budget=budget)
    for i, prompt in enumerate(PROMPTS):
        add(core, f"r{i}", prompt)
    got = run_to_completion(core)
    assert [got[f"r{i}"] for i in range(len(PROMPTS))] == refs
    assert_no_leaks(core)


def test_prefix_cache_hits_match_hf(family):
    hf, loaded, refs = family
    core = make_core(loaded)
    add(core, "warm", PROMPTS[3])
    run_to_completion(core)
    hits_before = core.kv.prefix_cache_hits
    add(core, "again", PROMPTS[3])
    add(core, "extends", PROMPTS[3] + [42, 43, 44, 45, 46])
    got = run_to_completion(core)
    assert core.kv.prefix_cache_hits - hits_before >= 2 * 24  # both reuse the cached blocks past the window
    assert got["again"] == refs[3]
    assert got["extends"] == hf_greedy(hf, PROMPTS[3] + [42, 43, 44, 45, 46], NEW)
    assert_no_leaks(core)


def test_forced_preemption_matches_hf(family):
    _, loaded, refs = family
    core = make_core(loaded, num_blocks=14, budget=32)  # 14 blocks of 4 cannot hold all five sequences
    for i, prompt in enumerate(PROMPTS):
        add(core, f"r{i}", prompt)
    got = run_to_completion(core)
    assert core.scheduler.num_preemptions > 0
    assert [got[f"r{i}"] for i in range(len(PROMPTS))] == refs
    assert_no_leaks(core)


def test_unsupported_architecture_and_missing_files_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="no \\*.safetensors files"):
        load_model(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        load_model(str(tmp_path))


def test_serve_with_an_unusable_model_dir_exits_2_with_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    run = subprocess.run([sys.executable, "-m", "rtserve", "serve", "--model", str(tmp_path), "--port", "0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "unsupported model_type 'gpt2'" in lines[0], run.stderr
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="no tokenizer.json"):
        model_path(EngineConfig(model=str(tmp_path)))


def test_fast_path_runs_llama_layers_only_and_refuses_the_rest(family, request):
    cfg = family[1].config
    name = request.node.callspec.params["family"]
    missing = unsupported_features(cfg)
    assert (missing == []) == (name == "llama3"), missing
    if missing:
        with pytest.raises(ValueError, match="fast path does not implement"):
            FastLlamaForCausalLM(cfg, {})


def test_gemma3_config_keys_left_out_take_transformers_defaults():
    from transformers import Gemma3Config, Gemma3TextConfig
    full = config_from_hf(Gemma3TextConfig().to_dict())
    assert config_from_hf({"model_type": "gemma3_text"}) == full
    assert config_from_hf({"model_type": "gemma3", "text_config": {}}) == full
    assert config_from_hf(Gemma3Config().to_dict()) == full
    assert full.layer_windows[:6] == (4096,) * 5 + (0,) and full.rope_local_theta == 10000.0
    # the older style: rope_theta + rope_local_base_freq + rope_scaling, sliding_window_pattern
    old = config_from_hf({"model_type": "gemma3_text", "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                          "sliding_window_pattern": 6, "num_hidden_layers": 12})
    assert old.rope_type == "linear" and old.rope_factor == 8.0 and old.rope_theta == 1e6
    assert old.layer_windows == ((4096,) * 5 + (0,)) * 2


def test_rope_freq_factors_give_llama3_frequencies():
    """A GGUF's `rope_freqs` divisors in place of the llama3 parameters: the same inverse frequencies."""
    from dataclasses import replace

    from rtserve.config import ModelConfig
    from rtserve.model.layers import rope_inv_freq
    llama3 = ModelConfig(vocab_size=8, hidden_size=64, intermediate_size=8, num_layers=1, num_heads=4,
                         num_kv_heads=4, head_dim=16, max_position=512, rope_type="llama3", rope_factor=8.0,
                         rope_original_max_position=64)
    plain = replace(llama3, rope_type="default")
    divisors = (rope_inv_freq(plain) / rope_inv_freq(llama3)).tolist()
    assert 1.0 in divisors and 8.0 in [round(d, 4) for d in divisors] and any(1 < d < 7.99 for d in divisors)
    from_factors = rope_inv_freq(replace(plain, rope_freq_factors=tuple(divisors)))
    torch.testing.assert_close(from_factors, rope_inv_freq(llama3), rtol=1e-6, atol=0)


def test_a_sliding_window_draft_model_is_refused(family):
    from rtserve.spec.draft_model import DraftModelProposer
    _, loaded, _ = family
    if not any(loaded.config.layer_windows):
        return
    with pytest.raises(ValueError, match="sliding-window layers is not supported"):
        DraftModelProposer.from_weights(loaded.config, loaded.weights, num_blocks=8, block_size=4)


def test_llm_serves_an_hf_directory_end_to_end(tmp_path):
    """`LLM(model=DIR)` (what `--model DIR` resolves to): config, weights and tokenizer from the
    directory, the fp32 path chosen for it, text in and out, greedy tokens equal to transformers'."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from rtserve import LLM
    from rtserve.client.tokenizer import Tokenizer
    tok = Tokenizer.load()  # the embedded model's tokenizer, written out as an HF tokenizer.json
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(Qwen3Config(**{**SIZES, "vocab_size": tok.vocab_size}, num_hidden_layers=2,
                                      head_dim=16, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.3 if "embed" in name else 0.15)
    hf.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(tok.backend.to_str())
    llm = LLM(model=str(tmp_path), weights_cache_dir=str(tmp_path / "cache"))
    assert not llm.core.runner.is_fast_path and llm.core.model_config.model_type == "qwen3"
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(hf, tok.encode("The capital of France is"), 8)
    assert out.text == tok.decode(out.token_ids)


def test_fast_path_applies_llama3_rope(tmp_path):
    """The fast path's RoPE tables come from the same inverse frequencies as the reference's: with
    llama3 scaling its logits follow the llama3 reference, not the plain-RoPE one."""
    from dataclasses import replace

    from rtserve.model.decoder import DecoderForCausalLM
    from rtserve.model.quantized_loader import load_fast_checkpoint
    from tests.unit.test_quant import TINY, kv, prefill_meta, write_q4_1_gguf
    path = str(tmp_path / "tiny.Q4_1.gguf")
    write_q4_1_gguf(path, TINY)
    tensors, weights = load_fast_checkpoint(path, str(tmp_path)).tensors, load_model(path, str(tmp_path)).weights
    llama3 = replace(TINY, rope_type="llama3", rope_factor=8.0, rope_original_max_position=8)
    n = 48
    ids, pos = torch.randint(0, TINY.vocab_size, (n,), generator=torch.Generator().manual_seed(1)), torch.arange(n)

    def logits(model, dtype):
        cache, slots = kv(64, dtype)
        return model(ids, pos, slots if dtype == torch.bfloat16 else cache, prefill_meta(n), pos)

    refs = {}
    for name, cfg in (("plain", TINY), ("llama3", llama3)):
        refs[name] = DecoderForCausalLM(cfg)
        refs[name].load_hf_weights(weights)
        refs[name] = logits(refs[name].eval(), torch.float32)
    fast = logits(FastLlamaForCausalLM(llama3, tensors), torch.bfloat16)
    to_llama3 = (fast - refs["llama3"]).norm() / refs["llama3"].norm()
    # bf16 activations leave ~3% relative error; plain RoPE against llama3 differs by ~100%
    assert to_llama3 < 0.05 and (refs["plain"] - refs["llama3"]).norm() / refs["llama3"].norm() > 3 * to_llama3


def test_windowed_metadata_reads_only_blocks_inside_the_window():
    """A sliding layer's decode table starts at the block holding its oldest visible position and its
    prefill gather at that position: blocks wholly before the window are never read."""
    from rtserve.engine.request import Request
    from rtserve.engine.scheduler_output import ScheduledSeq, SchedulerOutput
    from rtserve.runner.input_batch import prepare_inputs
    block_size, window = 4, 8
    blocks = [10, 11, 12, 13, 14, 15, 16, 17, 18]
    decode = ScheduledSeq(Request("d", list(range(30)), SamplingParams(), 0.0), 29, 1, blocks[:8])
    prefill = ScheduledSeq(Request("p", list(range(36)), SamplingParams(), 0.0), 20, 16, blocks)
    inputs = prepare_inputs(SchedulerOutput([decode, prefill]), block_size, torch.device("cpu"), (window,))
    full, local = inputs.meta, inputs.meta.for_window(window)
    assert full.decode_block_table.tolist() == [blocks[:8]] and local.decode_block_table.tolist() == [blocks[5:8]]
    # the decode at position 29 sees positions 22-29: slots 2..9 of its 3-block table [20, 32)
    assert local.decode_mask[0, 0, 0].nonzero().flatten().tolist() == list(range(2, 10))
    chunk = local.prefills[0]  # queries 20-35 see keys from 13 on
    assert chunk.context_len == 36 - 13 and chunk.gather_idx.tolist() == [
        blocks[p // block_size] * block_size + p % block_size for p in range(13, 36)]
    assert chunk.causal_mask.sum(1).tolist() == [window] * 16
    assert full.prefills[0].context_len == 36 and inputs.meta.for_window(0) is full
