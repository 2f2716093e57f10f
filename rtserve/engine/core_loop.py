"""The engine core's busy loop, run in its own process (default) or a thread (tests, offline).

It drains typed input messages between steps (new requests join the next step; aborts free their
blocks before the next step), drops requests whose deadline passed (before each step, so a late
request never costs a step), runs `EngineCore.step()` while there is work, and blocks on the input
queue when idle. Every message is a dataclass from rtserve.protocol.
"""
from __future__ import annotations

import logging
import queue
import time
import traceback
from typing import Any, Callable

from rtserve.engine.core import EngineCore
from rtserve.engine.ipc import Channel
from rtserve.engine.startup import describe_backend
from rtserve.engine.rt_hygiene import EngineHygiene
from rtserve.protocol import (EngineCoreAbort, EngineCoreFailed, EngineCoreOutput, EngineCoreOutputs,
                              EngineCorePause, EngineCoreReady, EngineCoreRequest, EngineCoreShutdown,
                              FinishReason)

logger = logging.getLogger("rtserve.engine")


def run_engine_loop(make_core: Callable[[], EngineCore], in_q: Any, out_q: Any,
                    is_orphaned: Callable[[], bool] = lambda: False, hygiene: EngineHygiene | None = None) -> None:
    """Build the core, announce readiness, then serve until EngineCoreShutdown (then `core.close()`).

    `hygiene` (the engine process only: its GC measure is process-wide) is applied after warm-up."""
    try:
        core = make_core()
    except Exception as exc:  # noqa: BLE001 - reported to the client, which fails loudly
        logger.exception("engine core failed to start")
        out_q.put(EngineCoreFailed(f"engine failed to start: {exc!r}"))
        return
    if hygiene is not None:
        hygiene.after_warmup(core)
    mc = core.model_config
    out_q.put(EngineCoreReady(vocab_size=mc.vocab_size, max_model_len=core.max_model_len,
                              num_kv_blocks=core.kv.pool.num_blocks, block_size=core.kv.block_size,
                              eos_token_ids=tuple(mc.eos_token_ids), backend=describe_backend(core)))
    # The stats before any step: the client's admission control then predicts the first request
    # with the cost model start-up calibrated, not with none.
    out_q.put(EngineCoreOutputs([], time.monotonic(), core.stats()))
    try:
        _serve(core, in_q, out_q, is_orphaned, hygiene)
    except BaseException:  # noqa: BLE001 - whatever kills the loop is reported, never silent
        logger.exception("engine core loop died")
        out_q.put(EngineCoreFailed("engine core loop died: " + traceback.format_exc(limit=3)))
    else:
        core.close()


_STALLED_POLL_S = 0.01  # every unfinished request is paused (slow readers): poll, don't spin


def _serve(core: EngineCore, in_q: Any, out_q: Any, is_orphaned: Callable[[], bool],
           hygiene: EngineHygiene | None) -> None:
    stalled = False
    while True:
        if hygiene is not None and not core.has_unfinished:
            hygiene.idle()
        messages = _drain(in_q, block=not core.has_unfinished, is_orphaned=is_orphaned,
                          wait_s=_STALLED_POLL_S if stalled else 0.0)
        if messages is None:
            logger.warning("engine core: parent process is gone, exiting")
            return
        immediate: list[EngineCoreOutput] = []
        for msg in messages:
            if isinstance(msg, EngineCoreShutdown):
                return
            immediate.extend(_handle(core, msg))
        if core.has_unfinished:
            immediate.extend(core.expire_requests())
        if immediate:
            out_q.put(EngineCoreOutputs(immediate, time.monotonic(), core.stats()))
        if core.has_unfinished:
            if hygiene is not None:
                hygiene.between_steps()
            result = core.step()
            stalled = not (result.outputs or result.stats.num_scheduled_tokens)
            if not stalled:
                out_q.put(result)


def _handle(core: EngineCore, msg: Any) -> list[EngineCoreOutput]:
    if isinstance(msg, EngineCoreAbort):
        return core.abort_requests(msg.request_ids)
    if isinstance(msg, EngineCorePause):
        core.pause_requests(msg.request_ids, msg.paused)
        return []
    if isinstance(msg, EngineCoreRequest):
        try:
            core.add_request(msg)
        except ValueError as exc:
            return [EngineCoreOutput(request_id=msg.request_id, new_token_ids=[],
                                     finish_reason=FinishReason.ERROR, error=str(exc))]
        return []
    logger.error("engine core ignoring unknown message %r", type(msg).__name__)
    return []


def _drain(in_q: Any, block: bool, is_orphaned: Callable[[], bool], wait_s: float = 0.0) -> list[Any] | None:
    """Everything queued now; when `block`, wait for at least one message. None: parent is gone.

    With `wait_s` > 0 (and not `block`), wait up to that long for a first message.
    """
    out = []
    if wait_s > 0 and not block:
        try:
            out.append(in_q.get(timeout=wait_s))
        except queue.Empty:
            pass
    if block:
        while True:
            try:
                out.append(in_q.get(timeout=1.0))
                break
            except queue.Empty:
                if is_orphaned():
                    return None
    while True:
        try:
            out.append(in_q.get_nowait())
        except queue.Empty:
            return out


def run_engine_process(config, in_addr: str, out_addr: str) -> None:
    """Entry point of the engine core process (spawned: no state inherited from the API process):
    its messages come in on `in_addr` and go out on `out_addr` (rtserve/engine/ipc.py)."""
    import os

    import torch

    parent_pid = os.getppid()
    _die_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hygiene = EngineHygiene(config.hygiene)
    hygiene.before_load()
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    from rtserve.engine.startup import start_engine_core
    in_q, out_q = Channel(in_addr, sending=False), Channel(out_addr, sending=True)
    run_engine_loop(lambda: start_engine_core(config), in_q, out_q,
                    is_orphaned=lambda: os.getppid() != parent_pid, hygiene=hygiene)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL this process when the API process dies, even by SIGKILL (where the
    orphan check in `_drain` would only see it once idle). Elsewhere the orphan check alone remains.
    Strictly the signal comes when the thread that started this process exits: the engine client starts
    it on its event loop's thread, which lives as long as the client."""
    import ctypes
    import os
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)
