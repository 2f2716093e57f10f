"""AsyncLLM: the asyncio engine client used by the API server.

Streaming has one shape end to end: each request gets an asyncio.Queue; a reader thread receives
`EngineCoreOutputs` from the engine core and hands them to the event loop, where the output
processor detokenizes and applies stop strings; `generate()` is an async iterator over those deltas.
If its consumer stops early (break, aclose, cancellation) the request is aborted in the engine.

Real time: `generate(..., rt=RTParams(...))` resolves the request's budgets, runs admission control
(rtserve/engine/admission.py) on the engine's latest queue snapshot and raises `AdmissionRejected`
(with `retry_after_s`) before its first yield, so an API can answer 429/529 before any byte. Each
stream's buffer is bounded: a consumer that stops reading gets its request paused in the engine
(it keeps its KV blocks) and, if it does not resume within `slow_reader_timeout_s`, aborted.
"""
from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from typing import AsyncIterator

from rtserve.client.output_processor import OutputProcessor
from rtserve.client.outputs import RequestOutput
from rtserve.client.rt_report import RTTracker
from rtserve.client.tokenizer import Tokenizer
from rtserve.config import EngineConfig
from rtserve.engine.admission import AdmissionDecision, PendingRequest, decide, order_key
from rtserve.engine.rt_params import resolve_rt
from rtserve.engine.validation import validate_request
from rtserve.protocol import (EngineCoreAbort, EngineCoreFailed, EngineCoreOutputs, EngineCorePause,
                              EngineCoreReady, EngineCoreRequest, EngineStats, FinishReason, RTParams)
from rtserve.sampling_params import SamplingParams

logger = logging.getLogger("rtserve.client")


# An admitted request counts as waiting until it is sent, or until the task that admitted it ends without
# sending it (its client left), or at the latest for this long (a backstop; a slow but live handler sends
# well within it).
_RESERVATION_TTL_S = 30.0


@dataclasses.dataclass(eq=False)
class _Reservation:
    """An admitted request not sent yet: counted as waiting by admission until generate() sends it."""

    entry: PendingRequest
    task: asyncio.Task | None  # the task that admitted it (the route handler); done: the request never came
    expiry_s: float


# The reservation check_admission made in this context; generate() running in it (or in a task started
# from it, which copies the context) sends that one, so requests admitted in a burst each release their own.
_own_reservation: contextvars.ContextVar[_Reservation | None] = contextvars.ContextVar("rtserve_reservation",
                                                                                      default=None)


class EngineDeadError(RuntimeError):
    """The engine core process is gone; no request can be served."""


class AdmissionRejected(RuntimeError):
    """Refused on arrival (queue full, a firm request predicted to miss its budget, or with
    `RTConfig.soft_overload="reject"` a soft one predicted to be too late); nothing was sent.

    `reason` is "queue_full", "ttft" or "deadline"; `retry_after_s` is the predicted wait.
    """

    def __init__(self, decision: AdmissionDecision, rt_class: str) -> None:
        super().__init__(decision.message)
        self.reason = decision.reason
        self.retry_after_s = decision.retry_after_s
        self.predicted_ttft_s = decision.predicted_ttft_s
        self.rt_class = rt_class


def model_path(config: EngineConfig) -> str:
    """The model to load: `config.model` as a GGUF path, an HF directory or the name of an installed
    model package; "" is the embedded SmolLM2 (rtserve/model/catalog.py). It is checked here, before
    anything loads: a one-line ValueError for a missing file, a truncated GGUF, an unsupported
    architecture or quantization; an unknown name is a FileNotFoundError."""
    import os

    from rtserve.model.catalog import describe, resolve_model
    path = resolve_model(config.model, config.weights_cache_dir)
    if os.path.isdir(path):
        from rtserve.model.loader import check_hf_dir
        check_hf_dir(path)
    else:
        describe(path)  # reads the GGUF header and tensor table only
    return path


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
        path = "" if tokenizer is not None else model_path(config)
        if config.model and path != config.model:  # the engine process loads the file, not a package name
            config = dataclasses.replace(config, model=path)
        self.config = config
        self.in_process = in_process or make_core is not None
        self._make_core = make_core
        self.tokenizer = tokenizer or Tokenizer.load(path, config.weights_cache_dir)
        self.model_name = served_model_name(path) if path else "rtserve-model"
        self.limits = config.limits
        self.max_model_len = 0
        self.backend = ""  # the engine's backend line, once it is ready (shown in /v1/models)
        self.vocab_size = self.tokenizer.vocab_size
        self.stats = EngineStats()
        self.is_dead = False
        self.dead_reason = ""
        self.num_restarts = 0
        self._processor = OutputProcessor(self.tokenizer)
        self._queues: dict[str, asyncio.Queue] = {}
        self._transport = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None
        self.rt_config = config.rt
        self._num_sent = 0  # EngineCoreRequests sent; compared with QueueSnapshot.num_requests_added
        self._pending: deque[PendingRequest] = deque()  # sent, not yet reflected in a snapshot
        self._reserved: deque[_Reservation] = deque()  # admitted, not sent
        self._trackers: dict[str, RTTracker] = {}
        self._paused: dict[str, asyncio.TimerHandle] = {}  # slow readers -> their abort timer
        # Optional observer (the API's per-class metrics): on_rejected(rt_class, reason), on_finished(report)
        self.rt_listener = None

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
        self.backend = msg.backend
        self.is_dead, self.dead_reason = False, ""
        self._reader = threading.Thread(target=self._read_loop, name="rtserve-output-reader", daemon=True)
        self._reader.start()

    async def restart(self, timeout_s: float = 300.0) -> None:
        """After the engine died (every waiter already failed): stop what is left of it and start a new
        engine core. The client stays dead (503s) until the new one is ready; EngineDeadError if it fails."""
        if self._transport is not None:
            await asyncio.to_thread(self._transport.kill)
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 2.0)
        for timer in self._paused.values():
            timer.cancel()
        self._paused.clear()
        self._pending.clear()
        self._reserved.clear()
        self._num_sent = 0  # the new engine counts the requests it is sent from zero
        self.stats = EngineStats()
        await self.start(timeout_s)
        self.num_restarts += 1

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
        self._mark_dead("engine shut down")
        if self._transport is not None:
            await asyncio.to_thread(self._transport.close)
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 2.0)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (InvalidRequest, with `.param`) for a request the engine would refuse."""
        validate_request(prompt_token_ids, params, max_model_len=self.max_model_len,
                         vocab_size=self.vocab_size, limits=self.limits)

    def admit(self, rt: RTParams, arrival_s: float, num_prompt_tokens: int) -> AdmissionDecision:
        """Admission decision for a request with resolved budgets (microseconds; no engine round trip)."""
        snap = self.stats.queue
        if snap is not None:
            while self._pending and self._pending[0].seq <= snap.num_requests_added:
                self._pending.popleft()
        now = time.monotonic()
        if self._reserved:  # admitted but never sent: the admitting task ended (the client left) or, outside one, expiry
            self._reserved = deque(r for r in self._reserved
                                   if r.expiry_s >= now and (r.task is None or not r.task.done()))
        return decide(self.rt_config, snap, [*self._pending, *(r.entry for r in self._reserved)], rt,
                      arrival_s, num_prompt_tokens, now)

    def check_admission(self, num_prompt_tokens: int, rt: RTParams | None = None,
                        arrival_s: float | None = None) -> RTParams:
        """Resolve `rt` and run admission now (synchronously); returns the resolved budgets.

        Raises InvalidRequest (bad or `hard` rt) or AdmissionRejected. An API calls this before it sends
        anything, then passes the result to `generate(..., rt=resolved, admitted=True)`.
        """
        rt = resolve_rt(rt, self.rt_config)
        arrival_s = time.monotonic() if arrival_s is None else arrival_s
        decision = self.admit(rt, arrival_s, num_prompt_tokens)
        if not decision.admitted:
            if self.rt_listener is not None:
                self.rt_listener.on_rejected(rt.rt_class, decision.reason)
            raise AdmissionRejected(decision, rt.rt_class)
        # Counted as waiting from now on: requests admitted in one burst, before any of them reached
        # generate(), must see each other or the bounded queue would not bound them.
        entry = PendingRequest(-1, order_key(self._policy(), rt, arrival_s, self.rt_config), num_prompt_tokens)
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no running loop
            task = None
        reservation = _Reservation(entry, task, time.monotonic() + _RESERVATION_TTL_S)
        self._reserved.append(reservation)
        _own_reservation.set(reservation)
        return rt

    def _policy(self) -> str:
        return self.stats.queue.policy if self.stats.queue is not None else self.rt_config.policy

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       rt: RTParams | None = None, arrival_s: float | None = None, admitted: bool = False,
                       ) -> AsyncIterator[RequestOutput]:
        """Stream deltas; raises InvalidRequest, AdmissionRejected or EngineDeadError before any yield.

        `admitted=True`: `rt` came from `check_admission` (resolved, admitted); it is not decided again.
        """
        self.validate(prompt_token_ids, params)
        params = self._bounded(prompt_token_ids, params)
        if self.is_dead:
            raise EngineDeadError(self.dead_reason or "engine is not running")
        if request_id in self._queues:
            raise ValueError(f"request_id {request_id!r} is already in use")
        arrival_s = time.monotonic() if arrival_s is None else arrival_s
        if admitted and rt is not None:
            rt = resolve_rt(rt, self.rt_config)  # idempotent on resolved budgets
        else:
            rt = self.check_admission(len(prompt_token_ids), rt, arrival_s)
        own = _own_reservation.get()
        if own is not None and own in self._reserved:  # from here on it is counted as pending (sent) instead
            self._reserved.remove(own)
        elif self._reserved:  # admitted in another context: the count is what matters
            self._reserved.popleft()
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        self._trackers[request_id] = RTTracker(rt, arrival_s)
        self._processor.add_request(request_id, prompt_token_ids, params)
        self._num_sent += 1
        self._pending.append(PendingRequest(self._num_sent, order_key(self._policy(), rt, arrival_s, self.rt_config),
                                            len(prompt_token_ids)))
        self._transport.send(EngineCoreRequest(request_id, list(prompt_token_ids), params, arrival_s, rt=rt))
        finished = False
        try:
            while not finished:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                self._maybe_resume(request_id, q)
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            self._trackers.pop(request_id, None)
            timer = self._paused.pop(request_id, None)
            if timer is not None:
                timer.cancel()
            self._processor.remove(request_id)
            if not finished and not self.is_dead:
                self._transport.send(EngineCoreAbort([request_id]))

    def _bounded(self, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        """A request without max_tokens may generate up to the server's cap (or to the end of the context
        when that comes first), never without bound."""
        if params.max_tokens is not None:
            return params
        room = self.max_model_len - len(prompt_token_ids)
        return dataclasses.replace(params, max_tokens=max(1, min(self.limits.max_tokens_cap, room)))

    def _maybe_resume(self, request_id: str, q: asyncio.Queue) -> None:
        """The consumer is reading again: resume a paused request once its buffer is half drained."""
        if request_id in self._paused and q.qsize() <= self.rt_config.max_buffered_outputs // 2:
            self._paused.pop(request_id).cancel()
            if not self.is_dead:
                self._transport.send(EngineCorePause([request_id], paused=False))

    def _pause_slow_reader(self, request_id: str) -> None:
        self._paused[request_id] = self._loop.call_later(
            self.rt_config.slow_reader_timeout_s, self._abort_slow_reader, request_id)
        self._transport.send(EngineCorePause([request_id], paused=True))

    def _abort_slow_reader(self, request_id: str) -> None:
        """Paused too long: abort in the engine (frees KV) and end the stream after what is buffered."""
        self._paused.pop(request_id, None)
        q = self._queues.get(request_id)
        if q is None or request_id not in self._processor:
            return
        self._processor.remove(request_id)
        self._transport.send(EngineCoreAbort([request_id]))
        limit_s = self.rt_config.slow_reader_timeout_s
        logger.warning("request %s aborted: its client read nothing for %.0f s", request_id, limit_s)
        q.put_nowait(RequestOutput(request_id, finished=True, finish_reason=FinishReason.ABORT,
                                   error=f"slow reader: the client stopped reading for {limit_s:.0f} s"))

    @property
    def num_requests(self) -> int:
        """Requests whose outputs someone is still waiting for."""
        return len(self._queues)

    def abort_all(self, reason: str) -> list[str]:
        """Abort every request in flight (server shutdown): each stream ends now with finish_reason
        "abort" after what it already has, and the engine frees their blocks. Returns their ids."""
        ids = [rid for rid in self._queues if rid in self._processor]
        for rid in ids:
            self._processor.remove(rid)
            timer = self._paused.pop(rid, None)
            if timer is not None:
                timer.cancel()
            self._queues[rid].put_nowait(RequestOutput(rid, finished=True, finish_reason=FinishReason.ABORT,
                                                       error=reason))
        if ids and not self.is_dead:
            self._transport.send(EngineCoreAbort(ids))
        return ids

    def kill(self) -> None:
        """Stop the engine process at once (a forced exit); no output is delivered after this."""
        self._mark_dead("engine killed")
        if self._transport is not None:
            self._transport.kill()

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
                msg = self._transport.recv(0.5)
            except queue.Empty:
                if not self._transport.is_alive():
                    self._post(self._mark_dead, "engine core process exited")
                    return
                continue
            except (EOFError, OSError):
                self._post(self._mark_dead, "engine core connection lost")
                return
            if isinstance(msg, EngineCoreFailed):
                self._post(self._mark_dead, msg.error)
                return
            if isinstance(msg, EngineCoreOutputs):
                self._post(self._on_outputs, msg)

    def _post(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is left to tell
            pass

    def _on_outputs(self, msg: EngineCoreOutputs) -> None:
        if msg.stats is not None:
            self.stats = msg.stats
        for out in msg.outputs:
            q = self._queues.get(out.request_id)
            if q is None or out.request_id not in self._processor:
                continue  # already gone (aborted by its consumer, or stopped by a stop string)
            delta, stopped_by_string = self._processor.process(out)
            self._track(delta, out.num_preemptions)
            q.put_nowait(delta)
            if stopped_by_string and not out.finished:
                self._transport.send(EngineCoreAbort([out.request_id]))
            elif (not delta.finished and q.qsize() >= self.rt_config.max_buffered_outputs
                  and out.request_id not in self._paused):
                self._pause_slow_reader(out.request_id)

    def _track(self, delta: RequestOutput, num_preemptions: int) -> None:
        tracker = self._trackers.get(delta.request_id)
        if tracker is None:
            return
        now = time.monotonic()
        tracker.on_tokens(len(delta.token_ids), now)
        if delta.finished:
            delta.rt = tracker.finish(now, delta.finish_reason, num_preemptions, delta.error)
            if self.rt_listener is not None:
                self.rt_listener.on_finished(delta.rt, now)

    def _mark_dead(self, reason: str) -> None:
        if self.is_dead:
            return
        self.is_dead = True
        self.dead_reason = reason
        if reason != "engine shut down":
            logger.error("engine is dead: %s", reason)
        for q in self._queues.values():
            q.put_nowait(EngineDeadError(reason))
