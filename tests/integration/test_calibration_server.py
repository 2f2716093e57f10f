"""A real `rtserve serve`, started twice on one calibration cache: the first start measures the
step-time model on warm-up steps before it reports ready, the second loads it from the cache (and
checks it with a few steps, and it holds the steps the first server served: it was stored again at
shutdown); on both, the first request is planned with a calibrated model.

The cache is a temporary directory (`--rt-calibration-cache-dir`), so nothing touches ~/.cache.
"""
from __future__ import annotations

import concurrent.futures
import json
import re
import time

import httpx
import pytest

try:
    from tests.integration.fake_engine import ServerProcess
except ImportError:  # tests/integration not importable as a package
    from fake_engine import ServerProcess

pytestmark = pytest.mark.slow

def cost_model_gauges(server) -> dict[str, float]:
    """`rtserve:step_cost_model_*` series by name (the source's label folded into the name)."""
    out = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("rtserve:step_cost_model_source{"):
            out["source=" + line.split('source="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("rtserve:step_cost_model_calibrated{"):
            out["calibrated"] = float(line.rsplit(" ", 1)[1])
    return out


def first_request(server, step_log) -> list[dict]:
    """A ~600-token prompt on the idle server; the engine's steps for it (RTSERVE_STEP_LOG)."""
    prompt = "Summarize the following. " + "The quick brown fox jumps over the lazy dog. " * 60
    r = httpx.post(server.url + "/v1/completions", timeout=120, json={
        "model": httpx.get(server.url + "/v1/models").json()["data"][0]["id"], "prompt": prompt,
        "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 512
    with open(step_log) as f:
        return [json.loads(line) for line in f]


def test_deadline_policy_calibrated_with_several_sequences_answers_as_alone(tmp_path, monkeypatch):
    """The deadline policy end to end with a calibrated model and several sequences: greedy answers
    to prompts sent together (soft streams, one prompt long enough to be prefilled beside the others'
    decodes) equal those to the same prompts sent one at a time. The fp32 reference path, whose
    batched and single-row arithmetic agree (the quantized fast path may part at a near tie)."""
    step_log = tmp_path / "steps.jsonl"
    monkeypatch.setenv("RTSERVE_STEP_LOG", str(step_log))
    with ServerProcess("--quantization", "none", "--rt-calibration-cache-dir", str(tmp_path / "calibration"),
                       "--rt-calibration-budget-s", "8") as server:
        assert cost_model_gauges(server)["calibrated"] == 1.0
        _concurrent_equals_alone(server, step_log)


def _concurrent_equals_alone(server, step_log) -> None:
    model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
    prompts = ["Name three colours.", "Count from one to five.", "What is the capital of France?",
               "Summarize: " + "Rivers carry water from the hills to the sea. " * 40]

    def ask(client, prompt):
        return client.post(server.url + "/v1/completions", timeout=180, json={
            "model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "rt": {"class": "soft"}})

    with httpx.Client() as client:
        alone = [ask(client, p).json()["choices"][0]["text"] for p in prompts]
    open(step_log, "w").close()
    with httpx.Client() as client, concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = [r.json()["choices"][0]["text"] for r in pool.map(lambda p: ask(client, p), prompts)]
    assert together == alone
    with open(step_log) as f:
        steps = [json.loads(line) for line in f]
    assert max(s["decodes"] + (s["prefill_tokens"] > 0) for s in steps) > 1  # sequences shared steps


def test_second_start_loads_the_calibrated_model_from_cache(tmp_path, monkeypatch):
    cache_dir = tmp_path / "calibration"
    # 8 s: enough warm-up steps to calibrate (8) even on a contended 2-core machine.
    args = ("--rt-calibration-cache-dir", str(cache_dir), "--rt-calibration-budget-s", "8")
    starts, logs = [], []
    for name in ("first", "second"):
        step_log = tmp_path / f"{name}.steps.jsonl"
        monkeypatch.setenv("RTSERVE_STEP_LOG", str(step_log))
        t0 = time.monotonic()
        with ServerProcess(*args) as server:
            starts.append(time.monotonic() - t0)
            gauges = cost_model_gauges(server)  # the engine's stats from before any request
            assert gauges == {"calibrated": 1.0, f"source={'warmup' if name == 'first' else 'cache'}": 1.0}
            steps = first_request(server, step_log)
            logs.append(server.log_text())
        assert steps[0]["calibrated"] and steps[0]["prefill_tokens"] > 0  # the request's first step
    num_measured = int(re.search(r"cost model: calibrated in (\d+) steps", logs[0]).group(1))
    num_stored = int(re.search(r"calibrated from cache .* \((\d+) steps stored", logs[1]).group(1))
    assert num_stored > num_measured  # stored again at shutdown, with the first request's steps
    assert len(list(cache_dir.iterdir())) == 1
    print(f"start-up with warm-up {starts[0]:.1f} s, from cache {starts[1]:.1f} s")
