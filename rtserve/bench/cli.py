"""`rtserve bench`: argument parsing and the top-level flow (run -> metrics -> report/plots)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys

import httpx

from rtserve.bench.config import (LEN_DISTS, WORKLOADS, BenchConfig, parse_goodput, parse_mix,
                                  parse_rates)
from rtserve.bench.metrics import compute_phase_metrics

_EPILOG = """examples:
  rtserve bench --base-url http://127.0.0.1:8000 --rate 4 --num-requests 200 --goodput ttft:500 tpot:50
  rtserve bench --workload realtime-mix --mix firm:0.3,soft:0.5,batch:0.2 --sweep-rates 1,2,4,8
  rtserve bench --compare A/results.json B/results.json"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtserve bench", epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="SLO load generator for any OpenAI-compatible server.")
    t = p.add_argument_group("target")
    t.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (a /v1 suffix is ok)")
    t.add_argument("--model", help="model id (default: the first id of GET /v1/models)")
    t.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default $OPENAI_API_KEY")
    t.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    t.add_argument("--timeout-s", type=float, default=600.0, help="per-request HTTP timeout")
    a = p.add_argument_group("arrivals and bounds (per phase)")
    a.add_argument("--rate", default="inf", help="requests/s, Poisson (or gamma); inf = all at once")
    a.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson, <1 burstier")
    a.add_argument("--sweep-rates", help="comma-separated rates, one phase each (overrides --rate)")
    a.add_argument("--max-concurrency", type=int, help="cap on requests in flight")
    a.add_argument("--num-requests", type=int, help="requests per phase (default 100 without --duration-s)")
    a.add_argument("--duration-s", type=float, help="stop sending after this; in-flight requests are cancelled")
    a.add_argument("--seed", type=int, default=0)
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=WORKLOADS, default="synthetic")
    w.add_argument("--input-len", type=int, default=256, help="synthetic prompt tokens (mean)")
    w.add_argument("--output-len", type=int, help="max_tokens (mean for synthetic; default per workload)")
    w.add_argument("--len-dist", choices=LEN_DISTS, default="fixed", help="synthetic length distribution")
    w.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix system prompt tokens")
    w.add_argument("--long-input-len", type=int, default=2048, help="batch/long prompt tokens")
    w.add_argument("--long-output-len", type=int, default=128, help="batch/long max_tokens")
    w.add_argument("--long-every", type=int, default=8, help="interference: every Nth request is long")
    w.add_argument("--mix", default="firm:0.3,soft:0.5,batch:0.2", help="realtime-mix class shares")
    w.add_argument("--ignore-eos", action="store_true", help='send "ignore_eos": true')
    w.add_argument("--extra-body", default="{}", help="JSON merged into every request body")
    r = p.add_argument_group("real-time extension and SLOs")
    r.add_argument("--rt-extension", choices=("auto", "on", "off"), default="auto",
                   help='attach {"rt": {...}} budgets; auto = on when owned_by is "rtserve"')
    r.add_argument("--rt-ttft-ms", type=float, default=500.0, help="firm/soft TTFT budget")
    r.add_argument("--rt-itl-ms", type=float, default=50.0, help="firm/soft per-token budget")
    r.add_argument("--rt-deadline-ms", type=float, help="firm/soft end-to-end deadline (optional)")
    r.add_argument("--goodput", nargs="+", metavar="KEY:MS",
                   help="SLO limits, e.g. ttft:500 tpot:50 itl:50 e2e:5000 (itl = largest gap)")
    o = p.add_argument_group("output")
    o.add_argument("--result-dir", help="write results.json and PNG plots here")
    o.add_argument("--no-progress", action="store_true", help="no live progress line on stderr")
    o.add_argument("--no-plots", action="store_true", help="results.json only")
    o.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="compare two runs and exit")
    return p


def config_from_args(args: argparse.Namespace, argv: list[str]) -> BenchConfig:
    """Raises ValueError on invalid values (reported as a usage error)."""
    rates = parse_rates(args.sweep_rates if args.sweep_rates else args.rate)
    extra_body = json.loads(args.extra_body)
    if not isinstance(extra_body, dict):
        raise ValueError("--extra-body must be a JSON object")
    return BenchConfig(
        base_url=args.base_url, model=args.model, api_key=args.api_key, endpoint=args.endpoint,
        workload=args.workload, rates_per_s=rates, burstiness=args.burstiness,
        max_concurrency=args.max_concurrency, num_requests=args.num_requests,
        duration_s=args.duration_s, seed=args.seed, input_len=args.input_len,
        output_len=args.output_len, len_dist=args.len_dist, prefix_len=args.prefix_len,
        long_input_len=args.long_input_len, long_output_len=args.long_output_len,
        long_every=args.long_every, mix=parse_mix(args.mix),
        rt_extension={"auto": None, "on": True, "off": False}[args.rt_extension],
        rt_ttft_ms=args.rt_ttft_ms, rt_itl_ms=args.rt_itl_ms, rt_deadline_ms=args.rt_deadline_ms,
        ignore_eos=args.ignore_eos, extra_body=extra_body, goodput=parse_goodput(args.goodput),
        timeout_s=args.timeout_s, result_dir=args.result_dir, show_progress=not args.no_progress,
        make_plots=not args.no_plots, command_line="rtserve bench " + shlex.join(argv))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare:
        return _compare(*args.compare)
    try:
        cfg = config_from_args(args, argv)
    except ValueError as exc:
        parser.error(str(exc))
    return _run(cfg)


def _run(cfg: BenchConfig) -> int:
    from rtserve.bench.report import build_results, format_phase, format_sweep, write_results
    from rtserve.bench.runner import run_bench

    try:
        run = asyncio.run(run_bench(cfg))
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        print(f"rtserve bench: cannot reach or use {cfg.base_url}: {exc!r}", file=sys.stderr)
        return 1
    metrics = [compute_phase_metrics(p.records, p.duration_s, p.rate_per_s, cfg.goodput)
               for p in run.phases]
    limits_text = " ".join(f"{k.removesuffix('_ms')}<={v:g}ms" for k, v in cfg.goodput.as_dict().items())
    print(f"target {run.target.url}  model {run.target.model}  owned_by {run.target.owned_by}  "
          f"rt extension {'on' if run.target.rt_extension else 'off'}  workload {cfg.workload}")
    for m in metrics:
        print(format_phase(m, limits_text))
    if len(metrics) > 1:
        print(format_sweep(metrics))
    if cfg.result_dir:
        doc = build_results(run, metrics)
        print(f"wrote {write_results(doc, cfg.result_dir)}")
        if cfg.make_plots:
            from rtserve.bench.plots import write_plots
            for path in write_plots(doc, cfg.result_dir):
                print(f"wrote {path}")
    return 0 if any(m.num_completed for m in metrics) else 1


def _compare(path_a: str, path_b: str) -> int:
    from rtserve.bench.compare import compare_results
    from rtserve.bench.report import load_results

    try:
        doc_a, doc_b = load_results(path_a), load_results(path_b)
    except (OSError, ValueError) as exc:
        print(f"rtserve bench --compare: {exc}", file=sys.stderr)
        return 1
    print(compare_results(doc_a, doc_b, path_a, path_b))
    return 0
