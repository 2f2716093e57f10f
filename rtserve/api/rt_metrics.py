"""Per-class real-time metrics (firm / soft / batch), rendered beside the vLLM-named serving metrics.

Fed by the engine client (`AsyncLLM.rt_listener`): every finished request's RTReport and every admission
refusal. Exposes, with the label `rt_class`:
- `rtserve:rt_time_to_first_token_seconds`, `rtserve:rt_inter_token_latency_seconds` (histograms)
- `rtserve:rt_deadline_misses_total{kind=ttft|itl|deadline}`, `rtserve:rt_rejections_total{reason}`,
  `rtserve:rt_expirations_total` (dropped for a deadline), `rtserve:rt_preemptions_total`,
  `rtserve:rt_requests_finished_total`
- `rtserve:step_cost_model_*`: the step-time model's coefficients and its prediction error
- `rtserve:rt_slo_attainment` (fraction of requests finished in the last `window_s` that met every
  budget; dropped requests count as misses, refused ones are not counted) and `rtserve:rt_goodput`
  (requests per second in that window that met every budget).
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator

from prometheus_client.core import Metric

from rtserve.api.metric_families import ITL_BUCKETS_S, MODEL_LABEL, TTFT_BUCKETS_S, Histogram, scalar
from rtserve.client.rt_report import RTReport
from rtserve.protocol import QueueSnapshot, RTClass

MISS_KINDS = ("ttft", "itl", "deadline")
REJECT_REASONS = ("ttft", "deadline", "queue_full")


class _ClassMetrics:
    def __init__(self) -> None:
        self.ttft = Histogram("rtserve:rt_time_to_first_token_seconds",
                              "Time to first token per real-time class, in seconds.", TTFT_BUCKETS_S)
        self.itl = Histogram("rtserve:rt_inter_token_latency_seconds",
                             "Gaps between consecutive tokens per real-time class, in seconds.", ITL_BUCKETS_S)
        self.misses = dict.fromkeys(MISS_KINDS, 0)
        self.rejections = dict.fromkeys(REJECT_REASONS, 0)
        self.num_expired = 0
        self.num_preemptions = 0
        self.num_finished = 0
        self.window: deque[tuple[float, bool]] = deque()  # (finish time, met every budget)


class RTMetrics:
    """Counters, histograms and a sliding SLO window per class; `render()` returns exposition lines."""

    def __init__(self, model_name: str, window_s: float = 60.0) -> None:
        self.model_name = model_name
        self.window_s = window_s
        self.classes = {c: _ClassMetrics() for c in RTClass.ALL}

    def on_rejected(self, rt_class: str, reason: str) -> None:
        m = self.classes.get(rt_class)
        if m is not None:
            m.rejections[reason] = m.rejections.get(reason, 0) + 1

    def on_finished(self, report: RTReport, now_s: float | None = None) -> None:
        m = self.classes.get(report.rt_class)
        if m is None:
            return
        now_s = time.monotonic() if now_s is None else now_s
        if report.ttft_s is not None:
            m.ttft.observe(report.ttft_s)
        for gap in report.itl_gaps_s:
            m.itl.observe(gap)
        for kind in report.missed:
            m.misses[kind] += 1
        m.num_expired += report.dropped
        m.num_preemptions += report.num_preemptions
        m.num_finished += 1
        m.window.append((now_s, report.met))
        self._trim(m, now_s)

    def _trim(self, m: _ClassMetrics, now_s: float) -> None:
        while m.window and m.window[0][0] < now_s - self.window_s:
            m.window.popleft()

    def attainment(self, rt_class: str, now_s: float | None = None) -> tuple[float, float]:
        """(SLO attainment in [0, 1] or NaN when nothing finished, goodput in requests/s) over the window."""
        m = self.classes[rt_class]
        self._trim(m, time.monotonic() if now_s is None else now_s)
        num_met = sum(1 for _, met in m.window if met)
        return (num_met / len(m.window) if m.window else float("nan")), num_met / self.window_s

    def families(self, now_s: float | None = None) -> Iterator[Metric]:
        """Every per-class family (prometheus_client), with the labels `model_name` and `rt_class`."""
        names = (*MODEL_LABEL, "rt_class")
        labels = {c: (self.model_name, c) for c in self.classes}
        per_class = {c: self.attainment(c, now_s) for c in self.classes}
        for kind, name, doc, extra, samples in (
            ("counter", "rtserve:rt_deadline_misses_total", "Budgets missed, by kind (ttft, itl, deadline).", ("kind",),
             [((*labels[c], k), n) for c, m in self.classes.items() for k, n in m.misses.items()]),
            ("counter", "rtserve:rt_rejections_total", "Requests refused at admission, by reason.", ("reason",),
             [((*labels[c], r), n) for c, m in self.classes.items() for r, n in m.rejections.items()]),
            ("counter", "rtserve:rt_expirations_total", "Requests dropped because a deadline passed.", (),
             [(labels[c], m.num_expired) for c, m in self.classes.items()]),
            ("counter", "rtserve:rt_preemptions_total", "Preemptions suffered by finished requests.", (),
             [(labels[c], m.num_preemptions) for c, m in self.classes.items()]),
            ("counter", "rtserve:rt_requests_finished_total", "Finished requests (dropped ones included).", (),
             [(labels[c], m.num_finished) for c, m in self.classes.items()]),
            ("gauge", "rtserve:rt_slo_attainment",
             f"Fraction of requests finished in the last {self.window_s:.0f} s that met every budget.", (),
             [(labels[c], per_class[c][0]) for c in self.classes]),
            ("gauge", "rtserve:rt_goodput",
             f"Requests per second, over the last {self.window_s:.0f} s, that met every budget.", (),
             [(labels[c], per_class[c][1]) for c in self.classes]),
        ):
            yield scalar(kind, name, doc, (*names, *extra), samples)
        for attr in ("ttft", "itl"):  # one family per metric, a label set per class
            family = getattr(next(iter(self.classes.values())), attr).family(names)
            for c, m in self.classes.items():
                getattr(m, attr).add_to(family, labels[c])
            yield family


def cost_model_families(model_name: str, snap: QueueSnapshot | None) -> Iterator[Metric]:
    """Gauges of the engine's step-time cost model (from the latest queue snapshot)."""
    if snap is None:
        return
    model = (model_name,)
    names = ("intercept_seconds", "per_decode_seconds", "per_prefill_token_seconds", "per_kilo_context_seconds")
    yield scalar("gauge", "rtserve:step_cost_model_coefficient", "Step-time model: step_s = sum(coefficient * feature).",
                 (*MODEL_LABEL, "term"), [((*model, n), c) for n, c in zip(names, snap.cost_coeffs)])
    for name, doc, value in (
        ("rtserve:step_cost_model_mean_abs_error_seconds", "EWMA of |measured - predicted| step time.",
         snap.cost_mean_abs_error_s),
        ("rtserve:step_cost_model_mean_rel_error", "EWMA of |measured - predicted| / measured step time.",
         snap.cost_mean_rel_error),
        ("rtserve:step_cost_model_calibrated", "1 once enough steps were measured to trust predictions.",
         float(snap.cost_calibrated)),
        ("rtserve:prefill_token_budget", "Prefill tokens the policy lets into the next step.",
         snap.prefill_token_budget),
    ):
        yield scalar("gauge", name, doc, MODEL_LABEL, [(model, value)])
