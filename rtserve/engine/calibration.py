"""Warm-up calibration of the step-time cost model: real steps on synthetic tokens, before ready.

A cost model that has measured nothing makes the deadline policy plan small steps (64 prefill tokens
until calibrated, then at most twice the largest chunk measured), so the first long prompts on a fresh
server missed their TTFT. `warm_up` runs the step shapes the policy plans through the real runner and
feeds each measured step to the model: decode steps of 1 to 32 sequences, prefill chunks of 16 to 512
tokens at position 0 and deep into a 2,048-token context, and decodes beside a chunk. A pass is
ordered so that one cut short by the time budget has still seen each kind of step; passes repeat
until the window holds `MIN_SAMPLES` steps (so the overrun ratio is measured, not the prior).

Nothing outlives a warm-up: its sequences take KV blocks through the KV manager and give them back,
never register them in the prefix cache, and never enter the scheduler; the prefix-cache counters
are put back. Sampling is greedy, so no random generator advances.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from rtserve.engine.cost_model import StepCostModel, StepFeatures
from rtserve.engine.request import Request
from rtserve.engine.scheduler_output import ScheduledSeq, SchedulerOutput
from rtserve.sampling_params import SamplingParams

CHUNK_SIZES = (16, 32, 64, 128, 256, 512)  # prefill chunks measured at position 0
PROMPT_SIZES = (16, 32, 64)                # the decode sequences' first chunks (cheap, many)
LONG_CHUNK_SIZES = (512, 16, 256, 64, 128, 32)  # chunks that grow the long sequence, deeper each time
DECODE_BATCHES = (1, 2, 4, 8, 16, 32)
MAX_LONG_TOKENS = 2048
MIN_SAMPLES = 32  # StepCostModel measures its overrun ratio from this many steps
NUM_PRIMING_STEPS = 3  # a prefill chunk, a decode step, and both in one step, run before any is measured
_GREEDY = SamplingParams(temperature=0.0, max_tokens=1)
_ID_PREFIX = "\0calibration-"  # never a client's request id (the warm-up runs before any exists)


@dataclass(frozen=True)
class Chunk:
    """`num_tokens` tokens of synthetic sequence `seq`, from position `start` (everything before
    `start` is computed by an earlier step)."""

    seq: int
    start: int
    num_tokens: int


Step = tuple[Chunk, ...]


@dataclass
class WarmUpResult:
    num_steps: int
    seconds: float
    samples: list[tuple[StepFeatures, float]]  # (features, measured seconds), in order


def plan_pass(max_num_seqs: int, max_num_batched_tokens: int, long_len: int) -> list[Step]:
    """One pass over the shapes, ordered so that a pass cut short by the time budget has still seen
    each kind. Sequence 0 is the long one (up to `long_len` tokens); 1..n are decode sequences.
    Each decode sequence gets a short prompt beside the decodes of those before it, and decode-only
    steps follow at each batch size of DECODE_BATCHES. The long sequence grows by chunks of mixed
    sizes (every other one beside up to 8 decodes): two chunks after the first four decode
    sequences, the rest after all of them. Then decode batches again over longer contexts, and the
    chunk sizes not yet measured at position 0. Every step respects both limits."""
    budget = max_num_batched_tokens
    num_short = max(min(max(DECODE_BATCHES), max_num_seqs - 1), 1)
    batches = [b for b in DECODE_BATCHES if b < num_short] + [num_short]
    long_sizes = [min(s, budget, long_len) for s in LONG_CHUNK_SIZES]
    pos = [0] * (num_short + 1)  # next position of each sequence
    steps: list[Step] = []

    def decodes(n: int) -> list[Chunk]:
        out = [Chunk(i, pos[i], 1) for i in range(1, n + 1)]
        for i in range(1, n + 1):
            pos[i] += 1
        return out

    def prompt(i: int) -> None:
        size = min(PROMPT_SIZES[(i - 1) % len(PROMPT_SIZES)], max(budget - (i - 1), budget // 2))
        steps.append((*decodes(min(i - 1, budget - size)), Chunk(i, 0, size)))
        pos[i] = size
        if i in batches:
            steps.append(tuple(decodes(min(i, budget))))

    def grow_long(k: int, num_prompted: int) -> bool:
        size = long_sizes[k % len(long_sizes)]
        if pos[0] + size > long_len:
            return False
        beside = max(min(8, num_prompted, max_num_seqs - 1, budget - size), 0) if k % 2 else 0
        steps.append((*decodes(beside), Chunk(0, pos[0], size)))
        pos[0] += size
        return True

    num_first = min(4, num_short)
    for i in range(1, num_first + 1):
        prompt(i)
    k = sum(grow_long(k, num_first) for k in range(2))
    for i in range(num_first + 1, num_short + 1):
        prompt(i)
    while grow_long(k, num_short):
        k += 1
    for b in batches:
        steps.append(tuple(decodes(min(b, budget))))
    at_zero = {c.num_tokens for step in steps for c in step if c.start == 0}
    for size in sorted({min(s, budget, long_len) for s in CHUNK_SIZES} - at_zero):
        steps.append((Chunk(0, 0, size),))
    return steps


def sequence_lengths(steps: list[Step]) -> dict[int, int]:
    """Tokens each synthetic sequence needs KV slots for."""
    out: dict[int, int] = {}
    for step in steps:
        for c in step:
            out[c.seq] = max(out.get(c.seq, 0), c.start + c.num_tokens)
    return out


def warm_up(core, budget_s: float, observe: bool = True, min_samples: int = MIN_SAMPLES,
            max_samples: int | None = None, clock: Callable[[], float] = time.monotonic) -> WarmUpResult:
    """Run passes of `plan_pass` through `core`'s runner until a pass ends with `min_samples` steps
    measured, `max_samples` are measured, or the next step would end past `budget_s` (predicted by
    the model once it is calibrated; else the first step after the budget is spent). With
    `observe`, each measured step goes to `core.cost_model.observe` (modifies the model). For an
    idle engine (start-up): its blocks come from the free list, as a request's would.

    The first `NUM_PRIMING_STEPS` steps run once unmeasured: a process's first prefill and first
    decode are slow (on the 2-core host, 0.2-1.5 s for its first 16-token chunk against 39 ms for
    the next; 40-62 ms for its first decode, the TorchScript profiling run, against 10-15 ms):
    without a warm-up, a fresh server's first request pays it. Raises RuntimeError when the KV
    cache is too small for a pass."""
    kv, model = core.kv, core.cost_model
    counters = (kv.prefix_cache_queries, kv.prefix_cache_hits)
    samples: list[tuple[StepFeatures, float]] = []
    seqs: list[tuple[Request, list[int]]] = []
    start = clock()
    try:
        steps, seqs = _allocate(core)
        for step in steps[:NUM_PRIMING_STEPS]:
            _execute(core, _scheduler_output(step, seqs), clock)
        while True:
            for step in steps:
                sched = _scheduler_output(step, seqs)
                predicted_s = model.predict_s(sched.step_features) if model.is_calibrated else 0.0
                if clock() - start + predicted_s > budget_s or len(samples) == max_samples:
                    return WarmUpResult(len(samples), clock() - start, samples)
                measured_s = _execute(core, sched, clock)
                samples.append((sched.step_features, measured_s))
                if observe:
                    model.observe(sched.step_features, measured_s)
            if len(samples) >= min_samples:
                return WarmUpResult(len(samples), clock() - start, samples)
    finally:
        for owner, _ in seqs:
            kv.free(owner)
        kv.prefix_cache_queries, kv.prefix_cache_hits = counters


def _execute(core, sched: SchedulerOutput, clock: Callable[[], float]) -> float:
    """Run one step as `EngineCore.step` does (the thread governor sees it too); its seconds."""
    t0 = clock()
    core.runner.execute(sched)
    measured_s = clock() - t0
    if core.thread_governor is not None:  # measured at the thread count serving would have now
        core.thread_governor.tick()
    return measured_s


def _allocate(core) -> tuple[list[Step], list[tuple[Request, list[int]]]]:
    """A pass whose sequences fit the free KV blocks, and each sequence's (owner, block ids): the
    owner's prompt is the sequence's tokens, and it holds the blocks in the KV manager. The long
    sequence is shortened to fit; RuntimeError if even the decode sequences do not."""
    sched_cfg = core.config.scheduler
    kv = core.kv
    long_len = min(MAX_LONG_TOKENS, core.max_model_len - 1)
    while True:
        steps = plan_pass(sched_cfg.max_num_seqs, sched_cfg.max_num_batched_tokens, long_len)
        lengths = sequence_lengths(steps)
        if sum(kv.num_blocks_needed(n) for n in lengths.values()) <= kv.num_free_blocks:
            break
        if long_len < 2 * max(PROMPT_SIZES):
            raise RuntimeError("the KV cache is too small for the calibration warm-up")
        long_len //= 2
    gen = torch.Generator().manual_seed(0)
    vocab_size = core.model_config.vocab_size
    seqs = []
    for i in range(max(lengths) + 1):
        tokens = torch.randint(0, vocab_size, (lengths.get(i, 1),), generator=gen).tolist()
        owner = Request(f"{_ID_PREFIX}{i}", tokens, _GREEDY, 0.0)
        if not kv.allocate_slots(owner, len(tokens)):
            for done, _ in seqs:
                kv.free(done)
            raise RuntimeError("the KV cache is too small for the calibration warm-up")
        seqs.append((owner, kv.block_ids(owner.request_id)))
    return steps, seqs


def _scheduler_output(step: Step, seqs: list[tuple[Request, list[int]]]) -> SchedulerOutput:
    """The step as the runner takes it. Each chunk gets a request that ends with the chunk, so every
    sequence samples a token (as a decode and a prompt's last chunk do); the token is not kept."""
    out = SchedulerOutput()
    for c in step:
        owner, block_ids = seqs[c.seq]
        view = Request(owner.request_id, owner.prompt_token_ids[:c.start + c.num_tokens], _GREEDY, 0.0)
        out.seqs.append(ScheduledSeq(view, c.start, c.num_tokens, block_ids))
    return out


def median_ratio(model: StepCostModel, samples: list[tuple[StepFeatures, float]]) -> float:
    """Median of measured / predicted step time over `samples` (1.0 when there are none)."""
    ratios = sorted(s / max(model.predict_s(f), 1e-9) for f, s in samples)
    return ratios[len(ratios) // 2] if ratios else 1.0
