"""Batch-1 decode, 512-token prefill, concurrent-stream ITL and cold start, side by side:
rtserve fast path (default, quantized GGUF) vs rtserve fp32 reference (`quantization="none"`) vs
Hugging Face transformers bf16 (eager, built from the same dequantized weights). A llama-cpp-python
column is added only when it is installed.

Every number drives the engine core directly (`EngineCore.step()`: schedule, model, sampling, update),
no HTTP. Measures:
  decode ms/token   one greedy stream, median step time over --decode-tokens decode steps
  prefill tok/s     one 512-token prompt in one step (median of 3, prefix cache off)
  N streams         N concurrent greedy streams (64-token prompts) after their prefills: per-step ITL
                    p50/p99 over --stream-steps steps, aggregate tok/s = N / mean step time
  cold start        a fresh interpreter: import + `LLM()` ready, second start (caches warm)

Usage: python benchmarks/decode_latency.py [--threads N] [--streams 1,8,16,32] [--engines fast,fp32,hf]
(about 2-3 minutes with the defaults).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time

import torch

PREFILL_LEN = 512
STREAM_PROMPT_LEN = 64
COLD_START = ("import time; t = time.perf_counter(); import torch; torch.set_num_threads({threads}); "
              "from rtserve import LLM; LLM(quantization={quant!r}); print(time.perf_counter() - t)")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def prompt_ids(n: int, seed: int, vocab: int = 49152) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n,), generator=g).tolist()


# --- rtserve ----------------------------------------------------------------------------------------

class RtserveEngine:
    def __init__(self, quantization: str, max_streams: int) -> None:
        from rtserve.config import CacheConfig, EngineConfig, RTConfig, SchedulerConfig
        from rtserve.engine.core import EngineCore
        # FCFS: every stream runs at once (the deadline policy would cap the running set to fit 50 ms).
        self.config = EngineConfig(quantization=quantization, cache=CacheConfig(enable_prefix_caching=False),
                                   rt=RTConfig(policy="fcfs"),
                                   scheduler=SchedulerConfig(max_num_batched_tokens=PREFILL_LEN,
                                                             max_num_seqs=max(64, max_streams)))
        self.core = EngineCore.from_config(self.config)
        self._n = 0

    def _add(self, ids: list[int], max_tokens: int) -> None:
        from rtserve.protocol import EngineCoreRequest
        from rtserve.sampling_params import SamplingParams
        self._n += 1
        self.core.add_request(EngineCoreRequest(f"b{self._n}", ids, SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True), time.monotonic()))

    def _timed_steps(self, max_steps: int) -> list[float]:
        times = []
        while self.core.has_unfinished and len(times) < max_steps:
            start = time.perf_counter()
            self.core.step()
            times.append(time.perf_counter() - start)
        return times

    def _drain(self) -> None:
        self.core.abort_requests([r.request_id for r in list(self.core.scheduler.running)
                                  + list(self.core.scheduler.waiting)])
        while self.core.has_unfinished:
            self.core.step()

    def decode_ms(self, num_tokens: int) -> float:
        self._add(prompt_ids(32, 1), num_tokens + 1)
        times = self._timed_steps(num_tokens + 1)[1:]  # the first step is the prefill
        self._drain()
        return statistics.median(times) * 1e3

    def prefill_tok_s(self) -> float:
        times = []
        for seed in range(3):
            self._add(prompt_ids(PREFILL_LEN, 10 + seed), 1)
            times.append(self._timed_steps(1)[0])
            self._drain()
        return PREFILL_LEN / statistics.median(times)

    def streams(self, n: int, steps: int) -> list[float]:
        for i in range(n):
            self._add(prompt_ids(STREAM_PROMPT_LEN, 100 + i), 2000)
        while self.core.scheduler.waiting or any(
                r.num_computed_tokens < len(r.prompt_token_ids) for r in self.core.scheduler.running):
            self.core.step()  # prefills (and the first decodes riding along)
        times = self._timed_steps(steps)
        self._drain()
        return times


# --- Hugging Face transformers bf16 -------------------------------------------------------------------

class HFEngine:
    """transformers' LlamaForCausalLM in bf16, eager, greedy with its DynamicCache."""

    def __init__(self) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM
        from rtserve.model.loader import default_model_path, load_model
        loaded = load_model(default_model_path())
        c = loaded.config
        self.model = LlamaForCausalLM(LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
            num_key_value_heads=c.num_kv_heads,
            max_position_embeddings=c.max_position, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
            tie_word_embeddings=True)).eval()
        self.model.load_state_dict(loaded.weights, strict=False)
        self.model.tie_weights()
        self.model.to(torch.bfloat16)

    @torch.inference_mode()
    def _run(self, batch: list[list[int]], decode_steps: int) -> tuple[float, list[float]]:
        ids = torch.tensor(batch)
        start = time.perf_counter()
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - start
        cache, times = out.cache if hasattr(out, "cache") else out.past_key_values, []
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(decode_steps):
            start = time.perf_counter()
            out = self.model(input_ids=token, cache=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - start)
        return prefill_s, times

    def decode_ms(self, num_tokens: int) -> float:
        return statistics.median(self._run([prompt_ids(32, 1)], num_tokens)[1]) * 1e3

    def prefill_tok_s(self) -> float:
        times = [self._run([prompt_ids(PREFILL_LEN, 10 + s)], 0)[0] for s in range(3)]
        return PREFILL_LEN / statistics.median(times)

    def streams(self, n: int, steps: int) -> list[float]:
        return self._run([prompt_ids(STREAM_PROMPT_LEN, 100 + i) for i in range(n)], steps)[1]


def cold_start_s(quantization: str, threads: int) -> float:
    """Seconds from a fresh interpreter to a ready `LLM`; run twice, the second start is reported."""
    code = COLD_START.format(threads=threads, quant=quantization)
    result = 0.0
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        result = float(out.stdout.strip().splitlines()[-1])
    return result


def measure(name: str, engine, args) -> dict[str, str]:
    row = {"decode ms/token (batch 1)": f"{engine.decode_ms(args.decode_tokens):.1f}",
           f"prefill tok/s ({PREFILL_LEN})": f"{engine.prefill_tok_s():.0f}"}
    for n in args.stream_counts:
        times = engine.streams(n, args.stream_steps)
        p50, p99 = percentile(times, 50) * 1e3, percentile(times, 99) * 1e3
        row[f"{n} streams: ITL p50/p99 ms"] = f"{p50:.0f} / {p99:.0f}"
        row[f"{n} streams: tok/s"] = f"{n / statistics.mean(times):.0f}"
    print(f"  {name} done", file=sys.stderr)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--streams", default="1,8,16,32")
    ap.add_argument("--engines", default="fast,fp32,hf")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--stream-steps", type=int, default=24)
    ap.add_argument("--no-cold-start", action="store_true")
    args = ap.parse_args()
    args.stream_counts = [int(n) for n in args.streams.split(",")]
    torch.set_num_threads(args.threads)
    engines = args.engines.split(",")
    columns: dict[str, dict[str, str]] = {}
    for name in engines:
        if name == "hf":
            columns["HF bf16"] = measure(name, HFEngine(), args)
            columns["HF bf16"]["cold start s (2nd)"] = "n/a"
            continue
        quantization = {"fast": "auto", "fp32": "none"}[name]
        label = {"fast": "rtserve fast", "fp32": "rtserve fp32 ref"}[name]
        columns[label] = measure(name, RtserveEngine(quantization, max(args.stream_counts)), args)
        columns[label]["cold start s (2nd)"] = "skipped" if args.no_cold_start else \
            f"{cold_start_s(quantization, args.threads):.2f}"
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python is not installed (install it in its own venv): its column is skipped")
    print(f"threads={args.threads}, torch {torch.__version__}")
    rows = list(next(iter(columns.values())))
    width = max(len(r) for r in rows)
    print(f"{'':<{width}} " + " ".join(f"{c:>18}" for c in columns))
    for r in rows:
        print(f"{r:<{width}} " + " ".join(f"{columns[c].get(r, ''):>18}" for c in columns))


if __name__ == "__main__":
    main()
