"""Fixtures for engine unit tests: a tiny random-weight Llama and its Hugging Face twin."""
from __future__ import annotations

import pytest
import torch

from rtserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from rtserve.engine.core import EngineCore

TINY = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, max_position=512, rope_theta=10000.0, eos_token_ids=())


@pytest.fixture(scope="session")
def tiny_hf_model():
    """transformers' LlamaForCausalLM with TINY's shapes and varied random weights (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=TINY.vocab_size, hidden_size=TINY.hidden_size, intermediate_size=TINY.intermediate_size,
        num_hidden_layers=TINY.num_layers, num_attention_heads=TINY.num_heads,
        num_key_value_heads=TINY.num_kv_heads, max_position_embeddings=TINY.max_position,
        rope_theta=TINY.rope_theta, rms_norm_eps=TINY.rms_norm_eps, tie_word_embeddings=True)).eval()
    with torch.no_grad():  # the default 0.02 init makes every greedy output repeat one token
        for name, p in hf.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.3)
    return hf


@pytest.fixture(scope="session")
def tiny_weights(tiny_hf_model):
    return {k: v.detach().clone() for k, v in tiny_hf_model.state_dict().items()}


@pytest.fixture
def make_core(tiny_weights):
    """Build an EngineCore on the tiny model with the given cache/scheduler geometry."""

    def make(num_blocks=64, block_size=4, budget=16, max_num_seqs=8, prefix_caching=True) -> EngineCore:
        cfg = EngineConfig(cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                                             enable_prefix_caching=prefix_caching),
                           scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                                                     max_model_len=TINY.max_position))
        return EngineCore(cfg, TINY, tiny_weights)

    return make


def hf_greedy(hf, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def run_to_completion(core: EngineCore) -> dict[str, list[int]]:
    """Step until idle; collect each request's generated token ids."""
    tokens: dict[str, list[int]] = {}
    while core.has_unfinished:
        for out in core.step().outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens
