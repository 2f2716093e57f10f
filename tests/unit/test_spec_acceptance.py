"""Acceptance tracking: per-request evidence, proposer-wide rates per prior key, fading evidence."""
import random

import pytest

from rtserve.spec.acceptance import AcceptanceTracker


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


def test_prior_is_per_key_so_chat_matches_do_not_inherit_copy_acceptance():
    # Copy requests: 4-token matches, always accepted. Chat requests: 2-token matches, rejected.
    t = AcceptanceTracker(max_k=4)
    for i in range(40):
        t.observe(f"copy{i}", 4, 4, prior_key=4)
        t.observe(f"chat{i}", 4, 0, prior_key=2)
    assert t.rate("new", prior_key=4) > 0.9
    assert t.rate("new", prior_key=2) < 0.1
    assert t.rate("new", prior_key=3) == pytest.approx(t.prior_rate)  # never seen: the prior
    assert t.best_rate("new") > 0.9


def test_own_failures_fade_so_a_request_is_tried_again():
    t = AcceptanceTracker(max_k=4, half_life_steps=10)
    for _ in range(10):
        t.observe("r", 4, 0, prior_key=2)
    low = t.rate("r", prior_key=4)  # a 4-token match: prior 0.5, but r's own record is bad
    assert low < 0.25
    for _ in range(50):  # 50 steps without a verify of r: its failures weigh 1/32 as much
        t.tick()
    assert t.rate("r", prior_key=4) > 0.45
    t.observe("r", 4, 0, prior_key=4)  # new evidence counts in full, the old stays faded
    assert t.rate("r", prior_key=4) < 0.35


def test_best_rate_is_the_best_key_rate_and_follows_new_evidence():
    t = AcceptanceTracker(max_k=4)
    t.observe("a", 4, 1, prior_key=2)
    t.observe("b", 4, 4, prior_key=4)
    t.tick()
    for rid in ("a", "b", "new"):
        assert t.best_rate(rid) == pytest.approx(max(t.rate(rid, k) for k in (2, 4, -1)))
    for _ in range(20):  # key 4 collapses within the same step: the cached best key is dropped
        t.observe("b", 4, 0, prior_key=4)
    assert t.best_rate("new") == pytest.approx(max(t.rate("new", k) for k in (2, 4, -1)))
