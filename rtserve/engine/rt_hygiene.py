"""Real-time hygiene of the engine process: the standard Linux measures against step-time jitter.

`EngineHygiene` is built from `HygieneConfig` in the engine process. `before_load()` runs before the
model loads, so the threads torch's OpenMP pool starts later inherit the CPU affinity and scheduling
class; `after_warmup(core)` runs once start-up's calibration steps are done, before ready; the core loop
calls `between_steps()` before each step and `idle()` when it is about to wait for work.

Each measure is applied independently; one the system refuses (no permission, no such CPU, a limit)
is logged in one line and skipped, and the engine starts anyway. `applied` lists what took effect.

The garbage collector: Python's automatic collections start whenever allocations outnumber
deallocations by a threshold, i.e. in the middle of a step, and a full one traverses every tracked
object (the model's modules included). Here the heap start-up built is frozen (never traversed again),
automatic collection is off, and the same generational collections run between steps: a young one
once `gc_young_budget` net allocations accumulated, a full one every tenth of those, and a full one
when the engine goes idle. Cyclic garbage is still collected under a load that never lets the engine
idle, at step boundaries only.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
from typing import Any

from rtserve.config import HygieneConfig, parse_cpu_list

logger = logging.getLogger("rtserve.engine")

MCL_CURRENT, MCL_FUTURE = 1, 2
FULL_EVERY_YOUNG = 10  # CPython's own ratio of full to young collections (its default threshold2)


class EngineHygiene:
    def __init__(self, config: HygieneConfig) -> None:
        self.config = config
        self.applied: list[str] = []
        self.num_young_collections = 0
        self.num_full_collections = 0
        self._gc_managed = False
        self._young_since_full = 0

    def before_load(self) -> None:
        """CPU affinity and scheduling class of the calling thread, before torch's OpenMP threads start: threads
        started later inherit both (threads already running keep theirs)."""
        if self.config.cpus:
            self._try("cpus", _set_affinity, parse_cpu_list(self.config.cpus))
        if self.config.sched in ("fifo", "rr"):
            self._try(f"sched={self.config.sched}", _set_realtime, self.config.sched, self.config.sched_priority)
        elif self.config.sched == "nice":
            self._try(f"nice{self.config.nice:+d}", os.nice, self.config.nice)

    def after_warmup(self, core: Any) -> None:
        """Pre-fault the KV cache, lock memory, freeze the heap; then log one line of what took effect."""
        if self.config.prefault_kv:
            self._try("prefault_kv", prefault_kv, core)
        if self.config.mlock:
            self._try("mlock", _mlockall)
        if self.config.gc:
            gc.collect()
            gc.freeze()
            gc.disable()
            self._gc_managed = True
            self.applied.append(f"gc=frozen({gc.get_freeze_count()} objects),between-steps")
        logger.info("real-time hygiene: %s", ", ".join(self.applied) or "none")

    def between_steps(self) -> None:
        """A young collection once the allocation budget is spent (a full one every tenth)."""
        if not self._gc_managed or gc.get_count()[0] < self.config.gc_young_budget:
            return
        if self._young_since_full + 1 >= FULL_EVERY_YOUNG:
            self._full()
        else:
            gc.collect(0)
            self._young_since_full += 1
            self.num_young_collections += 1

    def idle(self) -> None:
        """The engine has nothing to run: a full collection costs no step anything now."""
        if self._gc_managed and (gc.get_count()[0] or self._young_since_full):
            self._full()

    def _full(self) -> None:
        gc.collect()
        self._young_since_full = 0
        self.num_full_collections += 1

    def _try(self, name: str, fn, *args) -> None:
        try:
            fn(*args)
        except (OSError, ValueError, AttributeError, RuntimeError) as exc:
            logger.warning("real-time hygiene: %s not applied (%s); continuing without it", name, _reason(exc))
        else:
            self.applied.append(name)


def prefault_kv(core: Any) -> None:
    """Write every page of the KV cache once (the fast path allocates it with torch.empty: untouched)."""
    for cache in core.runner.kv_caches:
        cache.zero_()


def _set_affinity(cpus: set[int]) -> None:
    os.sched_setaffinity(0, cpus)


def _set_realtime(policy: str, priority: int) -> None:
    os.sched_setscheduler(0, os.SCHED_FIFO if policy == "fifo" else os.SCHED_RR, os.sched_param(priority))


def _mlockall() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, PermissionError) or getattr(exc, "errno", None) == 1:
        return f"not permitted: {exc}"
    return f"{type(exc).__name__}: {exc}"


def apply_api_hygiene(cpus: str, freeze_heap: bool, omp_wait_policy: str = "") -> list[str]:
    """The API process's share: its CPU list, and its start-up heap frozen (the collector stays on there:
    the event loop has no step boundary to move collections to). `omp_wait_policy` goes into the
    environment the engine process is started with: OpenMP reads it when torch loads, before any of the
    engine's own code runs. Returns what took effect."""
    hygiene = EngineHygiene(HygieneConfig(cpus=cpus))
    hygiene.before_load()
    if omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = omp_wait_policy.upper()
        hygiene.applied.append(f"engine OMP_WAIT_POLICY={omp_wait_policy.upper()}")
    if freeze_heap:
        gc.collect()
        gc.freeze()
        hygiene.applied.append(f"gc=frozen({gc.get_freeze_count()} objects)")
    logger.info("real-time hygiene (API process): %s", ", ".join(hygiene.applied) or "none")
    return hygiene.applied
