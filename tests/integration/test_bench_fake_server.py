"""`rtserve bench` end to end against a tiny fake OpenAI-compatible streaming server.

The fake server (Starlette + uvicorn in a background thread) numbers requests as they arrive:
every 4th (n % 4 == 3) gets 429 + Retry-After: 2, n % 8 == 5 fails mid-stream after two chunks,
the rest stream `max_tokens` chunks (first after FIRST_S, then GAP_S apart) and a usage chunk.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from rtserve.bench.cli import main

FIRST_S = 0.03
GAP_S = 0.01


class FakeServer:
    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.num_in_flight = 0
        self.peak_in_flight = 0
        self.app = Starlette(routes=[
            Route("/v1/models", self.models),
            Route("/v1/chat/completions", self.complete, methods=["POST"]),
            Route("/v1/completions", self.complete, methods=["POST"]),
        ])

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake-org"}]})

    async def complete(self, request: Request):
        body = await request.json()
        n = len(self.bodies)
        self.bodies.append(body)
        if n % 4 == 3:
            return JSONResponse({"error": {"message": "overloaded", "type": "rate_limit_error",
                                           "param": None, "code": "rate_limit_exceeded"}},
                                status_code=429, headers={"Retry-After": "2"})
        return StreamingResponse(self.stream(body, fail=n % 8 == 5), media_type="text/event-stream")

    async def stream(self, body: dict, fail: bool):
        self.num_in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.num_in_flight)
        try:
            is_chat = "messages" in body
            await asyncio.sleep(FIRST_S)
            for i in range(body["max_tokens"]):
                if i:
                    await asyncio.sleep(GAP_S)
                if fail and i == 2:
                    yield 'data: {"error": {"message": "boom", "type": "server_error"}}\n\ndata: [DONE]\n\n'
                    return
                choice = {"index": 0, "delta": {"content": f"t{i} "}} if is_chat else {"index": 0, "text": f"t{i} "}
                yield f"data: {json.dumps({'choices': [choice], 'usage': None})}\n\n"
                if i == 0:
                    yield ": keep-alive\n\n"
            if not body.get("fake_no_usage"):
                final = {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": body["max_tokens"],
                                                  "total_tokens": 11 + body["max_tokens"]}}
                if "rt" in body:
                    final["rt"] = {"class": body["rt"]["class"], "ttft_met": True}
                yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.num_in_flight -= 1


@pytest.fixture
def fake():
    server = FakeServer()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(server.app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    server.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield server
    uv.should_exit = True
    thread.join(timeout=5)
    sock.close()


def _run(fake: FakeServer, tmp_path, *flags: str, expected_rc: int = 0) -> dict:
    rc = main(["--base-url", fake.url, "--no-progress", "--result-dir", str(tmp_path), *flags])
    assert rc == expected_rc
    return json.loads((tmp_path / "results.json").read_text())


def test_chat_run_counts_timings_and_plots(fake, tmp_path):
    doc = _run(fake, tmp_path, "--num-requests", "16", "--output-len", "5", "--input-len", "20",
               "--goodput", "ttft:2000", "tpot:1000")
    phase = doc["phases"][0]
    m = phase["metrics"]
    assert (m["num_requests"], m["num_completed"], m["num_rejected"], m["num_errors"]) == (16, 10, 4, 2)
    assert m["slo"]["num_good"] == 10 and m["slo"]["attainment"] == pytest.approx(10 / 16)
    assert m["total_output_tokens"] == 50 and m["total_input_tokens"] == 110
    ok = [r for r in phase["requests"] if r["status"] == "ok"]
    for r in ok:
        assert r["output_tokens"] == 5 and r["output_tokens_from_usage"]
        assert len(r["chunk_times_s"]) == 5 and r["ttft_s"] >= FIRST_S * 0.9
        assert r["send_s"] >= 0 and r["rt_class"] == "default" and r["server_rt"] is None
    rejected = [r for r in phase["requests"] if r["status"] == "rejected"]
    assert all(r["http_status"] == 429 and r["retry_after_s"] == 2.0 for r in rejected)
    errors = [r for r in phase["requests"] if r["status"] == "error"]
    assert all("boom" in r["error"] for r in errors)
    assert GAP_S * 0.8 <= m["itl"]["p50_ms"] / 1000 <= GAP_S + 0.04
    assert m["tpot"]["count"] == 10 and m["ttft"]["count"] == 10
    assert doc["config"]["workload"] == "synthetic" and doc["command_line"].startswith("rtserve bench")
    assert doc["target"] == {"url": fake.url + "/v1/chat/completions", "model": "fake-model",
                             "owned_by": "fake-org", "rt_extension": False}
    body = fake.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "fake-model" and body["max_tokens"] == 5 and "rt" not in body
    for name in ("ttft_cdf.png", "itl_cdf.png", "timeline.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_completions_without_usage_counts_chunks(fake, tmp_path):
    doc = _run(fake, tmp_path, "--endpoint", "completions", "--num-requests", "3", "--output-len", "4",
               "--extra-body", '{"fake_no_usage": true}', "--ignore-eos", "--no-plots")
    ok = [r for r in doc["phases"][0]["requests"] if r["status"] == "ok"]
    assert len(ok) == 3
    assert all(r["output_tokens"] == 4 and not r["output_tokens_from_usage"] for r in ok)
    assert "prompt" in fake.bodies[0] and fake.bodies[0]["ignore_eos"] is True


def test_realtime_mix_sweep_with_rt_extension(fake, tmp_path):
    doc = _run(fake, tmp_path, "--workload", "realtime-mix", "--rt-extension", "on", "--sweep-rates",
               "100,200", "--num-requests", "8", "--output-len", "3", "--long-input-len", "40",
               "--long-output-len", "3", "--goodput", "ttft:2000")
    assert [p["rate_per_s"] for p in doc["phases"]] == [100.0, 200.0]
    rts = [b["rt"] for b in fake.bodies]
    assert len(rts) == 16 and {rt["class"] for rt in rts} <= {"firm", "soft", "batch"}
    assert all(rt["ttft_ms"] == 500 and rt["itl_ms"] == 50 for rt in rts if rt["class"] != "batch")
    requests = doc["phases"][0]["requests"]
    assert all(r["server_rt"]["class"] == r["rt_class"] for r in requests if r["status"] == "ok")
    per_class = doc["phases"][0]["metrics"]["per_class"]
    assert sum(c["num_requests"] for c in per_class.values()) == 8
    assert all(c["budget"] is not None for c in per_class.values())
    assert (tmp_path / "attainment_vs_rate.png").exists()


def test_duration_limit_cancels_in_flight(fake, tmp_path):
    started = time.perf_counter()
    doc = _run(fake, tmp_path, "--num-requests", "8", "--output-len", "300", "--duration-s", "0.5",
               "--no-plots", expected_rc=1)  # 1: nothing completed
    assert time.perf_counter() - started < 2.0  # the streams would take 3 s
    m = doc["phases"][0]["metrics"]
    assert (m["num_requests"], m["num_rejected"], m["num_errors"], m["num_cancelled"]) == (8, 2, 1, 5)
    assert m["num_completed"] == 0 and m["request_throughput_per_s"] == 0


def test_max_concurrency_and_poisson(fake, tmp_path):
    doc = _run(fake, tmp_path, "--num-requests", "10", "--rate", "200", "--max-concurrency", "2",
               "--output-len", "3", "--no-plots")
    assert fake.peak_in_flight <= 2 and doc["phases"][0]["metrics"]["peak_concurrency"] <= 2
    assert doc["phases"][0]["metrics"]["num_requests"] == 10


def test_compare_two_runs(fake, tmp_path, capsys):
    a = _run(fake, tmp_path / "a", "--num-requests", "4", "--output-len", "3", "--no-plots")
    b = _run(fake, tmp_path / "b", "--num-requests", "8", "--output-len", "3", "--no-plots")
    assert a["phases"][0]["metrics"]["num_requests"] == 4 and b["phases"][0]["metrics"]["num_requests"] == 8
    capsys.readouterr()
    rc = main(["--compare", str(tmp_path / "a" / "results.json"), str(tmp_path / "b" / "results.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "B/A" in out
    row = next(line for line in out.splitlines() if line.startswith("requests"))
    assert row.split() == ["requests", "4", "8", "2.000"]
