"""The default quantized CPU fast path against the fp32 reference path on the real SmolLM2-135M.

The fast path runs the GGUF's own Q4_1 weights (int4 / bf16 kernels) with bf16 activations into the
matmuls, so it is not bit-exact: greedy output must be identical to the reference, or part only at a
near tie. At the first differing position each path's token must be within NEAR_TIE_NATS of the
other path's best token by that path's own logprobs (so the two are the reference's top 2, or among
tokens tied that closely), where NEAR_TIE_NATS is a small multiple of how far the two paths' logprobs
for the same token on the same prefix differ in this run: the rounding of bf16 activations (8
significant bits) through 30 layers, measured, not assumed (AMX and AVX-512 machines round
differently).
"""
import pytest
import torch

from rtserve import LLM, SamplingParams
from rtserve.model import quant

pytestmark = pytest.mark.slow
NEW_TOKENS = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core runner a second thread stalls every op when the other
    core is busy, and this test's runtime budget (90 s) is about latency, not throughput."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fast():
    llm = LLM(max_num_batched_tokens=512)
    assert llm.core.runner.is_fast_path
    return llm


@pytest.fixture(scope="module")
def reference():
    llm = LLM(max_num_batched_tokens=512, quantization="none", dtype="float32")
    assert not llm.core.runner.is_fast_path
    return llm


@pytest.fixture(scope="module")
def prompts(fast):
    tok = fast.tokenizer

    def chat(msg):
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": msg}]))

    return [
        chat("What is the capital of France? Answer in one sentence."),
        chat("Write a haiku about the sea."),
        chat("请用中文介绍一下你自己。"),
        chat("Explain recursion to a child 🧒 with an emoji or two 🎉."),
        chat("Write a Python function that checks whether a string is a palindrome."),
        tok.encode("def quicksort(arr):\n    "),
        tok.encode("The history of the Roman Empire"),
        tok.encode("東京は日本の首都です。大阪は"),
        tok.encode("1, 2, 3, 5, 8, 13,"),
        tok.encode("<html>\n<head>\n  <title>"),
    ]


def params(logprobs=5):
    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=logprobs)


# A divergence is a near tie when each token is within this many times the paths' measured
# disagreement of the other's best (and the disagreement is floored at 0.02 nats).
NEAR_TIE_FACTOR = 5.0
MIN_DISAGREEMENT_NATS = 0.02


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)


def disagreement_nats(outs_a, outs_b) -> float:
    """Largest |logprob| difference the two runs give the same token on the same prefix (positions
    before their first divergence), over every prompt."""
    worst = MIN_DISAGREEMENT_NATS
    for a, b in zip(outs_a, outs_b):
        n = first_divergence(a.token_ids, b.token_ids)
        for j in range(len(a.token_ids) if n is None else n):
            worst = max(worst, abs(a.samples[0].logprobs[j].logprob - b.samples[0].logprobs[j].logprob))
    return worst


def check_near_tie(a, b, gap_nats: float) -> str:
    """'' when the greedy outputs `a` and `b` (logprobs=5) are identical; a description when they part
    at a near tie (module doc); fails otherwise."""
    i = first_divergence(a.token_ids, b.token_ids)
    if i is None:
        return ""
    la, lb = a.samples[0].logprobs[i], b.samples[0].logprobs[i]
    top_a, top_b = dict(zip(la.top_ids, la.top_logprobs)), dict(zip(lb.top_ids, lb.top_logprobs))
    ta, tb = a.token_ids[i], b.token_ids[i]
    assert tb in top_a and ta in top_b, f"token {i}: {ta} vs {tb} not in each other's top-5 {la.top_ids} {lb.top_ids}"
    gap_in_a, gap_in_b = top_a[ta] - top_a[tb], top_b[tb] - top_b[ta]
    assert max(gap_in_a, gap_in_b) <= gap_nats, (
        f"not a near tie at token {i}: {ta} vs {tb}, logprob gaps {gap_in_a:.3f} / {gap_in_b:.3f} nats "
        f"> {gap_nats:.3f}")
    return f"token {i}: {ta} vs {tb} (gaps {gap_in_a:.3f}/{gap_in_b:.3f} nats)"


def check_all(outs_a, outs_b) -> list[str]:
    gap = NEAR_TIE_FACTOR * disagreement_nats(outs_a, outs_b)
    notes = [check_near_tie(a, b, gap) for a, b in zip(outs_a, outs_b)]
    print(f"\n{sum(not n for n in notes)}/{len(notes)} identical; near-tie bound {gap:.3f} nats; "
          f"near ties: {[n for n in notes if n]}")
    return notes


def test_fast_path_matches_reference_or_near_tie(fast, reference, prompts):
    check_all(fast.generate(prompts, params()), reference.generate(prompts, params()))


def test_fast_path_batch_1_equals_batched(fast, prompts):
    """Decode kernels (M < LARGE_M: int4) and batched kernels (bf16) give the same greedy text or
    near ties; batch-1 runs take the contiguous-slot decode attention."""
    alone = [fast.generate([p], params())[0] for p in prompts[:4]]
    check_all(alone, fast.generate(prompts[:4], params()))


def test_small_chunks_as_decode_rows_match_whole_prompt_prefill(fast, prompts):
    """With an 8-token budget every prompt is prefilled in chunks of at most 8 tokens, which run as
    decode rows (runner/input_batch.py ROW_CHUNK_MAX) through the native paged attention; the greedy
    text must equal whole-prompt prefill's, or part at a near tie."""
    chunked = LLM(max_num_batched_tokens=8)
    assert chunked.core.runner.is_fast_path
    check_all([chunked.generate([p], params())[0] for p in prompts[:3]],
              [fast.generate([p], params())[0] for p in prompts[:3]])


@pytest.mark.parametrize("panel", [True, False])
def test_without_onednn_bf16_the_int4_kernels_serve_every_row_count(reference, prompts, monkeypatch, panel):
    """Where oneDNN's bf16 linear cannot run (AVX2-only x86), the fast path still loads and serves:
    the int4 panel GEMM takes the steps of 8+ rows (or, without it, the int4 GEMV every row count) and
    no bf16 layer matrix is kept. Same contract as the default fast path: the reference's text, or a
    part at a near tie. On CPUs with AMX the AMX kernel serves up to 32 rows whatever this says."""
    monkeypatch.setattr(quant, "onednn_bf16", lambda: False)
    if not panel:
        monkeypatch.setattr(quant, "panel_kernel_runs", lambda: False)
    elif not quant.panel_kernel_runs():
        pytest.skip("the panel kernel does not run here (AMX, or a build without AVX2/FMA)")
    llm = LLM(max_num_batched_tokens=512)
    model = llm.core.runner.model
    assert llm.core.runner.is_fast_path and model.have_panel == panel
    assert quant.kernel_for_rows(256, model.have_amx, model.have_panel) == (quant.PANEL if panel else quant.SMALL)
    assert all(layer.qkv.bf16_prepacked.numel() == 0 for layer in model.layers)
    check_all(llm.generate(prompts, params()), reference.generate(prompts, params()))
