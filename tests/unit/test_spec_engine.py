"""Speculative decoding inside the engine on the tiny Llama: greedy output is token-identical to
Hugging Face with either proposer, mixed with plain requests, across prefix hits and preemption,
without KV leaks; sampled output keeps the target distribution."""
import dataclasses
import itertools

import pytest
import torch

from rtserve.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from rtserve.engine.core import EngineCore
from rtserve.protocol import EngineCoreRequest
from rtserve.sampling_params import SamplingParams
from rtserve.spec.draft_model import DraftModelProposer
from tests.unit.conftest import TINY, hf_greedy, run_to_completion

PROMPTS = [
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    [5, 9, 200, 3],
    [7] * 20,
    [30, 31, 32, 33, 34, 35, 99, 30, 31, 32, 33],  # copy-heavy: n-gram hits at once
    [250, 17, 33, 91, 4, 4, 4, 180, 66, 12, 8, 199, 3, 77, 41, 9, 100, 2],
]
NEW = 16
PROPOSERS = ["ngram", "draft_self", "draft_small"]


@pytest.fixture(scope="module")
def reference(tiny_hf_model):
    return [hf_greedy(tiny_hf_model, p, NEW) for p in PROMPTS]


@pytest.fixture
def make_spec_core(tiny_weights):
    def make(proposer="ngram", k=4, adaptive=False, num_blocks=64, block_size=4, budget=64, max_num_seqs=8,
             prefix_caching=True, draft_num_blocks=64):
        spec = SpeculativeConfig(method="ngram" if proposer == "ngram" else "draft", num_speculative_tokens=k,
                                 adaptive=adaptive, ngram_min=1, ngram_max=3)
        cfg = EngineConfig(cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                                             enable_prefix_caching=prefix_caching),
                           scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                                                     max_model_len=TINY.max_position),
                           speculative=spec)
        draft, geometry = None, dict(num_blocks=draft_num_blocks, block_size=block_size)
        if proposer == "draft_self":  # the target as its own draft: every greedy draft is accepted
            draft = DraftModelProposer.from_weights(TINY, tiny_weights, **geometry)
        elif proposer == "draft_small":  # the target's first layer only: partial acceptance
            draft = DraftModelProposer.from_weights(dataclasses.replace(TINY, num_layers=1), tiny_weights, **geometry)
        elif proposer == "draft_noisy":  # the target with perturbed weights: a close but different q
            gen = torch.Generator().manual_seed(5)
            noisy = {k: v + 0.03 * torch.randn(v.shape, generator=gen) for k, v in tiny_weights.items()}
            draft = DraftModelProposer.from_weights(TINY, noisy, **geometry)
        return EngineCore(cfg, TINY, tiny_weights, proposer=draft)

    return make


def add(core, rid, prompt, **kw):
    kw.setdefault("max_tokens", NEW)
    kw.setdefault("temperature", 0.0)
    eos = kw.pop("eos", ())
    core.add_request(EngineCoreRequest(rid, prompt, SamplingParams(**kw), 0.0, eos_token_ids=eos))


def assert_no_leaks(core):
    assert not core.has_unfinished
    assert core.kv.num_free_blocks == core.kv.pool.num_blocks
    assert all(b.ref_cnt == 0 for b in core.kv.pool.blocks)
    proposer = core.speculator.proposer
    if isinstance(proposer, DraftModelProposer):
        assert proposer.num_free_blocks == proposer.kv_caches[0].shape[1]
    assert not core.speculator.tracker._per_request


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_greedy_identical_to_hf_mixed_with_plain_requests(make_spec_core, reference, proposer):
    core = make_spec_core(proposer)
    for i, prompt in enumerate(PROMPTS):
        add(core, f"r{i}", prompt)
    add(core, "plain", PROMPTS[0], logprobs=2)  # logprobs: speculated too, shares the verify batches
    got = run_to_completion(core)
    assert [got[f"r{i}"] for i in range(len(PROMPTS))] == reference
    assert got["plain"] == reference[0]
    stats = core.stats().spec_decode
    assert stats.method == ("ngram" if proposer == "ngram" else "draft")
    assert 0 < stats.num_accepted_tokens <= stats.num_draft_tokens
    if proposer == "draft_self":
        assert stats.num_accepted_tokens == stats.num_draft_tokens
    else:
        assert stats.num_accepted_tokens < stats.num_draft_tokens  # rejections were exercised
    assert sum(stats.num_accepted_tokens_per_pos) == stats.num_accepted_tokens
    assert_no_leaks(core)


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_prefix_hits_and_chunked_prefill_with_speculation(make_spec_core, reference, tiny_hf_model, proposer):
    core = make_spec_core(proposer, budget=8)
    add(core, "warm", PROMPTS[3])
    assert run_to_completion(core)["warm"] == reference[3]
    hits_before = core.kv.prefix_cache_hits
    add(core, "again", PROMPTS[3])
    add(core, "extends", PROMPTS[3] + [42, 43])
    add(core, "long", PROMPTS[4])
    got = run_to_completion(core)
    assert core.kv.prefix_cache_hits > hits_before
    assert got["again"] == reference[3] and got["long"] == reference[4]
    assert got["extends"] == hf_greedy(tiny_hf_model, PROMPTS[3] + [42, 43], NEW)
    assert_no_leaks(core)


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_preemption_with_speculation(make_spec_core, reference, proposer):
    core = make_spec_core(proposer, num_blocks=14, budget=32)
    for i, prompt in enumerate(PROMPTS):
        add(core, f"r{i}", prompt)
    got = run_to_completion(core)
    assert core.scheduler.num_preemptions > 0
    assert [got[f"r{i}"] for i in range(len(PROMPTS))] == reference
    assert_no_leaks(core)


def test_stop_inside_accepted_drafts_truncates(make_spec_core, reference, tiny_weights):
    core = make_spec_core("draft_self")
    add(core, "eos", PROMPTS[0], eos=(reference[0][2],))
    add(core, "stop", PROMPTS[1], stop_token_ids=[reference[1][1]])
    add(core, "len", PROMPTS[4], max_tokens=5)
    add(core, "min", PROMPTS[0], eos=(reference[0][2],), min_tokens=6)
    outs = {}
    while core.has_unfinished:
        for o in core.step().outputs:
            outs.setdefault(o.request_id, []).append(o)
    tokens = {rid: [t for o in os for t in o.new_token_ids] for rid, os in outs.items()}
    assert tokens["eos"] == reference[0][:3] and outs["eos"][-1].finish_reason == "stop"
    assert tokens["stop"] == reference[1][:2] and outs["stop"][-1].stop_reason == reference[1][1]
    assert tokens["len"] == reference[4][:5] and outs["len"][-1].finish_reason == "length"
    plain = EngineCore(dataclasses.replace(core.config, speculative=SpeculativeConfig()), TINY, tiny_weights)
    add(plain, "min", PROMPTS[0], eos=(reference[0][2],), min_tokens=6)
    assert tokens["min"] == run_to_completion(plain)["min"]  # EOS masked in draft rows below min_tokens
    assert len(tokens["min"]) >= 6
    assert_no_leaks(core)


@pytest.mark.parametrize("proposer", ["ngram", "draft_small"])
def test_adaptive_k_keeps_greedy_exact(make_spec_core, reference, proposer):
    core = make_spec_core(proposer, adaptive=True)
    for i, prompt in enumerate(PROMPTS):
        add(core, f"r{i}", prompt)
    got = run_to_completion(core)
    assert [got[f"r{i}"] for i in range(len(PROMPTS))] == reference
    assert_no_leaks(core)


def run_with_logprobs(core):
    tokens, logprobs = {}, {}
    while core.has_unfinished:
        for out in core.step().outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            logprobs.setdefault(out.request_id, []).extend(out.new_logprobs or [])
    return tokens, logprobs


# A verify step scores a position among several rows, a plain decode alone: the same fp32 network
# with other GEMM blockings (which the CPU's ISA chooses: AVX-512 and AMX machines differ), so the sums
# are rounded in another order. A K-term dot product's rounding error is at most K·u times the sum of
# its terms' magnitudes (u = 2^-24); with TINY's largest inner dimension (K = 128) and its 2 layers,
# the LM head and the logsumexp each adding such an error, (2 + 2) · 128 · u = 2^-15 of the values'
# scale bounds the difference, while scoring another position or row would be off by far more.
_LOGPROB_REL_TOL = (TINY.num_layers + 2) * max(TINY.hidden_size, TINY.intermediate_size) * 2.0**-24


def _logprob_tol(value: float) -> float:
    return _LOGPROB_REL_TOL * max(abs(value), 1.0)


def assert_same_logprobs(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a.token_id, a.top_ids) == (b.token_id, b.top_ids)
        assert a.logprob == pytest.approx(b.logprob, abs=_logprob_tol(b.logprob))
        assert len(a.top_logprobs) == len(b.top_logprobs)
        for x, y in zip(a.top_logprobs, b.top_logprobs):
            assert x == pytest.approx(y, abs=_logprob_tol(y))


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_logprobs_with_drafts_equal_those_without(make_spec_core, tiny_weights, reference, proposer):
    """Every emitted token, accepted draft or the target's own, carries the logprob and top-k a plain
    decode of that position computes; a stop inside the accepted drafts cuts the logprobs too."""
    core = make_spec_core(proposer)
    plain = EngineCore(dataclasses.replace(core.config, speculative=SpeculativeConfig()), TINY, tiny_weights)
    for c in (core, plain):
        for i, prompt in enumerate(PROMPTS):
            add(c, f"r{i}", prompt, logprobs=3)
        add(c, "top0", PROMPTS[3], logprobs=0)
        add(c, "eos", PROMPTS[0], logprobs=1, eos=(reference[0][2],))
        add(c, "none", PROMPTS[1])
    accepted = {}
    observe = core.speculator.observe

    def record(rid, num_draft, num_accepted):
        accepted[rid] = accepted.get(rid, 0) + num_accepted
        observe(rid, num_draft, num_accepted)

    core.speculator.observe = record
    got, got_lps = run_with_logprobs(core)
    want, want_lps = run_with_logprobs(plain)
    assert got == want
    assert got["eos"] == reference[0][:3]
    for rid in want:
        assert_same_logprobs(got_lps[rid], want_lps[rid])
        assert len(got_lps[rid]) == (0 if rid == "none" else len(got[rid]))
    assert sum(n for rid, n in accepted.items() if rid != "none") > 0  # drafts emitted with logprobs
    assert_no_leaks(core)


def test_sampled_logprobs_with_drafts_are_the_targets(make_spec_core, tiny_hf_model):
    """Sampled (seeded) with an always-accepted draft: each emitted token's logprobs are the target's
    raw log-softmax at that position (before temperature), whichever row of the verify step it came from."""
    core = make_spec_core("draft_self")
    add(core, "s", PROMPTS[4], temperature=0.8, seed=7, logprobs=2)
    tokens, logprobs = run_with_logprobs(core)
    assert core.stats().spec_decode.num_accepted_tokens > 0
    context = list(PROMPTS[4])
    with torch.no_grad():
        for token_id, lp in zip(tokens["s"], logprobs["s"]):
            expected = tiny_hf_model(torch.tensor([context])).logits[0, -1].log_softmax(-1)
            top = expected.topk(2)
            assert lp.token_id == token_id and lp.top_ids == top.indices.tolist()
            assert lp.logprob == pytest.approx(expected[token_id].item(), abs=1e-4)
            assert lp.top_logprobs == pytest.approx(top.values.tolist(), abs=1e-4)
            context.append(token_id)


def test_sampled_tokens_keep_the_target_distribution(make_spec_core, tiny_hf_model):
    """Tokens 2 and 3 of each request come from one verify step (k = 1) with a perturbed draft; their
    joint distribution given token 1 must be the target's (temperature 0.8, top-k 3), chi-square."""
    torch.manual_seed(0)
    prompt, num_requests = [5, 9, 200, 3], 800
    core = make_spec_core("draft_noisy", k=1, budget=4096, max_num_seqs=512, num_blocks=2048, draft_num_blocks=2048)
    params = dict(temperature=0.8, top_k=3, max_tokens=3)
    for i in range(num_requests):
        add(core, f"s{i}", prompt, **params)
    got = run_to_completion(core)
    stats = core.stats().spec_decode
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert_no_leaks(core)

    def dist(context):
        logits = tiny_hf_model(torch.tensor([context])).logits[0, -1] / params["temperature"]
        top = logits.topk(params["top_k"])
        return dict(zip(top.indices.tolist(), top.values.softmax(-1).tolist()))

    with torch.no_grad():
        first = dist(prompt)
        t1 = max(first, key=first.get)  # condition on the most likely first token
        seqs = [tuple(v[1:]) for v in got.values() if v[0] == t1]
        p2 = dist(prompt + [t1])
        expected = {(a, b): p2[a] * pb for a in p2 for b, pb in dist(prompt + [t1, a]).items()}
    counts = {cell: 0 for cell in expected}
    for s in seqs:
        counts[s] += 1  # a KeyError would mean a token outside the target's top-k
    n = len(seqs)
    cells = [(counts[c], p * n) for c, p in expected.items()]
    big = [(o, e) for o, e in cells if e >= 5]
    small = [(o, e) for o, e in cells if e < 5]
    if small:
        big.append((sum(o for o, _ in small), sum(e for _, e in small)))
    stat = sum((o - e) ** 2 / e for o, e in big)
    p_value = torch.special.gammaincc(torch.tensor((len(big) - 1) / 2), torch.tensor(stat / 2)).item()
    assert p_value > 1e-3, (p_value, counts, expected)


def test_draft_model_with_another_vocabulary_is_rejected(make_spec_core, tiny_weights):
    small_vocab = dataclasses.replace(TINY, vocab_size=128)
    weights = {k: (v[:128] if k == "model.embed_tokens.weight" else v) for k, v in tiny_weights.items()}
    draft = DraftModelProposer.from_weights(small_vocab, weights, num_blocks=8, block_size=4)
    cfg = EngineConfig(speculative=SpeculativeConfig(method="draft"), cache=CacheConfig(num_blocks=16, block_size=4))
    with pytest.raises(ValueError, match="vocabulary"):
        EngineCore(cfg, TINY, tiny_weights, proposer=draft)
