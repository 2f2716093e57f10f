r"""SLO goodput of rtserve's two scheduling policies, side by side (`--policy deadline` vs `fcfs`).

For every repeat, workload and rate, each policy gets a fresh `rtserve serve` (nothing carried over
between runs: no prefix cache, no cost-model samples), waited for on /health and /ready. The load
runs through `rtserve bench` (Poisson arrivals) and, with --guidellm, through guidellm as well
(its own fresh server; `constant` rate, synthetic prompts of set token counts, /v1/completions).

One run sends round(rate * --duration-s) requests and then waits for them: a run ends when the last
request finishes, or at the hard cap of 2 * duration + --drain-s, when what is still in flight is
cancelled and counted as a miss. Every run gets its own seed (--seed + run number), or with
--paired-seeds one seed per (repeat, workload, rate), shared by the policies: identical arrivals
and prompts, which removes the sampling noise from the comparison (the servers are fresh anyway).

The policies take turns at each rate, and the order flips from one rate to the next (deadline,
fcfs, then fcfs, deadline, ...), so a drift of the shared host hits both.

A request is good when it completed with TTFT <= --ttft-ms and TPOT <= --tpot-ms (vLLM's TPOT,
(e2e - ttft) / (output tokens - 1)); attainment is good requests over all requests sent, goodput is
good requests per second of the run. Rows come from `rtserve bench`'s results.json (its metrics
module) and from guidellm's per-request JSON, judged with the same definitions.

Writes to --out-dir: slo_goodput.json (every row, rewritten after each run), slo_goodput.md (the
tables) and goodput_vs_rate.png, plus runs/<tool>/<workload>/<policy>/... (each run's raw output
and server log).

Usage (the smoke run; see benchmarks/README.md):
  .venv/bin/python benchmarks/slo_goodput.py --workloads synthetic --rates 0.5,1 --duration-s 20 \
      --guidellm /tmp/guidellm-venv/bin/python --out-dir results/slo_goodput_smoke
  .venv/bin/python benchmarks/slo_goodput.py --fcfs-rate 1.2 --multiples 0.25,0.5,1,1.5,2 --repeat 3
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from slo_goodput_guidellm import GUIDELLM_DATA, GuidellmTool  # noqa: E402
from slo_goodput_report import write_plot, write_table  # noqa: E402
from slo_goodput_server import RtserveServer, run_process_group  # noqa: E402

SCHEMA = "rtserve-slo-goodput/1"
WORKLOADS = ("synthetic", "chat", "long-prompt-interference", "realtime-mix")


def bench_workload_args(workload: str, input_len: int, output_len: int) -> list[str]:
    """`rtserve bench` flags for each workload of this benchmark."""
    if workload == "synthetic":  # the same endpoint and shape guidellm sends
        return ["--workload", "synthetic", "--endpoint", "completions", "--input-len", str(input_len),
                "--output-len", str(output_len), "--ignore-eos"]
    if workload == "chat":  # a shared 1024-token system prompt, a different question each (one turn)
        return ["--workload", "shared-prefix"]
    return ["--workload", workload]  # long-prompt-interference, realtime-mix: rt budgets sent


@dataclass(frozen=True)
class Run:
    """One load run against one fresh server."""

    tool: str
    workload: str
    policy: str
    rate_per_s: float
    multiple: float | None  # of --fcfs-rate, when rates are given that way
    repeat: int
    seed: int

    @property
    def slug(self) -> str:
        return f"{self.tool}/{self.workload}/{self.policy}/rate{self.rate_per_s:g}-rep{self.repeat}"


def plan_runs(args: argparse.Namespace, rates: list[tuple[float, float | None]],
              tools: list[str]) -> list[Run]:
    """Execution order: repeat > workload > rate > tool > policy, the policy order flipping per rate."""
    runs: list[Run] = []
    cell = 0
    for rep in range(args.repeat):
        for workload in args.workloads:
            for i, (rate, multiple) in enumerate(rates):
                order = args.policies if (i + rep) % 2 == 0 else args.policies[::-1]
                for tool in tools:
                    if tool == "guidellm" and workload not in GUIDELLM_DATA:
                        continue
                    for policy in order:
                        seed = args.seed + (cell if args.paired_seeds else len(runs))
                        runs.append(Run(tool, workload, policy, rate, multiple, rep, seed))
                cell += 1
    return runs


def bench_row(doc: dict) -> dict:
    """The row fields from one `rtserve bench` results.json (one phase)."""
    phase = doc["phases"][0]
    m = phase["metrics"]
    slo = m["slo"] or {}
    per_class = {c: {"sent": v["num_requests"], "done": v["num_completed"], "late": v["num_late"],
                     "slo_attainment_pct": _pct((v["slo"] or {}).get("attainment")),
                     "budget_attainment_pct": _pct((v["budget"] or {}).get("attainment"))}
                 for c, v in m["per_class"].items()}
    return {
        "num_sent": m["num_requests"], "num_completed": m["num_completed"],
        "num_rejected": m["num_rejected"], "num_errors": m["num_errors"],
        "num_cancelled": m["num_cancelled"], "num_dropped": m["num_dropped"],
        "ttft_p50_ms": m["ttft"]["p50_ms"], "ttft_p99_ms": m["ttft"]["p99_ms"],
        "tpot_mean_ms": m["tpot"]["mean_ms"], "tpot_p50_ms": m["tpot"]["p50_ms"],
        "tpot_p99_ms": m["tpot"]["p99_ms"], "itl_p99_ms": m["itl"]["p99_ms"],
        "slo_attainment_pct": _pct(slo.get("attainment")),
        "goodput_req_per_s": slo.get("goodput_req_per_s"),
        "throughput_req_per_s": m["request_throughput_per_s"],
        "output_tok_per_s": m["output_throughput_tok_per_s"],
        "duration_s": phase["duration_s"], "per_class": per_class,
    }


def _pct(fraction: float | None) -> float | None:
    return None if fraction is None else 100.0 * fraction


def run_rtserve_bench(run: Run, args: argparse.Namespace, base_url: str, run_dir: Path) -> dict:
    num_requests = max(2, round(run.rate_per_s * args.duration_s))
    cmd = [sys.executable, "-m", "rtserve", "bench", "--base-url", base_url,
           *bench_workload_args(run.workload, args.input_len, args.output_len),
           "--rate", f"{run.rate_per_s:g}", "--num-requests", str(num_requests),
           "--duration-s", f"{hard_cap_s(args):g}", "--seed", str(run.seed),
           "--goodput", f"ttft:{args.ttft_ms:g}", f"tpot:{args.tpot_ms:g}",
           "--result-dir", str(run_dir), "--no-progress",
           *([] if args.run_plots else ["--no-plots"]), *shlex.split(args.bench_args)]
    run_process_group(cmd, run_dir / "bench.log", timeout_s=hard_cap_s(args) + 120)
    results = run_dir / "results.json"
    if not results.is_file():
        raise RuntimeError(f"rtserve bench wrote no results.json; see {run_dir / 'bench.log'}")
    return bench_row(json.loads(results.read_text()))


def hard_cap_s(args: argparse.Namespace) -> float:
    """A run's longest span: sending takes ~duration (Poisson: longer by chance), then the drain."""
    return 2 * args.duration_s + args.drain_s


def execute(run: Run, args: argparse.Namespace, guidellm: GuidellmTool | None) -> dict:
    """Start a fresh server, run the load, stop the server; returns the row (error rows too)."""
    run_dir = Path(args.out_dir) / "runs" / run.slug
    run_dir.mkdir(parents=True, exist_ok=True)
    row = {**asdict(run), "load_avg_before": round(os.getloadavg()[0], 2), "run_dir": str(run_dir)}
    t0 = time.monotonic()
    try:
        with RtserveServer(run.policy, args.port, shlex.split(args.server_args),
                           run_dir / "server.log", args.ready_timeout_s) as server:
            row["server_start_s"] = round(time.monotonic() - t0, 2)
            t1 = time.monotonic()
            if run.tool == "rtserve-bench":
                row.update(run_rtserve_bench(run, args, server.base_url, run_dir))
            else:
                row.update(guidellm.run(run, server.base_url, run_dir, args))
            row["load_s"] = round(time.monotonic() - t1, 2)
    except (RuntimeError, TimeoutError, OSError, ValueError, KeyError) as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    row["wall_s"] = round(time.monotonic() - t0, 2)
    row["server_notes"] = server_notes(run_dir / "server.log")
    return row


def server_notes(log_path: Path, max_lines: int = 12) -> list[str]:
    """The server's start-up calibration and thread-count lines: they explain outlying runs."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    notes = [line[:240] for line in lines if "cost model" in line or "engine threads" in line]
    return notes[:max_lines]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[-4:]))
    p.add_argument("--workloads", default="synthetic", help=f"comma-separated, of {','.join(WORKLOADS)}")
    p.add_argument("--rates", help="comma-separated req/s, e.g. 0.25,0.5,1,1.5,2")
    p.add_argument("--fcfs-rate", type=float, help="a measured FCFS-sustainable rate (req/s) ...")
    p.add_argument("--multiples", help="... and the multiples of it to run, e.g. 0.25,0.5,1,1.5,2")
    p.add_argument("--duration-s", type=float, default=20.0, help="sending window per run (s)")
    p.add_argument("--drain-s", type=float, default=30.0, help="wait for in-flight requests (s)")
    p.add_argument("--policies", default="deadline,fcfs", help="server --policy values, in order")
    p.add_argument("--repeat", type=int, default=1, help="runs per (workload, rate, policy): noise")
    p.add_argument("--seed", type=int, default=0, help="base seed; each run adds its run number")
    p.add_argument("--paired-seeds", action="store_true", help="one seed per rate, shared by the policies")
    p.add_argument("--ttft-ms", type=float, default=500.0, help="TTFT budget of a good request")
    p.add_argument("--tpot-ms", type=float, default=50.0, help="TPOT budget of a good request")
    p.add_argument("--input-len", type=int, default=256, help="synthetic prompt tokens")
    p.add_argument("--output-len", type=int, default=128, help="synthetic output tokens (EOS ignored)")
    p.add_argument("--server-args", default="", help="extra `rtserve serve` args, both policies")
    p.add_argument("--bench-args", default="",
                   help="extra `rtserve bench` args, e.g. '--mix firm:0.5,batch:0.5'")
    p.add_argument("--port", type=int, default=8741, help="first port tried (the next free one is used)")
    p.add_argument("--ready-timeout-s", type=float, default=180.0)
    p.add_argument("--guidellm", help="guidellm's own venv: its python or its `guidellm` executable")
    p.add_argument("--guidellm-profile", choices=("constant", "poisson"), default="constant")
    p.add_argument("--guidellm-workers", type=int, default=1,
                   help="guidellm worker processes (its default, 10, competes with a small host's server)")
    p.add_argument("--run-plots", action="store_true", help="also write rtserve bench's per-run plots")
    p.add_argument("--out-dir", default="results/slo_goodput")
    p.add_argument("--report", metavar="JSON", help="only rewrite the table and plot of a slo_goodput.json")
    args = p.parse_args(argv)
    if args.report:
        return args
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    bad = [w for w in args.workloads if w not in WORKLOADS]
    if bad or not args.workloads:
        p.error(f"unknown workload(s) {bad}; choose from {WORKLOADS}")
    if not args.policies or args.repeat < 1 or args.duration_s <= 0:
        p.error("need at least one policy, --repeat >= 1 and --duration-s > 0")
    try:
        args.rate_plan = rate_plan(args)
    except ValueError as exc:
        p.error(str(exc))
    return args


def rate_plan(args: argparse.Namespace) -> list[tuple[float, float | None]]:
    """[(rate, multiple or None)] from --rates, or from --fcfs-rate times --multiples."""
    def floats(text: str) -> list[float]:
        values = [float(x) for x in text.split(",") if x.strip()]
        if not values or any(not (0 < v < math.inf) for v in values):
            raise ValueError(f"values must be finite and > 0: {text!r}")
        return values
    if args.rates and (args.fcfs_rate or args.multiples):
        raise ValueError("give --rates, or --fcfs-rate with --multiples, not both")
    if args.rates:
        return [(r, None) for r in floats(args.rates)]
    if args.fcfs_rate and args.multiples and args.fcfs_rate > 0:
        return [(round(args.fcfs_rate * m, 4), m) for m in floats(args.multiples)]
    raise ValueError("give --rates, or --fcfs-rate R with --multiples")


def write_outputs(doc: dict, out_dir: Path) -> None:
    print(write_table(doc, out_dir / "slo_goodput.md"))
    plot = write_plot(doc, out_dir / "goodput_vs_rate.png")
    print(f"wrote {out_dir / 'slo_goodput.md'}"
          + (f", {plot}" if plot else " (no plot: matplotlib is not installed)"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        write_outputs(json.loads(Path(args.report).read_text()), Path(args.report).parent)
        return 0
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    guidellm = GuidellmTool.probe(args.guidellm, out_dir, args.server_args) if args.guidellm else None
    tools = ["rtserve-bench"] + (["guidellm"] if guidellm and guidellm.version else [])
    runs = plan_runs(args, args.rate_plan, tools)
    doc = {"schema": SCHEMA, "command_line": shlex.join([sys.executable, *sys.argv]),
           "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host_cpus": os.cpu_count(),
           "config": {k: v for k, v in vars(args).items()},
           "guidellm": guidellm.describe() if guidellm else None, "rows": []}
    print(f"{len(runs)} runs; guidellm: {guidellm.describe() if guidellm else 'not requested'}")
    for i, run in enumerate(runs, 1):
        row = execute(run, args, guidellm)
        doc["rows"].append(row)
        (out_dir / "slo_goodput.json").write_text(json.dumps(_json_safe(doc), indent=1) + "\n")
        print(f"[{i}/{len(runs)}] {run.slug} seed {run.seed}: " + _summary(row), flush=True)
    write_outputs(doc, out_dir)
    return 0 if all("error" not in r for r in doc["rows"]) else 1


def _summary(row: dict) -> str:
    if "error" in row:
        return f"ERROR {row['error']} ({row['wall_s']} s)"
    return (f"goodput {row['goodput_req_per_s'] or 0:.3f} req/s, SLO {row['slo_attainment_pct'] or 0:.1f}%, "
            f"{row['num_completed']}/{row['num_sent']} done (server start {row['server_start_s']} s, "
            f"load {row['load_s']} s, wall {row['wall_s']} s)")


def _json_safe(value):
    if isinstance(value, float) and value != value:  # nan
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
