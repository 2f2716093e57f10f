"""Step-time cost model: RLS calibration, error tracking, prefill-token inversion."""
import math
import random

import numpy as np

import pytest

from rtserve.engine.cost_model import StepCostModel, StepFeatures, prefill_pairs

TRUE = (0.004, 0.0008, 0.00015, 0.002)  # intercept, per decode, per prefill token, per 1k context


def true_step_s(f: StepFeatures, coeffs=TRUE) -> float:
    return sum(c * x for c, x in zip(coeffs, f.vector()))


def random_steps(n, seed=0):
    rng = random.Random(seed)
    return [StepFeatures(rng.randint(0, 32), rng.choice([0, 0, 16, 64, 256, 512]), rng.randint(0, 20000))
            for _ in range(n)]


def test_calibrates_to_the_true_coefficients_online():
    model = StepCostModel()
    assert not model.is_calibrated
    for f in random_steps(200):
        model.observe(f, true_step_s(f))
    assert model.is_calibrated
    for got, want in zip(model.coeffs, TRUE):
        assert got == pytest.approx(want, rel=0.02, abs=1e-6)
    probe = StepFeatures(8, 128, 4000)
    assert model.predict_s(probe) == pytest.approx(true_step_s(probe), rel=0.01)
    assert model.mean_rel_error < 0.05  # error is exported and shrinks as the model learns


def test_tracks_a_machine_that_slows_down():
    model = StepCostModel(window=64)
    for f in random_steps(100, seed=1):
        model.observe(f, true_step_s(f))
    slow = tuple(2 * c for c in TRUE)
    for f in random_steps(150, seed=2):
        model.observe(f, true_step_s(f, slow))
    probe = StepFeatures(4, 256, 1000)
    assert model.predict_s(probe) == pytest.approx(true_step_s(probe, slow), rel=0.03)


def test_noisy_measurements_give_a_bounded_error():
    rng = random.Random(3)
    model = StepCostModel()
    for f in random_steps(400, seed=4):
        model.observe(f, true_step_s(f) * rng.uniform(0.9, 1.1))
    probe = StepFeatures(16, 64, 8000)
    assert model.predict_s(probe) == pytest.approx(true_step_s(probe), rel=0.1)
    assert 0.0 < model.mean_rel_error < 0.15
    assert model.mean_abs_error_s > 0.0


def test_max_prefill_tokens_inverts_the_model():
    model = StepCostModel.from_coeffs((0.010, 0.001, 0.0001, 0.0))
    # 50 ms budget, 4 decodes: 10 + 4 ms fixed, 0.1 ms per prefill token -> 360 tokens.
    assert model.max_prefill_tokens(0.050, 4, 0) == 360
    assert model.predict_s(StepFeatures(4, 360, 0)) <= 0.050 + 1e-12
    assert model.max_prefill_tokens(0.012, 4, 0) == 0  # the decodes alone are over budget
    free = StepCostModel.from_coeffs((0.010, 0.001, 0.0, 0.0))
    assert free.max_prefill_tokens(0.050, 4, 0) >= 1 << 20


def test_prior_has_at_most_six_coefficients_and_missing_ones_cost_nothing():
    with pytest.raises(ValueError):
        StepCostModel(prior=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7))
    with pytest.raises(ValueError):
        StepCostModel(prior=())
    assert StepCostModel(prior=(0.1, 0.2)).coeffs == (0.1, 0.2, 0.0, 0.0, 0.0, 0.0)


def test_a_step_with_prefill_pays_a_per_chunk_cost():
    model = StepCostModel.from_coeffs((0.010, 0.001, 0.0001, 0.0, 0.0, 0.008))
    assert model.predict_s(StepFeatures(4, 0)) == pytest.approx(0.014)
    assert model.predict_s(StepFeatures(4, 10)) == pytest.approx(0.014 + 0.001 + 0.008)  # one chunk implied
    assert model.predict_s(StepFeatures(4, 20, num_prefill_seqs=2)) == pytest.approx(0.014 + 0.002 + 0.016)
    # The chunk cost is paid once a single token is added: 50 ms - 14 ms - 8 ms leaves 280 tokens.
    assert model.max_prefill_tokens(0.050, 4, 0) == 280
    assert model.max_prefill_tokens(0.02255, 4, 0) == 5
    assert model.max_prefill_tokens(0.0215, 4, 0) == 0


def test_prefill_pairs_count_the_causal_attention_of_a_chunk():
    assert prefill_pairs(1, 0) == 1
    assert prefill_pairs(4, 0) == 1 + 2 + 3 + 4
    assert prefill_pairs(4, 100) == 101 + 102 + 103 + 104
    # Chunking does not change the total: a 2,048-token prompt in 16-token chunks.
    assert sum(prefill_pairs(16, s) for s in range(0, 2048, 16)) == prefill_pairs(2048)


def test_calibrates_the_prefill_attention_cost():
    truth = TRUE + (0.6,)  # 0.6 s per million query-key pairs
    rng = random.Random(11)
    model = StepCostModel()
    for _ in range(200):
        n, start = rng.choice([0, 16, 64, 256]), rng.choice([0, 512, 1024, 1900])
        f = StepFeatures(rng.randint(0, 16), n, rng.randint(0, 5000), prefill_pairs(n, start) if n else 0)
        model.observe(f, true_step_s(f, truth))
    assert model.coeffs[4] == pytest.approx(0.6, rel=0.02)
    deep, shallow = StepFeatures(4, 16, 1000, prefill_pairs(16, 1900)), StepFeatures(4, 16, 1000, prefill_pairs(16))
    assert model.predict_s(deep) - model.predict_s(shallow) == pytest.approx(0.6 * 16 * 1900 / 1e6, rel=0.03)


def test_max_prefill_tokens_shrinks_with_the_chunk_position():
    model = StepCostModel.from_coeffs((0.010, 0.001, 0.0001, 0.0, 0.5))
    at_start, deep = model.max_prefill_tokens(0.050, 4, 0), model.max_prefill_tokens(0.050, 4, 0, prefill_start=1900)
    assert deep < at_start
    for n, start in ((at_start, 0), (deep, 1900)):  # the largest chunk within budget
        assert model.predict_s(StepFeatures(4, n, 0, prefill_pairs(n, start))) <= 0.050 + 1e-12
        assert model.predict_s(StepFeatures(4, n + 1, 0, prefill_pairs(n + 1, start))) > 0.050


def test_never_diverges_on_heavy_tailed_contended_measurements():
    # A contended CPU: most steps cost what the model says, some stall for seconds, many features are
    # constant for long stretches (the regime where a projected RLS blew up to 1e14).
    rng = random.Random(5)
    model = StepCostModel(window=128)
    for i in range(3000):
        f = StepFeatures(rng.choice([1, 1, 1, 2, 8]), rng.choice([0] * 20 + [16, 512]), rng.randint(0, 3000))
        stall = rng.random() < 0.05
        model.observe(f, true_step_s(f) * (rng.uniform(20, 100) if stall else rng.uniform(0.8, 1.5)))
        assert all(0.0 <= c < 1.0 for c in model.coeffs), (i, model.coeffs)
    probe = StepFeatures(4, 128, 1000)
    assert 0.5 * true_step_s(probe) < model.predict_s(probe) < 10 * true_step_s(probe)


def test_unexercised_feature_keeps_its_prior():
    model = StepCostModel(prior=(0.005, 0.0005, 0.0001, 0.0))
    for n in range(1, 40):  # decode-only steps: no prefill tokens ever
        f = StepFeatures(n % 8 + 1, 0, 1000)
        model.observe(f, 0.004 + 0.001 * f.num_decodes)
    assert model.coeffs[2] == pytest.approx(0.0001, rel=0.05)
    assert model.coeffs[1] == pytest.approx(0.001, rel=0.05)


def test_max_decodes_inverts_the_model():
    model = StepCostModel.from_coeffs((0.010, 0.001, 0.0001, 0.0))
    # 30 ms budget beside 8 prefill tokens (0.8 ms): 19 decodes of 1 ms.
    assert model.max_decodes(0.030, 8, 0) == 19
    assert model.max_decodes(0.010, 8, 0) == 0  # the step's own cost is over budget
    assert StepCostModel.from_coeffs((0.010, 0.0, 0.0001, 0.0)).max_decodes(0.030, 8, 0) is None


def test_overrun_ratio_is_cautious_until_measured_then_tracks_the_noise_tail():
    model = StepCostModel()
    assert model.overrun_ratio == 1.5  # nothing measured yet
    rng = random.Random(6)
    for f in random_steps(256, seed=7):
        model.observe(f, true_step_s(f))
    assert model.overrun_ratio == pytest.approx(1.0, abs=0.02)  # exact measurements: no margin needed
    noisy = StepCostModel()
    for f in random_steps(256, seed=8):
        noisy.observe(f, true_step_s(f) * math.exp(rng.gauss(0.0, 0.1)))
    # Log-normal noise with sigma 0.1 exceeds exp(4.26 * 0.1) = 1.53 once in 10^5 steps.
    assert 1.35 < noisy.overrun_ratio < 1.75


def test_trusted_prefill_tokens_grow_only_from_measured_steps():
    assert StepCostModel.from_coeffs(TRUE).trusted_prefill_tokens >= 1 << 20  # given, not fitted
    model = StepCostModel(window=16)
    for _ in range(8):
        model.observe(StepFeatures(2, 8), 0.020)
    assert model.trusted_prefill_tokens == 64  # only 8-token chunks measured: at least 64 allowed
    model.observe(StepFeatures(2, 40), 0.024)
    assert model.trusted_prefill_tokens == 80
    for _ in range(16):  # the 40-token step leaves the window
        model.observe(StepFeatures(2, 0), 0.010)
    assert model.trusted_prefill_tokens == 64
    model.observe(StepFeatures(2, 100), 0.030)
    assert model.trusted_prefill_tokens == 200
    for _ in range(16):  # a large step (>= 64 tokens) leaving the window is kept beside it
        model.observe(StepFeatures(2, 0), 0.010)
    assert model.trusted_prefill_tokens == 200


def test_a_fresh_model_trusts_only_small_steps_until_fitted():
    model = StepCostModel(min_samples=8, refit_every=4)
    for n in range(3):  # measured, not yet fitted
        model.observe(StepFeatures(1, 8), 0.02)
        assert model.trusted_prefill_tokens == 64


def test_line_is_the_model_along_one_direction():
    model = StepCostModel()
    for f in random_steps(64, seed=3):
        model.observe(f, true_step_s(f))
    base = StepFeatures(12, 40, 3000, prefill_pairs(40, 100), 1)
    line = model.line_s(base, StepFeatures(1, 0, 250, num_prefill_seqs=0))
    for m in (0, 1, 7, 30):
        f = StepFeatures(12 + m, 40, 3000 + 250 * m, prefill_pairs(40, 100), 1)
        assert line(m) == pytest.approx(model.predict_s(f))
    negative = StepCostModel.from_coeffs((-0.01, 0.001))
    assert negative.line_s(StepFeatures(1, 0), StepFeatures(1, 0))(0) == 0.0  # clamped as predict_s is


def test_a_thread_count_change_scales_predictions_by_its_measured_slowdown_and_keeps_the_fit():
    """At 1 thread of 2 every step takes 1.7x as long: the model learns the factor within some
    steps, its fit of the full-count steps is not disturbed, and both counts predict at once when
    the governor switches back and forth."""
    true = (0.010, 0.001, 0.0001, 0.0, 0.5, 0.002)
    rng = np.random.default_rng(0)

    def features(i):
        return StepFeatures(int(rng.integers(1, 16)), int(rng.integers(0, 256)) * (i % 3 == 0), 500, 0,
                            int(i % 3 == 0))

    def truth(f, slowdown=1.0):
        return slowdown * sum(c * x for c, x in zip(true, f.vector()))

    model = StepCostModel(min_samples=8)
    for i in range(64):
        f = features(i)
        model.observe(f, truth(f))
    probe = StepFeatures(8, 128, 1000, 0, 1)
    full = model.predict_s(probe)  # the fit of full-count steps
    model.set_threads(1, 2)
    assert model.predict_s(probe) == pytest.approx(2 * full)  # a count never seen: 2 / 1
    for i in range(60):
        f = features(i)
        model.observe(f, truth(f, 1.7))
    assert model.predict_s(probe) == pytest.approx(1.7 * full, rel=0.03)
    model.set_threads(2, 2)
    assert model.predict_s(probe) == pytest.approx(full, rel=0.03)  # the fit kept its scale
    model.set_threads(1, 2)
    assert model.predict_s(probe) == pytest.approx(1.7 * full, rel=0.03)  # its factor kept
    assert model.to_json()["coeffs"] == pytest.approx([c / model._factor for c in model.coeffs])
    # Without the factor the window mixes both counts: 60 slow steps among 64 fast ones.
    mixed = StepCostModel(min_samples=8)
    rng = np.random.default_rng(0)
    for i in range(64):
        f = features(i)
        mixed.observe(f, truth(f))
    for i in range(60):
        f = features(i)
        mixed.observe(f, truth(f, 1.7))
    assert not mixed.predict_s(probe) == pytest.approx(full, rel=0.1)


def test_masked_rows_add_their_constant_cost_and_stay_out_of_the_fit():
    from rtserve.engine.cost_model import MASK_ROW_S
    true = (0.004, 0.001, 0.0002, 0.0, 0.0, 0.0)
    model = StepCostModel(prior=true, min_samples=4, refit_every=1)
    rng = random.Random(0)
    for _ in range(64):  # constrained and unconstrained steps, each costing the true model + its rows' masks
        d, rows = rng.randint(1, 16), rng.randint(0, 16)
        f = StepFeatures(d, rng.randint(0, 64), num_masked_rows=min(rows, d))
        model.observe(f, sum(c * x for c, x in zip(true, f.vector())) + MASK_ROW_S * f.num_masked_rows)
    for got, want in zip(model.coeffs, true):
        assert got == pytest.approx(want, abs=2e-5)  # the masks' cost did not leak into the fit
    plain, masked = StepFeatures(16, 0), StepFeatures(16, 0, num_masked_rows=16)
    assert model.predict_s(masked) - model.predict_s(plain) == pytest.approx(16 * MASK_ROW_S)
    line = model.line_s(StepFeatures(4, 0, num_masked_rows=4), StepFeatures(1, 0, num_prefill_seqs=0, num_masked_rows=1))
    assert line(3) == pytest.approx(model.predict_s(StepFeatures(7, 0, num_masked_rows=7)))
