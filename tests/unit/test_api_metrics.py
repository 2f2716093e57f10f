"""rtserve.api.metrics: Prometheus text exposition with vLLM names, and what /metrics reports.

prometheus_client writes the labels of a sample in name order."""
from __future__ import annotations

import math
import re

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rtserve.api.metric_families import Histogram, scalar
from rtserve.api.metrics import RequestTimer, ServingMetrics
from rtserve.client.outputs import RequestOutput
from rtserve.protocol import EngineStats
from tests.integration.fake_engine import FakeEngine, asgi_client, build_test_app

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_]+="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')


def parse(text: str) -> dict[str, float]:
    """{'name{labels}': value}; asserts every line is a valid HELP/TYPE/sample line."""
    assert text.endswith("\n")
    out = {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        m = SAMPLE.match(line)
        assert m, line
        out[line.rsplit(" ", 1)[0]] = float(m.group(4))
    return out


class _Families:
    def __init__(self, *families):
        self.families = families

    def collect(self):
        return self.families


def exposition(*families) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(*families))
    return generate_latest(registry).decode()


def test_histogram_buckets_are_cumulative_le():
    h = Histogram("x_seconds", "doc", (0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0):
        h.observe(v)
    assert exposition(h.add_to(h.family(), ["m"])).splitlines() == [
        "# HELP x_seconds doc", "# TYPE x_seconds histogram",
        'x_seconds_bucket{le="0.1",model_name="m"} 2.0', 'x_seconds_bucket{le="1.0",model_name="m"} 3.0',
        'x_seconds_bucket{le="+Inf",model_name="m"} 4.0', 'x_seconds_count{model_name="m"} 4.0',
        'x_seconds_sum{model_name="m"} 2.65']


def test_label_escaping_and_values():
    text = exposition(scalar("gauge", "g", "doc", ("a",), [(('q"\\\n',), math.inf)]),
                      scalar("counter", "c_total", "doc", ("a",), [(("x",), 3)]))
    assert 'g{a="q\\"\\\\\\n"} +Inf' in text and 'c_total{a="x"} 3.0' in text
    parsed = {f.name: f.samples[0] for f in text_string_to_metric_families(text)}
    assert parsed["g"].labels == {"a": 'q"\\\n'} and parsed["c"].value == 3


def test_render_has_vllm_names_types_and_labels():
    m = ServingMetrics("my-model")
    text = m.render(EngineStats(num_running=2, num_waiting=3, kv_usage=0.25, prefix_cache_queries=100,
                                prefix_cache_hits=40))
    for name, kind in [("vllm:time_to_first_token_seconds", "histogram"),
                       ("vllm:inter_token_latency_seconds", "histogram"),
                       ("vllm:e2e_request_latency_seconds", "histogram"),
                       ("vllm:num_requests_running", "gauge"), ("vllm:num_requests_waiting", "gauge"),
                       ("vllm:kv_cache_usage_perc", "gauge"), ("vllm:prefix_cache_queries_total", "counter"),
                       ("vllm:prefix_cache_hits_total", "counter"), ("vllm:prompt_tokens_total", "counter"),
                       ("vllm:generation_tokens_total", "counter"), ("vllm:request_success_total", "counter")]:
        assert f"# TYPE {name} {kind}\n" in text
    values = parse(text)
    assert values['vllm:num_requests_running{model_name="my-model"}'] == 2
    assert values['vllm:num_requests_waiting{model_name="my-model"}'] == 3
    assert values['vllm:kv_cache_usage_perc{model_name="my-model"}'] == 0.25
    assert values['vllm:prefix_cache_hits_total{model_name="my-model"}'] == 40
    assert values['vllm:request_success_total{finished_reason="stop",model_name="my-model"}'] == 0
    assert sum(1 for k in values if k.startswith("vllm:time_to_first_token_seconds_bucket")) == 23


def out(n_tokens: int, finished: bool = False, reason: str | None = None) -> RequestOutput:
    return RequestOutput("r", text="x", token_ids=[1] * n_tokens, finished=finished, finish_reason=reason,
                         num_prompt_tokens=10, num_output_tokens=n_tokens)


def test_request_timer_ttft_itl_e2e_and_counts():
    m = ServingMetrics("m")
    t = RequestTimer(m, arrival_s=100.0)
    t.on_output(out(1), now_s=100.5)
    t.on_output(out(1), now_s=100.6)
    t.on_output(out(2, True, "length"), now_s=100.8)
    assert (m.ttft.count, m.ttft.sum) == (1, 0.5)
    assert m.itl.count == 2 and abs(m.itl.sum - 0.3) < 1e-9
    assert m.e2e.count == 1 and abs(m.e2e.sum - 0.8) < 1e-9
    assert (m.num_prompt_tokens, m.num_generation_tokens, m.num_finished["length"]) == (10, 4, 1)
    t.finish("abort")  # idempotent once finished
    assert m.num_finished["abort"] == 0 and m.e2e.count == 1


async def test_metrics_endpoint_after_requests():
    app, engine = build_test_app(FakeEngine(max_running=3))
    async with asgi_client(app) as c:
        await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 40})
        r = await c.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = parse(r.text)
    label = '{model_name="fake-model"}'
    assert values[f"vllm:generation_tokens_total{label}"] == 4 + len(engine.reply)
    assert values['vllm:request_success_total{finished_reason="length",model_name="fake-model"}'] == 1
    assert values['vllm:request_success_total{finished_reason="stop",model_name="fake-model"}'] == 1
    assert values[f"vllm:time_to_first_token_seconds_count{label}"] == 2
    assert values[f"vllm:inter_token_latency_seconds_count{label}"] == 3 + len(engine.reply) - 1
    assert values[f"vllm:e2e_request_latency_seconds_count{label}"] == 2
    buckets = [v for k, v in values.items() if k.startswith("vllm:e2e_request_latency_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == 2
    assert values[f"vllm:num_requests_running{label}"] == 0
