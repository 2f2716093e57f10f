"""A real `rtserve serve` process under signals and faults: SIGTERM drains the streams in flight (new requests
get 503 + Retry-After, liveness stays up, exit 0), a shutdown timeout of 0 aborts them with a final event, a
second signal exits at once, and a SIGKILLed engine process fails every waiting client and makes the server
exit non-zero. After each, no process the server started is left."""
from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

try:
    from tests.integration.fake_engine import ServerProcess
except ImportError:  # tests/integration not importable as a package
    from fake_engine import ServerProcess

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
FAST_START = ("--no-rt-calibrate",)


def chat(max_tokens: int, stream: bool = True) -> dict:
    return {"messages": [{"role": "user", "content": "Count from one to one thousand."}], "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0, "stream": stream}


class Stream:
    """One streaming chat request on its own thread: its SSE payloads, and when the first one arrived."""

    def __init__(self, url: str, max_tokens: int) -> None:
        self.url, self.max_tokens = url, max_tokens
        self.payloads: list = []
        self.first_s = self.error_s = None

    def __call__(self) -> "Stream":
        with httpx.stream("POST", self.url + CHAT, json=chat(self.max_tokens), timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                self.payloads.append(data if data == "[DONE]" else json.loads(data))
                self.first_s = self.first_s or time.monotonic()
                if isinstance(self.payloads[-1], dict) and "error" in self.payloads[-1]:
                    self.error_s = time.monotonic()
        return self

    @property
    def finish_reason(self) -> str | None:
        reasons = [c["choices"][0]["finish_reason"] for c in self.payloads if isinstance(c, dict) and c.get("choices")]
        return next((r for r in reasons if r), None)


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def descendants(server: ServerProcess) -> list[psutil.Process]:
    return psutil.Process(server.proc.pid).children(recursive=True)


def assert_all_gone(procs: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(procs, timeout=10)
    assert not alive, f"left running: {[(p.pid, p.cmdline()) for p in alive]}"


def engine_process(server: ServerProcess) -> psutil.Process:
    (engine,) = [p for p in psutil.Process(server.proc.pid).children()
                 if "resource_tracker" not in " ".join(p.cmdline())]
    return engine


def test_sigterm_drains_eight_streams_then_exits_0():
    with ServerProcess(*FAST_START, "--max-num-seqs", "8", "--shutdown-timeout-s", "120") as server:
        children = descendants(server)
        streams = [Stream(server.url, 24) for _ in range(8)]
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(s) for s in streams]
            wait_for(lambda: all(s.first_s for s in streams), 120, "every stream's first chunk")
            server.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: "draining" in server.log_text(), 10, "the drain to start")
            refused = httpx.post(server.url + CHAT, json=chat(2, stream=False), timeout=10)
            assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == "server_shutting_down"
            anthropic_refused = httpx.post(server.url + "/v1/messages", timeout=10, json={
                "model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
            assert anthropic_refused.status_code == 503 and anthropic_refused.json()["type"] == "error"
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200   # liveness
            assert httpx.get(server.url + "/ready", timeout=10).status_code == 503    # readiness
            results = [f.result(timeout=120) for f in futures]
        assert server.proc.wait(60) == 0
    for s in results:
        assert s.payloads[-1] == "[DONE]" and s.finish_reason == "length"
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in s.payloads[:-1] if c["choices"])
    assert_all_gone(children)


def test_shutdown_timeout_0_aborts_streams_with_a_final_event():
    with ServerProcess(*FAST_START, "--shutdown-timeout-s", "0") as server:
        children = descendants(server)
        streams = [Stream(server.url, 2000) for _ in range(2)]
        with ThreadPoolExecutor(3) as pool:
            blocking = pool.submit(httpx.post, server.url + CHAT, json=chat(2000, stream=False), timeout=120)
            futures = [pool.submit(s) for s in streams]
            wait_for(lambda: all(s.first_s for s in streams), 120, "every stream's first chunk")
            server.proc.send_signal(signal.SIGTERM)
            results = [f.result(timeout=60) for f in futures]
            response = blocking.result(timeout=60)
        assert server.proc.wait(60) == 0
    for s in results:
        assert s.payloads[-1] == "[DONE]" and s.finish_reason == "abort"
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] == "abort"
    assert "aborted 3 request(s)" in server.log_text()
    assert_all_gone(children)


def test_second_signal_exits_at_once():
    with ServerProcess(*FAST_START, "--shutdown-timeout-s", "300") as server:
        children = descendants(server)
        stream = Stream(server.url, 2000)
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(stream)
            wait_for(lambda: stream.first_s, 120, "the stream's first chunk")
            server.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: "draining" in server.log_text(), 10, "the drain to start")
            assert server.proc.poll() is None  # still draining: the stream has 2000 tokens to go
            server.proc.send_signal(signal.SIGINT)
            assert server.proc.wait(30) == 1
            with pytest.raises(httpx.HTTPError):
                future.result(timeout=30)  # the connection died with the server
    assert_all_gone(children)


def test_engine_sigkill_fails_every_client_and_exits_nonzero():
    """Every waiting client gets an error (streams an in-band error event, a non-streaming request a 503),
    /health turns 503 and the server exits with status 3 (the design target is errors within 1 s of the
    kill; the bound asserted here is loose for a shared CI machine, the measured delays are printed)."""
    with ServerProcess(*FAST_START, "--max-num-seqs", "4") as server:
        children = descendants(server)
        streams = [Stream(server.url, 2000) for _ in range(3)]
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(s) for s in streams]
            blocking = pool.submit(httpx.post, server.url + CHAT, json=chat(2000, stream=False), timeout=120)
            wait_for(lambda: all(s.first_s for s in streams), 120, "every stream's first chunk")
            time.sleep(0.2)  # the non-streaming request is in the engine too
            engine_process(server).kill()
            killed_s = time.monotonic()
            health = []
            while server.proc.poll() is None and not health[-1:] == [503]:
                try:
                    health.append(httpx.get(server.url + "/health", timeout=2).status_code)
                except httpx.HTTPError:
                    break
            results = [f.result(timeout=30) for f in futures]
            response = blocking.result(timeout=30)
            response_s = time.monotonic()
        assert server.proc.wait(30) == 3
    assert 503 in health
    assert response.status_code == 503 and response.json()["error"]["code"] == "engine_dead"
    delays = [s.error_s - killed_s for s in results]
    print(f"error delays after the kill: streams {[round(d, 3) for d in delays]} s, "
          f"non-streaming <= {response_s - killed_s:.3f} s")
    for s in results:
        assert s.payloads[-1] == "[DONE]" and s.payloads[-2]["error"]["code"] == "engine_dead"
    assert max(delays) < 5
    assert "engine died" in server.log_text()
    assert_all_gone(children)


def test_engine_restart_replaces_a_killed_engine_which_dies_with_the_server():
    with ServerProcess(*FAST_START, "--engine-restart") as server:
        children = descendants(server)
        first_engine = engine_process(server)
        stream = Stream(server.url, 2000)
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(stream)
            wait_for(lambda: stream.first_s, 120, "the stream's first chunk")
            first_engine.kill()
            assert future.result(timeout=30).payloads[-2]["error"]["code"] == "engine_dead"

        def healthy() -> bool:
            assert server.proc.poll() is None, "the server exited instead of restarting its engine"
            return httpx.get(server.url + "/health", timeout=5).status_code == 200

        wait_for(healthy, 120, "the new engine")
        assert engine_process(server).pid != first_engine.pid
        r = httpx.post(server.url + CHAT, json=chat(4, stream=False), timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        assert 'rtserve:engine_restarts_total{model_name="SmolLM2-135M-Instruct"} 1' in metrics
        children += descendants(server)
        busy = Stream(server.url, 2000)
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(busy)
            wait_for(lambda: busy.first_s, 120, "a long stream in the new engine")
            server.proc.kill()  # the API process dies without a word mid-stream: its engine must not outlive it
            server.proc.wait(10)
            with pytest.raises(httpx.HTTPError):
                future.result(timeout=30)
    assert_all_gone(children)
