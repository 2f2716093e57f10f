"""Per-request real-time accounting in the engine client: what the final `rt` object reports.

Times are taken when a delta reaches the client (API process), the nearest point to what the user sees.
A budget is missed when: ttft — the first token came later than `ttft_s` after arrival (or never came
because the request was dropped for it); itl — some gap between consecutive tokens exceeded `itl_s` (or
the request was stopped because its next token could not come in time); deadline — the last token came
later than `deadline_s` after arrival (or the request was stopped for it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from rtserve.protocol import FinishReason, RTParams


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(math.ceil(q / 100.0 * len(sorted_values)), 1)
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class RTReport:
    """The `rt` object of a finished request (seconds; the API edge writes milliseconds)."""

    rt_class: str
    ttft_budget_s: float | None
    itl_budget_s: float | None
    deadline_budget_s: float | None
    ttft_s: float | None = None
    itl_p50_s: float | None = None
    itl_p99_s: float | None = None
    itl_max_s: float | None = None
    e2e_s: float = 0.0
    num_tokens: int = 0
    num_itl_misses: int = 0
    num_preemptions: int = 0
    missed: list[str] = field(default_factory=list)  # subset of ["ttft", "itl", "deadline"], in that order
    dropped: bool = False  # stopped by the engine for a deadline (FinishReason.DEADLINE)
    itl_gaps_s: list[float] = field(default_factory=list, repr=False)  # for histograms; not on the wire

    @property
    def met(self) -> bool:
        return not self.missed

    def to_wire(self) -> dict:
        """JSON object for the final chunk / response body (milliseconds, rounded to 0.01 ms)."""
        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000.0, 2)
        return {
            "class": self.rt_class,
            "budget": {"ttft_ms": ms(self.ttft_budget_s), "itl_ms": ms(self.itl_budget_s),
                       "deadline_ms": ms(self.deadline_budget_s)},
            "ttft_ms": ms(self.ttft_s), "itl_ms": {"p50": ms(self.itl_p50_s), "p99": ms(self.itl_p99_s),
                                                   "max": ms(self.itl_max_s)},
            "e2e_ms": ms(self.e2e_s), "itl_misses": self.num_itl_misses, "preemptions": self.num_preemptions,
            "deadline_met": self.met, "missed": list(self.missed), "dropped": self.dropped,
        }


class RTTracker:
    """Token arrival times of one request; `finish()` turns them into an RTReport."""

    def __init__(self, rt: RTParams, arrival_s: float) -> None:
        self.rt = rt
        self.arrival_s = arrival_s
        self.first_token_s: float | None = None
        self.last_token_s: float | None = None
        self.gaps_s: list[float] = []
        self.num_tokens = 0

    def on_tokens(self, num_tokens: int, now_s: float) -> None:
        if num_tokens <= 0:
            return
        if self.first_token_s is None:
            self.first_token_s = now_s
        else:
            self.gaps_s.append(now_s - self.last_token_s)
        self.last_token_s = now_s
        self.num_tokens += num_tokens

    def finish(self, now_s: float, finish_reason: str | None, num_preemptions: int = 0,
               error: str | None = None) -> RTReport:
        """`error`: the engine's reason when it dropped the request (tells an ITL drop from a deadline_ms one)."""
        rt, gaps = self.rt, sorted(self.gaps_s)
        ttft = None if self.first_token_s is None else self.first_token_s - self.arrival_s
        end = self.last_token_s if self.last_token_s is not None else now_s
        report = RTReport(rt.rt_class, rt.ttft_s, rt.itl_s, rt.deadline_s, ttft_s=ttft,
                          itl_p50_s=percentile(gaps, 50), itl_p99_s=percentile(gaps, 99),
                          itl_max_s=gaps[-1] if gaps else None, e2e_s=end - self.arrival_s,
                          num_tokens=self.num_tokens, num_preemptions=num_preemptions,
                          dropped=finish_reason == FinishReason.DEADLINE, itl_gaps_s=self.gaps_s)
        report.num_itl_misses = 0 if rt.itl_s is None else sum(1 for g in gaps if g > rt.itl_s)
        if rt.ttft_s is not None and (ttft is None and report.dropped or ttft is not None and ttft > rt.ttft_s):
            report.missed.append("ttft")
        stopped_for = None  # which budget a mid-stream drop was for: its next token could not be on time
        if report.dropped and ttft is not None:
            by_itl = rt.deadline_s is None or (error is not None and "itl budget" in error)
            stopped_for = "itl" if by_itl else "deadline"
        if report.num_itl_misses or stopped_for == "itl":
            report.missed.append("itl")
        if rt.deadline_s is not None and (report.e2e_s > rt.deadline_s or stopped_for == "deadline"):
            report.missed.append("deadline")
        return report
