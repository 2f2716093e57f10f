"""Speculative decoding on the real SmolLM2-135M: batch-1 speed-up and aggregate throughput, on vs off.

Drives `EngineCore.step()` directly (no HTTP), greedy, chat-templated prompts of two kinds:
  copy   input-grounded ("Repeat the following text exactly", rename a variable in code, fix a typo):
         prompt lookup should find most of the answer in the prompt
  chat   open questions: little to copy; adaptive k should fall back to plain decoding
Measures (tok/s: the median over the repeats; xN: the median over the repeats of method / off):
  batch 1      per prompt: output tok/s after the first token, off vs each method, acceptance
               (accepted / proposed draft tokens), mean tokens per verify step, greedy identity
  N streams    N concurrent requests (--stream-mix: all prompts in turn, or only copy / chat ones),
               EOS ignored (every engine runs the same batch shapes). --stream-mode steady (default):
               N kept in flight, a finished request replaced at once, request i generating a fixed
               0.5x-1.5x --max-tokens (completions spread out as with real traffic), until each engine
               emitted --turnover x N x --max-tokens tokens; burst: N added at once, each generating
               --max-tokens, run to completion (its tail of small batches, and its waves of requests
               finishing together, favour whichever engine keeps its requests in step).
               Output tok/s over the engine's own steps, each method vs off per repeat [min-max]
The methods' engines run side by side in one process and take turns step by step (the order rotating
every round), each timed over its own steps only: on a shared machine the load of the moment then
falls on every method alike, which a run-after-run comparison cannot ensure. Each engine's scheduler
clock stands still while the others step, so its deadlines see only its own steps, as if it ran alone.
The engines' thread governors are off (--governor keeps them): torch's thread count is process-wide.
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
import itertools
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
    if not args.governor:  # torch's thread count is process-wide: one engine's governor would set it for all
        core.thread_governor = None
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


def run(cores: dict, prompts: list[list[int]], max_tokens: int,
        ignore_eos: bool = False) -> dict[str, tuple[dict[str, list[int]], Timing]]:
    """The same prompts, all at once, greedy, on every engine; steps interleaved across engines.
    `ignore_eos`: every request generates exactly max_tokens, so every engine runs the same batch
    shapes (greedy fast-path outputs may part at a near tie between engines, and a request that
    stops earlier in one engine would leave it a smaller, cheaper batch).
    Returns per engine (tokens per request, its own step time)."""
    from rtserve.protocol import EngineCoreRequest
    from rtserve.sampling_params import SamplingParams
    for core in cores.values():
        for i, ids in enumerate(prompts):
            core.add_request(EngineCoreRequest(f"q{i}", ids, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                          ignore_eos=ignore_eos),
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


def run_steady(cores: dict, prompts: list[list[int]], concurrency: int, max_tokens: int,
               target_tokens: int) -> dict[str, tuple[int, Timing]]:
    """Every engine keeps `concurrency` requests in flight (a finished request is replaced at once by
    the next prompt in turn) until it has emitted `target_tokens`; steps interleaved across engines as
    in `run`. Returns per engine (tokens emitted, its step time).

    Request i generates exactly `output_len(i, max_tokens)` tokens: the same lengths on every engine,
    spread from 0.5x to 1.5x max_tokens so that completions do not come in waves. A fixed batch run to
    completion ends in a tail where the slowest requests decode in small, inefficient batches (with
    speculation the copy requests finish first and leave the chat ones that tail); and requests of
    one length started together finish together, so the engine without speculation refills in large,
    efficient prefill waves while speculation desynchronises its requests. A server with steady
    traffic sees neither.
    """
    from rtserve.protocol import EngineCoreRequest
    from rtserve.sampling_params import SamplingParams
    state = {name: [0, 0, Timing()] for name in cores}  # requests submitted, tokens emitted, step time

    def submit(name: str) -> None:
        core, st = cores[name], state[name]
        ids = prompts[st[0] % len(prompts)]
        core.add_request(EngineCoreRequest(f"s{next(_request_ids)}", ids, SamplingParams(
            temperature=0.0, max_tokens=output_len(st[0], max_tokens), ignore_eos=True), core.scheduler.clock()))
        st[0] += 1

    for name in cores:
        for _ in range(concurrency):
            submit(name)
    order = list(cores)
    while any(st[1] < target_tokens for st in state.values()):
        for name in order:
            core, st = cores[name], state[name]
            if st[1] >= target_tokens:
                continue
            core.scheduler.clock.resume()
            start = time.perf_counter()
            outputs = core.step().outputs
            st[2].total_s += time.perf_counter() - start
            core.scheduler.clock.pause()
            for out in outputs:
                st[1] += len(out.new_token_ids)
                if out.finish_reason is not None:
                    submit(name)
        order = order[1:] + order[:1]
    for core in cores.values():  # the requests still in flight are not part of the measurement
        core.scheduler.clock.resume()
        core.abort_requests([r.request_id for r in (*core.scheduler.running, *core.scheduler.waiting)])
        while core.has_unfinished:
            core.step()
        core.scheduler.clock.pause()
    return {name: (st[1], st[2]) for name, st in state.items()}


_request_ids = itertools.count()


def output_len(i: int, max_tokens: int) -> int:
    """Request i's output length: 0.5x to 1.5x max_tokens, spread evenly (golden-ratio sequence)."""
    return max(1, round(max_tokens * (0.5 + (i * 0.6180339887) % 1.0)))


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
    p.add_argument("--governor", action="store_true",
                   help="keep the engines' thread governors (default: threads pinned to --threads)")
    p.add_argument("--stop-at-eos", action="store_true",
                   help="burst stream runs stop at EOS (default: every stream generates --max-tokens)")
    p.add_argument("--stream-mode", default="steady", choices=("steady", "burst"),
                   help="steady: N requests kept in flight until each engine emitted --turnover x N x "
                        "--max-tokens tokens; burst: N requests at once, run to completion")
    p.add_argument("--turnover", type=float, default=2.0)
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
            if args.stream_mode == "steady":
                results = run_steady(cores, mix, n, args.max_tokens, int(args.turnover * n * args.max_tokens))
            else:
                results = {method: (sum(len(t) for t in tokens.values()), timing) for method, (tokens, timing)
                           in run(cores, batch, args.max_tokens, not args.stop_at_eos).items()}
            for method, (num_tokens, timing) in results.items():
                rates[method].append(num_tokens / timing.total_s)
        for method in methods:
            rate = statistics.median(rates[method])
            drafts = spec_summary(before[method], spec_counts(cores[method])) if method != "off" else ""
            ratios = [r / b for r, b in zip(rates[method], rates["off"])]
            print(f"{method:12s} {rate:7.1f} tok/s  x{paired_ratio(rates, method):4.2f} "
                  f"[{min(ratios):.2f}-{max(ratios):.2f}]  (runs: "
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
