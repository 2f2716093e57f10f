"""Per-class real-time metrics: misses by kind, rejections, expiries, sliding-window attainment, goodput."""
import math

from rtserve.api.rt_metrics import RTMetrics
from rtserve.client.rt_report import RTTracker
from rtserve.protocol import RTParams
from tests.unit.test_api_metrics import exposition


def report(rt_class="firm", ttft=0.1, gaps=(0.01, 0.02), finish="stop", ttft_s=0.3, itl_s=0.05):
    t = RTTracker(RTParams(rt_class, ttft_s, itl_s, None), arrival_s=0.0)
    now = ttft
    t.on_tokens(1, now)
    for g in gaps:
        now += g
        t.on_tokens(1, now)
    return t.finish(now, finish)


def test_counts_misses_rejections_expiries_and_window_attainment():
    m = RTMetrics("m", window_s=10.0)
    m.on_finished(report(), now_s=100.0)                      # met
    m.on_finished(report(ttft=0.5), now_s=101.0)              # ttft miss
    m.on_finished(report(gaps=(0.2,)), now_s=102.0)           # itl miss
    dropped = RTTracker(RTParams("firm", 0.3, 0.05, None), 0.0).finish(0.4, "deadline")
    m.on_finished(dropped, now_s=103.0)                       # expired: a ttft miss too
    m.on_rejected("firm", "ttft")
    m.on_rejected("soft", "queue_full")
    firm = m.classes["firm"]
    assert firm.misses == {"ttft": 2, "itl": 1, "deadline": 0}
    assert firm.num_expired == 1 and firm.rejections["ttft"] == 1 and firm.num_finished == 4
    attain, goodput = m.attainment("firm", now_s=105.0)
    assert attain == 0.25 and goodput == 0.1
    assert math.isnan(m.attainment("batch", now_s=105.0)[0])
    text = exposition(*m.families(now_s=105.0))
    assert 'rtserve:rt_deadline_misses_total{kind="ttft",model_name="m",rt_class="firm"} 2' in text
    assert 'rtserve:rt_rejections_total{model_name="m",reason="queue_full",rt_class="soft"} 1' in text
    assert 'rtserve:rt_slo_attainment{model_name="m",rt_class="firm"} 0.25' in text
    assert 'rtserve:rt_slo_attainment{model_name="m",rt_class="batch"} NaN' in text
    assert text.count("# TYPE rtserve:rt_time_to_first_token_seconds histogram") == 1
    assert 'rtserve:rt_inter_token_latency_seconds_count{model_name="m",rt_class="firm"} 5' in text
    assert m.attainment("firm", now_s=111.5) == (0.0, 0.0)  # only the dropped one is left in the window


def test_cost_model_gauges_render_from_the_snapshot():
    from rtserve.api.rt_metrics import cost_model_families
    from rtserve.protocol import QueueSnapshot
    snap = QueueSnapshot(0.0, "deadline", 3, cost_coeffs=(0.01, 0.001, 0.0001, 0.0), cost_calibrated=True,
                         cost_mean_rel_error=0.12, prefill_token_budget=300)
    text = exposition(*cost_model_families("m", snap))
    assert 'rtserve:step_cost_model_coefficient{model_name="m",term="intercept_seconds"} 0.01' in text
    assert 'rtserve:step_cost_model_mean_rel_error{model_name="m"} 0.12' in text
    assert 'rtserve:prefill_token_budget{model_name="m"} 300' in text
    assert list(cost_model_families("m", None)) == []
