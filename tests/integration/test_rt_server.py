"""A real `rtserve serve --policy deadline --max-num-seqs 1`: the `rt` extension end to end.

`hard` -> 400; a full waiting queue -> 429 / 529 with Retry-After and retry-after-ms before any byte; a firm
request whose TTFT passes while queued -> dropped with a deadline error (504 deadline_exceeded, nothing
streamed); a firm stream past its deadline_ms -> finish_reason "deadline"; a client that stops reading ->
its request paused, then aborted (the engine's gauges return to idle while the socket is still open) with
the server's memory flat; the final chunk's `rt` object, Server-Timing, and per-class metrics. Firm
streams here get loose ITL budgets: on a shared CPU a 50 ms one may drop them for their ITL first.

The cost model's calibration is pushed out of reach (`--rt-cost-min-samples`; no warm-up steps at start,
`--no-rt-calibrate`) so that firm admission never predicts here (unit-tested in
tests/unit/test_rt_admission.py) and the expiry path is reachable.
"""
from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

try:
    from tests.integration.fake_engine import ServerProcess
except ImportError:  # tests/integration not importable as a package
    from fake_engine import ServerProcess

pytestmark = pytest.mark.slow

LONG = {"messages": [{"role": "user", "content": "Count from one to one thousand."}], "max_tokens": 300,
        "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--policy", "deadline", "--max-num-seqs", "1", "--max-num-waiting", "2",
                       "--rt-cost-min-samples", "1000000000", "--max-buffered-outputs", "4",
                       "--slow-reader-timeout-s", "2", "--num-threads", "1", "--max-logprobs", "200",
                       "--no-rt-calibrate") as s:
        s.model = httpx.get(s.url + "/v1/models").json()["data"][0]["id"]
        yield s


def chat(server, body, **kw):
    return httpx.post(server.url + "/v1/chat/completions", json={"model": server.model, **body}, timeout=60, **kw)


def gauges(server) -> dict[str, float]:
    out = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if not line.startswith("#") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value) if value not in ("NaN",) else float("nan")
    return out


def gauge(server, name: str) -> float:
    return next(v for k, v in gauges(server).items() if k.startswith(name + "{"))


def metric(server, name: str, **labels: str) -> float:
    """One series of a labelled family (labels in any order, model_name implied)."""
    want = {"model_name": server.model, **labels}
    for key, value in gauges(server).items():
        if key.startswith(name + "{"):
            got = dict(part.split("=", 1) for part in key[len(name) + 1:-1].split(","))
            if {k: v.strip('"') for k, v in got.items()} == want:
                return value
    raise KeyError(f"{name}{want}")


def wait_for(predicate, timeout_s: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def idle(server) -> bool:
    return gauge(server, "vllm:num_requests_running") == 0 and gauge(server, "vllm:num_requests_waiting") == 0


class Background:
    """A streaming request held open on its own socket (occupies the single sequence slot)."""

    def __init__(self, server, body, rcvbuf: int | None = None, read: bool = True) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", server.port))
        payload = json.dumps({"model": server.model, "stream": True, **body}).encode()
        self.sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)

    def close(self) -> None:
        self.sock.close()


def test_hard_class_is_refused_with_a_reason(server):
    r = chat(server, {"messages": [{"role": "user", "content": "hi"}], "rt": {"class": "hard"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "rt.class"
    assert "garbage collector" in r.json()["error"]["message"] and "firm" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/messages", json={"model": server.model, "max_tokens": 5, "rt": {"class": "hard"},
                                                      "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = chat(server, {"messages": [{"role": "user", "content": "hi"}], "rt": {"class": "firm", "ttft_ms": -1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "rt.ttft_ms"


def test_firm_stream_reports_rt_and_nonstreaming_has_server_timing(server):
    wait_for(lambda: idle(server), what="idle")
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
            "model": server.model, "stream": True, "max_tokens": 5, "service_tier": "priority",
            "rt": {"ttft_ms": 20000, "itl_ms": 20000},
            "messages": [{"role": "user", "content": "Say hi"}]}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    final = [c for c in chunks if "rt" in c]
    assert len(final) == 1 and final[0]["rt"]["class"] == "firm" and final[0]["rt"]["budget"]["ttft_ms"] == 20000
    r = chat(server, {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 3, "rt": {"class": "soft"}})
    assert r.status_code == 200 and "ttft;dur=" in r.headers["server-timing"] and r.json()["rt"]["class"] == "soft"


def test_full_queue_is_refused_before_any_byte_with_retry_after(server):
    wait_for(lambda: idle(server), what="idle")
    held = [Background(server, LONG)]
    try:
        wait_for(lambda: gauge(server, "vllm:num_requests_running") == 1, what="the slot to be taken")
        held += [Background(server, LONG) for _ in range(2)]  # 2 waiting = --max-num-waiting
        wait_for(lambda: gauge(server, "vllm:num_requests_waiting") == 2, what="two waiting")
        r = chat(server, {**LONG, "stream": True, "rt": {"class": "soft"}})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert int(r.headers["retry-after"]) >= 1 and int(r.headers["retry-after-ms"]) >= 1
        r = httpx.post(server.url + "/v1/messages", json={"model": server.model, "max_tokens": 5, "stream": True,
                                                          "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 529 and r.json()["error"]["type"] == "overloaded_error"
        assert "retry-after-ms" in r.headers
    finally:
        for h in held:
            h.close()
    wait_for(lambda: idle(server), what="idle after the held streams closed")
    assert metric(server, "rtserve:rt_rejections_total", rt_class="soft", reason="queue_full") == 2


def test_firm_request_late_in_the_queue_is_dropped_with_a_deadline_error(server):
    wait_for(lambda: idle(server), what="idle")
    # The slot is held by a firm stream: a waiting firm request may preempt soft or batch work, never firm.
    held = Background(server, {**LONG, "rt": {"class": "firm", "ttft_ms": 20000, "itl_ms": 20000}})
    try:
        wait_for(lambda: gauge(server, "vllm:num_requests_running") == 1, what="the slot to be taken")
        start = time.monotonic()
        r = chat(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                          "rt": {"class": "firm", "ttft_ms": 300}})
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert "ttft budget of 300 ms" in r.json()["error"]["message"]
        assert time.monotonic() - start < 5.0
        r = chat(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True,
                          "rt": {"class": "firm", "ttft_ms": 300}})
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"  # not a byte streamed
    finally:
        held.close()
    wait_for(lambda: idle(server), what="idle")
    assert metric(server, "rtserve:rt_expirations_total", rt_class="firm") == 2
    assert metric(server, "rtserve:rt_deadline_misses_total", rt_class="firm", kind="ttft") == 2


def test_firm_stream_past_deadline_ms_stops_with_finish_reason_deadline(server):
    wait_for(lambda: idle(server), what="idle")
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
            **LONG, "model": server.model, "stream": True,
            "rt": {"class": "firm", "ttft_ms": 20000, "itl_ms": 20000, "deadline_ms": 1500}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
    assert reasons[-1] == "deadline" and 0 < len(reasons) < 300
    rt = next(c["rt"] for c in chunks if "rt" in c)
    assert rt["dropped"] and "deadline" in rt["missed"] and not rt["deadline_met"]
    wait_for(lambda: idle(server), what="KV freed")


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_slow_reader_is_paused_then_aborted_with_memory_flat(server):
    wait_for(lambda: idle(server), what="idle")
    # Big chunks (top-200 logprobs, ~20 KB each) into a tiny receive window: the kernel's socket buffers
    # (a few MB on loopback) fill within a couple of hundred tokens, then the server's writes block.
    body = {**LONG, "max_tokens": 2000, "logprobs": True, "top_logprobs": 200}
    rss_before = rss_kb(server.proc.pid)
    stuck = Background(server, body, rcvbuf=4096)
    try:
        wait_for(lambda: gauge(server, "vllm:num_requests_running") == 1, what="the stream to start")
        # Paused (no longer scheduled), then aborted after --slow-reader-timeout-s: the engine is idle
        # again while the client's socket is still open and unread.
        wait_for(lambda: idle(server), timeout_s=60, what="the slow reader to be aborted")
        num_tokens = gauge(server, "vllm:generation_tokens_total")
        time.sleep(1.0)
        assert gauge(server, "vllm:generation_tokens_total") == num_tokens  # nothing generated since
        assert stuck.sock.fileno() != -1
        assert rss_kb(server.proc.pid) - rss_before < 50_000  # API process memory flat (< 50 MB growth)
    finally:
        stuck.close()
    assert "its client read nothing for 2 s" in server.log_text()
