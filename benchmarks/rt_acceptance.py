"""Real-time scheduling acceptance: the same realtime-mix load against `--policy deadline` and
`--policy fcfs`, one server after the other, in one run; prints the real-time acceptance figures
(firm attainment and lateness, rejections and drops per class, interactive ITL, goodput ratio).

For each policy: start `rtserve serve` on 127.0.0.1, wait for /health, run `rtserve bench
--workload realtime-mix` (firm and soft chats with rt budgets, batch summaries with long prompts,
Poisson arrivals) for --duration-s, stop the server. Then, judged on the client's own timestamps:

  firm admitted        firm requests not rejected at admission (429)
  firm met both        admitted firm requests with TTFT <= budget and every inter-token gap <= budget
  firm served late     firm requests that received a token after a budget had passed: first token
                       after the TTFT budget, or any gap between tokens over the ITL budget
                       (target 0; the finish chunk of a stream stopped for a deadline carries no
                       token and is not counted)
  ok / rejected / dropped / error   per class (dropped: stopped or expired for a deadline)
  ITL p99/p50          over all firm and soft gaps, while long prompts arrive (target <= 1.5)
  goodput              firm + soft requests meeting their own budgets, per second (target >= 2x FCFS)

Usage: python benchmarks/rt_acceptance.py --rate 6 --duration-s 60 [--policies deadline,fcfs]
       [--serve-args "--num-threads 2"] [--mix firm:0.3,soft:0.5,batch:0.2] [--result-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server did not become ready")


def run_policy(policy: str, args, port: int) -> dict:
    base = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "rtserve", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--policy", policy, *shlex.split(args.serve_args)]
    server = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_ready(base, server)
        out_dir = os.path.join(args.result_dir, policy)
        bench = [sys.executable, "-m", "rtserve", "bench", "--base-url", base, "--workload", "realtime-mix",
                 "--mix", args.mix, "--rate", str(args.rate), "--duration-s", str(args.duration_s),
                 "--rt-ttft-ms", str(args.ttft_ms), "--rt-itl-ms", str(args.itl_ms),
                 "--long-input-len", str(args.long_input_len), "--long-output-len", str(args.long_output_len),
                 "--seed", str(args.seed), "--rt-extension", "on", "--goodput", f"ttft:{args.ttft_ms}",
                 f"tpot:{args.itl_ms}", "--result-dir", out_dir, "--no-progress", "--no-plots"]
        subprocess.run(bench, check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(out_dir, "results.json")) as f:
            return json.load(f)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def judge(doc: dict) -> dict:
    phase = doc["phases"][0]
    records = phase["requests"]
    duration = phase["duration_s"]

    def gaps(r):  # between tokens: a deadline stop's finish chunk is a notice, not a late token
        t = r.get("content_times_s", r["chunk_times_s"])
        return [b - a for a, b in zip(t, t[1:])]

    def meets(r):
        b = r["rt_budget"] or {}
        if r["status"] != "ok" or r["ttft_s"] is None:
            return False
        return r["ttft_s"] * 1e3 <= b.get("ttft_ms", float("inf")) and \
            max(gaps(r), default=0.0) * 1e3 <= b.get("itl_ms", float("inf"))

    out: dict = {}
    by_class: dict[str, list] = {}
    for r in records:
        by_class.setdefault(r["rt_class"], []).append(r)
    firm = by_class.get("firm", [])
    admitted = [r for r in firm if r["status"] != "rejected"]
    late_ttft = [r for r in firm if r["ttft_s"] is not None and r["ttft_s"] * 1e3 > (r["rt_budget"] or {}).get(
        "ttft_ms", float("inf"))]
    late_gap = [r for r in firm if r["ttft_s"] is not None and max(gaps(r), default=0.0) * 1e3 > (
        r["rt_budget"] or {}).get("itl_ms", float("inf"))]
    out["firm"] = len(firm)
    out["firm admitted"] = len(admitted)
    met = sum(meets(r) for r in admitted)
    out["firm met both (of admitted)"] = f"{met}/{len(admitted)} = {100 * met / max(1, len(admitted)):.1f}%"
    out["firm served late: ttft / gap"] = f"{len(late_ttft)} / {len(late_gap)}"
    for cls in ("firm", "soft", "batch"):
        rs = by_class.get(cls, [])
        out[f"{cls}: ok / rejected / dropped / error"] = " / ".join(
            str(sum(r["status"] == status for r in rs)) for status in ("ok", "rejected", "dropped", "error"))
    interactive = [g for r in firm + by_class.get("soft", []) for g in gaps(r)]
    if interactive:
        p50, p99 = np.percentile(np.asarray(interactive) * 1e3, [50, 99])
        out["interactive ITL p50 / p99 ms"] = f"{p50:.1f} / {p99:.1f}"
        out["ITL p99/p50"] = round(float(p99 / p50), 2)
    ttfts = [r["ttft_s"] * 1e3 for r in firm + by_class.get("soft", []) if r["ttft_s"] is not None]
    if ttfts:
        out["interactive TTFT p50 / p99 ms"] = "{:.0f} / {:.0f}".format(*np.percentile(ttfts, [50, 99]))
    good = sum(meets(r) for r in firm + by_class.get("soft", []))
    out["goodput (firm+soft meeting budgets) req/s"] = round(good / duration, 3)
    out["batch completed"] = sum(r["status"] == "ok" for r in by_class.get("batch", []))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=6.0)
    ap.add_argument("--duration-s", type=float, default=60.0)
    ap.add_argument("--policies", default="deadline,fcfs")
    ap.add_argument("--mix", default="firm:0.3,soft:0.5,batch:0.2")
    ap.add_argument("--ttft-ms", type=float, default=500)
    ap.add_argument("--itl-ms", type=float, default=50)
    ap.add_argument("--long-input-len", type=int, default=2048)
    ap.add_argument("--long-output-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve-args", default="")
    ap.add_argument("--port", type=int, default=8731)
    ap.add_argument("--result-dir", default="results/rt_acceptance")
    args = ap.parse_args()
    judged = {}
    for i, policy in enumerate(args.policies.split(",")):
        load = os.getloadavg()[0]
        judged[policy] = judge(run_policy(policy, args, args.port + i))
        judged[policy]["load average before"] = round(load, 2)
    keys = list(next(iter(judged.values())))
    print(f"rate {args.rate}/s for {args.duration_s:.0f} s, mix {args.mix}, budgets TTFT {args.ttft_ms:.0f} ms "
          f"/ ITL {args.itl_ms:.0f} ms, long prompts {args.long_input_len} tokens")
    print(f"{'':44s}" + "".join(f"{p:>22s}" for p in judged))
    for key in keys:
        print(f"{key:44s}" + "".join(f"{str(judged[p][key]):>22s}" for p in judged))
    policies = list(judged)
    if len(policies) == 2:
        a, b = (judged[p]["goodput (firm+soft meeting budgets) req/s"] for p in policies)
        print(f"goodput ratio {policies[0]}/{policies[1]}: {a / b:.2f}x" if b else "goodput ratio: FCFS had 0")


if __name__ == "__main__":
    main()
