"""Statistics and reproducibility of rtserve.bench.arrivals."""
from __future__ import annotations

import math

import numpy as np
import pytest

from rtserve.bench.arrivals import arrival_offsets_s, sample_gaps_s


def _cv(gaps: np.ndarray) -> float:
    return float(gaps.std() / gaps.mean())


def test_poisson_mean_rate_and_cv():
    gaps = sample_gaps_s(50_000, rate_per_s=10.0, burstiness=1.0, rng=np.random.default_rng(1))
    assert gaps.mean() == pytest.approx(0.1, rel=0.02)
    assert _cv(gaps) == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("shape", [0.25, 0.5, 4.0])
def test_gamma_burstiness_cv(shape):
    gaps = sample_gaps_s(50_000, rate_per_s=4.0, burstiness=shape, rng=np.random.default_rng(2))
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)  # the rate does not depend on burstiness
    assert _cv(gaps) == pytest.approx(1 / math.sqrt(shape), rel=0.05)


def test_offsets_are_seeded_and_start_at_zero():
    a = arrival_offsets_s(500, rate_per_s=5.0, burstiness=1.0, seed=7)
    assert a == arrival_offsets_s(500, rate_per_s=5.0, burstiness=1.0, seed=7)
    assert a != arrival_offsets_s(500, rate_per_s=5.0, burstiness=1.0, seed=8)
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:]))
    assert len(a) == 500 and a[-1] == pytest.approx(499 / 5.0, rel=0.15)


def test_same_seed_scales_with_rate():
    slow = arrival_offsets_s(300, rate_per_s=1.0, burstiness=0.5, seed=3)
    fast = arrival_offsets_s(300, rate_per_s=4.0, burstiness=0.5, seed=3)
    assert fast == pytest.approx([t / 4 for t in slow])


def test_infinite_rate_sends_everything_at_once():
    assert arrival_offsets_s(10, rate_per_s=math.inf, burstiness=1.0, seed=0) == [0.0] * 10


def test_invalid_rate_rejected():
    with pytest.raises(ValueError):
        sample_gaps_s(3, rate_per_s=0.0, burstiness=1.0, rng=np.random.default_rng(0))
