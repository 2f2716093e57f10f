"""Speculative decoding on the real SmolLM2-135M: batch-1 speed-up and aggregate throughput, on vs off.

Drives `EngineCore.step()` directly (no HTTP), greedy, chat-templated prompts of two kinds:
  copy   input-grounded ("Repeat the following text exactly", rename a variable in code, fix a typo):
         prompt lookup should find most of the answer in the prompt
  chat   open questions: little to copy; adaptive k should fall back to plain decoding
Measures (tok/s: the median over the repeats; xN: the median over the repeats of method / off):
  batch 1      per prompt: output tok/s after the first token, off vs each method, acceptance
               (accepted / proposed draft tokens), mean tokens per verify step, greedy identity
  N streams    N concurrent requests (--stream-mix: all prompts in turn, or only copy / chat ones),
               all added at once: output tok/s over the whole run, each method vs off
The methods' engines run side by side in one process and take turns step by step (the order rotating
every round), each timed over its own steps only: on a shared machine the load of the moment then
falls on every method alike, which a run-after-run comparison cannot ensure. Each engine's scheduler
clock stands still while the others step, so its deadlines see only its own steps, as if it ran alone.
Methods: off, ngram (adaptive k), ngram-fixed (k always 4 when there is a match), and with
--draft-layers L a layer-skip draft (the target's first L layers + its LM head: same tokenizer);
off2 is a second engine without speculation, an A/A check of the measurement's noise floor.

Requests carry the default real-time budgets (soft class, 50 ms ITL): under `--policy deadline` (the
server's default) adaptive k never lets a verify step run past the tightest stream's ITL slack, so
large batches whose plain decode step is already over budget do not speculate; `--policy fcfs` has no
step-time budget and shows the throughput trade-off alone. The load average is printed before and
after each section: other processes on the machine move these figures a lot.

Run it from the repository root with the checkout first on the path (PYTHONPATH=. or python -m):
       PYTHONPATH=. python benchmarks/spec_decode.py [--threads 2] [--max-tokens 128] [--streams 16,32]
       [--methods off,ngram,ngram-fixed] [--draft-layers 0] [--quantization auto] [--policy deadline]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch

PARAGRAPH = ("The committee met on Tuesday to review the budget for the new library. After a long discussion, "
             "the members agreed to extend the opening hours on weekends, to buy more books for children, and "
             "to repair the roof before the winter. The final vote was unanimous, and the plan will be "
             "presented to the city council next month.")
CODE = ('def total_price(items, tax_rate):\n    total = 0\n    for item in items:\n'
        '        total += item.price * item.quantity\n    total = total * (1 + tax_rate)\n    return total\n')
PROMPTS = {
    "copy-repeat": "Repeat the following text exactly, without any changes:\n\n" + PARAGRAPH,
    "copy-code": "Rename the variable `total` to `subtotal` in this Python function and output the whole "
                 "function:\n\n" + CODE,
    "copy-typo": "Fix the spelling mistakes and output the corrected text:\n\n"
                 + PARAGRAPH.replace("committee", "comittee").replace("library", "libary"),
    "chat-story": "Tell me a short story about a dragon who learns to cook.",
    "chat-advice": "What are some good habits for staying healthy while working from home?",
}


def build_core(method: str, args, max_streams: int):
    from rtserve.config import CacheConfig, EngineConfig, RTConfig, SchedulerConfig, SpeculativeConfig
    from rtserve.engine.core import EngineCore
    from rtserve.model.loader import default_model_path, load_model
    from rtserve.model.quantized_loader import load_fast_checkpoint
    spec = {"off": SpeculativeConfig(), "off2": SpeculativeConfig(),
            "ngram": SpeculativeConfig(method="ngram", num_speculative_tokens=args.k),
            "ngram-fixed": SpeculativeConfig(method="ngram", num_speculative_tokens=args.k, adaptive=False),
            "draft": SpeculativeConfig(method="draft", num_speculative_tokens=args.k)}[method]
    config = EngineConfig(quantization=args.quantization, speculative=spec, rt=RTConfig(policy=args.policy),
                          scheduler=SchedulerConfig(max_num_batched_tokens=1024, max_num_seqs=max(64, max_streams)),
                          cache=CacheConfig(enable_prefix_caching=False))
    path = default_model_path()
    fast = load_fast_checkpoint(path, "") if args.quantization == "auto" else None
    loaded = None if fast is not None else load_model(path)
    model_config, weights = (fast.config, fast) if fast is not None else (loaded.config, loaded.weights)
    proposer = None
    if method == "draft":
        from rtserve.spec.draft_model import DraftModelProposer
        full = loaded or load_model(path)
        draft_cfg = dataclasses.replace(full.config, num_layers=args.draft_layers)
        proposer = DraftModelProposer.from_weights(draft_cfg, full.weights, num_blocks=2048,
                                                   block_size=config.cache.block_size)
    core = EngineCore(config, model_config, weights, proposer=proposer)
    core.scheduler.clock = EngineClock()
    return core


class EngineClock:
    """Monotonic seconds that stand still between `pause()` and `resume()` (it starts paused)."""

    def __init__(self) -> None:
        self._paused_s = 0.0
        self._paused_at: float | None = time.monotonic()

    def __call__(self) -> float:
        return (time.monotonic() if self._paused_at is None else self._paused_at) - self._paused_s

    def resume(self) -> None:
        self._paused_s += time.monotonic() - self._paused_at
        self._paused_at = None

    def pause(self) -> None:
        self._paused_at = time.monotonic()


def prompt_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]),
                            add_special_tokens=False)


def run(cores: dict, prompts: list[list[int]], max_tokens: int) -> dict[str, tuple[dict[str, list[int]], Timing]]:
    """The same prompts, all at once, greedy, on every engine; steps interleaved across engines.
    Returns per engine (tokens per request, its own step time)."""
    from rtserve.protocol import EngineCoreRequest
    from rtserve.sampling_params import SamplingParams
    for core in cores.values():
        for i, ids in enumerate(prompts):
            core.add_request(EngineCoreRequest(f"q{i}", ids, SamplingParams(temperature=0.0, max_tokens=max_tokens),
                                               core.scheduler.clock()))
    results = {name: ({}, Timing()) for name in cores}
    order = list(cores)
    while any(core.has_unfinished for core in cores.values()):
        for name in order:
            core, (tokens, timing) = cores[name], results[name]
            if not core.has_unfinished:
                continue
            core.scheduler.clock.resume()
            start = time.perf_counter()
            outputs = core.step().outputs
            step_s = time.perf_counter() - start
            core.scheduler.clock.pause()
            timing.total_s += step_s
            if len(tokens) == len(prompts):  # every request had its first token before this step
                timing.after_first_s += step_s
            for out in outputs:
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        order = order[1:] + order[:1]
    return results


@dataclasses.dataclass
class Timing:
    total_s: float = 0.0  # the engine's own steps, first to last
    after_first_s: float = 0.0  # its steps after every request had its first token


def spec_counts(core) -> tuple[int, int, int]:
    s = core.stats().spec_decode
    return (0, 0, 0) if s is None else (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens)


def spec_summary(before: tuple[int, int, int], after: tuple[int, int, int]) -> str:
    drafts, proposed, accepted = (a - b for a, b in zip(after, before))
    if not drafts:
        return "no drafts"
    return f"accept {accepted / proposed:4.0%}  tok/verify {1 + accepted / drafts:.2f}  verify steps {drafts}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--streams", default="16,32")
    p.add_argument("--methods", default="off,ngram,ngram-fixed")
    p.add_argument("--draft-layers", type=int, default=0)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-batch1", action="store_true", help="only the concurrent-stream runs")
    p.add_argument("--stream-mix", default="all", choices=("all", "copy", "chat"))
    p.add_argument("--prompts", default=",".join(PROMPTS), help="comma-separated subset of " + ",".join(PROMPTS))
    p.add_argument("--quantization", default="auto", choices=("auto", "none"))
    p.add_argument("--policy", default="deadline", choices=("deadline", "fcfs"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from rtserve.client.tokenizer import Tokenizer
    from rtserve.model.loader import default_model_path
    tokenizer = Tokenizer.load(default_model_path())
    methods = args.methods.split(",") + (["draft"] if args.draft_layers else [])
    prompts = {name: prompt_ids(tokenizer, PROMPTS[name]) for name in args.prompts.split(",")}

    print(f"policy {args.policy}, {args.threads} torch threads, k <= {args.k}")
    if not args.no_batch1:
        print(f"== batch 1, greedy, {args.max_tokens} tokens, decode tok/s after the first token ==  {load()}")
        cores = {method: build_core(method, args, 1) for method in methods}
        run(cores, [next(iter(prompts.values()))], 16)  # warm-up
        for name, ids in prompts.items():
            rates: dict[str, list[float]] = {m: [] for m in methods}
            outs, before = {}, {m: spec_counts(c) for m, c in cores.items()}
            for _ in range(args.repeats):
                for method, (tokens, timing) in run(cores, [ids], args.max_tokens).items():
                    outs[method] = tokens["q0"]
                    rates[method].append((len(tokens["q0"]) - 1) / timing.after_first_s)
            for method in methods:
                rate, out, ref = statistics.median(rates[method]), outs[method], outs["off"]
                diverge = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), None)
                same = "identical" if out == ref else f"differs from token {diverge}"
                drafts = spec_summary(before[method], spec_counts(cores[method])) if method != "off" else ""
                print(f"{name:12s} {method:12s} {rate:6.1f} tok/s  x{paired_ratio(rates, method):4.2f}  "
                      f"{len(out):3d} tokens  {drafts}  {same if method != 'off' else ''}", flush=True)

    for n in [int(x) for x in args.streams.split(",") if x]:  # streams: median of the repeats
        mix = list(prompts.values()) if args.stream_mix == "all" else [
            ids for name, ids in prompts.items() if name.startswith(args.stream_mix)]
        print(f"== {n} concurrent streams ({args.stream_mix} prompts in turn), aggregate output tok/s ==  {load()}")
        batch = [mix[i % len(mix)] for i in range(n)]
        cores = {method: build_core(method, args, n) for method in methods}
        rates = {m: [] for m in methods}
        before = {}
        run(cores, batch[:2], 8)  # warm-up
        for rep in range(args.repeats):
            if rep == args.repeats - 1:
                before = {method: spec_counts(core) for method, core in cores.items()}
            for method, (tokens, timing) in run(cores, batch, args.max_tokens).items():
                rates[method].append(sum(len(t) for t in tokens.values()) / timing.total_s)
        for method in methods:
            rate = statistics.median(rates[method])
            drafts = spec_summary(before[method], spec_counts(cores[method])) if method != "off" else ""
            print(f"{method:12s} {rate:7.1f} tok/s  x{paired_ratio(rates, method):4.2f}  (runs: "
                  f"{', '.join(f'{r:.0f}' for r in rates[method])})  {drafts}", flush=True)
        del cores
    print(f"== done ==  {load()}")


def paired_ratio(rates: dict[str, list[float]], method: str) -> float:
    """Median over the repeats of method / off: each repeat ran both side by side (a paired sample)."""
    return statistics.median(r / b for r, b in zip(rates[method], rates["off"]))


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


if __name__ == "__main__":
    main()
