"""The load loop: one asyncio event loop and one shared httpx.AsyncClient send each phase's
requests at their arrival offsets, then wait, cancelling what is still in flight at --duration-s.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import time
from dataclasses import dataclass

import httpx

from rtserve.bench.arrivals import iter_arrival_offsets_s, phase_rng
from rtserve.bench.client import RequestRecord, Target, build_body, discover_model, send_request
from rtserve.bench.config import BenchConfig
from rtserve.bench.progress import ProgressLine
from rtserve.bench.workloads import iter_workload


@dataclass
class PhaseResult:
    """The records of one phase (one arrival rate) and how long it ran."""

    rate_per_s: float
    duration_s: float  # from the first send until the last request finished (or was cancelled)
    records: list[RequestRecord]


@dataclass
class BenchRun:
    config: BenchConfig
    target: Target
    started_at: str  # ISO 8601, UTC
    phases: list[PhaseResult]


def normalize_base_url(base_url: str) -> str:
    """Accepts `http://host:port`, with or without a trailing `/` or `/v1`."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


async def run_bench(cfg: BenchConfig) -> BenchRun:
    """Discover the model, then run one phase per rate in `cfg.rates_per_s`."""
    base_url = normalize_base_url(cfg.base_url)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    # Open loop: unlimited connections unless the run caps concurrency; no proxies for a benchmark.
    limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s), limits=limits,
                                 trust_env=False) as http:
        model, owned_by = await discover_model(http, base_url, headers, cfg.model)
        use_rt = cfg.rt_extension if cfg.rt_extension is not None else owned_by == "rtserve"
        target = Target(base_url + cfg.endpoint_path, model, owned_by, use_rt, headers)
        phases = []
        for i, rate in enumerate(cfg.rates_per_s):
            label = f"rate {rate:g}/s ({i + 1}/{len(cfg.rates_per_s)})"
            phases.append(await run_phase(http, target, cfg, rate, label))
    return BenchRun(cfg, target, started_at, phases)


async def run_phase(http: httpx.AsyncClient, target: Target, cfg: BenchConfig, rate_per_s: float,
                    label: str) -> PhaseResult:
    records: list[RequestRecord] = []
    tasks: list[asyncio.Task] = []
    limit = cfg.request_limit
    progress = ProgressLine(records, label, limit, cfg.duration_s)
    progress_task = asyncio.create_task(progress.run()) if cfg.show_progress else None
    semaphore = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    duration_s = cfg.duration_s if cfg.duration_s is not None else math.inf
    start_s = time.perf_counter()
    arrivals = iter_arrival_offsets_s(rate_per_s, cfg.burstiness, phase_rng(cfg.seed))
    for spec, offset_s in zip(iter_workload(cfg), arrivals):
        if (limit is not None and len(records) >= limit) or offset_s >= duration_s:
            break
        delay_s = start_s + offset_s - time.perf_counter()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        if semaphore is not None and not await _acquire_before(semaphore, start_s + duration_s):
            break
        record = RequestRecord.for_spec(spec, arrival_s=offset_s)
        body = build_body(spec, target, cfg.endpoint, cfg.ignore_eos, cfg.extra_body)
        task = asyncio.create_task(send_request(http, target, body, record, start_s))
        if semaphore is not None:
            task.add_done_callback(lambda _task: semaphore.release())
        records.append(record)
        tasks.append(task)
    await _drain(tasks, start_s + duration_s)
    elapsed_s = time.perf_counter() - start_s
    if progress_task is not None:
        progress_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await progress_task
        progress.draw(final=True)
    return PhaseResult(rate_per_s, elapsed_s, records)


async def _acquire_before(semaphore: asyncio.Semaphore, deadline_s: float) -> bool:
    """Wait for a concurrency slot; False if the phase's duration runs out first."""
    timeout_s = None if math.isinf(deadline_s) else max(0.0, deadline_s - time.perf_counter())
    try:
        await asyncio.wait_for(semaphore.acquire(), timeout_s)
    except TimeoutError:
        return False
    return True


async def _drain(tasks: list[asyncio.Task], deadline_s: float) -> None:
    """Wait for every request; at the deadline cancel the rest (each marks itself cancelled)."""
    if not tasks:
        return
    timeout_s = None if math.isinf(deadline_s) else max(0.0, deadline_s - time.perf_counter())
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
