"""How often does this machine stall a decode step past an ITL budget, with nothing but the engine running?

The floor under every real-time target: a firm stream is dropped the first time one of its tokens
comes later than its ITL budget, so with a per-step probability p of a step over the budget, a stream
of n tokens survives with probability (1 - p) ** n, whatever the scheduler does. This drives the
engine core directly (no server, no client, FCFS, the thread governor off), N greedy streams at a
time after their prefills, and reports per-step time percentiles, the share of steps over the budget
and over twice the median, and the resulting survival probability of a 100-token firm stream.

Usage: PYTHONPATH=. python benchmarks/step_jitter.py [--threads 2] [--streams 1,4] [--steps 3000]
       [--itl-ms 50]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_latency import RtserveEngine, percentile, prompt_ids  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", default="1,4")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--itl-ms", type=float, default=50.0)
    p.add_argument("--stream-tokens", type=int, default=100, help="firm stream length for the survival figure")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.streams.split(",")]
    engine = RtserveEngine("auto", max(sizes))
    engine.core.thread_governor = None
    print(f"{args.threads} torch threads, load average {os.getloadavg()[0]:.2f}")
    for n in sizes:
        for i in range(n):
            engine._add(prompt_ids(64, 100 + i), args.steps + 200)
        sched = engine.core.scheduler
        while sched.waiting or any(r.num_computed_tokens < len(r.prompt_token_ids) for r in sched.running):
            engine.core.step()
        ms = [t * 1e3 for t in engine._timed_steps(args.steps)]
        engine._drain()
        p50 = percentile(ms, 50)
        over = sum(t > args.itl_ms for t in ms) / len(ms)
        print(f"{n:3d} streams  {len(ms)} steps  p50 {p50:.1f}  p99 {percentile(ms, 99):.1f}  "
              f"p99.9 {percentile(ms, 99.9):.1f}  max {max(ms):.0f} ms  p99/p50 {percentile(ms, 99) / p50:.2f}  "
              f"> {args.itl_ms:.0f} ms: {over:.4f}  > 2x p50: {sum(t > 2 * p50 for t in ms) / len(ms):.4f}  "
              f"P({args.stream_tokens}-token firm stream never late) {(1 - over) ** args.stream_tokens:.3f}",
              flush=True)


if __name__ == "__main__":
    main()
