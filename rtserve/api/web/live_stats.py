"""Live serving stats for the dashboard: one JSON point per sample, over a sliding window.

A point is taken from what the API process already keeps: the serving histograms and counters
(ServingMetrics), the per-class real-time metrics (RTMetrics) and the engine's latest EngineStats.
Rates (tokens/s) are over the time since the previous sample; percentiles and the prefix-cache hit rate
are over the last `window_s`, from the difference of two cumulative snapshots (the stats are sampled
only while someone watches: right after the first viewer connects the window is shorter, and the very
first point has none). Percentiles are read off
the histogram buckets by linear interpolation inside the bucket (as Prometheus' histogram_quantile
does), so they are estimates with the buckets' resolution. All times on the wire are milliseconds; the
point's `t` is wall-clock Unix seconds (for plot axes only).
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from rtserve.api.metric_families import Histogram
from rtserve.api.metrics import ServingMetrics
from rtserve.protocol import EngineStats, RTClass


@dataclass(frozen=True)
class Totals:
    """Cumulative counters at one instant (monotonic seconds)."""

    now_s: float
    ttft_counts: tuple[int, ...]
    itl_counts: tuple[int, ...]
    num_generation_tokens: int
    num_prefix_queries: int
    num_prefix_hits: int


def quantile_ms(hist: Histogram, counts: tuple[int, ...], q: float) -> float | None:
    """Estimated q-quantile (0..1) in ms of the observations counted per bucket; None when there are none."""
    total = sum(counts)
    if total == 0:
        return None
    rank, cumulative = q * total, 0
    for i, num in enumerate(counts):
        if num and cumulative + num >= rank:
            if i == len(hist.bounds):  # the +Inf bucket: the largest finite bound is all we know
                return round(hist.bounds[-1] * 1000.0, 2)
            lower = hist.bounds[i - 1] if i > 0 else 0.0
            upper = hist.bounds[i]
            return round((lower + (upper - lower) * (rank - cumulative) / num) * 1000.0, 2)
        cumulative += num
    return round(hist.bounds[-1] * 1000.0, 2)


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) or math.isinf(value) else value


class LiveStats:
    """Takes points on demand (at most one per `min_interval_s`) and keeps the recent ones for new viewers.

    One instance serves every dashboard of an app, so several viewers do not multiply the sampling.
    """

    def __init__(self, metrics: ServingMetrics, engine: Any, window_s: float = 60.0, num_points_kept: int = 120,
                 min_interval_s: float = 0.5) -> None:
        self.metrics = metrics
        self.engine = engine
        self.window_s = window_s
        self.min_interval_s = min_interval_s
        self.points: deque[dict[str, Any]] = deque(maxlen=num_points_kept)
        self._totals: deque[Totals] = deque()  # oldest first; the first one is at or before the window start

    def _take_totals(self, now_s: float, stats: EngineStats) -> Totals:
        m = self.metrics
        return Totals(now_s, tuple(m.ttft.bucket_counts), tuple(m.itl.bucket_counts), m.num_generation_tokens,
                      stats.prefix_cache_queries, stats.prefix_cache_hits)

    def latest(self, now_s: float | None = None) -> dict[str, Any]:
        """The newest point, taking a new one when the last is older than `min_interval_s`."""
        now_s = time.monotonic() if now_s is None else now_s
        if self._totals and now_s - self._totals[-1].now_s < self.min_interval_s and self.points:
            return self.points[-1]
        return self.sample(now_s)

    def sample(self, now_s: float | None = None, wall_s: float | None = None) -> dict[str, Any]:
        """Take a point now (also kept in `points`)."""
        now_s = time.monotonic() if now_s is None else now_s
        stats = getattr(self.engine, "stats", None) or EngineStats()
        totals = self._take_totals(now_s, stats)
        if self._totals and now_s - self._totals[-1].now_s > self.window_s:  # nobody watched for a while
            self._totals.clear()
            self.points.clear()
        previous = self._totals[-1] if self._totals else None
        self._totals.append(totals)
        while len(self._totals) > 2 and self._totals[1].now_s <= now_s - self.window_s:
            self._totals.popleft()
        base = self._totals[0]
        point = {"t": round(time.time() if wall_s is None else wall_s, 3),
                 "running": stats.num_running, "waiting": stats.num_waiting, "kv_usage": round(stats.kv_usage, 4),
                 "tokens_per_s": self._rate(previous, totals), "window_s": self.window_s,
                 **self._window(base, totals), **self._rt_counts(now_s)}
        self.points.append(point)
        return point

    @staticmethod
    def _rate(previous: Totals | None, totals: Totals) -> float | None:
        if previous is None or totals.now_s <= previous.now_s:
            return None
        tokens = totals.num_generation_tokens - previous.num_generation_tokens
        return round(tokens / (totals.now_s - previous.now_s), 2)

    def _window(self, base: Totals, totals: Totals) -> dict[str, Any]:
        """Percentiles and hit rate of what happened between two snapshots (all None for a single one)."""
        def delta(new: tuple[int, ...], old: tuple[int, ...]) -> tuple[int, ...]:
            return tuple(a - b for a, b in zip(new, old))
        ttft = delta(totals.ttft_counts, base.ttft_counts)
        itl = delta(totals.itl_counts, base.itl_counts)
        num_queries = totals.num_prefix_queries - base.num_prefix_queries
        num_hits = totals.num_prefix_hits - base.num_prefix_hits
        m = self.metrics
        return {"ttft_ms": {"p50": quantile_ms(m.ttft, ttft, 0.5), "p99": quantile_ms(m.ttft, ttft, 0.99)},
                "itl_ms": {"p50": quantile_ms(m.itl, itl, 0.5), "p99": quantile_ms(m.itl, itl, 0.99)},
                "prefix_hit_rate": round(num_hits / num_queries, 4) if num_queries > 0 else None}

    def _rt_counts(self, now_s: float) -> dict[str, Any]:
        """Per-class SLO attainment over RTMetrics' window, and cumulative rejections, drops, preemptions."""
        rt = self.metrics.rt
        slo = {c: _finite(rt.attainment(c, now_s)[0]) for c in RTClass.ALL}
        return {"slo_attainment": {c: None if v is None else round(v, 4) for c, v in slo.items()},
                "rejections": sum(sum(m.rejections.values()) for m in rt.classes.values()),
                "drops": sum(m.num_expired for m in rt.classes.values()),
                "preemptions": (getattr(self.engine, "stats", None) or EngineStats()).num_preemptions}
