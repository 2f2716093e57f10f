"""Speculative verification: greedy matching is exact, rejection sampling keeps the target distribution."""
import itertools

import pytest
import torch

from rtserve.sample.rejection import PAD_ID, greedy_verify, rejection_sample, target_probs, verify
from rtserve.sample.sampler import SamplingBatch, exponential_race, make_generator, sample
from rtserve.sampling_params import SamplingParams


def test_greedy_verify_accepts_leading_matches_then_target_token():
    target = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8], [1, 2, 3, 4]])  # [B, K+1]
    drafts = torch.tensor([[5, 6, 7], [5, 9, 7], [9, 6, 7], [1, 2, 0]])  # [B, K]
    num_draft = torch.tensor([3, 3, 3, 2])  # the last row's third draft is padding
    out, num_accepted = greedy_verify(target, drafts, num_draft)
    assert num_accepted.tolist() == [3, 1, 0, 2]
    assert out.tolist() == [[5, 6, 7, 8], [5, 6, PAD_ID, PAD_ID], [5, PAD_ID, PAD_ID, PAD_ID],
                            [1, 2, 3, PAD_ID]]


def test_no_drafts_is_an_ordinary_draw():
    out, num_accepted = greedy_verify(torch.tensor([[4], [2]]), torch.zeros(2, 0, dtype=torch.long),
                                      torch.tensor([0, 0]))
    assert out.tolist() == [[4], [2]] and num_accepted.tolist() == [0, 0]
    probs = torch.tensor([[[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]])
    out, num_accepted = rejection_sample(probs, torch.zeros(2, 0, dtype=torch.long), None, torch.tensor([0, 0]),
                                         [None, None])
    assert out.tolist() == [[1], [2]] and num_accepted.tolist() == [0, 0]


@pytest.mark.parametrize("soft_draft", [True, False])
def test_greedy_rows_of_rejection_sampling_equal_greedy_verify(soft_draft):
    gen = torch.Generator().manual_seed(0)
    b, k, v = 64, 4, 7
    logits = torch.randn(b, k + 1, v, generator=gen)
    target_ids = logits.argmax(-1)
    # Drafts agree with the target with probability ~1/2 per position, so all prefix lengths occur.
    noise = torch.randint(0, v, (b, k), generator=gen)
    drafts = torch.where(torch.rand(b, k, generator=gen) < 0.5, target_ids[:, :k], noise)
    num_draft = torch.randint(0, k + 1, (b,), generator=gen)
    zeros = torch.zeros(b * (k + 1))
    p = target_probs(logits.view(-1, v), zeros, zeros.long(), zeros + 1, zeros).view(b, k + 1, v)
    q = torch.rand(b, k, v, generator=gen).softmax(-1) if soft_draft else None
    expect = greedy_verify(target_ids, drafts, num_draft)
    got = rejection_sample(p, drafts, q, num_draft, [None] * b)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])


def test_target_probs_is_the_samplers_distribution():
    params = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.3, top_p=0.8),
              SamplingParams(temperature=1.0, min_p=0.05), SamplingParams(temperature=0.0)]
    logits = torch.randn(len(params), 50, generator=torch.Generator().manual_seed(1)) * 3
    batch = SamplingBatch.build(params, [make_generator(i, "cpu") for i in range(4)], "cpu")
    p = target_probs(logits, batch.temperature, batch.top_k, batch.top_p, batch.min_p)
    assert torch.allclose(p.sum(-1), torch.ones(4))
    for _ in range(20):  # same generator states: the exponential race over p draws what `sample` draws
        before = [g.get_state() for g in batch.generators]
        drawn = sample(logits, batch).token_ids
        for g, s in zip(batch.generators, before):
            g.set_state(s)
        assert torch.equal(exponential_race(p, batch.generators), drawn)


def test_identical_draft_is_always_accepted():
    gen = torch.Generator().manual_seed(2)
    p = torch.rand(32, 4, 9, generator=gen).softmax(-1)
    drafts = torch.randint(0, 9, (32, 3), generator=gen)
    _, num_accepted = rejection_sample(p, drafts, p[:, :3], torch.full((32,), 3), [None] * 32)
    assert num_accepted.tolist() == [3] * 32


def test_seeded_rows_do_not_depend_on_the_batch():
    gen = torch.Generator().manual_seed(3)
    p = torch.rand(6, 4, 11, generator=gen).softmax(-1)
    q = torch.rand(6, 3, 11, generator=gen).softmax(-1)
    drafts = torch.randint(0, 11, (6, 3), generator=gen)
    n = torch.full((6,), 3)
    alone = rejection_sample(p[2:3], drafts[2:3], q[2:3], n[2:3], [make_generator(7, "cpu")])
    batched = rejection_sample(p, drafts, q, n, [None, None, make_generator(7, "cpu"), None, None, None])
    assert torch.equal(alone[0][0], batched[0][2]) and alone[1][0] == batched[1][2]


# --- statistics: sequences generated speculatively follow the target's distribution exactly --------

V, K, SEQ_LEN, NUM_TRIALS = 4, 3, 3, 40_000


def _chain(seed: int) -> torch.Tensor:
    """A random Markov chain over V tokens, [V, V], rows bounded away from 0."""
    m = 0.2 + torch.rand(V, V, generator=torch.Generator().manual_seed(seed))
    return m / m.sum(-1, keepdim=True)


def _speculative_sequences(target: torch.Tensor, draft: torch.Tensor | None, seed: int) -> torch.Tensor:
    """NUM_TRIALS sequences of SEQ_LEN tokens from state 0, each built by verify steps with random k.

    The draft proposes from its own chain (`draft`), or deterministically x = (prev + 1) % V (None).
    """
    torch.manual_seed(seed)
    seqs = [[] for _ in range(NUM_TRIALS)]
    while True:
        todo = [i for i, s in enumerate(seqs) if len(s) < SEQ_LEN]
        if not todo:
            break
        last = torch.tensor([seqs[i][-1] if seqs[i] else 0 for i in todo])  # [B]
        prev, drafts, q = last, [], []
        for _ in range(K):
            x = torch.multinomial(draft[prev], 1).squeeze(1) if draft is not None else (prev + 1) % V
            q.append(draft[prev] if draft is not None else None)
            drafts.append(x)
            prev = x
        drafts = torch.stack(drafts, 1)  # [B, K]
        contexts = torch.cat([last[:, None], drafts], 1)  # [B, K+1] the token each p_j conditions on
        p = target[contexts]  # [B, K+1, V]
        q = torch.stack(q, 1) if draft is not None else None  # [B, K, V]
        num_draft = torch.randint(0, K + 1, (len(todo),))
        out, num_accepted = rejection_sample(p, drafts, q, num_draft, [None] * len(todo))
        for row, i in enumerate(todo):
            seqs[i].extend(out[row, :num_accepted[row] + 1].tolist())
    return torch.tensor([s[:SEQ_LEN] for s in seqs])


def _chi_square_p_value(seqs: torch.Tensor, target: torch.Tensor) -> float:
    expected, observed = [], []
    counts = torch.zeros([V] * SEQ_LEN)
    for s in seqs.tolist():
        counts[tuple(s)] += 1
    for cell in itertools.product(range(V), repeat=SEQ_LEN):
        prob, prev = 1.0, 0
        for t in cell:
            prob, prev = prob * target[prev, t].item(), t
        expected.append(prob * NUM_TRIALS)
        observed.append(counts[cell].item())
    # Pool cells expected below 5 into one so the chi-square approximation holds.
    small = [i for i, e in enumerate(expected) if e < 5]
    big = [i for i, e in enumerate(expected) if e >= 5]
    e = [expected[i] for i in big] + ([sum(expected[i] for i in small)] if small else [])
    o = [observed[i] for i in big] + ([sum(observed[i] for i in small)] if small else [])
    stat = sum((oi - ei) ** 2 / ei for oi, ei in zip(o, e))
    dof = len(e) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0)).item()


@pytest.mark.parametrize("proposer", ["draft_chain", "deterministic"])
def test_speculative_output_distribution_equals_target(proposer):
    target = _chain(10)
    draft = _chain(11) if proposer == "draft_chain" else None
    seqs = _speculative_sequences(target, draft, seed=12)
    assert _chi_square_p_value(seqs, target) > 1e-3


def test_chi_square_detects_a_wrong_distribution():
    # The same harness, fed the draft's chain as if it were the target, must fail: the test has power.
    seqs = _speculative_sequences(_chain(11), _chain(11), seed=13)
    assert _chi_square_p_value(seqs, _chain(10)) < 1e-6


# --- verify(): the flat-rows entry point the runner calls ----------------------------------------

def test_verify_greedy_batch_of_ragged_drafts():
    v = 6
    # seq 0: k=2, rows argmax 3, 4, 5; seq 1: k=0, row argmax 1; seq 2: k=1, rows argmax 2, 0.
    argmax = [3, 4, 5, 1, 2, 0]
    logits = torch.nn.functional.one_hot(torch.tensor(argmax), v).float()
    batch = SamplingBatch.build([SamplingParams(temperature=0)] * 3, [None] * 3, "cpu")
    assert verify(logits, [[3, 4], [], [5]], [None] * 3, batch) == [[3, 4, 5], [1], [2]]


def test_verify_without_drafts_draws_exactly_what_sample_draws():
    params = [SamplingParams(temperature=0.9, seed=1), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.2, top_p=0.9, seed=2)]
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(4)) * 2
    gens_a = [make_generator(p.seed, "cpu") if p.seed is not None else None for p in params]
    gens_b = [make_generator(p.seed, "cpu") if p.seed is not None else None for p in params]
    expect = sample(logits, SamplingBatch.build(params, gens_a, "cpu")).token_ids.tolist()
    got = verify(logits, [[], [], []], [None] * 3, SamplingBatch.build(params, gens_b, "cpu"))
    assert got == [[t] for t in expect]


def test_verify_mixed_greedy_and_sampled_rows_with_draft_probs():
    v = 5
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)]
    logits = torch.full((5, v), -30.0)
    logits[[0, 1, 2], [2, 3, 4]] = 30.0  # greedy seq, k=2: argmax 2, 3, 4
    logits[3, 1] = 30.0  # sampled seq, k=1: p_0 ~ one-hot at 1, p_1 ~ one-hot at 0
    logits[4, 0] = 30.0
    q = [torch.full((2, v), 0.2), torch.full((1, v), 0.2)]
    out = verify(logits, [[2, 0], [1]], q, SamplingBatch.build(params, [None, None], "cpu"))
    assert out == [[2, 3], [1, 0]]
