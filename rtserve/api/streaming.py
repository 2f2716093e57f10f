"""Drive engine `generate()` iterators with the client's connection watched as its own task.

- `OutputStream` fans in one or more generate() iterators (n choices) through a queue, so a consumer can
  wait with a timeout (Anthropic pings) without cancelling the engine iterator. `aclose()` cancels the
  pump tasks, which closes the iterators and so aborts their engine requests. At most `max_buffered`
  deltas wait in it: a consumer that stops (its client stopped reading) stops the pumps, so the engine
  client's own bounded buffer fills and the request is paused, then aborted (AsyncLLM slow reader).
- `ClosingBody` ties a response body to the OutputStream it reads, for streams started before the
  response (admission and a firm request's first delta happen before any byte).
- `EventStreamResponse` sends SSE bytes and, concurrently, waits for `http.disconnect`; a disconnect
  cancels the body (whatever the ASGI spec version the server advertises).
- `run_until_disconnect` does the same for non-streaming handlers: a client that leaves while its request
  is queued, prefilling or decoding gets its engine request aborted at once.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TypeVar

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from rtserve.api.metrics import RequestTimer
from rtserve.client.outputs import RequestOutput

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the response was complete."""


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once the client has gone away (`http.disconnect`); other messages are dropped."""
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


class OutputStream:
    """Merged deltas of several engine requests, as `(choice_index, RequestOutput)` in arrival order.

    Raises the first engine exception (ValueError, EngineDeadError, ...) to the consumer. Ends once every
    request produced its finished delta. Always `await aclose()` (or use `async with`).
    """

    _END = object()

    def __init__(self, iterators: Sequence[AsyncIterator[RequestOutput]],
                 timers: Sequence[RequestTimer] | None = None, max_buffered: int = 16) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._credits = asyncio.Semaphore(max_buffered)  # deltas may wait here; errors and ends always fit
        self._timers = list(timers or [])
        self._num_open = len(iterators)
        self._tasks = [asyncio.create_task(self._pump(i, it)) for i, it in enumerate(iterators)]

    async def _pump(self, index: int, iterator: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in iterator:  # type: ignore[attr-defined]
                if self._timers:
                    self._timers[index].on_output(out)
                await self._credits.acquire()
                await self._queue.put((index, out))  # after the finished delta the iterator returns
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            if self._timers:
                self._timers[index].finish("error")
            await self._queue.put((index, exc))
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(BaseException):
                    await aclose()
            await self._queue.put((index, self._END))

    async def get(self, timeout_s: float | None = None) -> tuple[int, RequestOutput] | None:
        """Next delta; None when all requests are done, or (with a timeout) nothing arrived in time.

        Check `is_done` to tell the two apart.
        """
        while self._num_open > 0:
            try:
                async with asyncio.timeout(timeout_s):
                    index, item = await self._queue.get()
            except TimeoutError:
                return None
            if item is self._END:
                self._num_open -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            self._credits.release()
            return index, item
        return None

    @property
    def is_done(self) -> bool:
        return self._num_open == 0

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while (item := await self.get()) is not None:
            yield item

    async def aclose(self) -> None:
        """Cancel the pumps: unfinished engine requests are aborted; unfinished timers count as aborts."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for timer in self._timers:
            timer.finish("abort")

    async def __aenter__(self) -> OutputStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class ClosingBody:
    """An SSE body iterator that also closes `outputs` when closed, even if it never started."""

    def __init__(self, body: AsyncIterator[bytes], outputs: OutputStream) -> None:
        self._body = body
        self._outputs = outputs

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._body.__aiter__()

    async def aclose(self) -> None:
        with contextlib.suppress(BaseException):
            await self._body.aclose()  # type: ignore[attr-defined]
        await self._outputs.aclose()


class EventStreamResponse(Response):
    """ASGI response for `text/event-stream`; the body is cancelled as soon as the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], headers: dict[str, str] | None = None,
                 send_timeout_s: float | None = 60.0) -> None:
        self.body_iterator = body
        self.send_timeout_s = send_timeout_s
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})})

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:  # type: ignore[attr-defined]
                # A reader that stops reading (full socket buffer) is dropped after send_timeout_s.
                async with asyncio.timeout(self.send_timeout_s):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            with contextlib.suppress(BaseException):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream_task = asyncio.create_task(self._stream(send))
        watch_task = asyncio.create_task(wait_for_disconnect(receive))
        try:
            await asyncio.wait({stream_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream_task, watch_task):
                task.cancel()
            results = await asyncio.gather(stream_task, watch_task, return_exceptions=True)
        if isinstance(results[0], TimeoutError):
            return  # slow reader dropped; the connection is closed by the server
        if isinstance(results[0], BaseException) and not isinstance(results[0], asyncio.CancelledError):
            raise results[0]


async def run_until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work` unless the client disconnects first; then cancel it and raise ClientDisconnected."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.create_task(wait_for_disconnect(receive))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work_task.done():
            work_task.cancel()
        watch_task.cancel()
        await asyncio.gather(watch_task, return_exceptions=True)
    if work_task.cancelled() or not work_task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await work_task
        raise ClientDisconnected()
    return work_task.result()
