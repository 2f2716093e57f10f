"""Pure functions from `RequestRecord`s to typed aggregates, with `vllm bench serve`'s definitions.

- TTFT and E2E: per completed request. TPOT: per completed request with > 1 output token,
  (e2e - ttft) / (output_tokens - 1), so the first token is excluded. ITL: every gap between
  consecutive chunks, pooled over all completed requests (one gap may cover several tokens).
- Throughputs divide completed work by the phase duration.
- Goodput: completed requests meeting every given limit, per second. Attainment: that count over
  *all* requests issued, so rejected, failed, cancelled and dropped requests (stopped by the server
  for a deadline: a partial answer is not a completion) count as misses.
- Late (per class): completed requests that missed their own rt budget, i.e. served late.
Latencies leave here in milliseconds (the report edge); records stay in seconds.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from rtserve.bench.client import RequestRecord, RequestStatus
from rtserve.bench.config import SloLimits


@dataclass(frozen=True)
class Distribution:
    """Summary of one latency metric, in ms (nan when there are no samples)."""

    count: int
    mean_ms: float
    std_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


@dataclass(frozen=True)
class Attainment:
    """How many requests met a set of limits."""

    num_requests: int  # denominator: every request issued
    num_good: int
    attainment: float  # num_good / num_requests
    goodput_req_per_s: float  # num_good / duration


@dataclass(frozen=True)
class ClassMetrics:
    """Per request class (realtime-mix firm/soft/batch, interference short/long)."""

    rt_class: str
    num_requests: int
    num_completed: int
    num_rejected: int
    num_errors: int
    num_cancelled: int
    num_dropped: int
    num_late: int  # completed, but past their own rt budget: served late
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e: Distribution
    slo: Attainment | None  # against --goodput limits
    budget: Attainment | None  # against each request's own rt budget (ttft, max gap, deadline)


@dataclass(frozen=True)
class PhaseMetrics:
    """Aggregates of one phase (one arrival rate)."""

    rate_per_s: float
    duration_s: float
    num_requests: int
    num_completed: int
    num_rejected: int
    num_errors: int
    num_cancelled: int
    num_dropped: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput_per_s: float
    output_throughput_tok_per_s: float
    total_throughput_tok_per_s: float
    peak_concurrency: int
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e: Distribution
    max_itl: Distribution  # each request's largest gap: what a per-token deadline constrains
    slo: Attainment | None
    per_class: dict[str, ClassMetrics] = field(default_factory=dict)


def summarize_ms(values_s: Sequence[float]) -> Distribution:
    """Mean/std/p50/p90/p99/max in ms; percentiles use numpy's default (linear), as vLLM does."""
    if len(values_s) == 0:
        return Distribution(0, *([math.nan] * 6))
    ms = np.asarray(values_s, dtype=float) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return Distribution(len(ms), float(ms.mean()), float(ms.std()), float(p50), float(p90),
                        float(p99), float(ms.max()))


def meets_limits(record: RequestRecord, limits: SloLimits) -> bool:
    """True iff the request completed and every given limit holds (TPOT counts 0 when n <= 1)."""
    if not record.is_ok:
        return False
    checks = (
        (limits.ttft_ms, record.ttft_s),
        (limits.tpot_ms, record.tpot_s or 0.0),
        (limits.itl_ms, max(record.itl_s, default=0.0)),
        (limits.e2e_ms, record.e2e_s),
    )
    return all(limit_ms is None or (value_s is not None and value_s * 1000.0 <= limit_ms)
               for limit_ms, value_s in checks)


def budget_limits(record: RequestRecord) -> SloLimits | None:
    """The request's own rt budget as limits (deadline -> e2e); None if it has no budget."""
    budget = record.rt_budget
    if budget is None:
        return None
    return SloLimits(ttft_ms=budget.get("ttft_ms"), itl_ms=budget.get("itl_ms"),
                     e2e_ms=budget.get("deadline_ms"))


def attainment(records: Sequence[RequestRecord], limits: SloLimits | None,
               duration_s: float) -> Attainment | None:
    if limits is None or not records:
        return None
    num_good = sum(meets_limits(r, limits) for r in records)
    return Attainment(len(records), num_good, num_good / len(records), _per_s(num_good, duration_s))


def budget_attainment(records: Sequence[RequestRecord], duration_s: float) -> Attainment | None:
    """Attainment where each request is judged against its own rt budget."""
    judged = [(r, budget_limits(r)) for r in records]
    if not judged or any(limits is None for _, limits in judged):
        return None
    num_good = sum(meets_limits(r, limits) for r, limits in judged)
    return Attainment(len(records), num_good, num_good / len(records), _per_s(num_good, duration_s))


def peak_concurrency(records: Sequence[RequestRecord]) -> int:
    """The largest number of requests in flight at once (send to end, per the client)."""
    events = []
    for r in records:
        if math.isfinite(r.send_s) and math.isfinite(r.end_s):
            events += [(r.send_s, 1), (r.end_s, -1)]
    running = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # ends before starts at a tie
        running += step
        peak = max(peak, running)
    return peak


def compute_phase_metrics(records: Sequence[RequestRecord], duration_s: float, rate_per_s: float,
                          limits: SloLimits) -> PhaseMetrics:
    done = [r for r in records if r.is_ok]
    input_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.input_len_est
                       for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    slo_limits = None if limits.is_empty else limits
    classes = sorted({r.rt_class for r in records}, key=_class_order)
    per_class = {} if classes in ([], ["default"]) else {
        c: class_metrics(c, [r for r in records if r.rt_class == c], duration_s, slo_limits)
        for c in classes}
    return PhaseMetrics(
        rate_per_s=rate_per_s, duration_s=duration_s, **_counts(records),
        total_input_tokens=input_tokens, total_output_tokens=output_tokens,
        request_throughput_per_s=_per_s(len(done), duration_s),
        output_throughput_tok_per_s=_per_s(output_tokens, duration_s),
        total_throughput_tok_per_s=_per_s(input_tokens + output_tokens, duration_s),
        peak_concurrency=peak_concurrency(records), **_latencies(done),
        max_itl=summarize_ms([max(r.itl_s) for r in done if len(r.chunk_times_s) > 1]),
        slo=attainment(records, slo_limits, duration_s), per_class=per_class)


def class_metrics(rt_class: str, records: Sequence[RequestRecord], duration_s: float,
                  slo_limits: SloLimits | None) -> ClassMetrics:
    done = [r for r in records if r.is_ok]
    num_late = sum(1 for r in done if (b := budget_limits(r)) is not None and not meets_limits(r, b))
    return ClassMetrics(rt_class, **_counts(records), num_late=num_late, **_latencies(done),
                        slo=attainment(records, slo_limits, duration_s),
                        budget=budget_attainment(records, duration_s))


def _latencies(done: Sequence[RequestRecord]) -> dict[str, Distribution]:
    return {
        "ttft": summarize_ms([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot": summarize_ms([t for r in done if (t := r.tpot_s) is not None]),
        "itl": summarize_ms([gap for r in done for gap in r.itl_s]),
        "e2e": summarize_ms([r.e2e_s for r in done if r.e2e_s is not None]),
    }


def _counts(records: Sequence[RequestRecord]) -> dict[str, int]:
    statuses = [r.status for r in records]
    return {"num_requests": len(records), "num_completed": statuses.count(RequestStatus.OK),
            "num_rejected": statuses.count(RequestStatus.REJECTED),
            "num_errors": statuses.count(RequestStatus.ERROR),
            "num_cancelled": statuses.count(RequestStatus.CANCELLED),
            "num_dropped": statuses.count(RequestStatus.DROPPED)}


def _class_order(rt_class: str) -> tuple[int, str]:
    known = ("firm", "soft", "batch", "short", "long")
    return (known.index(rt_class) if rt_class in known else len(known), rt_class)


def _per_s(count: float, duration_s: float) -> float:
    return count / duration_s if duration_s > 0 else math.nan
