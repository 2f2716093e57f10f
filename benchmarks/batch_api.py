"""The batch API's cost and its effect on interactive traffic, on fresh `rtserve serve` processes.

(1) Idle server: one N-item chat batch (shared system prompt, greedy, `ignore_eos`, `--max-tokens` each)
    through /v1/files + /v1/batches, from submission to `completed`, against `LLM.chat` (offline, FCFS,
    in this process after the server is stopped) on the same conversations. Reports output tokens/s of
    both and their ratio (target: the batch at >= 80% of offline).
(2) The same batch submitted while `rtserve bench --workload chat` sends soft traffic at --rate, against
    the same bench alone on a fresh server: soft SLO attainment with and without the batch, and the
    output tokens/s the batch made while the bench ran.

    python benchmarks/batch_api.py --num-items 500 --max-tokens 64 --rate 1.0 --bench-requests 120 \
        --out results/batch_api
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slo_goodput_server import RtserveServer  # noqa: E402  (beside this script)

SYSTEM = ("You are a helpful assistant. Answer the user's question in a few plain sentences, without lists, "
          "headings or code, as if explaining to a curious student.")
TOPICS = ["rivers", "volcanoes", "bread", "bridges", "bees", "clocks", "glass", "tides", "paper", "comets",
          "salt", "wind", "maps", "coffee", "sleep", "rain", "iron", "music", "forests", "stars"]


def conversations(num: int) -> list[list[dict]]:
    return [[{"role": "system", "content": SYSTEM},
             {"role": "user", "content": f"Question {i}: how do {TOPICS[i % len(TOPICS)]} work?"}]
            for i in range(num)]


def batch_file(convs: list[list[dict]], max_tokens: int) -> bytes:
    return "".join(json.dumps({"custom_id": f"item-{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"messages": c, "max_tokens": max_tokens, "temperature": 0,
                                        "ignore_eos": True}}) + "\n" for i, c in enumerate(convs)).encode()


def submit(base_url: str, content: bytes) -> str:
    file_id = httpx.post(base_url + "/v1/files", data={"purpose": "batch"},
                         files={"file": ("batch.jsonl", content)}, timeout=60).json()["id"]
    return httpx.post(base_url + "/v1/batches", json={"input_file_id": file_id, "completion_window": "24h",
                                                      "endpoint": "/v1/chat/completions"}).json()["id"]


def batch_state(base_url: str, batch_id: str) -> dict:
    return httpx.get(f"{base_url}/v1/batches/{batch_id}", timeout=60).json()


def wait_ended(base_url: str, batch_id: str, poll_s: float = 0.5) -> dict:
    while (b := batch_state(base_url, batch_id))["status"] not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(poll_s)
    return b


def idle_batch(args, content: bytes, log: Path) -> dict:
    with RtserveServer("deadline", args.port, [*args.server_args, "--data-dir", tempfile.mkdtemp()], log) as srv:
        start = time.perf_counter()
        done = wait_ended(srv.base_url, submit(srv.base_url, content), poll_s=0.2)
        elapsed = time.perf_counter() - start
    tokens = done["usage"]["output_tokens"]
    return {"status": done["status"], "items": done["request_counts"], "elapsed_s": elapsed,
            "output_tokens": tokens, "output_tok_s": tokens / elapsed}


def offline(convs: list[list[dict]], max_tokens: int) -> dict:
    from rtserve import LLM, SamplingParams
    llm = LLM()
    llm.chat(convs[:1], SamplingParams(temperature=0, max_tokens=2))  # warm-up, as the server's /ready is
    start = time.perf_counter()
    outs = llm.chat(convs, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return {"elapsed_s": elapsed, "output_tokens": tokens, "output_tok_s": tokens / elapsed}


def bench(args, base_url: str, result_dir: Path, log: Path) -> dict:
    cmd = [sys.executable, "-m", "rtserve", "bench", "--base-url", base_url, "--workload", "chat",
           "--rate", str(args.rate), "--num-requests", str(args.bench_requests), "--goodput", "ttft:500",
           "tpot:50", "--result-dir", str(result_dir), "--no-plots", "--seed", str(args.seed)]
    with open(log, "ab") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)
    phase = json.loads((result_dir / "results.json").read_text())["phases"][0]
    m = phase["metrics"]
    return {"duration_s": phase["duration_s"], "sent": m["num_requests"], "completed": m["num_completed"],
            "slo_attainment_pct": 100.0 * (m["slo"] or {}).get("attainment", 0.0),
            "ttft_p99_ms": m["ttft"]["p99_ms"], "tpot_p50_ms": m["tpot"]["p50_ms"]}


def with_and_without_batch(args, content: bytes, out: Path) -> dict:
    rows = {}
    with RtserveServer("deadline", args.port, [*args.server_args, "--data-dir", tempfile.mkdtemp()],
                       out / "server-alone.log") as srv:
        rows["alone"] = bench(args, srv.base_url, out / "bench-alone", out / "bench.log")
    with RtserveServer("deadline", args.port, [*args.server_args, "--data-dir", tempfile.mkdtemp()],
                       out / "server-batch.log") as srv:
        batch_id = submit(srv.base_url, content)
        while batch_state(srv.base_url, batch_id)["status"] == "validating":
            time.sleep(0.2)
        before = batch_state(srv.base_url, batch_id)["usage"]["output_tokens"]
        row = bench(args, srv.base_url, out / "bench-batch", out / "bench.log")
        after = batch_state(srv.base_url, batch_id)
        row["batch_output_tokens_during"] = after["usage"]["output_tokens"] - before
        row["batch_output_tok_s_during"] = row["batch_output_tokens_during"] / row["duration_s"]
        row["batch_status_after"] = after["status"]
        httpx.post(f"{srv.base_url}/v1/batches/{batch_id}/cancel")
        rows["with_batch"] = row
    rows["attainment_delta_points"] = rows["with_batch"]["slo_attainment_pct"] - rows["alone"]["slo_attainment_pct"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-items", type=int, default=500)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rate", type=float, default=1.0, help="soft requests/s for part (2)")
    p.add_argument("--bench-requests", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--skip", choices=("idle", "interference"), action="append", default=[])
    p.add_argument("--out", default="results/batch_api")
    p.add_argument("server_args", nargs="*", help="passed to rtserve serve (after --)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    convs = conversations(args.num_items)
    content = batch_file(convs, args.max_tokens)
    report: dict = {"config": {k: v for k, v in vars(args).items()}}
    if "idle" not in args.skip:
        report["batch_idle"] = idle_batch(args, content, out / "server-idle.log")
        report["offline"] = offline(convs, args.max_tokens)
        report["batch_vs_offline"] = report["batch_idle"]["output_tok_s"] / report["offline"]["output_tok_s"]
        print(f"(1) batch {report['batch_idle']['output_tok_s']:.1f} tok/s vs LLM.chat "
              f"{report['offline']['output_tok_s']:.1f} tok/s: {100 * report['batch_vs_offline']:.0f}%")
    if "interference" not in args.skip:
        rows = with_and_without_batch(args, content, out)
        report["interference"] = rows
        print(f"(2) soft SLO attainment alone {rows['alone']['slo_attainment_pct']:.1f}%, with the batch "
              f"{rows['with_batch']['slo_attainment_pct']:.1f}% ({rows['attainment_delta_points']:+.1f} points); "
              f"batch {rows['with_batch']['batch_output_tok_s_during']:.1f} tok/s meanwhile")
    (out / "batch_api.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
