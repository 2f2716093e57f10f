"""N-gram (prompt lookup) proposer: longest suffix first, most recent match, periodic continuation."""
import random
from dataclasses import dataclass, field

import pytest

from rtserve.sampling_params import SamplingParams
from rtserve.spec.proposer import NgramProposer, ngram_lookup


@dataclass
class Req:
    all_token_ids: list[int]
    request_id: str = "r"
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    generator: None = None


def test_copies_what_followed_the_match():
    # "Repeat exactly": the suffix [3, 4] occurred in the prompt, followed by 5 6 7.
    assert ngram_lookup([1, 2, 3, 4, 5, 6, 7, 9, 3, 4], 1, 3, 3) == [5, 6, 7]


def test_longest_suffix_wins_over_more_recent_shorter_match():
    # Suffix [8, 3, 4] matches at 0 (-> 5); [3, 4] alone matches more recently at 6 (-> 9).
    tokens = [8, 3, 4, 5, 0, 0, 3, 4, 9, 8, 3, 4]
    assert ngram_lookup(tokens, 2, 3, 1) == [5]
    assert ngram_lookup(tokens, 2, 2, 1) == [9]


def test_most_recent_match_among_equal_lengths():
    assert ngram_lookup([1, 2, 7, 1, 2, 8, 1, 2], 2, 2, 1) == [8]


def test_continuation_repeats_with_the_period_of_the_match():
    assert ngram_lookup([1, 2, 3, 1, 2], 2, 2, 5) == [3, 1, 2, 3, 1]
    assert ngram_lookup([7, 7, 7], 1, 2, 4) == [7, 7, 7, 7]


def test_no_match_or_too_short_gives_nothing():
    assert ngram_lookup([1, 2, 3, 4], 1, 3, 4) == []
    assert ngram_lookup([5], 1, 3, 4) == []
    assert ngram_lookup([1, 2, 1, 3], 2, 3, 4) == []  # only a 1-gram match, min_n = 2


def test_proposer_batches_and_respects_k():
    proposer = NgramProposer(min_n=1, max_n=3)
    reqs = [Req([1, 2, 3, 1, 2]), Req([4, 5, 6]), Req([9, 9, 9])]
    props = proposer.propose(reqs, [2, 3, 0])
    assert [p.token_ids for p in props] == [[3, 1], [], []]
    assert all(p.probs is None for p in props)  # deterministic: q is one-hot
    assert props[0].num_tokens == 2


def test_lookback_window_limits_the_search():
    tokens = [1, 2, 3] + [0] * 10 + [1, 2]
    assert NgramProposer(2, 2, max_lookback=100).propose([Req(tokens)], [1])[0].token_ids == [3]
    assert NgramProposer(2, 2, max_lookback=8).propose([Req(tokens)], [1])[0].token_ids == []


@pytest.mark.parametrize("args", [(0, 2), (3, 2)])
def test_bad_ngram_sizes_raise(args):
    with pytest.raises(ValueError):
        NgramProposer(*args)


def _reference_lookup(tokens, min_n, max_n, k):
    """Brute force: for n = max_n..min_n, the most recent earlier window equal to the last n tokens."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n:]
        for start in range(length - 1 - n, -1, -1):
            if tokens[start:start + n] == suffix:
                cont = start + n
                return [tokens[cont + j % (length - cont)] for j in range(k)]
    return []


def test_matches_brute_force_on_random_sequences():
    import random
    rng = random.Random(0)
    for _ in range(300):
        tokens = [rng.randrange(6) for _ in range(rng.randrange(1, 60))]
        min_n = rng.randrange(1, 4)
        max_n = rng.randrange(min_n, 6)
        assert ngram_lookup(tokens, min_n, max_n, 5) == _reference_lookup(tokens, min_n, max_n, 5), tokens


def test_per_request_token_arrays_follow_appends_and_rebuild_on_a_changed_history():
    rng = random.Random(3)
    proposer = NgramProposer(1, 3)
    req = Req([rng.randrange(6) for _ in range(5)], "a")
    for _ in range(200):  # grows past the first buffers
        req.all_token_ids.append(rng.randrange(6))
        expected = ngram_lookup(req.all_token_ids, 1, 3, 4)
        assert proposer.propose([req], [4])[0].token_ids == expected
    req.all_token_ids = [rng.randrange(6) for _ in range(50)]  # same id, another history: copied afresh
    assert proposer.propose([req], [4])[0].token_ids == ngram_lookup(req.all_token_ids, 1, 3, 4)
    proposer.free("a")
    assert "a" not in proposer._arrays
