"""Adaptive speculation length: the goodput-maximising choice of k, measured step times, and the
Speculator's decision with fake step times and acceptance (deterministic)."""
import math

import pytest

from rtserve.spec.adaptive import DraftCostCorrection, SpecLengthChooser, SpeedupCalibration, StepTimeTable
from rtserve.spec.proposer import NgramProposer, Proposal, Proposer
from rtserve.spec.speculator import DraftStep, Speculator


def linear(base_s, per_token_s):
    return lambda n: base_s + per_token_s * n


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


def test_time_budget_caps_the_verify_step():
    # Copy-like acceptance, cheap verify rows: k = 4 when the step may take any time; only what fits
    # the real-time budget otherwise; nothing when the step without drafts is already over it.
    chooser, step = SpecLengthChooser(max_k=4), linear(0.010, 0.005)
    assert chooser.choose([0.95], [4], step) == [4]
    assert chooser.choose([0.95], [4], step, max_step_s=0.021) == [2]
    assert chooser.choose([0.95], [4], step, max_step_s=0.009) == [0]
    assert chooser.choose([0.95], [4], step, lambda rounds, tokens: 0.002 * rounds, max_step_s=0.021) == [1]


# --- StepTimeTable: measured decode-only step time by rows ---------------------------------------

def test_step_time_table_prefers_measurements_and_interpolates():
    table = StepTimeTable(warmup_steps=0)
    model = linear(0.010, 0.001)  # the cost model believes rows are cheap
    assert table.predict(5, model) == pytest.approx(0.015)  # nothing measured: the model
    table.observe(1, 0.020)
    assert table.predict(3, model) == pytest.approx(0.022)  # measured level + the model's slope
    table.observe(5, 0.040)
    assert table.predict(1, model) == pytest.approx(0.020)
    assert table.predict(3, model) == pytest.approx(0.030)  # between measured sizes
    # Beyond the largest size: the measured slope (5 ms a row), steeper than the model's 1 ms.
    assert table.predict(9, model) == pytest.approx(0.060)


def test_step_time_table_ignores_a_stalled_step():
    table = StepTimeTable(window=5, warmup_steps=0)
    for step_s in (0.020, 0.021, 0.019, 0.500, 0.020):  # another process stole the CPU once
        table.observe(1, step_s)
    assert table.predict(1, linear(0.0, 0.0)) == pytest.approx(0.020)


def test_step_time_table_skips_the_engine_s_cold_first_steps():
    table = StepTimeTable(warmup_steps=2)
    table.observe(3, 0.500)  # TorchScript's profiling runs
    table.observe(1, 0.300)
    table.observe(1, 0.010)
    assert table.predict(1, linear(0.0, 0.0)) == pytest.approx(0.010)
    assert table.predict(3, linear(0.0, 0.001)) == pytest.approx(0.012)  # never measured


def test_step_time_table_forgets_stale_sizes():
    table = StepTimeTable(max_age_steps=3, warmup_steps=0)
    table.observe(5, 1.0)
    for _ in range(4):
        table.observe(1, 0.01)
    assert table.predict(5, linear(0.01, 0.001)) == pytest.approx(0.014)  # 5 is stale: re-explore


def test_a_size_seen_once_is_retried_sooner_than_a_well_measured_one():
    table = StepTimeTable(window=9, max_age_steps=1000, probe_age_steps=10, warmup_steps=0)
    table.observe(3, 0.500)  # one probe, stalled
    for _ in range(9):
        table.observe(2, 0.015)
    model = linear(0.010, 0.001)
    assert table.predict(3, model) == pytest.approx(0.500)
    for _ in range(5):
        table.observe(1, 0.010)
    assert table.predict(3, model) == pytest.approx(0.020)  # forgotten after 10 steps: extrapolated
    assert table.predict(2, model) == pytest.approx(0.015)  # 9 samples: kept


def test_chooser_with_measured_nonlinear_step_times_stops_speculating():
    # Verify rows measured as expensive (each one costs a whole decode): with 50% acceptance no k
    # pays, though the linear model alone would have said it does.
    table, model = StepTimeTable(warmup_steps=0), linear(0.020, 0.0005)
    assert SpecLengthChooser(max_k=4).choose([0.5], [4], lambda n: table.predict(1 + n, model)) == [4]
    for m in range(1, 6):
        table.observe(m, 0.020 * m)
    assert SpecLengthChooser(max_k=4).choose([0.5], [4], lambda n: table.predict(1 + n, model)) == [0]


# --- Speculator: proposer + tracker + chooser, fake step times -----------------------------------

class _Req:
    def __init__(self, rid, tokens):
        self.request_id, self.all_token_ids, self.sampling_params, self.generator = rid, tokens, None, None


class CountingNgram(NgramProposer):
    def __init__(self, *args):
        super().__init__(*args)
        self.num_calls = 0

    def propose(self, requests, num_tokens):
        self.num_calls += 1
        return super().propose(requests, num_tokens)


def decode_step(num_decodes, base_s=0.010, per_row_s=0.006, budget_s=math.inf):
    """A decode-only step whose cost model says each draft row costs per_row_s (60% of a decode)."""
    return DraftStep(num_decodes, 0, lambda n: base_s + per_row_s * n, budget_s)


COPY = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4]  # ends in a 4-token match: proposes 5 6 7 8
CHAT = [9, 2, 3, 10, 11, 12, 13, 14, 2, 3]  # ends in a 2-token match: proposes 10 11 12 13


def test_speculator_truncates_cheap_proposals_to_the_chosen_k():
    spec = Speculator(NgramProposer(1, 2), max_k=4)
    reqs = [_Req("copy", [1, 2, 3, 4, 5, 1, 2]), _Req("none", [7, 8, 9])]
    cheap = decode_step(2, 0.05, 0.0001)
    props = spec.propose(reqs, [4, 4], cheap)
    assert [p.token_ids for p in props] == [[3, 4, 5, 1], []]
    for _ in range(20):
        spec.observe("copy", 4, 0)  # never accepted: the chooser stops proposing for it
    assert spec.propose(reqs, [4, 4], cheap)[0].token_ids == []
    assert spec.propose(reqs[:1], [2], decode_step(1, 0.05, 0.0001))[0].token_ids in ([], [3, 4])
    spec.free("copy")
    assert "copy" not in spec.tracker._per_request
    fresh = Speculator(NgramProposer(1, 2), max_k=4)
    assert fresh.propose(reqs, [2, 4], cheap)[0].token_ids == [3, 4]  # caps respected


def test_no_request_can_pay_so_the_proposer_is_not_even_asked():
    # Verify rows cost 60% of a decode; acceptance no better than the 0.5 prior cannot pay for one,
    # so the step is planned exactly as with speculation off: no lookup, no drafts.
    proposer = CountingNgram(2, 4)
    spec = Speculator(proposer, max_k=4)
    props = spec.propose([_Req("a", COPY), _Req("b", CHAT)], [4, 4], decode_step(2))
    assert [p.token_ids for p in props] == [[], []] and proposer.num_calls == 0


def test_copy_requests_speculate_and_chat_matches_do_not():
    proposer = CountingNgram(2, 4)
    spec = Speculator(proposer, max_k=4)
    for i in range(30):  # history: 4-token matches were always right, 2-token matches never
        spec.tracker.observe(f"old-copy{i}", 4, 4, prior_key=4)
        spec.tracker.observe(f"old-chat{i}", 4, 0, prior_key=2)
    props = spec.propose([_Req("copy", COPY), _Req("chat", CHAT)], [4, 4], decode_step(2, base_s=0.020))
    assert [p.token_ids for p in props] == [[5, 6, 7, 8], []]
    assert [p.prior_key for p in props] == [4, 2]  # the chat match was found, and not worth verifying
    spec.observe("copy", 4, 4)  # the copy request's own record now counts too
    assert spec.tracker.rate("copy", 4) > 0.95 and spec.tracker.rate("chat", 2) < 0.1


def test_verification_priced_by_measured_decode_steps_of_that_many_rows():
    # The cost model says a draft row is nearly free; measured decode-only steps say a row costs
    # what a whole decode does (int4 GEMV at batch 1): 90% acceptance cannot pay for that.
    spec = Speculator(NgramProposer(2, 4), max_k=4)
    for i in range(30):
        spec.tracker.observe(f"old{i}", 4, 4, prior_key=4)
    free_rows = decode_step(1, per_row_s=0.0001)
    assert spec.propose([_Req("copy", COPY)], [4], free_rows)[0].token_ids == [5, 6, 7, 8]
    for _ in range(spec.step_times.warmup_steps):
        spec.observe_step(1, 0, 1.0)  # cold steps: not recorded
    for rows in range(1, 6):
        spec.observe_step(rows, 0, 0.010 * rows)
    assert spec.propose([_Req("copy", COPY)], [4], free_rows)[0].token_ids == []
    spec._skip_steps = 0  # nobody could pay: the idle backoff would skip the next step
    # A step that also prefills runs another path: its drafts are priced by the cost model.
    with_prefill = DraftStep(1, 64, lambda n: 0.050 + 0.0001 * n)
    assert spec.propose([_Req("copy", COPY)], [4], with_prefill)[0].token_ids == [5, 6, 7, 8]


def test_real_time_budget_limits_verification():
    spec = Speculator(NgramProposer(2, 4), max_k=4)
    for i in range(30):
        spec.tracker.observe(f"old{i}", 4, 4, prior_key=4)
    cheap = dict(base_s=0.010, per_row_s=0.001)
    assert spec.propose([_Req("c", COPY)], [4], decode_step(1, **cheap))[0].token_ids == [5, 6, 7, 8]
    assert spec.propose([_Req("c", COPY)], [4], decode_step(1, **cheap, budget_s=0.0125))[0].token_ids == [5, 6]
    assert spec.propose([_Req("c", COPY)], [4], decode_step(1, **cheap, budget_s=0.008))[0].token_ids == []


def test_speculator_tells_an_expensive_proposer_k_before_it_drafts():
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
    spec.propose([_Req("a", [1])], [3], decode_step(1, 0.05, 0.0005))
    assert 1 <= proposer.asked[0] <= 3
    proposer.asked = None
    spec.propose([_Req("a", [1])] * 64, [5] * 64, decode_step(64, 0.0, 0.01))  # compute-bound: nothing
    assert proposer.asked is None  # not even called


def test_measured_proposing_time_is_weighed_against_the_drafts_gain():
    # A copy request that would verify 4 drafts when proposing is free; once proposing is measured
    # to cost more than the drafts could save (200 ms per request asked), the proposer is not asked.
    proposer = CountingNgram(2, 4)
    spec = Speculator(proposer, max_k=4)
    for i in range(30):
        spec.tracker.observe(f"old-copy{i}", 4, 4, prior_key=4)
    step = decode_step(1, base_s=0.020, per_row_s=0.002)
    assert spec.propose([_Req("copy", COPY)], [4], step)[0].token_ids == [5, 6, 7, 8]
    assert proposer.num_calls == 1
    spec._propose_s_per_request = 0.200
    assert spec.propose([_Req("copy", COPY)], [4], step)[0].token_ids == []
    assert proposer.num_calls == 1


def test_draft_cost_correction_weighs_steps_by_their_drafts_and_lapses():
    c = DraftCostCorrection(window=5, min_samples=3, max_age_steps=10)
    c.observe(0.010, 1.0)  # a stalled verify step, clamped to 4x
    c.tick()
    assert c.scale == 1.0  # too few samples: one cold or stalled step does not stop speculation
    for predicted, measured in ((0.010, 0.020), (0.030, 0.060)):
        c.observe(predicted, measured)
        c.tick()
    assert c.scale == pytest.approx((0.040 + 0.020 + 0.060) / 0.050)
    c.observe(0.0, 0.5)  # nothing predicted: nothing learnt
    assert c.scale == pytest.approx(2.4)
    for _ in range(11):
        c.tick()
    assert c.scale == 1.0  # old evidence forgotten: speculation is probed again


def test_verify_steps_slower_than_predicted_stop_marginal_speculation_until_it_lapses():
    spec = Speculator(NgramProposer(2, 4), max_k=4)
    for i in range(30):
        spec.tracker.observe(f"old{i}", 4, 4, prior_key=4)
    step = decode_step(1)  # base 10 ms, a draft row 6 ms: 4 drafts predicted at 34 ms
    for _ in range(spec.correction.min_samples):
        assert spec.propose([_Req("copy", COPY)], [4], step)[0].token_ids == [5, 6, 7, 8]
        spec.observe("copy", 4, 4)
        spec.observe_step(5, 0, 0.010 + 3 * 0.024)  # the verify step took 3x the predicted extra
    assert spec.correction.scale == pytest.approx(3.0, rel=0.05)  # less the proposing time
    assert spec.propose([_Req("copy", COPY)], [4], step)[0].token_ids == []
    spec.observe_step(1, 0, 0.010)  # a step without drafts teaches the correction nothing
    assert spec.correction.scale == pytest.approx(3.0, rel=0.05)
    for _ in range(spec.correction.max_age_steps):
        spec.propose([_Req("copy", COPY)], [4], step)
    assert spec.propose([_Req("copy", COPY)], [4], step)[0].token_ids == [5, 6, 7, 8]


def test_speedup_calibration_discounts_predictions_by_their_median_realization():
    c = SpeedupCalibration(window=8, min_samples=3, max_age_steps=10)
    c.observe(1.2, 0.9)
    c.observe(1.2, 0.1)  # a stalled step
    assert c.factor == 1.0 and c.required_gain(0.05) == 0.0  # too few samples
    c.observe(2.0, 1.6)
    assert c.factor == pytest.approx(0.75)  # median of 0.75, 0.083, 0.8
    assert c.required_gain(0.05) == pytest.approx(1.05 / 0.75 - 1.05)  # a predicted 1.4x clears 1.05x
    for _ in range(3):
        c.observe(1.1, 1.4)  # predictions now pessimistic: never credited above 1
    assert c.factor == 1.0
    for _ in range(11):
        c.tick()
    assert c.factor == 1.0 and not [d for s, d in c._samples if c._step - s <= c.max_age_steps]


def test_speculation_that_does_not_pay_stops_whatever_the_prediction_said():
    # The cost model and the acceptance estimate agree that 4 drafts pay (predicted ~1.4x); every
    # verify step accepts only 1 and takes the predicted time: realized ~0.6x. After min_samples
    # such steps the chooser demands that much more gain, and stops speculating.
    spec = Speculator(NgramProposer(2, 4), max_k=4)
    spec.correction.min_samples = 10 ** 6  # isolate the outcome calibration
    for i in range(30):
        spec.tracker.observe(f"old{i}", 4, 4, prior_key=4)
    step = decode_step(1)
    for i in range(spec.calibration.min_samples):  # a new request each step: no own record to learn from
        assert spec.propose([_Req(f"copy{i}", COPY)], [4], step)[0].token_ids == [5, 6, 7, 8]
        spec.observe(f"copy{i}", 4, 1)
        spec.observe_step(5, 0, 0.034)
        for _ in range(5):
            spec.tracker.observe("old", 4, 4, prior_key=4)  # the estimate stays high: the prediction stays wrong
    assert spec.calibration.factor < 0.5
    assert spec.propose([_Req("next", COPY)], [4], step)[0].token_ids == []


def test_steps_where_nobody_can_pay_back_off_from_asking():
    proposer = CountingNgram(2, 4)
    spec = Speculator(proposer, max_k=4)
    for i in range(30):
        spec.tracker.observe(f"old{i}", 4, 4, prior_key=4)
    costly, cheap = decode_step(1, per_row_s=0.050), decode_step(1)
    asked = []
    for _ in range(12):
        asked.append(spec._skip_steps == 0)  # this step runs the chooser
        spec.propose([_Req("copy", COPY)], [4], costly)
    assert asked == [True, False, True, False, False, True] + [False] * 4 + [True, False]
    assert proposer.num_calls == 0
    while spec._skip_steps:  # the backoff is bounded: a step that can pay is found within MAX_IDLE_SKIP
        spec.propose([_Req("copy", COPY)], [4], cheap)
    assert spec.propose([_Req("copy", COPY)], [4], cheap)[0].token_ids == [5, 6, 7, 8]
    assert spec._idle_backoff == 0
