"""AsyncLLM: the asyncio engine client used by the API server.

Streaming has one shape end to end: each request gets an asyncio.Queue; a reader thread receives
`EngineCoreOutputs` from the engine core and hands them to the event loop, where the output
processor detokenizes and applies stop strings; `generate()` is an async iterator over those deltas.
If its consumer stops early (break, aclose, cancellation) the request is aborted in the engine.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import AsyncIterator

from rtserve.client.output_processor import OutputProcessor
from rtserve.client.outputs import RequestOutput
from rtserve.client.tokenizer import Tokenizer
from rtserve.config import EngineConfig
from rtserve.engine.validation import validate_request
from rtserve.protocol import (EngineCoreAbort, EngineCoreFailed, EngineCoreOutputs, EngineCoreReady,
                              EngineCoreRequest, EngineStats)
from rtserve.sampling_params import SamplingParams

logger = logging.getLogger("rtserve.client")


class EngineDeadError(RuntimeError):
    """The engine core process is gone; no request can be served."""


def model_path(config: EngineConfig) -> str:
    if config.model:
        return config.model
    from rtserve.model.loader import default_model_path
    return default_model_path()


def served_model_name(path: str) -> str:
    """'…/SmolLM2-135M-Instruct.Q4_1.gguf' -> 'SmolLM2-135M-Instruct'; a directory -> its name."""
    import os
    name = os.path.basename(os.path.normpath(path))
    if name.endswith(".gguf"):
        name = name[:-5]
        stem, _, tag = name.rpartition(".")
        if stem and tag[:1] in ("Q", "F", "q", "f", "B", "b", "I", "i"):
            name = stem
    return name


class AsyncLLM:
    def __init__(self, config: EngineConfig, *, in_process: bool = False, make_core=None,
                 tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        self.in_process = in_process or make_core is not None
        self._make_core = make_core
        path = "" if tokenizer is not None else model_path(config)
        self.tokenizer = tokenizer or Tokenizer.load(path, config.weights_cache_dir)
        self.model_name = served_model_name(path) if path else "rtserve-model"
        self.limits = config.limits
        self.max_model_len = 0
        self.vocab_size = self.tokenizer.vocab_size
        self.stats = EngineStats()
        self.is_dead = False
        self.dead_reason = ""
        self._processor = OutputProcessor(self.tokenizer)
        self._queues: dict[str, asyncio.Queue] = {}
        self._transport = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    async def start(self, timeout_s: float = 300.0) -> None:
        """Start the engine core and wait until its model is loaded."""
        from rtserve.client.engine_transport import ProcessTransport, ThreadTransport
        self._loop = asyncio.get_running_loop()
        if self.in_process:
            self._transport = ThreadTransport(self.config, self._make_core)
        else:
            self._transport = ProcessTransport(self.config)
        msg = await asyncio.to_thread(self._wait_ready, timeout_s)
        if isinstance(msg, EngineCoreFailed):
            self._mark_dead(msg.error)
            raise EngineDeadError(msg.error)
        self.max_model_len = msg.max_model_len
        self.vocab_size = msg.vocab_size
        self._reader = threading.Thread(target=self._read_loop, name="rtserve-output-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                msg = self._transport.recv(0.5)
            except queue.Empty:
                if not self._transport.is_alive():
                    return EngineCoreFailed("engine core exited during start-up")
                continue
            if isinstance(msg, (EngineCoreReady, EngineCoreFailed)):
                return msg
        return EngineCoreFailed(f"engine core not ready after {timeout_s:.0f} s")

    async def shutdown(self) -> None:
        if self._transport is not None:
            await asyncio.to_thread(self._transport.close)
        self._mark_dead("engine shut down")

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (InvalidRequest, with `.param`) for a request the engine would refuse."""
        validate_request(prompt_token_ids, params, max_model_len=self.max_model_len,
                         vocab_size=self.vocab_size, limits=self.limits)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        self.validate(prompt_token_ids, params)
        if self.is_dead:
            raise EngineDeadError(self.dead_reason or "engine is not running")
        if request_id in self._queues:
            raise ValueError(f"request_id {request_id!r} is already in use")
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        self._processor.add_request(request_id, prompt_token_ids, params)
        self._transport.send(EngineCoreRequest(request_id, list(prompt_token_ids), params, time.monotonic()))
        finished = False
        try:
            while not finished:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            self._processor.remove(request_id)
            if not finished and not self.is_dead:
                self._transport.send(EngineCoreAbort([request_id]))

    async def abort(self, request_id: str) -> None:
        if request_id in self._queues and not self.is_dead:
            self._transport.send(EngineCoreAbort([request_id]))

    async def check_ready(self, timeout_s: float = 10.0) -> bool:
        """Readiness: the engine generates one token within `timeout_s`."""
        if self.is_dead:
            return False
        rid = f"readiness-{time.monotonic_ns()}"
        params = SamplingParams(temperature=0.0, max_tokens=1)

        async def one_token() -> bool:
            async for out in self.generate([self.tokenizer.bos_token_id or 0], params, rid):
                if out.finished:
                    return out.error is None
            return False

        try:
            return await asyncio.wait_for(one_token(), timeout_s)
        except (asyncio.TimeoutError, EngineDeadError):
            return False

    # --- reader thread -> event loop -------------------------------------------------------------

    def _read_loop(self) -> None:
        while not self.is_dead:
            try:
                msg = self._transport.recv(1.0)
            except queue.Empty:
                if not self._transport.is_alive():
                    self._loop.call_soon_threadsafe(self._mark_dead, "engine core process exited")
                    return
                continue
            except (EOFError, OSError):
                self._loop.call_soon_threadsafe(self._mark_dead, "engine core connection lost")
                return
            if isinstance(msg, EngineCoreFailed):
                self._loop.call_soon_threadsafe(self._mark_dead, msg.error)
                return
            if isinstance(msg, EngineCoreOutputs):
                self._loop.call_soon_threadsafe(self._on_outputs, msg)

    def _on_outputs(self, msg: EngineCoreOutputs) -> None:
        if msg.stats is not None:
            self.stats = msg.stats
        for out in msg.outputs:
            q = self._queues.get(out.request_id)
            if q is None or out.request_id not in self._processor:
                continue  # already gone (aborted by its consumer, or stopped by a stop string)
            delta, stopped_by_string = self._processor.process(out)
            q.put_nowait(delta)
            if stopped_by_string and not out.finished:
                self._transport.send(EngineCoreAbort([out.request_id]))

    def _mark_dead(self, reason: str) -> None:
        if self.is_dead:
            return
        self.is_dead = True
        self.dead_reason = reason
        if reason != "engine shut down":
            logger.error("engine is dead: %s", reason)
        for q in self._queues.values():
            q.put_nowait(EngineDeadError(reason))
