"""/metrics: vLLM-named serving metrics and rtserve's own, exposed through prometheus_client.

Latencies are measured here, in the API process, from delta arrival times (`time.monotonic()`); gauges and
prefix-cache counters come from the engine's latest `EngineStats` snapshot. The state lives in plain
objects (`Histogram`, counters) that the dashboard also reads; at each scrape `ServingMetrics.collect`
turns it into prometheus_client metric families (a custom collector, so engine-side values are read
when scraped, not copied on every step), and prometheus_client writes the text format beside its own
process, platform and GC metrics. Every rtserve series has the label `model_name`; counters appear
with the `_total` suffix. Per-class real-time series (`rtserve:rt_*`) and the step-time cost model
follow (rtserve/api/rt_metrics.py).
"""
from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import Metric

from rtserve.api.metric_families import (E2E_BUCKETS_S, ITL_BUCKETS_S, MODEL_LABEL, TTFT_BUCKETS_S, Histogram,
                                         scalar)
from rtserve.api.rt_metrics import RTMetrics, cost_model_families
from rtserve.client.outputs import RequestOutput
from rtserve.protocol import EngineStats, SpecDecodeStats

def spec_decode_families(spec: SpecDecodeStats, model_name: str) -> Iterator[Metric]:
    """vLLM's speculative decoding counters (acceptance rate = accepted / draft tokens)."""
    for name, doc, value in (
        ("vllm:spec_decode_num_drafts_total", "Number of spec decoding drafts.", spec.num_drafts),
        ("vllm:spec_decode_num_draft_tokens_total", "Number of draft tokens.", spec.num_draft_tokens),
        ("vllm:spec_decode_num_accepted_tokens_total", "Number of accepted tokens.", spec.num_accepted_tokens),
    ):
        yield scalar("counter", name, doc, MODEL_LABEL, [((model_name,), value)])
    yield scalar("counter", "vllm:spec_decode_num_accepted_tokens_per_pos_total", "Accepted tokens per draft position.",
                 (*MODEL_LABEL, "position"),
                 [((model_name, str(pos)), n) for pos, n in enumerate(spec.num_accepted_tokens_per_pos)])


class ServingMetrics:
    """All metrics of one served model; `render()` produces the /metrics body.

    Its own prometheus_client registry (one per app: tests build many) holds this object as a custom
    collector and the standard process, platform and GC collectors."""

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
        self.rt = RTMetrics(model_name)  # fed by the engine client (AsyncLLM.rt_listener)
        self._stats = EngineStats()  # the engine's snapshot at the scrape in progress
        self.registry = CollectorRegistry(auto_describe=False)
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self.registry.register(self)

    def render(self, stats: EngineStats | None) -> str:
        self._stats = stats or EngineStats()
        return generate_latest(self.registry).decode()

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's collector interface: every rtserve family, from the current state."""
        stats, model = self._stats, (self.model_name,)
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
            yield scalar(kind, name, doc, MODEL_LABEL, [(model, value)])
        yield scalar("counter", "vllm:request_success_total", "Count of successfully processed requests.",
                     (*MODEL_LABEL, "finished_reason"), [((*model, r), n) for r, n in self.num_finished.items()])
        if stats.spec_decode is not None:
            yield from spec_decode_families(stats.spec_decode, self.model_name)
        for hist in (self.ttft, self.itl, self.e2e):
            yield hist.add_to(hist.family(), model)
        yield from self.rt.families()
        yield from cost_model_families(self.model_name, stats.queue)
        yield scalar("gauge", "rtserve:step_cost_model_source",
                     "Where the step-time model came from at start: prior, warmup (measured before ready) or "
                     "cache (stored by an earlier start); 1 for the one in use.",
                     (*MODEL_LABEL, "source"), [((*model, stats.cost_model_source), 1)])
        yield scalar("counter", "rtserve:engine_restarts_total",
                     "Engine core processes started after one died (--engine-restart).", MODEL_LABEL,
                     [(model, self.num_engine_restarts)])


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
