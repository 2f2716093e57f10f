"""`rtserve generate`: one-shot offline generation on the local model (no server)."""
from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="rtserve generate", description=__doc__)
    ap.add_argument("prompt", nargs="?", default="What is the capital of France? Answer in one sentence.")
    ap.add_argument("--model", default="", help="GGUF file or HF directory (default: embedded SmolLM2)")
    ap.add_argument("--raw", action="store_true", help="send the prompt as-is, without the chat template")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)

    from rtserve import LLM, SamplingParams
    start = time.monotonic()
    llm = LLM(args.model)
    loaded = time.monotonic()
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                seed=args.seed, max_tokens=args.max_tokens)
        if args.raw:
            out = llm.generate(args.prompt, params)[0]
        else:
            out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    except ValueError as exc:
        print(f"rtserve generate: {exc}", file=sys.stderr)
        return 2
    done = time.monotonic()
    print(out.text)
    print(f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}, load {loaded - start:.2f} s, "
          f"generate {done - loaded:.2f} s]", file=sys.stderr)
    return 0
