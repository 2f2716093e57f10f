"""Keep torch's intra-op thread count at the number of cores this process can actually get.

Every parallel op (OpenMP) splits its work statically over the threads and ends at a barrier, so
when another process holds one of the cores, each op waits for the descheduled thread's time
slice: with 2 threads on 2 cores and one busy neighbour, a 40 ms decode step measured 370 ms (p50)
and a batch-1 token 37 ms, against 100 ms and 12 ms with 1 thread (benchmarks/decode_latency.py
next to a pytest run). A serving engine shares its cores with the API process and whatever else
runs; latency must degrade gracefully, not collapse.

Every `interval_s` the governor reads how much CPU the other processes used (system-wide busy time
from /proc/stat minus this process's own CPU time) and sets the thread count to the cores left
(a core counts as taken once others use more than half of it), between 1 and `max_threads`. It lowers at once (a collapse is costly) and raises
only after two intervals agree (probing costs a little). Linux only; elsewhere it stays off.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

logger = logging.getLogger("rtserve.engine")

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_SLACK_CORES = 0.5  # a core counts as taken once other processes use more than half of one


def read_system_busy_s() -> float | None:
    """Seconds of CPU time all processes have used since boot (stolen time counted as busy), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(values) - values[3] - values[4]) / _CLK_TCK


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class ThreadGovernor:
    def __init__(self, max_threads: int, set_threads: Callable[[int], None], interval_s: float = 0.5,
                 num_cores: int | None = None, clock: Callable[[], float] = time.monotonic,
                 system_busy_s: Callable[[], float | None] = read_system_busy_s,
                 self_cpu_s: Callable[[], float] = time.process_time) -> None:
        self.max_threads = max(1, max_threads)
        self.threads = self.max_threads
        self._set_threads = set_threads
        self._interval_s = interval_s
        self._num_cores = num_cores or available_cores()
        self._clock, self._system_busy_s, self._self_cpu_s = clock, system_busy_s, self_cpu_s
        self._pending_raise: int | None = None
        self.enabled = self.max_threads > 1 and system_busy_s() is not None
        self._mark()

    def _mark(self) -> None:
        self._t0, self._busy0, self._self0 = self._clock(), self._system_busy_s() or 0.0, self._self_cpu_s()

    def tick(self) -> int | None:
        """Call after each step. Returns the new thread count when it changed, else None."""
        if not self.enabled or self._clock() - self._t0 < self._interval_s:
            return None
        wall = self._clock() - self._t0
        busy = self._system_busy_s()
        if busy is None:
            return None
        others = max(0.0, (busy - self._busy0) - (self._self_cpu_s() - self._self0)) / wall  # cores
        self._mark()
        want = min(self.max_threads, max(1, int(self._num_cores - others + _SLACK_CORES)))
        if want > self.threads and self._pending_raise != want:  # raise only when two intervals agree
            self._pending_raise = want
            return None
        self._pending_raise = None
        if want == self.threads:
            return None
        logger.info("engine threads %d -> %d (other processes use %.1f of %d cores)", self.threads, want, others,
                    self._num_cores)
        self.threads = want
        self._set_threads(want)
        return want
