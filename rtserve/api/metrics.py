"""Prometheus text exposition (format 0.0.4) of vLLM-named serving metrics, without prometheus_client.

Latencies are measured here, in the API process, from delta arrival times (`time.monotonic()`); gauges and
prefix-cache counters come from the engine's latest `EngineStats` snapshot. Every series has the label
`model_name`; counters appear on the wire with the `_total` suffix, as prometheus_client writes them.
Per-class real-time series (`rtserve:rt_*`) and the step-time cost model follow (rtserve/api/rt_metrics.py).
"""
from __future__ import annotations

import bisect
import math
import time
from collections.abc import Sequence

from rtserve.client.outputs import RequestOutput
from rtserve.protocol import EngineStats, SpecDecodeStats

TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                  10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
E2E_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                 240.0, 480.0, 960.0, 1920.0, 7680.0)


def fmt_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def fmt_labels(labels: Sequence[tuple[str, str]]) -> str:
    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels) + "}" if labels else ""


class Histogram:
    """Cumulative-bucket histogram for one label set."""

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

    def render(self, labels: list[tuple[str, str]]) -> list[str]:
        lines = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, num in zip((*self.bounds, math.inf), self.bucket_counts):
            cumulative += num
            lines.append(f"{self.name}_bucket{fmt_labels([('le', fmt_value(bound)), *labels])} {cumulative}")
        lines.append(f"{self.name}_count{fmt_labels(labels)} {self.count}")
        lines.append(f"{self.name}_sum{fmt_labels(labels)} {fmt_value(self.sum)}")
        return lines


def render_scalar(kind: str, name: str, doc: str, samples: list[tuple[list[tuple[str, str]], float]]) -> list[str]:
    """A counter (`kind="counter"`, name already ending in `_total`) or a gauge."""
    lines = [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{fmt_labels(labels)} {fmt_value(value)}" for labels, value in samples]
    return lines


def render_spec_decode(spec: SpecDecodeStats, model: list[tuple[str, str]]) -> list[str]:
    """vLLM's speculative decoding counters (acceptance rate = accepted / draft tokens)."""
    lines: list[str] = []
    for name, doc, value in (
        ("vllm:spec_decode_num_drafts_total", "Number of spec decoding drafts.", spec.num_drafts),
        ("vllm:spec_decode_num_draft_tokens_total", "Number of draft tokens.", spec.num_draft_tokens),
        ("vllm:spec_decode_num_accepted_tokens_total", "Number of accepted tokens.", spec.num_accepted_tokens),
    ):
        lines += render_scalar("counter", name, doc, [(model, value)])
    lines += render_scalar("counter", "vllm:spec_decode_num_accepted_tokens_per_pos_total",
                           "Accepted tokens per draft position.",
                           [([*model, ("position", str(pos))], n)
                            for pos, n in enumerate(spec.num_accepted_tokens_per_pos)])
    return lines


class ServingMetrics:
    """All metrics of one served model; `render()` produces the /metrics body."""

    FINISHED_REASONS = ("stop", "length", "abort", "error")

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS_S)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS_S)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of end to end request latency in seconds.", E2E_BUCKETS_S)
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_finished: dict[str, int] = dict.fromkeys(self.FINISHED_REASONS, 0)
        self.num_engine_restarts = 0  # --engine-restart: engine cores started after one died
        from rtserve.api.rt_metrics import RTMetrics  # imports this module's Histogram
        self.rt = RTMetrics(model_name)  # fed by the engine client (AsyncLLM.rt_listener)

    def render(self, stats: EngineStats | None) -> str:
        stats = stats or EngineStats()
        model = [("model_name", self.model_name)]
        lines: list[str] = []
        for kind, name, doc, value in (
            ("gauge", "vllm:num_requests_running", "Number of requests in model execution batches.",
             stats.num_running),
            ("gauge", "vllm:num_requests_waiting", "Number of requests waiting to be processed.", stats.num_waiting),
            ("gauge", "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", stats.kv_usage),
            ("counter", "vllm:prefix_cache_queries_total",
             "Prefix cache queries, in terms of number of queried tokens.", stats.prefix_cache_queries),
            ("counter", "vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens.",
             stats.prefix_cache_hits),
            ("counter", "vllm:num_preemptions_total", "Cumulative number of preemptions.", stats.num_preemptions),
            ("counter", "vllm:prompt_tokens_total", "Number of prefill tokens processed.", self.num_prompt_tokens),
            ("counter", "vllm:generation_tokens_total", "Number of generation tokens processed.",
             self.num_generation_tokens),
        ):
            lines += render_scalar(kind, name, doc, [(model, value)])
        lines += render_scalar("counter", "vllm:request_success_total", "Count of successfully processed requests.",
                               [([*model, ("finished_reason", r)], n) for r, n in self.num_finished.items()])
        if stats.spec_decode is not None:
            lines += render_spec_decode(stats.spec_decode, model)
        for hist in (self.ttft, self.itl, self.e2e):
            lines += hist.render(model)
        from rtserve.api.rt_metrics import render_cost_model
        lines += self.rt.render()
        lines += render_cost_model(self.model_name, stats.queue)
        lines += render_scalar("gauge", "rtserve:step_cost_model_source",
                               "Where the step-time model came from at start: prior, warmup (measured "
                               "before ready) or cache (stored by an earlier start); 1 for the one in use.",
                               [([*model, ("source", stats.cost_model_source)], 1)])
        lines += render_scalar("counter", "rtserve:engine_restarts_total",
                               "Engine core processes started after one died (--engine-restart).",
                               [(model, self.num_engine_restarts)])
        return "\n".join(lines) + "\n"


class RequestTimer:
    """Feeds one engine request's deltas into `ServingMetrics` (TTFT, ITL, E2E, token and finish counts)."""

    def __init__(self, metrics: ServingMetrics, arrival_s: float) -> None:
        self.metrics = metrics
        self.arrival_s = arrival_s
        self.last_token_s: float | None = None
        self.is_finished = False

    def on_output(self, out: RequestOutput, now_s: float | None = None) -> None:
        now_s = time.monotonic() if now_s is None else now_s
        if out.token_ids:
            if self.last_token_s is None:
                self.metrics.ttft.observe(now_s - self.arrival_s)
                self.metrics.num_prompt_tokens += out.num_prompt_tokens
            else:
                self.metrics.itl.observe(now_s - self.last_token_s)
            self.last_token_s = now_s
            self.metrics.num_generation_tokens += len(out.token_ids)
        if out.finished:
            self.finish(out.finish_reason or "stop", now_s)

    def finish(self, reason: str, now_s: float | None = None) -> None:
        """Idempotent; called with "abort" when the client went away before the engine finished."""
        if self.is_finished:
            return
        self.is_finished = True
        now_s = time.monotonic() if now_s is None else now_s
        self.metrics.e2e.observe(now_s - self.arrival_s)
        self.metrics.num_finished[reason] = self.metrics.num_finished.get(reason, 0) + 1
