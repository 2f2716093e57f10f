"""A live one-line progress bar on stderr, redrawn a few times a second by its own task.

It only reads the phase's record list (no per-request hooks), so it costs nothing per token.
When stderr is not a terminal (CI logs, pipes) only the final line of each phase is written.
"""
from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

from rtserve.bench.client import RequestRecord, RequestStatus

_BAR_WIDTH = 24
_REFRESH_S = 0.25


class ProgressLine:
    """Shows sent/done/in-flight/rejected/error counts against the request or time limit."""

    def __init__(self, records: list[RequestRecord], label: str, request_limit: int | None,
                 duration_s: float | None, stream: TextIO | None = None) -> None:
        self._records = records
        self._label = label
        self._request_limit = request_limit
        self._duration_s = duration_s
        self._stream = stream or sys.stderr
        self._started_at = time.perf_counter()
        self._is_tty = bool(getattr(self._stream, "isatty", lambda: False)())

    async def run(self) -> None:
        """Redraw until cancelled."""
        while self._is_tty:
            self.draw()
            await asyncio.sleep(_REFRESH_S)

    def draw(self, final: bool = False) -> None:
        if self._is_tty:
            self._stream.write("\r" + self.render() + "\x1b[K" + ("\n" if final else ""))
        elif final:
            self._stream.write(self.render() + "\n")
        self._stream.flush()

    def render(self) -> str:
        elapsed_s = time.perf_counter() - self._started_at
        statuses = [r.status for r in self._records]
        num_pending = statuses.count(RequestStatus.PENDING)
        num_finished = len(statuses) - num_pending
        if self._request_limit is not None:
            fraction = num_finished / self._request_limit
        else:
            fraction = elapsed_s / self._duration_s if self._duration_s else 0.0
        filled = int(_BAR_WIDTH * min(1.0, fraction))
        bar = "#" * filled + "." * (_BAR_WIDTH - filled)
        return (f"{self._label} [{bar}] {num_finished}/{self._request_limit or '-'} done, "
                f"{num_pending} in flight, {statuses.count(RequestStatus.REJECTED)} rejected, "
                f"{statuses.count(RequestStatus.ERROR)} errors, {elapsed_s:6.1f} s ")
