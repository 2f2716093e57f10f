"""1,000 idle connections (opened, nothing sent) do not stop a new client from being served, and the
header-read timeout later closes them (real uvicorn with the guarded httptools protocol, fake engine)."""
from __future__ import annotations

import resource
import socket
import time

import httpx
import pytest

from rtserve.api.http_protocol import guarded_httptools
from tests.integration.fake_engine import LiveServer, build_test_app

NUM_IDLE = 1000


@pytest.fixture
def enough_fds():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * NUM_IDLE + 256  # both ends of every connection live in this process
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"needs {want} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_idle_connections_do_not_starve_a_new_client(enough_fds):
    app, _ = build_test_app()
    with LiveServer(app, http=guarded_httptools(max_header_bytes=8192, header_timeout_s=3.0)) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(NUM_IDLE)]
        try:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                assert client.get("/v1/models").status_code == 200
                r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                              "max_tokens": 3})
                assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Par"
            deadline = time.monotonic() + 30
            for sock in idle:  # each was cut off by the header-read timeout
                sock.settimeout(max(deadline - time.monotonic(), 0.1))
                assert sock.recv(100) == b""
        finally:
            for sock in idle:
                sock.close()
