"""The engine process's message channels: pyzmq PUSH/PULL sockets carrying msgspec-encoded messages.

One `Channel` per direction (API -> engine core, engine core -> API). A message is one of the
dataclasses of rtserve.protocol, sent as two frames: its class name and its msgpack encoding, decoded
back into that class (typed, nested dataclasses included; nothing is unpickled). A send is done on
the caller's thread into zmq's own I/O thread, which needs no GIL: with a `multiprocessing` queue the
engine's output waited for its feeder thread to get the GIL from the engine loop, and the API's
reader for it again (about 5 ms at the median on a busy 2-core host; benchmarks/transport.py).

The receiving side binds and the sending side connects, so either process may start first. `get`
and `get_nowait` raise `queue.Empty` like a queue's, which is all the engine loop and the engine
client need of them. A channel belongs to one process; only `put` may be called from several threads.
"""
from __future__ import annotations

import queue
import threading
from typing import Any

import msgspec
import zmq

from rtserve.protocol import (EngineCoreAbort, EngineCoreFailed, EngineCoreOutputs, EngineCorePause,
                              EngineCoreReady, EngineCoreRequest, EngineCoreShutdown)

MESSAGE_TYPES = (EngineCoreRequest, EngineCoreAbort, EngineCorePause, EngineCoreShutdown,
                 EngineCoreOutputs, EngineCoreReady, EngineCoreFailed)
_DECODERS = {cls.__name__.encode(): msgspec.msgpack.Decoder(cls) for cls in MESSAGE_TYPES}
_ENCODER = msgspec.msgpack.Encoder()


class Channel:
    """One direction of the engine's messages over `addr` (an `ipc://` or `tcp://` address)."""

    def __init__(self, addr: str, *, sending: bool) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUSH if sending else zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)  # close never waits on a peer that is gone
        # Unbounded like a queue: a send never blocks the engine loop or the API's event loop (what
        # waits is bounded upstream: admission's queue caps, one output message per step).
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        if sending:
            self._sock.connect(addr)
        else:
            self._sock.bind(addr)
        self._lock = threading.Lock()

    def put(self, msg: Any) -> None:
        name = type(msg).__name__.encode()
        if name not in _DECODERS:
            raise TypeError(f"not an engine message: {type(msg).__name__}")
        payload = _ENCODER.encode(msg)
        with self._lock:
            self._sock.send_multipart((name, payload), copy=False)

    def get(self, timeout: float | None = None) -> Any:
        """The next message; waits up to `timeout` seconds (None: forever), then raises queue.Empty."""
        if not self._sock.poll(None if timeout is None else max(int(timeout * 1000), 0)):
            raise queue.Empty
        return self._decode(self._sock.recv_multipart(copy=False))  # ValueError: not a valid message

    def get_nowait(self) -> Any:
        try:
            frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise queue.Empty from None
        return self._decode(frames)

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()

    @staticmethod
    def _decode(frames) -> Any:
        name, payload = frames
        decoder = _DECODERS.get(bytes(name.buffer))
        if decoder is None:
            raise ValueError(f"unknown engine message type {bytes(name.buffer)[:64]!r}")
        try:
            return decoder.decode(payload.buffer)
        except msgspec.DecodeError as exc:  # a malformed message or a field of the wrong type
            raise ValueError(f"unreadable {bytes(name.buffer).decode()}: {exc}") from None
