"""Greedy decoding on the real SmolLM2-135M-Instruct is token-identical to Hugging Face transformers
(same GGUF, dequantized, fp32 -- `quantization="none"`, the reference mode, not the default fast
path): each prompt alone, all batched together, and again with prefix-cache
hits and with forced preemption. fp32 is the reference mode; if a kernel difference ever flips a
near-tie, the assertion message shows where (each token must then be in the other's top-5)."""
import pytest
import torch

from rtserve import LLM, SamplingParams

pytestmark = pytest.mark.slow
NEW_TOKENS = 40
SYSTEM = ("You are a meticulous assistant. Answer briefly, cite facts precisely, and never invent "
          "sources. Prefer plain words; use lists only when they help the reader.")


@pytest.fixture(scope="module")
def llm():
    return LLM(max_num_batched_tokens=256, quantization="none", dtype="float32")


@pytest.fixture(scope="module")
def hf_model(hf_smollm2):
    return hf_smollm2


@pytest.fixture(scope="module")
def prompts(llm):
    tok = llm.tokenizer

    def chat(msg, system=None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": msg}]
        return tok.encode(tok.apply_chat_template(msgs))

    return [
        chat("What is the capital of France? Answer in one sentence."),
        chat("Write a haiku about the sea."),
        chat("请用中文介绍一下你自己。"),
        chat("Explain recursion to a child 🧒 with an emoji or two 🎉."),
        tok.encode("def quicksort(arr):\n    "),
        tok.encode("The history of the Roman Empire"),
        tok.encode("東京は日本の首都です。大阪は"),
        tok.encode("1, 2, 3, 5, 8, 13,"),
        chat("Name three primary colors.", SYSTEM),
        chat("Why is the sky blue?", SYSTEM),
    ]


@pytest.fixture(scope="module")
def reference(hf_model, prompts):
    refs = []
    for p in prompts:
        out = hf_model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
        refs.append(out[0, len(p):].tolist())
    return refs


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def check(got, ref, hf_model, prompt):
    if got == ref:
        return
    i = next(j for j, (a, b) in enumerate(zip(got, ref)) if a != b)
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + ref[:i]])).logits[0, -1]
    top5 = logits.topk(5).indices.tolist()
    pytest.fail(f"diverged at token {i}: ours {got[i]} vs HF {ref[i]}; HF top-5 {top5} "
                f"(near tie: {got[i] in top5})")


def test_each_prompt_alone(llm, prompts, reference, hf_model):
    for p, ref in zip(prompts, reference):
        check(llm.generate([p], GREEDY)[0].token_ids, ref, hf_model, p)


def test_all_prompts_batched(llm, prompts, reference, hf_model):
    outs = llm.generate(prompts, GREEDY)
    for out, p, ref in zip(outs, prompts, reference):
        check(out.token_ids, ref, hf_model, p)


def test_shared_prefix_cache_hits(llm, prompts, reference, hf_model):
    llm.core.kv.reset_prefix_cache()
    first = llm.generate([prompts[8]], GREEDY)[0]
    assert first.num_cached_tokens == 0
    second = llm.generate([prompts[9]], GREEDY)[0]  # shares the long system prompt
    assert second.num_cached_tokens >= 32
    check(first.token_ids, reference[8], hf_model, prompts[8])
    check(second.token_ids, reference[9], hf_model, prompts[9])
    llm.generate(prompts[:8], GREEDY)
    again = llm.generate(prompts, GREEDY)  # every prompt's full blocks are cached now
    assert all(o.num_cached_tokens > 0 for o in again if len(o.prompt_token_ids) > 16)
    for out, p, ref in zip(again, prompts, reference):
        check(out.token_ids, ref, hf_model, p)


def test_forced_preemption(prompts, reference, hf_model):
    small = LLM(num_blocks=40, block_size=16, max_num_batched_tokens=128, enable_prefix_caching=False,
                quantization="none", dtype="float32")
    outs = small.generate(prompts, GREEDY)
    assert small.core.scheduler.num_preemptions > 0
    for out, p, ref in zip(outs, prompts, reference):
        check(out.token_ids, ref, hf_model, p)
    assert small.core.kv.num_free_blocks == small.core.kv.pool.num_blocks
