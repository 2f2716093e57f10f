"""Adaptive speculation length: acceptance tracking and the goodput-maximising choice of k."""
import pytest

from rtserve.spec.adaptive import AcceptanceTracker, SpecLengthChooser


def linear(base_s, per_token_s):
    return lambda n: base_s + per_token_s * n


def test_tracker_estimates_per_token_rate_and_counts_metrics():
    t = AcceptanceTracker(max_k=4, decay=0.99, prior_weight=1e-6)
    for _ in range(50):
        t.observe("a", 4, 4)  # always accepted
        t.observe("b", 4, 0)  # always rejected at once
    assert t.rate("a") > 0.95 and t.rate("b") < 0.05
    assert t.num_drafts == 100 and t.num_draft_tokens == 400 and t.num_accepted_tokens == 200
    assert t.num_accepted_tokens_per_pos == [50, 50, 50, 50]
    assert t.mean_accepted_len == pytest.approx(3.0)


def test_tracker_truncated_observations_are_unbiased():
    # Each position accepted with prob 0.6 until the first rejection, k = 3: the per-token estimate
    # (successes / tested positions) converges to 0.6, not to accepted / proposed.
    import random
    rng = random.Random(0)
    t = AcceptanceTracker(max_k=3, decay=0.999, global_decay=0.999, prior_weight=1e-6)
    for _ in range(5000):
        a = 0
        while a < 3 and rng.random() < 0.6:
            a += 1
        t.observe("r", 3, a)
    assert t.rate("r") == pytest.approx(0.6, abs=0.03)


def test_new_requests_start_from_the_proposer_wide_rate_and_free_forgets():
    t = AcceptanceTracker(max_k=2, prior_rate=0.5)
    for i in range(100):
        t.observe(f"r{i}", 2, 2)
    assert t.rate("new") > 0.9
    t.free("r0")
    assert "r0" not in t._per_request


def test_ngram_on_copy_task_at_batch_one_speculates_deeply():
    # Memory-bound step: one more token costs 2% of the step. High acceptance -> max k.
    ks = SpecLengthChooser(max_k=5).choose([0.9], [5], linear(0.05, 0.001))
    assert ks == [5]


def test_large_compute_bound_batch_gets_k_zero():
    # 64 decodes on a step where each extra token costs as much as a whole decode's share.
    rates = [0.6] * 64
    ks = SpecLengthChooser(max_k=4).choose(rates, [4] * 64, linear(0.0, 0.01))
    assert ks == [0] * 64


def test_poor_acceptance_gets_k_zero_and_good_requests_keep_speculating():
    ks = SpecLengthChooser(max_k=4).choose([0.02, 0.9], [4, 4], linear(0.05, 0.002))
    assert ks[0] == 0 and ks[1] >= 3


def test_k_is_capped_by_available_proposal_and_max_k():
    chooser = SpecLengthChooser(max_k=3)
    assert chooser.choose([0.99, 0.99], [1, 10], linear(0.05, 0.0001)) == [1, 3]
    assert chooser.choose([0.99], [0], linear(0.05, 0.0001)) == [0]


def test_draft_model_cost_limits_depth():
    # Each draft round costs 40% of a target step: only the first, nearly-sure tokens pay off.
    chooser = SpecLengthChooser(max_k=5)
    ks = chooser.choose([0.7], [5], linear(0.05, 0.0005), lambda rounds, tokens: 0.02 * rounds)
    assert 1 <= ks[0] < 5
    cheap = chooser.choose([0.7], [5], linear(0.05, 0.0005), lambda rounds, tokens: 0.001 * rounds)
    assert cheap[0] > ks[0]


def test_chosen_goodput_never_below_no_speculation():
    chooser = SpecLengthChooser(max_k=4, min_rel_gain=0.0)
    for rate in (0.0, 0.1, 0.5, 0.9, 1.0):
        for per_token in (0.0001, 0.001, 0.01, 0.1):
            step = linear(0.02, per_token)
            ks = chooser.choose([rate] * 8, [4] * 8, step)
            tokens = sum(sum(rate ** j for j in range(k + 1)) for k in ks)
            assert tokens / step(sum(ks)) >= 8 / step(0) - 1e-9
            assert chooser.predicted_speedup >= 1.0


def test_full_acceptance_ties_keep_drafts_contiguous():
    ks = SpecLengthChooser(max_k=3).choose([1.0, 1.0], [3, 3], linear(0.05, 0.0001))
    assert ks == [3, 3]


# --- Speculator: proposer + tracker + chooser --------------------------------------------------

class _Req:
    def __init__(self, rid, tokens):
        self.request_id, self.all_token_ids, self.sampling_params, self.generator = rid, tokens, None, None


def test_speculator_truncates_cheap_proposals_to_the_chosen_k():
    from rtserve.spec.proposer import NgramProposer
    from rtserve.spec.speculator import Speculator
    spec = Speculator(NgramProposer(1, 2), max_k=4)
    reqs = [_Req("copy", [1, 2, 3, 4, 5, 1, 2]), _Req("none", [7, 8, 9])]
    props = spec.propose(reqs, [4, 4], 2, linear(0.05, 0.0001))
    assert [p.token_ids for p in props] == [[3, 4, 5, 1], []]
    for _ in range(20):
        spec.observe("copy", 4, 0)  # never accepted: the chooser stops proposing for it
    assert spec.propose(reqs, [4, 4], 2, linear(0.05, 0.0001))[0].token_ids == []
    assert spec.propose(reqs[:1], [2], 1, linear(0.05, 0.0001))[0].token_ids in ([], [3, 4])
    spec.free("copy")
    assert "copy" not in spec.tracker._per_request
    fresh = Speculator(NgramProposer(1, 2), max_k=4)
    assert fresh.propose(reqs, [2, 4], 2, linear(0.05, 0.0001))[0].token_ids == [3, 4]  # caps respected


def test_speculator_tells_an_expensive_proposer_k_before_it_drafts():
    from rtserve.spec.proposer import Proposal, Proposer
    from rtserve.spec.speculator import Speculator

    class Expensive(Proposer):
        is_cheap = False
        asked = None

        def propose(self, requests, num_tokens):
            self.asked = list(num_tokens)
            return [Proposal([0] * k) for k in num_tokens]

        def cost_s(self, num_rounds, num_tokens):
            return 0.01 * num_rounds

    proposer = Expensive()
    spec = Speculator(proposer, max_k=5)
    spec.propose([_Req("a", [1])], [3], 1, linear(0.05, 0.0005))
    assert 1 <= proposer.asked[0] <= 3
    spec.propose([_Req("a", [1])] * 64, [5] * 64, 64, linear(0.0, 0.01))  # compute-bound: nothing
    assert proposer.asked == [0] * 64


# --- StepTimeTable: measured step time by token count --------------------------------------------

def test_step_time_table_prefers_measurements_and_interpolates():
    from rtserve.spec.adaptive import StepTimeTable
    table = StepTimeTable(decay=0.5)
    model = linear(0.010, 0.001)  # the cost model believes tokens are cheap
    assert table.predict(5, model) == pytest.approx(0.015)  # nothing measured: the model
    table.observe(1, 0.020)
    table.observe(5, 0.040)
    assert table.predict(1, model) == pytest.approx(0.020)
    assert table.predict(3, model) == pytest.approx(0.030)  # between measured sizes
    assert table.predict(9, model) == pytest.approx(0.044)  # measured level + the model's slope
    table.observe(5, 0.020)
    assert table.predict(5, model) == pytest.approx(0.030)  # EWMA


def test_step_time_table_forgets_stale_sizes():
    from rtserve.spec.adaptive import StepTimeTable
    table = StepTimeTable(max_age_steps=3)
    table.observe(5, 1.0)
    for _ in range(4):
        table.observe(1, 0.01)
    assert table.predict(5, linear(0.01, 0.001)) == pytest.approx(0.014)  # 5 is stale: re-explore


def test_chooser_with_measured_nonlinear_step_times_stops_speculating():
    # Verify tokens measured as expensive (each one costs a whole decode): with 50% acceptance no k
    # pays, though the linear model alone would have said it does.
    from rtserve.spec.adaptive import StepTimeTable
    table, model = StepTimeTable(), linear(0.020, 0.0005)
    assert SpecLengthChooser(max_k=4).choose([0.5], [4], lambda n: table.predict(1 + n, model)) == [4]
    for m in range(1, 6):
        table.observe(m, 0.020 * m)
    assert SpecLengthChooser(max_k=4).choose([0.5], [4], lambda n: table.predict(1 + n, model)) == [0]
