"""Measure `rtserve bench`'s own client cost, so its numbers can be trusted at a given load.

1. Parse cost: `SseSplitter.feed` + `StreamState.on_payload` on a vLLM-shaped chat stream, one
   event per read (the worst case: every token arrives in its own network read).
2. End-to-end client CPU: the real `send_request` (httpx + parsing) against a canned HTTP server in
   a child process that streams pre-built SSE events 1 ms apart. Only the client process's CPU
   time (time.process_time) is counted, so the server's work is excluded. Per-request overhead is
   the CPU of a 1-chunk stream; per-chunk overhead is the marginal CPU of the extra chunks.
3. Timestamp lag at 50 chunks/s per stream: the server stamps each event with its own time.perf_counter() (CLOCK_MONOTONIC,
   shared by processes on one Linux host) just before writing it; the client's loop (httpx
   aiter_text, then perf_counter, as in `send_request`) reports how late it saw each event.

Usage: python benchmarks/client_overhead.py  (about 30 s)
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import socket
import time

import httpx

from rtserve.bench.client import RequestRecord, Target, send_request
from rtserve.bench.sse import SseSplitter, StreamState


def _event(i: int) -> str:
    chunk = {"id": "chatcmpl-1234567890", "object": "chat.completion.chunk", "created": 1700000000,
             "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
             "choices": [{"index": 0, "delta": {"content": f" word{i}"}, "logprobs": None,
                          "finish_reason": None}], "usage": None}
    return "data: " + json.dumps(chunk) + "\n\n"


def parse_cost_us_per_chunk(num_chunks: int = 200_000) -> float:
    events = [_event(i) for i in range(1000)]
    splitter, state = SseSplitter(), StreamState()
    started = time.process_time()
    for i in range(num_chunks):
        now = time.perf_counter()
        for payload in splitter.feed(events[i % 1000]):
            state.on_payload(payload, now)
    return (time.process_time() - started) / num_chunks * 1e6


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    events = [_event(i).encode() for i in range(1000)]
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1}}\n\ndata: [DONE]\n\n'
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:  # the client closed its keep-alive connection
            writer.close()
            return
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        body = json.loads(await reader.readexactly(length))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        for i in range(body["max_tokens"]):
            data = events[i % 1000]
            if body.get("stamp"):
                data = b'data: {"t": %r, "choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n' % (
                    time.perf_counter())
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
            await asyncio.sleep(body.get("gap_s", 0.001))
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(usage), usage))
        await writer.drain()


def _serve(sock: socket.socket) -> None:
    async def main() -> None:
        server = await asyncio.start_server(_handle, sock=sock)
        await server.serve_forever()
    asyncio.run(main())


async def _client_cpu_s(url: str, num_requests: int, num_chunks: int, concurrency: int) -> float:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, trust_env=False, timeout=60) as http:
        target = Target(url, "m", None, False, {})
        body = {"model": "m", "max_tokens": num_chunks, "stream": True, "messages": []}

        async def worker(n: int) -> None:
            for i in range(n):
                record = RequestRecord(i, "default", 1, num_chunks, 0.0)
                await send_request(http, target, body, record, 0.0)
                assert record.status == "ok", record.error

        await worker(2)  # warm up connections
        started = time.process_time()
        await asyncio.gather(*(worker(num_requests // concurrency) for _ in range(concurrency)))
        return (time.process_time() - started) / num_requests


async def _lag_us(url: str, num_chunks: int, concurrency: int) -> list[float]:
    lags_us: list[float] = []
    body = {"model": "m", "max_tokens": num_chunks, "stream": True, "stamp": True, "gap_s": 0.02}

    async def one(http: httpx.AsyncClient) -> None:
        splitter = SseSplitter()
        async with http.stream("POST", url, json=body) as resp:
            async for text in resp.aiter_text():
                now = time.perf_counter()
                for payload in splitter.feed(text):
                    if payload.startswith('{"t"'):
                        lags_us.append((now - json.loads(payload)["t"]) * 1e6)

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency),
                                 trust_env=False, timeout=60) as http:
        await asyncio.gather(*(one(http) for _ in range(concurrency)))
    return sorted(lags_us)


def main() -> None:
    print(f"parse only: {parse_cost_us_per_chunk():.1f} us per chunk (one event per read)")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    proc = multiprocessing.Process(target=_serve, args=(sock,), daemon=True)
    proc.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions"
    try:
        for concurrency, num_requests in ((1, 64), (32, 512)):
            one = asyncio.run(_client_cpu_s(url, num_requests, 1, concurrency))
            many = asyncio.run(_client_cpu_s(url, num_requests, 129, concurrency))
            print(f"concurrency {concurrency:>2}: {one * 1e3:.2f} ms client CPU per request, "
                  f"{(many - one) / 128 * 1e6:.0f} us per extra chunk (httpx + parse)")
        for concurrency in (1, 32, 128):  # streams at 50 tokens/s each
            lags = asyncio.run(_lag_us(url, 100, concurrency))
            print(f"{concurrency:>3} streams x 50 chunks/s: timestamp lag after the server's write "
                  f"p50 {lags[len(lags) // 2]:.0f} us, p99 {lags[int(len(lags) * 0.99)]:.0f} us")
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()
