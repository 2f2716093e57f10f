"""How the engine client reaches the engine core: a spawned process (default) or a thread.

Both expose `send(msg)`, `recv(timeout_s)`, `is_alive()`, `close()` (orderly) and `kill()` (at once).
Messages are the dataclasses of rtserve.protocol.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import shutil
import tempfile
import threading
from typing import Any

from rtserve.config import EngineConfig
from rtserve.engine.ipc import Channel
from rtserve.protocol import EngineCoreShutdown


class ProcessTransport:
    """The engine core in its own process: it never shares the API process's GIL or event loop.

    Messages travel over two zmq channels on ipc sockets in a private temporary directory
    (rtserve/engine/ipc.py). `recv` is called by one thread at a time; after `kill` or `close` it
    closes the receiving channel itself (never under a thread polling it) and raises EOFError."""

    def __init__(self, config: EngineConfig) -> None:
        from rtserve.engine.core_loop import run_engine_process
        self._dir = tempfile.mkdtemp(prefix="rtserve-engine-")
        in_addr, out_addr = f"ipc://{self._dir}/in", f"ipc://{self._dir}/out"
        self._out = Channel(out_addr, sending=False)  # bound before the engine can send
        self._in = Channel(in_addr, sending=True)
        self._closed = self._out_closed = False
        self._proc = mp.get_context("spawn").Process(target=run_engine_process, args=(config, in_addr, out_addr),
                                                     name="rtserve-engine-core", daemon=True)
        self._proc.start()

    def send(self, msg: Any) -> None:
        self._in.put(msg)

    def recv(self, timeout_s: float) -> Any:
        if self._closed:
            if not self._out_closed:
                self._out_closed = True
                self._out.close()
            raise EOFError("engine transport closed")
        try:
            return self._out.get(timeout=timeout_s)
        except ValueError as exc:  # the protocol is broken: the engine is as good as lost
            raise EOFError(str(exc)) from None

    def is_alive(self) -> bool:
        return self._proc.is_alive()

    def kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5.0)
        self._release()

    def close(self, timeout_s: float = 5.0) -> None:
        if self._proc.is_alive():
            self._in.put(EngineCoreShutdown())
            self._proc.join(timeout_s)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(1.0)
        self._release()

    def _release(self) -> None:
        if not self._closed:
            self._closed = True
            self._in.close()
            shutil.rmtree(self._dir, ignore_errors=True)


class ThreadTransport:
    """The engine core on a background thread of this process (tests, embedding)."""

    def __init__(self, config: EngineConfig, make_core=None) -> None:
        from rtserve.engine.core_loop import run_engine_loop
        from rtserve.engine.startup import start_engine_core
        self._in: queue.Queue = queue.Queue()
        self._out: queue.Queue = queue.Queue()
        factory = make_core or (lambda: start_engine_core(config))
        self._thread = threading.Thread(target=run_engine_loop, args=(factory, self._in, self._out),
                                        name="rtserve-engine-core", daemon=True)
        self._thread.start()

    def send(self, msg: Any) -> None:
        self._in.put(msg)

    def recv(self, timeout_s: float) -> Any:
        return self._out.get(timeout=timeout_s)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def kill(self) -> None:
        """A thread cannot be killed: ask it to stop and do not wait."""
        self._in.put(EngineCoreShutdown())

    def close(self, timeout_s: float = 5.0) -> None:
        if self._thread.is_alive():
            self._in.put(EngineCoreShutdown())
            self._thread.join(timeout_s)
