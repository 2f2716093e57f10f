"""The pieces every /metrics family is built from: a plain histogram the dashboard can also read, and
prometheus_client metric families for counters and gauges (rtserve/api/metrics.py exposes them)."""
from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                  10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
E2E_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                 240.0, 480.0, 960.0, 1920.0, 7680.0)
MODEL_LABEL = ("model_name",)


class Histogram:
    """Cumulative-bucket histogram for one label set (its counts are read by the dashboard too)."""

    def __init__(self, name: str, doc: str, buckets_s: Sequence[float]) -> None:
        self.name, self.doc = name, doc
        self.bounds = tuple(buckets_s)
        self.bucket_counts = [0] * (len(self.bounds) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.bucket_counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def family(self, labelnames: Sequence[str] = MODEL_LABEL) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.doc, labels=list(labelnames))

    def add_to(self, family: HistogramMetricFamily, labelvalues: Sequence[str]) -> HistogramMetricFamily:
        """This histogram's cumulative `le` buckets, count and sum as one label set of `family`."""
        cumulative, buckets = 0, []
        for bound, num in zip((*self.bounds, math.inf), self.bucket_counts):
            cumulative += num
            buckets.append((floatToGoString(bound), cumulative))
        family.add_metric(list(labelvalues), buckets, self.sum)
        return family


def scalar(kind: str, name: str, doc: str, labelnames: Sequence[str],
           samples: Sequence[tuple[Sequence[str], float]]) -> Metric:
    """A counter (`kind="counter"`; `name` with or without `_total`) or a gauge, one sample per label set."""
    family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, doc, labels=list(labelnames))
    for labelvalues, value in samples:
        family.add_metric(list(labelvalues), value)
    return family
