import math

import pytest
import torch

from rtserve.sample.sampler import (
    SamplingBatch,
    apply_min_p,
    apply_top_k,
    apply_top_p,
    compute_logprobs,
    make_generator,
    sample,
)
from rtserve.sampling_params import SamplingParams

NEG_INF = float("-inf")


def _batch(params, generators=None):
    return SamplingBatch.build(params, generators or [None] * len(params), "cpu")


def _logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_build_flags_and_tensors():
    params = [SamplingParams(temperature=0.0, top_k=5, logprobs=3),
              SamplingParams(temperature=0.7, top_p=0.9),
              SamplingParams(temperature=1.0, top_k=-1, min_p=0.1, logprobs=1)]
    b = _batch(params)
    assert b.temperature.dtype == torch.float32 and b.top_k.dtype == torch.int64
    assert b.top_k.tolist() == [5, 0, -1]
    assert b.max_num_logprobs == 3
    assert not b.all_greedy and not b.all_random
    assert b.no_top_k  # the greedy row's top_k does not count
    assert not b.no_top_p and not b.no_min_p
    assert _batch([SamplingParams(temperature=0.0)]).all_greedy
    assert _batch([SamplingParams()]).max_num_logprobs == -1
    with pytest.raises(ValueError):
        SamplingBatch.build([SamplingParams()], [], "cpu")


def test_greedy_is_argmax_with_lowest_index_on_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 1.0, 5.0]])
    out = sample(logits, _batch([SamplingParams(temperature=0.0)] * 2))
    assert out.token_ids.tolist() == [1, 0]
    assert out.logprobs is None and out.logprob_token_ids is None


def test_greedy_rows_exact_in_mixed_batch():
    logits = _logits(8, 100)
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 2.0, top_k=50 if i % 3 else 0)
              for i in range(8)]
    before = logits.clone()
    for step in range(20):
        torch.manual_seed(step)
        out = sample(logits, _batch(params))
        assert torch.equal(out.token_ids[0::2], logits[0::2].argmax(-1))
    assert torch.equal(logits, before)  # sample() does not modify its input


def test_apply_top_k_known_logits():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0, 0.0]] * 4)
    out = apply_top_k(logits, torch.tensor([2, 0, -1, 9]))
    assert out[0].tolist() == [NEG_INF, 4.0, NEG_INF, 3.0, NEG_INF]
    for row in (1, 2, 3):  # disabled (0, -1) and k > V keep everything
        assert torch.equal(out[row], logits[row])


def test_apply_top_k_keeps_ties_with_kth():
    out = apply_top_k(torch.tensor([[2.0, 1.0, 2.0, 0.0]]), torch.tensor([1]))
    assert out[0].tolist() == [2.0, NEG_INF, 2.0, NEG_INF]


def test_apply_top_p_known_logits():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4, 4).clone()
    out = apply_top_p(logits, torch.tensor([0.3, 0.75, 0.85, 1.0]))
    kept = [(row > NEG_INF).nonzero().flatten().tolist() for row in out]
    assert kept == [[1], [1, 3], [1, 2, 3], [0, 1, 2, 3]]
    assert torch.equal(out[1, [1, 3]], logits[1, [1, 3]])  # survivors unchanged


def test_apply_min_p_known_logits():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = (probs.log() + 7.0).expand(3, 4).clone()  # a shift must not matter
    out = apply_min_p(logits, torch.tensor([0.35, 0.0, 1.0]))
    kept = [(row > NEG_INF).nonzero().flatten().tolist() for row in out]
    assert kept == [[1, 3], [0, 1, 2, 3], [1]]


def test_masks_compose_in_sample():
    # Row distribution after top_k=2 has only tokens {1, 3}; many draws must stay inside it.
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log().expand(2000, 4).contiguous()
    torch.manual_seed(0)
    out = sample(logits, _batch([SamplingParams(top_k=2)] * 2000))
    assert set(out.token_ids.unique().tolist()) == {1, 3}
    out = sample(logits, _batch([SamplingParams(min_p=0.9)] * 2000))
    assert set(out.token_ids.unique().tolist()) == {1}


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# chi-square critical value for 4 degrees of freedom at p = 0.001
CHI2_DF4_P001 = 18.47


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_frequencies_match_softmax(temperature):
    n = 40_000
    row = torch.tensor([0.3, -1.0, 1.2, 0.0, 0.5])
    torch.manual_seed(1234)
    out = sample(row.expand(n, 5).contiguous(), _batch([SamplingParams(temperature=temperature)] * n))
    counts = torch.bincount(out.token_ids, minlength=5).float()
    expected = (row / temperature).softmax(-1)
    assert _chi_square(counts, expected) < CHI2_DF4_P001
    # and it must be able to fail: the untempered distribution is rejected at T=0.5
    if temperature != 1.0:
        assert _chi_square(counts, row.softmax(-1)) > CHI2_DF4_P001


def test_seeded_row_frequencies_match_softmax():
    # One seeded request sampled step after step must also follow the distribution.
    row = torch.tensor([[0.3, -1.0, 1.2, 0.0, 0.5]])
    gen = make_generator(99, "cpu")
    batch = _batch([SamplingParams(seed=99)], [gen])
    ids = torch.cat([sample(row, batch).token_ids for _ in range(20_000)])
    assert _chi_square(torch.bincount(ids, minlength=5).float(), row[0].softmax(-1)) < CHI2_DF4_P001


def _run_seeded(seed: int, position: int, batch_size: int, steps: int, neighbour_seed: int) -> list[int]:
    """Sample a seeded request at `position` among unseeded/differently-seeded neighbours."""
    params, gens = [], []
    for i in range(batch_size):
        if i == position:
            params.append(SamplingParams(seed=seed, top_p=0.95))
            gens.append(make_generator(seed, "cpu"))
        else:
            params.append(SamplingParams(temperature=0.0 if i % 3 == 0 else 1.3, top_k=7))
            gens.append(make_generator(neighbour_seed + i, "cpu") if i % 2 else None)
    batch = _batch(params, gens)
    torch.manual_seed(neighbour_seed)
    tokens = []
    for step in range(steps):
        logits = _logits(batch_size, 64, seed=1000 + step)
        logits[position] = _logits(1, 64, seed=step)[0]  # the seeded row sees the same logits
        tokens.append(int(sample(logits, batch).token_ids[position]))
    return tokens


def test_seeded_rows_independent_of_batch_composition_and_position():
    alone = _run_seeded(seed=7, position=0, batch_size=1, steps=30, neighbour_seed=0)
    assert len(set(alone)) > 3  # actually random, not degenerate
    assert _run_seeded(7, 0, 1, 30, 0) == alone  # reproducible
    assert _run_seeded(7, 2, 5, 30, 11) == alone
    assert _run_seeded(7, 4, 6, 30, 23) == alone
    assert _run_seeded(8, 0, 1, 30, 0) != alone  # the seed matters


def test_logprobs_columns():
    logits = torch.tensor([[1.0, 3.0, 0.5, 2.0], [0.0, -1.0, 4.0, 1.0]])
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=5.0, logprobs=0)]
    torch.manual_seed(0)
    out = sample(logits, _batch(params))
    raw = logits.log_softmax(-1)
    assert out.logprobs.shape == (2, 3) and out.logprob_token_ids.shape == (2, 3)
    assert out.logprob_token_ids.dtype == torch.int64
    assert torch.equal(out.logprob_token_ids[:, 0], out.token_ids)
    assert torch.allclose(out.logprobs[:, 0], raw.gather(-1, out.token_ids[:, None])[:, 0])
    assert out.logprob_token_ids[:, 1:].tolist() == [[1, 3], [2, 3]]
    # raw logprobs (before temperature), best first
    assert torch.allclose(out.logprobs[:, 1:], torch.stack([raw[0, [1, 3]], raw[1, [2, 3]]]))


def test_compute_logprobs_k_zero_and_sum():
    logits = _logits(3, 10)
    lp, ids = compute_logprobs(logits, torch.tensor([4, 0, 9]), 0)
    assert lp.shape == (3, 1) and ids[:, 0].tolist() == [4, 0, 9]
    assert torch.allclose(lp[:, 0].exp(), logits.softmax(-1)[torch.arange(3), ids[:, 0]])
    lp, ids = compute_logprobs(logits, torch.tensor([4, 0, 9]), 10)
    assert math.isclose(float(lp[0, 1:].exp().sum()), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("scale", [8.0, 3.0, 0.5])  # nucleus within 256, within 4096, wider: each stage
def test_top_p_over_candidates_equals_the_whole_sorted_vocabulary(scale):
    from rtserve.sample.sampler import _top_p_sorted
    gen = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(6, 49152, generator=gen) * scale
    top_p = torch.tensor([0.5, 0.9, 0.95, 0.999, 1.0, 0.0])
    got, want = apply_top_p(logits, top_p), _top_p_sorted(logits, top_p)
    want[4] = logits[4]  # p = 1 is untouched
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got[~torch.isinf(got)], logits[~torch.isinf(got)])


def test_top_k_selects_like_a_full_sort():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 49152, generator=gen)
    k = torch.tensor([1, 64, 0, 1000])
    got = apply_top_k(logits, k)
    kth = logits.sort(dim=-1, descending=True).values.gather(-1, torch.where(k <= 0, 49152, k)[:, None] - 1)
    assert torch.equal(got, logits.masked_fill(logits < kth, float("-inf")))
