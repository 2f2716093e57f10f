"""How often does this machine stall a decode step past an ITL budget, with nothing but the engine running?

The floor under every real-time target: a firm stream is dropped the first time one of its tokens
comes later than its ITL budget, so with a per-step probability p of a step over the budget, a stream
of n tokens survives with probability (1 - p) ** n, whatever the scheduler does. This drives the
engine core directly (no server, no client, FCFS, the thread governor off but for the `governor`
variant), N greedy streams at a time after their prefills, and reports per-step time percentiles,
the share of steps over the budget and over twice the median, and the resulting survival probability
of a 100-token firm stream. Each timed interval is what separates two tokens in the engine process:
the hygiene's between-steps work (a garbage collection, when one is due) plus the step. "gc in
steps" counts the timed intervals in which a collection ran, and their total collection time.

`--variant` picks the real-time hygiene (rtserve/engine/rt_hygiene.py) applied after warm-up:
  off      nothing (automatic garbage collection, KV pages touched on first use)
  gc       heap frozen, collections between steps only
  default  what `rtserve serve` does: gc + KV cache pre-faulted
  mlock    default + mlockall          nice   default + nice -5      fifo   default + SCHED_FIFO 1
  pin      default + the process pinned to the first --threads CPUs
  omp-passive / omp-active   default with OMP_WAIT_POLICY=PASSIVE / ACTIVE (OpenMP's idle threads
           sleep at once / spin) set before torch loads
  governor default with the thread governor on (engine/thread_governor.py: fewer threads while
           other processes hold cores), as `rtserve serve` runs; every other variant has it off
`--compare off,default,...` runs each variant in its own process, `--rounds` times in alternating
order (so the host's drift hits each), beside the host's own floor: a plain C loop
(benchmarks/host_jitter.c, built with `cc`) of the batch-1 median step's duration.

Usage: PYTHONPATH=. python benchmarks/step_jitter.py [--threads 2] [--streams 1,4] [--steps 3000]
       [--itl-ms 50] [--variant off | --compare off,default,mlock,nice,fifo,omp-passive --rounds 2]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {"off": {"gc": False, "prefault_kv": False}, "gc": {"prefault_kv": False}, "default": {},
            "mlock": {"mlock": True}, "nice": {"sched": "nice"}, "fifo": {"sched": "fifo"}, "pin": {},
            "omp-passive": {}, "omp-active": {}, "governor": {}}
OMP_ENV = {"omp-passive": "PASSIVE", "omp-active": "ACTIVE"}


class GcClock:
    """Time spent in garbage collections, from gc.callbacks."""

    def __init__(self) -> None:
        self.total_s = 0.0
        self.num = 0
        self._start = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total_s += time.perf_counter() - self._start
            self.num += 1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarize(ms: list[float], itl_ms: float, stream_tokens: int) -> dict:
    p50 = percentile(ms, 50)
    over = sum(t > itl_ms for t in ms) / len(ms)
    return {"num_steps": len(ms), "p50": p50, "p99": percentile(ms, 99), "p99_9": percentile(ms, 99.9),
            "max": max(ms), "p99_over_p50": percentile(ms, 99) / p50, "over_itl": over,
            "over_2x_p50": sum(t > 2 * p50 for t in ms) / len(ms), "survival": (1 - over) ** stream_tokens}


def line(label: str, s: dict, itl_ms: float, stream_tokens: int) -> str:
    gc_part = f"  gc in steps {s['num_gc_steps']} ({s['gc_ms']:.1f} ms)" if "gc_ms" in s else ""
    return (f"{label}  {s['num_steps']} steps  p50 {s['p50']:.1f}  p99 {s['p99']:.1f}  p99.9 {s['p99_9']:.1f}  "
            f"max {s['max']:.0f} ms  p99/p50 {s['p99_over_p50']:.2f}  > {itl_ms:.0f} ms: {s['over_itl']:.4f}  "
            f"> 2x p50: {s['over_2x_p50']:.4f}  P({stream_tokens}-token firm stream never late) "
            f"{s['survival']:.3f}{gc_part}")


def measure(args) -> list[dict]:
    """This process: build the engine, apply the variant's hygiene after a warm-up, time each stream count."""
    import torch

    from rtserve.config import HygieneConfig
    from rtserve.engine.rt_hygiene import EngineHygiene
    sys.path.insert(0, HERE)
    from decode_latency import RtserveEngine, prompt_ids

    fields = dict(VARIANTS[args.variant])
    if args.variant == "pin":
        fields["cpus"] = f"0-{args.threads - 1}"
    hygiene = EngineHygiene(HygieneConfig(**fields))
    hygiene.before_load()
    torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.streams.split(",")]
    engine = RtserveEngine("auto", max(sizes))
    if args.variant != "governor":
        engine.core.thread_governor = None
    engine.streams(1, 32)  # warm-up: allocator, kernels, the first prefill
    hygiene.after_warmup(engine.core)
    clock = GcClock()
    results = []
    for n in sizes:
        for i in range(n):
            engine._add(prompt_ids(64, 100 + i), args.steps + 200)
        sched = engine.core.scheduler
        while sched.waiting or any(r.num_computed_tokens < len(r.prompt_token_ids) for r in sched.running):
            engine.core.step()
        ms, num_gc_steps, gc_s = [], 0, 0.0
        while engine.core.has_unfinished and len(ms) < args.steps:
            num_gc, gc_before = clock.num, clock.total_s
            start = time.perf_counter()
            hygiene.between_steps()
            engine.core.step()
            ms.append((time.perf_counter() - start) * 1e3)
            num_gc_steps += clock.num > num_gc
            gc_s += clock.total_s - gc_before
        engine._drain()
        hygiene.idle()
        results.append({"variant": args.variant, "streams": n, "applied": hygiene.applied, "ms": ms,
                        "num_gc_steps": num_gc_steps, "gc_ms": gc_s * 1e3, "load_avg": os.getloadavg()[0],
                        **summarize(ms, args.itl_ms, args.stream_tokens)})
    return results


def host_floor(target_ms: float, reps: int, itl_ms: float, stream_tokens: int) -> dict | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        print("host floor: no C compiler (cc); skipped")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "host_jitter")
        subprocess.run([cc, "-O2", "-o", exe, os.path.join(HERE, "host_jitter.c")], check=True)
        out = subprocess.run([exe, f"{target_ms:.3f}", str(reps)], check=True, capture_output=True, text=True)
    ms = json.loads(out.stdout)["ms"]
    return {"variant": "host C loop", "streams": 0, "ms": ms, **summarize(ms, itl_ms, stream_tokens)}


def compare(args) -> None:
    variants = args.compare.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    base = ["--threads", str(args.threads), "--streams", args.streams, "--steps", str(args.steps),
            "--itl-ms", str(args.itl_ms), "--stream-tokens", str(args.stream_tokens)]
    runs: list[dict] = []
    print(f"{args.threads} torch threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
          f"{args.rounds} rounds of {', '.join(variants)} (alternating order) + the host floor", flush=True)
    for r in range(args.rounds):
        for variant in (variants if r % 2 == 0 else variants[::-1]):
            env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
            if variant in OMP_ENV:
                env["OMP_WAIT_POLICY"] = OMP_ENV[variant]
            out = subprocess.run([sys.executable, __file__, *base, "--variant", variant, "--json"], env=env,
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{variant}: failed\n{out.stderr[-2000:]}")
                continue
            for res in (json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")):
                res["round"] = r
                runs.append(res)
                print(line(f"round {r} {variant:12s} {res['streams']:2d} streams", res, args.itl_ms,
                           args.stream_tokens) + f"  [{', '.join(res['applied']) or 'none'}] "
                      f"load {res['load_avg']:.2f}", flush=True)
        one = [x["p50"] for x in runs if x["streams"] == 1] or [x["p50"] for x in runs]
        floor = host_floor(statistics.median(one), args.steps, args.itl_ms, args.stream_tokens)
        if floor is not None:
            floor["round"] = r
            runs.append(floor)
            print(line(f"round {r} host C loop     ", floor, args.itl_ms, args.stream_tokens), flush=True)
    print("\npooled over rounds (per-step times of every round together):")
    for label in [*variants, "host C loop"]:
        for n in sorted({x["streams"] for x in runs if x["variant"] == label}):
            ms = [t for x in runs if x["variant"] == label and x["streams"] == n for t in x["ms"]]
            s = summarize(ms, args.itl_ms, args.stream_tokens)
            gcs = [x for x in runs if x["variant"] == label and x["streams"] == n and "gc_ms" in x]
            if gcs:
                s.update(num_gc_steps=sum(x["num_gc_steps"] for x in gcs), gc_ms=sum(x["gc_ms"] for x in gcs))
            print(line(f"{label:12s} {n:2d} streams", s, args.itl_ms, args.stream_tokens))
    if args.out:
        with open(args.out, "w") as f:
            json.dump([{k: v for k, v in x.items() if k != "ms"} for x in runs], f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", default="1,4")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--itl-ms", type=float, default=50.0)
    p.add_argument("--stream-tokens", type=int, default=100, help="firm stream length for the survival figure")
    p.add_argument("--variant", default="off", choices=list(VARIANTS))
    p.add_argument("--compare", default="", help="comma-separated variants, each run in its own process")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="", help="--compare: write every run's summary here (JSON)")
    p.add_argument("--json", action="store_true", help="one JSON line per stream count (used by --compare)")
    args = p.parse_args()
    if args.compare:
        compare(args)
        return
    if not args.json:
        print(f"{args.threads} torch threads, load average {os.getloadavg()[0]:.2f}, variant {args.variant}")
    for res in measure(args):
        if args.json:
            print(json.dumps(res), flush=True)
        else:
            print(line(f"{res['streams']:3d} streams", res, args.itl_ms, args.stream_tokens) +
                  f"  [{', '.join(res['applied']) or 'none'}]", flush=True)


if __name__ == "__main__":
    main()
