"""Known answers for rtserve.bench.metrics on hand-made timing data (no server, no clock)."""
from __future__ import annotations

import math

import pytest

from rtserve.bench.client import RequestRecord, RequestStatus
from rtserve.bench.config import SloLimits, parse_goodput
from rtserve.bench.metrics import (budget_limits, compute_phase_metrics, meets_limits,
                                   peak_concurrency, summarize_ms)


def _record(index: int, status: str = RequestStatus.OK, chunks: tuple[float, ...] = (),
            output_tokens: int = 0, send_s: float = 0.0, rt_class: str = "default",
            rt_budget: dict | None = None) -> RequestRecord:
    record = RequestRecord(index, rt_class, input_len_est=10, max_tokens=16, arrival_s=send_s,
                           rt_budget=rt_budget, send_s=send_s, status=status)
    record.chunk_times_s = list(chunks)
    record.ttft_s = chunks[0] if chunks else None
    record.e2e_s = chunks[-1] if chunks else 0.01
    record.finished_s = record.e2e_s
    record.output_tokens = output_tokens
    return record


@pytest.fixture
def records() -> list[RequestRecord]:
    return [
        # one token per chunk: ttft 100 ms, four 50 ms gaps, TPOT 50 ms
        _record(0, chunks=(0.10, 0.15, 0.20, 0.25, 0.30), output_tokens=5),
        # multi-token chunks (e.g. speculative): 5 tokens in 3 chunks, one 200 ms stall
        _record(1, chunks=(0.20, 0.40, 0.41), output_tokens=5, send_s=0.05),
        _record(2, status=RequestStatus.REJECTED, send_s=0.1),
        _record(3, status=RequestStatus.ERROR, chunks=(0.05, 0.06), output_tokens=2, send_s=0.1),
        # a single output token: no TPOT sample, counts as TPOT 0 for goodput
        _record(4, chunks=(0.05,), output_tokens=1, send_s=0.2),
    ]


def test_tpot_excludes_first_token_and_differs_from_pooled_itl(records):
    m = compute_phase_metrics(records, duration_s=2.0, rate_per_s=math.inf, limits=SloLimits())
    # TPOT per request: (e2e - ttft) / (n - 1) = 0.2/4 = 50 ms and 0.21/4 = 52.5 ms
    assert m.tpot.count == 2
    assert m.tpot.mean_ms == pytest.approx(51.25)
    # ITL pools every gap of completed requests: 4 x 50 ms + 200 ms + 10 ms
    assert m.itl.count == 6
    assert m.itl.mean_ms == pytest.approx(410 / 6)
    assert m.itl.max_ms == pytest.approx(200)
    assert m.max_itl.count == 2 and m.max_itl.max_ms == pytest.approx(200)
    assert m.ttft.count == 3 and m.ttft.mean_ms == pytest.approx((100 + 200 + 50) / 3)
    assert m.e2e.max_ms == pytest.approx(410)


def test_rejections_and_errors_are_not_successes(records):
    m = compute_phase_metrics(records, duration_s=2.0, rate_per_s=4.0, limits=SloLimits())
    assert (m.num_requests, m.num_completed, m.num_rejected, m.num_errors, m.num_cancelled) == (5, 3, 1, 1, 0)
    assert m.request_throughput_per_s == pytest.approx(1.5)
    assert m.total_output_tokens == 11  # the failed request's 2 tokens are not counted
    assert m.output_throughput_tok_per_s == pytest.approx(5.5)
    assert m.total_input_tokens == 30
    assert m.total_throughput_tok_per_s == pytest.approx(20.5)
    assert m.slo is None and m.per_class == {}


@pytest.mark.parametrize(("flags", "num_good"), [
    (["ttft:150"], 2),  # 100 and 50 ms pass, 200 ms fails
    (["tpot:51"], 2),  # 50 ms and the single-token request (TPOT 0) pass, 52.5 ms fails
    (["itl:100"], 2),  # the 200 ms stall fails; TPOT would have hidden it
    (["ttft:1000,tpot:1000", "itl:1000"], 3),
    (["e2e:350"], 2),
    (["ttft:60"], 1),
])
def test_goodput_and_attainment_count_all_requests(records, flags, num_good):
    limits = parse_goodput(flags)
    m = compute_phase_metrics(records, duration_s=2.0, rate_per_s=1.0, limits=limits)
    assert m.slo is not None
    assert m.slo.num_good == num_good
    assert m.slo.num_requests == 5  # rejected and failed requests are misses, not exclusions
    assert m.slo.attainment == pytest.approx(num_good / 5)
    assert m.slo.goodput_req_per_s == pytest.approx(num_good / 2.0)


def test_failed_request_never_meets_limits(records):
    assert not meets_limits(records[3], SloLimits(ttft_ms=1e9))
    assert not meets_limits(records[2], SloLimits())
    assert meets_limits(records[0], SloLimits())


def test_percentiles_match_numpy_linear():
    d = summarize_ms([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert d.count == 100
    assert (d.p50_ms, d.p90_ms, d.p99_ms, d.max_ms) == pytest.approx((50.5, 90.1, 99.01, 100.0))
    assert d.mean_ms == pytest.approx(50.5)
    empty = summarize_ms([])
    assert empty.count == 0 and math.isnan(empty.p99_ms)


def test_per_class_attainment_uses_own_budget():
    firm = {"class": "firm", "ttft_ms": 150.0, "itl_ms": 60.0}
    records = [
        _record(0, chunks=(0.1, 0.15, 0.2), output_tokens=3, rt_class="firm", rt_budget=firm),
        _record(1, chunks=(0.1, 0.2), output_tokens=2, rt_class="firm", rt_budget=firm),  # 100 ms gap
        _record(2, status=RequestStatus.CANCELLED, rt_class="firm", rt_budget=firm),
        _record(3, chunks=(3.0, 9.0), output_tokens=2, rt_class="batch", rt_budget={"class": "batch"}),
    ]
    m = compute_phase_metrics(records, duration_s=10.0, rate_per_s=1.0, limits=parse_goodput(["ttft:500"]))
    assert set(m.per_class) == {"batch", "firm"}
    assert m.per_class["firm"].budget.num_good == 1
    assert m.per_class["firm"].budget.attainment == pytest.approx(1 / 3)
    assert m.per_class["firm"].num_cancelled == 1
    assert m.per_class["batch"].budget.attainment == 1.0  # no deadline: completing is enough
    assert m.per_class["batch"].slo.attainment == 0.0  # but it misses the global TTFT limit
    assert m.slo.num_good == 2
    assert budget_limits(records[0]) == SloLimits(ttft_ms=150.0, itl_ms=60.0)


def test_peak_concurrency():
    records = [_record(0, chunks=(1.0,), output_tokens=1), _record(1, chunks=(0.5,), output_tokens=1, send_s=0.2),
               _record(2, chunks=(0.1,), output_tokens=1, send_s=1.0)]  # starts as record 0 ends
    assert peak_concurrency(records) == 2


def test_deadline_drops_are_counted_apart_and_never_goodput_and_late_completions_are_counted():
    firm = {"class": "firm", "ttft_ms": 150.0, "itl_ms": 60.0}
    records = [
        _record(0, chunks=(0.1, 0.15, 0.2), output_tokens=3, rt_class="firm", rt_budget=firm),
        _record(1, chunks=(0.1, 0.2), output_tokens=2, rt_class="firm", rt_budget=firm),  # served late
        # stopped mid-stream for its deadline: every gap it got was on time, but it is not a completion
        _record(2, status=RequestStatus.DROPPED, chunks=(0.1, 0.15), output_tokens=2, rt_class="firm",
                rt_budget=firm),
        _record(3, status=RequestStatus.DROPPED, rt_class="firm", rt_budget=firm),  # 504 before a token
        _record(4, status=RequestStatus.REJECTED, rt_class="firm", rt_budget=firm),
    ]
    m = compute_phase_metrics(records, duration_s=1.0, rate_per_s=1.0, limits=parse_goodput(["ttft:500"]))
    assert (m.num_completed, m.num_dropped, m.num_rejected) == (2, 2, 1)
    firm_m = m.per_class["firm"]
    assert firm_m.num_dropped == 2 and firm_m.num_late == 1 and firm_m.num_rejected == 1
    assert firm_m.budget.num_good == 1 and firm_m.budget.num_requests == 5
    assert m.slo.num_good == 2 and m.slo.goodput_req_per_s == 2.0  # the drop meets ttft:500 yet is no good
    assert not meets_limits(records[2], SloLimits(ttft_ms=1e9))
