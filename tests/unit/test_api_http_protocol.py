"""rtserve.api.http_protocol: header-size cap (431) and header-read timeout on a real uvicorn socket."""
from __future__ import annotations

import json
import socket
import time

import httpx

from rtserve.api.http_protocol import guarded_httptools
from tests.integration.fake_engine import LiveServer, build_test_app


def raw_request(port: int, payload: bytes, timeout_s: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.sendall(payload)
        except OSError:
            pass
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def test_oversized_headers_get_431_and_normal_requests_pass():
    app, _ = build_test_app()
    with LiveServer(app, http=guarded_httptools(max_header_bytes=8192, header_timeout_s=5.0)) as server:
        reply = raw_request(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2_000_000 + b"\r\n\r\n")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431 ")
        assert json.loads(body)["error"]["code"] == "request_header_fields_too_large"
        with httpx.Client(base_url=server.url) as client:  # a large body is not a large header
            big = {"messages": [{"role": "user", "content": "x" * 200_000}], "max_tokens": 1}
            assert client.post("/v1/chat/completions", json=big).status_code == 400  # too long for the fake
            for _ in range(3):  # keep-alive: the count restarts for every request
                assert client.get("/health", headers={"x-pad": "p" * 4000}).status_code == 200


def test_slow_headers_are_cut_off():
    app, _ = build_test_app()
    with LiveServer(app, http=guarded_httptools(max_header_bytes=8192, header_timeout_s=0.3)) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.settimeout(3)
            t0 = time.monotonic()
            sock.sendall(b"GET /health HTTP/1.1\r\n")
            try:
                for _ in range(20):  # trickle a header byte every 50 ms: must not extend the deadline
                    sock.sendall(b"X")
                    time.sleep(0.05)
            except OSError:
                pass
            assert sock.recv(100) == b""
            assert time.monotonic() - t0 < 1.5
        with socket.create_connection(("127.0.0.1", server.port)) as idle:  # sends nothing at all
            idle.settimeout(3)
            assert idle.recv(100) == b""
