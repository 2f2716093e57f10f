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

from rtserve.api.metrics import ITL_BUCKETS_S, TTFT_BUCKETS_S, Histogram, render_scalar
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

    def render(self, now_s: float | None = None) -> list[str]:
        lines: list[str] = []
        base = [("model_name", self.model_name)]
        labels = {c: [*base, ("rt_class", c)] for c in self.classes}
        per_class = {c: self.attainment(c, now_s) for c in self.classes}
        for kind, name, doc, samples in (
            ("counter", "rtserve:rt_deadline_misses_total", "Budgets missed, by kind (ttft, itl, deadline).",
             [([*labels[c], ("kind", k)], n) for c, m in self.classes.items() for k, n in m.misses.items()]),
            ("counter", "rtserve:rt_rejections_total", "Requests refused at admission, by reason.",
             [([*labels[c], ("reason", r)], n) for c, m in self.classes.items() for r, n in m.rejections.items()]),
            ("counter", "rtserve:rt_expirations_total", "Requests dropped because a deadline passed.",
             [(labels[c], m.num_expired) for c, m in self.classes.items()]),
            ("counter", "rtserve:rt_preemptions_total", "Preemptions suffered by finished requests.",
             [(labels[c], m.num_preemptions) for c, m in self.classes.items()]),
            ("counter", "rtserve:rt_requests_finished_total", "Finished requests (dropped ones included).",
             [(labels[c], m.num_finished) for c, m in self.classes.items()]),
            ("gauge", "rtserve:rt_slo_attainment",
             f"Fraction of requests finished in the last {self.window_s:.0f} s that met every budget.",
             [(labels[c], per_class[c][0]) for c in self.classes]),
            ("gauge", "rtserve:rt_goodput",
             f"Requests per second, over the last {self.window_s:.0f} s, that met every budget.",
             [(labels[c], per_class[c][1]) for c in self.classes]),
        ):
            lines += [line[:-3] + "NaN" if line.endswith(" nan") else line
                      for line in render_scalar(kind, name, doc, samples)]
        for attr in ("ttft", "itl"):
            hists = [(getattr(m, attr), labels[c]) for c, m in self.classes.items()]
            head = hists[0][0].render(hists[0][1])
            lines += head
            for hist, lab in hists[1:]:
                lines += hist.render(lab)[2:]  # one HELP/TYPE header per metric family
        return lines


def render_cost_model(model_name: str, snap: QueueSnapshot | None) -> list[str]:
    """Gauges of the engine's step-time cost model (from the latest queue snapshot)."""
    if snap is None:
        return []
    base = [("model_name", model_name)]
    names = ("intercept_seconds", "per_decode_seconds", "per_prefill_token_seconds", "per_kilo_context_seconds")
    lines = render_scalar("gauge", "rtserve:step_cost_model_coefficient",
                          "Step-time model: step_s = sum(coefficient * feature).",
                          [([*base, ("term", n)], c) for n, c in zip(names, snap.cost_coeffs)])
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
        lines += render_scalar("gauge", name, doc, [(base, value)])
    return lines
