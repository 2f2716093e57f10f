"""--limit-concurrency on a real uvicorn socket: over the cap a request gets its route family's error
object with Retry-After (not uvicorn's plain-text 503), liveness is still answered, and once connections
close the server serves again."""
from __future__ import annotations

import socket
import time

import httpx

from rtserve.api.http_protocol import guarded_httptools
from tests.integration.fake_engine import LiveServer, build_test_app

CAP = 3


def open_idle(port: int, n: int) -> list[socket.socket]:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    for s in socks:  # a request on each would end it: hold them open with nothing sent
        s.settimeout(5)
    return socks


def served_again(client: httpx.Client) -> bool:
    for _ in range(200):  # the server notices the closed sockets on its next loop turns
        if client.get("/v1/models").status_code == 200:
            return True
        time.sleep(0.02)
    return False


def test_over_the_cap_is_an_error_object_with_retry_after_and_health_answers():
    app, _ = build_test_app()
    protocol = guarded_httptools(max_header_bytes=8192, header_timeout_s=30.0, connection_cap=CAP)
    with LiveServer(app, http=protocol) as server:
        idle = open_idle(server.port, CAP)
        try:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
                assert chat.status_code == 503 and chat.headers["retry-after"] == "1"
                assert chat.headers["content-type"] == "application/json"
                error = chat.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}
                assert error["type"] == "server_error" and error["code"] == "server_at_capacity"
                messages = client.post("/v1/messages", json={"model": "m", "max_tokens": 4,
                                                             "messages": [{"role": "user", "content": "hi"}]})
                assert messages.status_code == 529 and messages.headers["retry-after"] == "1"
                assert messages.json() == {"type": "error", "error": {
                    "type": "overloaded_error", "message": "The server is at its connection limit; retry shortly."}}
                assert client.get("/health").status_code == 200  # liveness is never refused
        finally:
            for s in idle:
                s.close()
        with httpx.Client(base_url=server.url, timeout=10) as client:
            assert served_again(client)
            reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                              "max_tokens": 4})
            assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]


def test_below_the_cap_nothing_is_refused():
    app, _ = build_test_app()
    protocol = guarded_httptools(max_header_bytes=8192, header_timeout_s=30.0, connection_cap=CAP)
    with LiveServer(app, http=protocol) as server:
        idle = open_idle(server.port, CAP - 2)  # with the client's own connection: one under the cap
        try:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                for _ in range(5):
                    assert client.get("/v1/models").status_code == 200
        finally:
            for s in idle:
                s.close()


def test_serve_refuses_a_cap_below_one(capsys):
    from rtserve.api.server import main
    assert main(["--limit-concurrency", "0"]) == 2
    assert "--limit-concurrency must be >= 1" in capsys.readouterr().err


def test_uncapped_protocol_refuses_nothing():
    app, _ = build_test_app()
    with LiveServer(app, http=guarded_httptools(max_header_bytes=8192, header_timeout_s=30.0)) as server:
        idle = open_idle(server.port, 20)
        try:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                assert client.get("/v1/models").status_code == 200
        finally:
            for s in idle:
                s.close()
