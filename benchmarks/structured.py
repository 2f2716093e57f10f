"""What grammar-constrained decoding costs: step time constrained vs unconstrained at the same batch
size, the grammar compile, and jump-forward's tokens per step.

Drives the engine core directly (default SmolLM2 model, FCFS, no server). For each batch size, N
greedy streams run either unconstrained (ignore_eos) or under a JSON schema that cannot finish inside
the window (an array of at least 100 objects), jump-forward off, so both emit one token per stream
per step; rounds alternate plain / constrained and the medians of the rounds are reported. Step time
p99 is each stream's inter-token time at one token per step. Compile: a typical schema on a fresh
compiler (the vocabulary built first), then again (cached). Jump-forward: a constrained stream with
long fixed keys, tokens emitted per step with it on.

Usage: PYTHONPATH=. python benchmarks/structured.py [--threads 2] [--streams 1,16] [--steps 60] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_latency import RtserveEngine, percentile, prompt_ids  # noqa: E402

from rtserve.protocol import EngineCoreRequest  # noqa: E402
from rtserve.sampling_params import SamplingParams, StructuredOutputs  # noqa: E402
from rtserve.structured.compiler import GrammarService  # noqa: E402

ITEM = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "value": {"type": "integer"}},
        "required": ["name", "value"], "additionalProperties": False}
LONG = {"type": "array", "items": ITEM, "minItems": 100}
TYPICAL = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string"}, "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 5},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["street"]},
    "score": {"anyOf": [{"type": "number"}, {"type": "null"}]}}, "required": ["name", "age"]}
KEYS = {"type": "array", "minItems": 4, "maxItems": 4, "items": {
    "type": "object", "properties": {"identifier_of_the_customer_account": {"type": "integer", "maximum": 99},
                                     "customer_is_currently_active": {"type": "boolean"}},
    "required": ["identifier_of_the_customer_account", "customer_is_currently_active"],
    "additionalProperties": False}}


def add(engine: RtserveEngine, n: int, schema: dict | None, max_tokens: int) -> None:
    for i in range(n):
        extra = {"structured": StructuredOutputs("json", json.dumps(schema))} if schema else {"ignore_eos": True}
        engine._n += 1
        engine.core.add_request(EngineCoreRequest(f"s{engine._n}", prompt_ids(64, 100 + i), SamplingParams(
            temperature=0.0, max_tokens=max_tokens, **extra), time.monotonic(), eos_token_ids=(2,)))


def decode_steps_ms(engine: RtserveEngine, n: int, schema: dict | None, steps: int) -> list[float]:
    add(engine, n, schema, steps + 50)
    sched = engine.core.scheduler
    while sched.waiting or any(r.num_computed_tokens < len(r.prompt_token_ids) for r in sched.running):
        engine.core.step()
    times = []
    while len(times) < steps and len(sched.running) == n:
        start = time.perf_counter()
        engine.core.step()
        times.append((time.perf_counter() - start) * 1e3)
    engine._drain()
    return times


def compile_ms(service: GrammarService, schema: dict) -> float:
    start = time.perf_counter()
    service.submit(StructuredOutputs("json", json.dumps(schema))).result()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", default="1,16")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.streams.split(",")]
    engine = RtserveEngine("auto", max(sizes))
    engine.core.thread_governor = None
    print(f"{args.threads} torch threads, load average {os.getloadavg()[0]:.2f}", flush=True)

    service = GrammarService(engine.core.grammars._make_tokenizer_info)
    vocab_ms = compile_ms(service, {"type": "boolean"})
    cold, cached = compile_ms(service, TYPICAL), compile_ms(service, TYPICAL)
    print(json.dumps({"compile_ms": {"first_incl_vocab": round(vocab_ms, 1), "typical_cold": round(cold, 2),
                                     "typical_cached": round(cached, 3)}}), flush=True)

    for schema in (LONG, KEYS):  # the engine's own compiler: vocabulary and grammars ready before timing
        engine.core.grammars.submit(StructuredOutputs("json", json.dumps(schema))).result()
    engine.core.request_drafts = False
    for n in sizes:
        plain, constrained = [], []
        for _ in range(args.rounds):
            plain.append(decode_steps_ms(engine, n, None, args.steps))
            constrained.append(decode_steps_ms(engine, n, LONG, args.steps))
        p50 = [statistics.median(statistics.median(r) for r in runs) for runs in (plain, constrained)]
        p99 = [statistics.median(percentile(r, 99) for r in runs) for runs in (plain, constrained)]
        print(json.dumps({"streams": n, "step_ms_p50": {"plain": round(p50[0], 2), "constrained": round(p50[1], 2)},
                          "overhead_p50": round(p50[1] / p50[0] - 1, 3),
                          "itl_ms_p99": {"plain": round(p99[0], 2), "constrained": round(p99[1], 2)}}), flush=True)

    for jump in (False, True):
        engine.core.request_drafts = jump
        add(engine, 1, KEYS, 400)
        num_steps = num_tokens = 0
        while engine.core.has_unfinished:
            num_tokens += sum(len(o.new_token_ids) for o in engine.core.step().outputs)
            num_steps += 1
        print(json.dumps({"jump_forward": jump, "tokens": num_tokens, "steps": num_steps,
                          "tokens_per_step": round(num_tokens / num_steps, 2)}), flush=True)


if __name__ == "__main__":
    main()
