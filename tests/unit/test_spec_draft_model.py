"""Draft-model proposer on the tiny Llama: its proposals are its own greedy continuation, its cache
follows accepted/rejected tokens, and its blocks are reused and freed."""
from dataclasses import dataclass, field

import torch

from rtserve.sampling_params import SamplingParams
from rtserve.spec.draft_model import DraftModelProposer
from tests.unit.conftest import TINY, hf_greedy


@dataclass
class Req:
    request_id: str
    all_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    generator: torch.Generator | None = None


def make(weights, num_blocks=32, block_size=4):
    return DraftModelProposer.from_weights(TINY, weights, num_blocks=num_blocks, block_size=block_size)


def test_greedy_proposals_are_the_drafts_greedy_continuation(tiny_weights, tiny_hf_model):
    draft = make(tiny_weights)  # the target itself as draft: every greedy proposal is right
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [100, 3, 77, 41, 9]]
    reqs = [Req(f"r{i}", list(p)) for i, p in enumerate(prompts)]
    props = draft.propose(reqs, [4, 2, 3])
    for req, prop, k in zip(reqs, props, [4, 2, 3]):
        assert prop.token_ids == hf_greedy(tiny_hf_model, req.all_token_ids, k)
        assert prop.probs.shape == (k, TINY.vocab_size)
        assert torch.equal(prop.probs.argmax(-1), torch.tensor(prop.token_ids))


def test_cache_follows_accepted_and_rejected_tokens(tiny_weights, tiny_hf_model):
    draft = make(tiny_weights)
    req = Req("r", [5, 9, 200, 3, 17])
    first = draft.propose([req], [3])[0].token_ids
    req.all_token_ids += first[:1] + [42]  # one accepted, then a token the draft did not propose
    second = draft.propose([req], [3])[0].token_ids
    assert second == hf_greedy(tiny_hf_model, req.all_token_ids, 3)
    req.all_token_ids += second + [7]  # all accepted plus a bonus token
    assert draft.propose([req], [2])[0].token_ids == hf_greedy(tiny_hf_model, req.all_token_ids, 2)


def test_blocks_freed_and_least_recently_used_evicted(tiny_weights, tiny_hf_model):
    draft = make(tiny_weights, num_blocks=6, block_size=4)
    a, b = Req("a", list(range(1, 13))), Req("b", list(range(20, 30)))
    draft.propose([a], [2])  # 13 positions -> 4 blocks
    assert draft.num_free_blocks == 2
    props = draft.propose([b], [3])  # needs 3 blocks: evicts a
    assert props[0].token_ids == hf_greedy(tiny_hf_model, b.all_token_ids, 3)
    assert draft.num_free_blocks == 3
    assert draft.propose([a, b], [2, 3])[0].token_ids == []  # no room for both: a proposes nothing
    draft.free("b")
    draft.free("a")
    assert draft.num_free_blocks == 6


def test_sampled_proposals_come_with_their_distribution(tiny_weights):
    draft = make(tiny_weights)
    params = SamplingParams(temperature=1.0, top_k=20)
    req = Req("s", [1, 2, 3, 4], params, torch.Generator().manual_seed(0))
    prop = draft.propose([req], [4])[0]
    assert prop.probs.shape == (4, TINY.vocab_size)
    assert torch.allclose(prop.probs.sum(-1), torch.ones(4))
    assert ((prop.probs > 0).sum(-1) <= 20).all()  # top-k applied to q as to the target
    assert all(prop.probs[j, t] > 0 for j, t in enumerate(prop.token_ids))
