"""LiveStats: the dashboard's points (rates, windowed percentiles, hit rate, per-class SLO attainment)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from rtserve.api.metrics import ServingMetrics
from rtserve.api.web.live_stats import LiveStats, quantile_ms
from rtserve.client.rt_report import RTReport
from rtserve.protocol import EngineStats


@dataclass
class StubEngine:
    stats: EngineStats = field(default_factory=EngineStats)


def make() -> tuple[ServingMetrics, StubEngine, LiveStats]:
    metrics, engine = ServingMetrics("m"), StubEngine()
    return metrics, engine, LiveStats(metrics, engine, window_s=60.0, min_interval_s=0.5)


def test_quantile_interpolates_inside_the_bucket():
    metrics = ServingMetrics("m")
    bounds = metrics.itl.bounds  # 0.01, 0.025, 0.05, ...
    counts = [0] * (len(bounds) + 1)
    counts[1] = 10  # ten gaps in (10 ms, 25 ms]
    assert quantile_ms(metrics.itl, tuple(counts), 0.5) == 17.5
    assert quantile_ms(metrics.itl, tuple(counts), 0.99) == 24.85
    counts[-1] = 990  # most in the +Inf bucket: only the largest finite bound is known
    assert quantile_ms(metrics.itl, tuple(counts), 0.99) == bounds[-1] * 1000
    assert quantile_ms(metrics.itl, (0,) * len(counts), 0.5) is None


def test_first_point_has_no_rates_then_deltas_over_the_window():
    metrics, engine, live = make()
    metrics.ttft.observe(0.5)  # before anyone watched: never in a window
    first = live.sample(now_s=100.0, wall_s=1.0)
    assert first["tokens_per_s"] is None and first["ttft_ms"] == {"p50": None, "p99": None}
    for ttft_s in (0.03, 0.03, 0.03, 0.07):  # (20 ms, 40 ms] x3 and (60 ms, 80 ms]
        metrics.ttft.observe(ttft_s)
    metrics.num_generation_tokens += 40
    engine.stats = EngineStats(num_running=2, num_waiting=1, kv_usage=0.25, prefix_cache_queries=100,
                               prefix_cache_hits=75, num_preemptions=3)
    second = live.sample(now_s=102.0, wall_s=3.0)
    assert second["tokens_per_s"] == 20.0
    assert (second["running"], second["waiting"], second["kv_usage"], second["preemptions"]) == (2, 1, 0.25, 3)
    assert second["ttft_ms"]["p50"] == round(20.0 + 20.0 * (2 / 3), 2)  # rank 2 of the three in (20, 40]
    assert second["ttft_ms"]["p99"] == round(60.0 + 20.0 * 0.96, 2)  # rank 3.96: in (60, 80]
    assert second["prefix_hit_rate"] == 0.75
    # A minute later with nothing new: the observations have left the window.
    engine.stats = EngineStats(prefix_cache_queries=100, prefix_cache_hits=75)
    live.sample(now_s=130.0, wall_s=31.0)
    late = live.sample(now_s=163.0, wall_s=64.0)
    assert late["ttft_ms"] == {"p50": None, "p99": None} and late["prefix_hit_rate"] is None
    assert late["tokens_per_s"] == 0.0
    assert [p["t"] for p in live.points] == [1.0, 3.0, 31.0, 64.0]


def test_slo_attainment_per_class_and_counts_are_json():
    metrics, _, live = make()
    met = RTReport("soft", 1.0, 0.1, None, ttft_s=0.2, e2e_s=1.0)
    missed = RTReport("soft", 1.0, 0.1, None, ttft_s=2.0, e2e_s=3.0, missed=["ttft"])
    dropped = RTReport("firm", 0.3, 0.05, None, missed=["ttft"], dropped=True)
    for report in (met, met, met, missed, dropped):
        metrics.rt.on_finished(report, now_s=10.0)
    metrics.rt.on_rejected("firm", "queue_full")
    metrics.rt.on_rejected("soft", "ttft")
    point = live.sample(now_s=11.0)
    assert point["slo_attainment"] == {"firm": 0.0, "soft": 0.75, "batch": None}
    assert (point["rejections"], point["drops"]) == (2, 1)
    json.loads(json.dumps(point, allow_nan=False))  # no NaN reaches the browser's JSON.parse


def test_latest_shares_one_sample_between_viewers_and_forgets_an_unwatched_past():
    _, _, live = make()
    a = live.latest(now_s=10.0)
    assert live.latest(now_s=10.2) is a
    b = live.latest(now_s=10.6)
    assert b is not a and len(live.points) == 2
    live.latest(now_s=500.0)  # nobody watched for longer than the window
    assert len(live.points) == 1 and live.points[0]["tokens_per_s"] is None
