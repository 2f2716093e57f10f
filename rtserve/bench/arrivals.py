"""When to send: arrival offsets (seconds from the start of a phase) for Poisson, gamma and
all-at-once schedules.

Gaps follow vLLM's `vllm bench serve`: gamma(shape=burstiness, scale=1/(rate*burstiness)), so the
mean gap is 1/rate and the coefficient of variation is 1/sqrt(burstiness). Burstiness 1 is an
exponential gap, i.e. a Poisson process; < 1 is burstier, > 1 more regular. rate = inf: all at t=0.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

_BATCH = 256  # gaps drawn per numpy call; the sequence for a seed does not depend on the consumer


def sample_gaps_s(num_gaps: int, rate_per_s: float, burstiness: float,
                  rng: np.random.Generator) -> np.ndarray:
    """`num_gaps` inter-arrival gaps in seconds (all 0 for rate inf)."""
    if not rate_per_s > 0 or not burstiness > 0:
        raise ValueError(f"rate and burstiness must be > 0, got {rate_per_s}, {burstiness}")
    if math.isinf(rate_per_s):
        return np.zeros(num_gaps)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate_per_s * burstiness), size=num_gaps)


def iter_arrival_offsets_s(rate_per_s: float, burstiness: float,
                           rng: np.random.Generator) -> Iterator[float]:
    """Endless arrival offsets: 0.0 first, then the running sum of the gaps."""
    offset_s = 0.0
    while True:
        for gap_s in sample_gaps_s(_BATCH, rate_per_s, burstiness, rng).tolist():
            yield offset_s
            offset_s += gap_s


def arrival_offsets_s(num_requests: int, rate_per_s: float, burstiness: float,
                      seed: int) -> list[float]:
    """The first `num_requests` offsets of a seeded schedule (what a phase with that seed sends)."""
    offsets = iter_arrival_offsets_s(rate_per_s, burstiness, phase_rng(seed))
    return [next(offsets) for _ in range(num_requests)]


def phase_rng(seed: int) -> np.random.Generator:
    """The arrival generator for a run seed; separate from the workload's so that changing the rate
    never changes which prompts are sent."""
    return np.random.default_rng([seed, 0xA77])
