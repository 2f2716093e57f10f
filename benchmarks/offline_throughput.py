"""Offline throughput: rtserve (continuous batching) vs Hugging Face transformers one request at a time.

Both run in this process on the same GGUF weights, side by side. rtserve serves all requests at once;
HF generates a sample of the same requests sequentially (it would take too long to run them all on
2 cores) and its tokens/s is compared with rtserve's. Also reports batch-1 decode ms/token and
prefill tokens/s for rtserve.

    python benchmarks/offline_throughput.py --num-requests 200 --hf-requests 12
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch


def make_requests(n: int, seed: int, vocab: int) -> list[tuple[list[int], int]]:
    """Mixed prompt/output lengths: log-uniform prompts 16..1024 tokens, outputs 16..256."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        prompt_len = int(2 ** rng.uniform(4, 10))
        output_len = int(2 ** rng.uniform(4, 8))
        reqs.append(([rng.randrange(100, vocab) for _ in range(prompt_len)], output_len))
    return reqs


def run_rtserve(llm, reqs) -> dict:
    from rtserve import SamplingParams
    from rtserve.engine.core import EngineCore  # noqa: F401 (documented path)
    from rtserve.protocol import EngineCoreRequest
    core = llm.core
    start = time.perf_counter()
    for i, (prompt, out_len) in enumerate(reqs):
        core.add_request(EngineCoreRequest(f"b{i}", prompt, SamplingParams(
            temperature=0.0, max_tokens=out_len, ignore_eos=True), time.monotonic()))
    generated = 0
    while core.has_unfinished:
        generated += sum(len(o.new_token_ids) for o in core.step().outputs)
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(p) for p, _ in reqs)
    return {"requests": len(reqs), "elapsed_s": elapsed, "output_tokens": generated,
            "prompt_tokens": prompt_tokens, "output_tok_s": generated / elapsed,
            "total_tok_s": (generated + prompt_tokens) / elapsed, "preemptions": core.scheduler.num_preemptions}


def run_hf(reqs) -> dict:
    from transformers import AutoModelForCausalLM

    from rtserve.model.loader import default_model_path
    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    generated, prompt_tokens = 0, 0
    start = time.perf_counter()
    for prompt, out_len in reqs:
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=out_len, min_new_tokens=out_len,
                              do_sample=False, pad_token_id=0)
        generated += out.shape[1] - len(prompt)
        prompt_tokens += len(prompt)
    elapsed = time.perf_counter() - start
    return {"requests": len(reqs), "elapsed_s": elapsed, "output_tokens": generated,
            "prompt_tokens": prompt_tokens, "output_tok_s": generated / elapsed,
            "total_tok_s": (generated + prompt_tokens) / elapsed}


def batch1_latency(llm, prompt_len: int = 512, decode_tokens: int = 64) -> dict:
    """Prefill tok/s for one `prompt_len` prompt, then batch-1 decode ms/token."""
    from rtserve.protocol import EngineCoreRequest
    from rtserve.sampling_params import SamplingParams
    core = llm.core
    core.kv.reset_prefix_cache()
    prompt = [random.Random(7).randrange(100, 40000) for _ in range(prompt_len)]
    core.add_request(EngineCoreRequest("lat", prompt, SamplingParams(
        temperature=0.0, max_tokens=decode_tokens, ignore_eos=True), time.monotonic()))
    t0 = time.perf_counter()
    first_token_at, steps = None, []
    while core.has_unfinished:
        s = time.perf_counter()
        outs = core.step().outputs
        if outs and first_token_at is None:
            first_token_at = time.perf_counter()
        elif outs:
            steps.append(time.perf_counter() - s)
    steps.sort()
    return {"prefill_tokens": prompt_len, "prefill_s": first_token_at - t0,
            "prefill_tok_s": prompt_len / (first_token_at - t0),
            "decode_ms_per_token_p50": 1000 * steps[len(steps) // 2],
            "decode_ms_per_token_mean": 1000 * sum(steps) / len(steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--hf-requests", type=int, default=12, help="sample run through HF (0 = skip HF)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()

    from rtserve import LLM
    llm = LLM(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)
    reqs = make_requests(args.num_requests, args.seed, llm.tokenizer.vocab_size)
    results = {"config": vars(args), "threads": torch.get_num_threads()}
    results["batch1"] = batch1_latency(llm)
    print("batch-1:", json.dumps(results["batch1"], indent=None))
    results["rtserve"] = run_rtserve(llm, reqs)
    print("rtserve:", json.dumps(results["rtserve"]))
    if args.hf_requests:
        results["hf_sequential"] = run_hf(reqs[:args.hf_requests])
        print("hf sequential:", json.dumps(results["hf_sequential"]))
        ratio = results["rtserve"]["output_tok_s"] / results["hf_sequential"]["output_tok_s"]
        results["output_tok_s_ratio"] = ratio
        print(f"rtserve / HF one-at-a-time output tok/s: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
