"""Speculative decoding on the real SmolLM2-135M: n-gram drafts verified by the target model.

Greedy verification accepts a draft token only where it equals the target's own argmax, so the text
must be the one decoding without speculation produces. On the fp32 reference path that is exact
token for token; on the default quantized fast path a verify step computes k + 1 rows where plain
decoding computes one (other matmul kernels, bf16 rounding), so the texts may part only at a near
tie, as the fast path may from the reference (tests/integration/test_fast_path.py). Both runs must
actually accept drafts on prompts that repeat their own text.
"""
import pytest
import torch

from rtserve import LLM, SamplingParams
from rtserve.config import EngineConfig, RTConfig, SpeculativeConfig

pytestmark = pytest.mark.slow
NEW_TOKENS = 48


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_llm(quantization: str, spec: bool) -> LLM:
    method = SpeculativeConfig(method="ngram", num_speculative_tokens=4, adaptive=False) if spec else \
        SpeculativeConfig()
    return LLM(config=EngineConfig(quantization=quantization, dtype="float32", rt=RTConfig(policy="fcfs"),
                                   speculative=method))


@pytest.fixture(scope="module")
def prompts():
    tok = make_llm("none", False).tokenizer

    def chat(msg):
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": msg}]))

    text = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
            "How vexingly quick daft zebras jump!")
    return [
        chat(f"Repeat the following text exactly, twice:\n{text}"),
        tok.encode("def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n    return a + b\n\n\ndef add("),
        tok.encode("one two three four five one two three four five one two three"),
        chat("Write a haiku about the sea."),
    ]


def greedy(llm: LLM, prompts):
    return [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS,
                                                                      ignore_eos=True))]


def top5_at(llm: LLM, prompt, prefix):
    out = llm.generate([prompt + prefix], SamplingParams(temperature=0.0, max_tokens=1, logprobs=5))[0]
    return out.samples[0].logprobs[0].top_ids


def test_reference_path_speculation_is_token_identical(prompts):
    plain, spec = make_llm("none", False), make_llm("none", True)
    assert greedy(spec, prompts) == greedy(plain, prompts)
    stats = spec.core.speculator.stats()
    assert stats.num_accepted_tokens > 0 and stats.num_drafts > 0


def test_fast_path_speculation_matches_or_parts_at_a_near_tie(prompts):
    plain, spec = make_llm("auto", False), make_llm("auto", True)
    assert spec.core.runner.is_fast_path
    got, ref = greedy(spec, prompts), greedy(plain, prompts)
    for prompt, g, r in zip(prompts, got, ref):
        if g != r:
            i = next(j for j, (a, b) in enumerate(zip(g, r)) if a != b)
            assert g[i] in top5_at(plain, prompt, r[:i]) and r[i] in top5_at(spec, prompt, r[:i]), \
                f"not a near tie at token {i}: speculative {g[i]} vs plain {r[i]}"
    stats = spec.core.speculator.stats()
    assert stats.num_accepted_tokens > 0
    # The repeated prompts are where n-gram drafts pay: most drafted tokens are accepted there.
    print(f"\nfast path n-gram: {stats.num_accepted_tokens}/{stats.num_draft_tokens} drafted tokens accepted")
    assert stats.acceptance_rate > 0.3, stats
