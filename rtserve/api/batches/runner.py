"""Runs batches: validates OpenAI input files, submits items, settles expiry and cancellation, writes the
output/error files, and applies retention. One asyncio task, woken by the routes and by finished items.

Items are sent through the app's own endpoints (`dispatch`, in process) with `rt.class = "batch"` and
`stream: false`, so an item's answer is exactly what the online endpoint returns for the same body, and
the engine schedules it behind firm and soft traffic. At most `max_in_flight` items are submitted at once
over all batches, oldest batch first, so the engine's waiting queue and its bounds are never flooded.

Restart: items whose result was committed are never submitted again; items in flight when the process
died are still pending and are submitted again. A batch that died while finalizing finalizes again (its
output file ids are derived from the batch id, so the rewrite replaces, never duplicates).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from rtserve.api.batches import objects as O
from rtserve.api.batches.settings import BatchSettings
from rtserve.api.batches.store import BatchStore
from rtserve.api.batches.validate import BodyCheck, batch_body, validate_lines

logger = logging.getLogger("rtserve.api.batches")

RETRYABLE_STATUS = frozenset({429, 503, 529})  # queue full / engine not running: the item stays pending

# (api, endpoint, body) -> (status_code, response body, request id)
Dispatch = Callable[[str, str, dict[str, Any]], Awaitable[tuple[int, dict[str, Any], str | None]]]


class BatchRunner:
    def __init__(self, store: BatchStore, settings: BatchSettings, dispatch: Dispatch, check_body: BodyCheck,
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.settings, self.dispatch, self.check_body = store, settings, dispatch, check_body
        self.clock = clock
        self._in_flight: dict[tuple[str, int], asyncio.Task] = {}
        self._validating: dict[str, asyncio.Task] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._last_sweep_s = float("-inf")
        self._stopping = False

    def now(self) -> int:
        return int(self.clock())

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a store method off the event loop (commits fsync)."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        removed = await self.call(self.store.remove_orphan_bytes)
        if removed:
            logger.info("removed %d file bodies of interrupted uploads", removed)
        self._task = asyncio.create_task(self._loop(), name="batch-runner")

    async def stop(self) -> None:
        """Stop submitting; items in flight are abandoned (still pending, so they run after a restart)."""
        self._stopping = True
        tasks = [t for t in (self._task, *self._in_flight.values(), *self._validating.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop every batch; it is logged and retried
                logger.exception("batch runner step failed")
            # asyncio.wait, not wait_for: Python 3.11's wait_for can swallow a cancellation that races the
            # event, which would leave stop() waiting on this task forever
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=self.settings.sweep_interval_s)
            finally:
                waiter.cancel()
            self._wake.clear()

    async def tick(self) -> None:
        """One pass over every active batch (oldest first), then retention when it is due."""
        for batch_id in await self.call(self.store.active_batch_ids):
            batch = await self.call(self.store.get_batch, batch_id)
            if batch["status"] == "validating":  # on its own task: a large file must not stall other batches
                if batch_id not in self._validating:
                    self._validating[batch_id] = asyncio.create_task(self._validate(batch), name="batch-validate")
            elif batch["status"] == "in_progress":
                await self._advance(batch)
            else:  # cancelling or finalizing: wait for the items in flight, then write the results
                await self._finish_when_idle(batch)
        if time.monotonic() - self._last_sweep_s >= self.settings.sweep_interval_s:
            self._last_sweep_s = time.monotonic()
            await self.sweep()

    async def _validate(self, batch: dict[str, Any]) -> None:
        """validating -> in_progress with its items, or failed with the errors; nothing if cancelled meanwhile."""
        path = self.store.file_path(batch["input_file_id"])

        def read_and_check() -> Any:
            with open(path, "rb") as f:
                return validate_lines(f, batch["endpoint"], self.check_body)
        try:
            try:
                checked = await self.call(read_and_check)
            except FileNotFoundError:
                checked = None
            now = self.now()
            if checked is None or checked.errors:
                errors = checked.errors if checked else [{
                    "code": "file_not_found", "line": None, "param": "input_file_id",
                    "message": "The input file was deleted before validation."}]
                await self.call(self.store.update_batch, batch["id"], ("validating",), status="failed",
                                failed_at=now, ended_at=now, errors=errors)
            else:
                await self.call(self.store.start_batch, batch["id"], checked.items, checked.model, now)
        finally:
            self._validating.pop(batch["id"], None)
            self.wake()

    async def _advance(self, batch: dict[str, Any]) -> None:
        busy = {idx for (bid, idx) in self._in_flight if bid == batch["id"]}
        if self.now() >= batch["expires_at"]:  # items in flight may still finish
            await self.call(self.store.settle_pending, batch["id"], "expired", busy)
            await self.call(self.store.update_batch, batch["id"], ("in_progress",), status="finalizing",
                            finalizing_at=self.now())
            return await self._finish_when_idle({**batch, "status": "finalizing"})
        free = self.settings.max_in_flight - len(self._in_flight)
        if free <= 0:  # no slot (other batches may hold them all): this one waits, whatever it has left
            return
        items = await self.call(self.store.pending_items, batch["id"], free, busy)
        for item in items:
            key = (batch["id"], item["idx"])
            self._in_flight[key] = asyncio.create_task(self._run_item(batch, item), name=f"batch-item-{key}")
        if items or busy:
            return
        # nothing pending and nothing in flight: every item has its result
        if await self.call(self.store.update_batch, batch["id"], ("in_progress",), status="finalizing",
                           finalizing_at=self.now()):
            await self._finish_when_idle({**batch, "status": "finalizing"})

    async def _run_item(self, batch: dict[str, Any], item: dict[str, Any]) -> None:
        key = (batch["id"], item["idx"])
        try:
            body = batch_body(json.loads(item["body"]))
            while True:
                try:
                    status, answer, request_id = await self.dispatch(batch["api"], batch["endpoint"], body)
                except Exception as exc:  # the app itself failed: this item's error, not the batch's
                    logger.exception("batch item %s failed", key)
                    status, request_id = 500, None
                    answer = {"error": {"message": f"Internal error: {type(exc).__name__}", "type": "server_error",
                                        "param": None, "code": None}}
                if status not in RETRYABLE_STATUS:
                    break
                await asyncio.sleep(self.settings.retry_backoff_s)
                current = await self.call(self.store.get_batch, batch["id"])
                if current is None or current["status"] != "in_progress":
                    return
            usage = O.usage_of(batch["api"], answer) if status == 200 else (0, 0, 0)
            await self.call(self.store.record_result, batch["id"], item["idx"],
                            "succeeded" if status == 200 else "errored", status, request_id, answer, usage)
        finally:
            self._in_flight.pop(key, None)
            self.wake()

    async def _finish_when_idle(self, batch: dict[str, Any]) -> None:
        """cancelling/finalizing -> the batch's final status, once none of its items is in flight."""
        if any(bid == batch["id"] for bid, _ in self._in_flight):
            return
        cancelling = batch["status"] == "cancelling"
        await self.call(self.store.settle_pending, batch["id"], "cancelled" if cancelling else "expired")
        counts = await self.call(self.store.item_counts, batch["id"])
        final = "cancelled" if cancelling else ("expired" if counts["expired"] else "completed")
        files = await self.call(self._write_result_files, batch) if batch["api"] == "openai" else {}
        await self.call(self.store.finalize, batch["id"], final, list(files.values()), self.now(),
                        output_file_id=files["output"]["id"] if "output" in files else None,
                        error_file_id=files["error"]["id"] if "error" in files else None)

    def _write_result_files(self, batch: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The output file (200 answers) and the error file (everything else), one line per custom_id."""
        now = self.now()
        suffix = batch["id"].removeprefix("batch_")
        written = {}
        for kind, wanted in (("output", lambda s: s == "succeeded"), ("error", lambda s: s != "succeeded")):
            file_id = f"file-{suffix}{kind}"
            lines = (O.output_line(batch["id"], item) for item in self.store.iter_items(batch["id"])
                     if wanted(item["state"]))
            chunks = (json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in lines)
            num_bytes = self.store.write_file_bytes(file_id, chunks)
            if num_bytes == 0:
                os.unlink(self.store.file_path(file_id))
                continue
            written[kind] = {"id": file_id, "owner": batch["owner"], "purpose": "batch_output",
                             "filename": f"{batch['id']}_{kind}.jsonl", "bytes": num_bytes, "created_at": now,
                             "expires_at": now + int(batch["output_expires_s"] or self.settings.retention_s)}
        return written

    async def sweep(self) -> None:
        """Retention: expired files are deleted; ended batches past retention lose their results."""
        now = self.now()
        for file_id in await self.call(self.store.files_expired, now):
            await self.call(self.store.delete_file, file_id)
        ended = await self.call(self.store.ended_before, now - int(self.settings.retention_s))
        for batch in ended:
            await self.call(self.store.archive_batch, batch["id"], now)
        await self.call(self.store.reclaim_space)
