"""guidellm as a second load generator for slo_goodput.py (optional; never a project dependency).

guidellm lives in its own venv (`python3 -m venv /tmp/guidellm-venv && /tmp/guidellm-venv/bin/pip
install guidellm==0.8.1`). This adapter speaks guidellm 0.8's scenario file and JSON report; other
versions are skipped with a note. Each run writes a scenario (openai_http backend on
/v1/completions, `constant` profile at the run's rate, synthetic_text data with set token counts,
max_requests, the run's seed), runs `guidellm run --scenario`, and judges the report's per-request
records with the same definitions as `rtserve bench`: TTFT, and vLLM's TPOT (e2e - ttft) / (n - 1).

guidellm makes its synthetic prompts with a Hugging Face tokenizer and the server has no hub access,
so the served model's tokenizer is exported once as tokenizer.json + tokenizer_config.json.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slo_goodput_server import run_process_group

SUPPORTED_VERSION = re.compile(r"^0\.8\.")
STARTUP_ALLOWANCE_S = 180.0  # guidellm imports torch and transformers and spawns workers

# Workload -> synthetic_text fields. The mixes (interference, realtime-mix) have no guidellm form:
# synthetic_text draws every request from one length distribution.
GUIDELLM_DATA = {
    "synthetic": lambda args: {"prompt_tokens": args.input_len, "output_tokens": args.output_len},
    # rtserve bench's shared-prefix: one 1024-token system prompt, a ~15-token question, 64 tokens out
    "chat": lambda args: {"prefix_tokens": 1024, "prefix_count": 1, "prompt_tokens": 16,
                          "output_tokens": 64},
}


def export_tokenizer(model_path: str, out_dir: Path) -> Path:
    """The served model's tokenizer as an HF directory that AutoTokenizer loads offline."""
    from rtserve.client.tokenizer import Tokenizer

    tok = Tokenizer.load(model_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(tok.backend.to_str(), encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20}
    if tok.bos_token_id is not None:
        config["bos_token"] = tok.backend.id_to_token(tok.bos_token_id)
    if tok.eos_token_id is not None:
        config["eos_token"] = tok.backend.id_to_token(tok.eos_token_id)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out_dir


def _model_arg(server_args: str) -> str:
    argv = shlex.split(server_args)
    for i, arg in enumerate(argv):
        if arg == "--model" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
    return ""  # the embedded default model


@dataclass
class GuidellmTool:
    cmd: list[str]
    version: str | None  # None: not usable (see `problem`)
    problem: str | None = None
    tokenizer_dir: Path | None = None

    @classmethod
    def probe(cls, path: str, out_dir: Path, server_args: str) -> "GuidellmTool":
        """`path` is guidellm's python (run as `-m guidellm`) or its `guidellm` executable."""
        cmd = [path, "-m", "guidellm"] if Path(path).name.startswith("python") else [path]
        try:
            out = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return cls(cmd, None, f"cannot run {path}: {exc}")
        match = re.search(r"(\d+\.\d+\.\d+\S*)", out.stdout + out.stderr)
        if out.returncode != 0 or not match:
            return cls(cmd, None, f"`{shlex.join(cmd)} --version` failed: {out.stderr.strip()[-300:]}")
        version = match.group(1)
        if not SUPPORTED_VERSION.match(version):
            return cls(cmd, None, f"guidellm {version}: this adapter speaks 0.8.x's scenario and "
                                  "report formats; skipped")
        try:
            tokenizer_dir = export_tokenizer(_model_arg(server_args), out_dir / "guidellm_tokenizer")
        except (OSError, ValueError) as exc:
            return cls(cmd, None, f"cannot export the model's tokenizer: {exc}")
        return cls(cmd, version, None, tokenizer_dir)

    def describe(self) -> dict:
        return {"command": self.cmd, "version": self.version, "problem": self.problem}

    def scenario(self, run, base_url: str, args, report_path: Path) -> dict:
        num_requests = max(2, round(run.rate_per_s * args.duration_s))
        data = {"kind": "synthetic_text", **GUIDELLM_DATA[run.workload](args)}
        return {"spec": {
            "backend": {"kind": "openai_http", "target": base_url,
                        "request_format": "/v1/completions", "http2": False},
            "profile": {"kind": args.guidellm_profile, "rate": run.rate_per_s},
            "constraints": [{"kind": "max_requests", "count": num_requests},
                            {"kind": "max_duration", "seconds": 2 * args.duration_s + args.drain_s}],
            "tokenizer": {"kind": "huggingface_auto", "model": str(self.tokenizer_dir)},
            "data": [data],
            "seed": {"kind": "static", "value": run.seed},
            "metrics": {"kind": "generative", "slo": {"ttft_ms": args.ttft_ms, "tpot_ms": args.tpot_ms}},
            "outputs": [{"kind": "json", "path": str(report_path)}],
        }}

    def run(self, run, base_url: str, run_dir: Path, args) -> dict:
        """One guidellm run against `base_url`; returns the row fields."""
        report_path = run_dir / "guidellm.json"
        scenario_path = run_dir / "scenario.json"
        scenario_path.write_text(json.dumps(self.scenario(run, base_url, args, report_path), indent=1))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "GUIDELLM__MAX_WORKER_PROCESSES": str(args.guidellm_workers)}
        timeout_s = 2 * args.duration_s + args.drain_s + STARTUP_ALLOWANCE_S
        cmd = [*self.cmd, "run", "--scenario", str(scenario_path), "--disable-progress"]
        rc = run_process_group(cmd, run_dir / "guidellm.log", timeout_s, env)
        if rc != 0 or not report_path.is_file():
            raise RuntimeError(f"guidellm exited {rc} without a report; see {run_dir / 'guidellm.log'}")
        return guidellm_row(json.loads(report_path.read_text()), args.ttft_ms, args.tpot_ms)


def guidellm_row(doc: dict, ttft_ms: float, tpot_ms: float) -> dict:
    """Row fields from a guidellm 0.8 JSON report (its first benchmark), judged like rtserve bench."""
    bench = doc["benchmarks"][0]
    metrics = bench["metrics"]
    totals = metrics["request_totals"]
    ok = bench["requests"]["successful"] or []
    ttft = np.array([r["time_to_first_token_ms"] for r in ok], dtype=float)
    e2e_ms = np.array([r["request_latency"] * 1000.0 for r in ok], dtype=float)
    n_out = np.array([r["output_tokens"] or 0 for r in ok], dtype=float)
    multi = n_out > 1
    tpot = np.zeros(len(ok))  # vLLM counts TPOT 0 for one-token answers when judging goodput
    tpot[multi] = (e2e_ms[multi] - ttft[multi]) / (n_out[multi] - 1)
    good = int(np.sum((ttft <= ttft_ms) & (tpot <= tpot_ms)))
    # guidellm may keep a sample of the records; scale the count to all successful requests
    good_all = good * totals["successful"] / len(ok) if ok else 0.0
    duration_s = bench["duration"]
    itl = metrics["inter_token_latency_ms"]["successful"]
    return {
        "num_sent": totals["total"], "num_completed": totals["successful"],
        "num_errors": totals["errored"], "num_cancelled": totals["incomplete"],
        "num_rejected": None, "num_dropped": None,
        "ttft_p50_ms": _pctl(ttft, 50), "ttft_p99_ms": _pctl(ttft, 99),
        "tpot_mean_ms": float(tpot[multi].mean()) if multi.any() else None,
        "tpot_p50_ms": _pctl(tpot[multi], 50), "tpot_p99_ms": _pctl(tpot[multi], 99),
        # guidellm keeps no per-gap samples: this is the p99 of each request's mean gap
        "itl_p99_ms": (itl.get("percentiles") or {}).get("p99"),
        "slo_attainment_pct": 100.0 * good_all / totals["total"] if totals["total"] else None,
        "goodput_req_per_s": good_all / duration_s if duration_s else None,
        "throughput_req_per_s": totals["successful"] / duration_s if duration_s else None,
        "output_tok_per_s": float(n_out.sum()) / duration_s if duration_s else None,
        "duration_s": duration_s,
        # guidellm's own verdict on the same limits (TPOT there ends at the last token), for a check
        "guidellm_slo_attainment": metrics.get("slo_attainment"),
        "guidellm_goodput_req_per_s": ((metrics.get("request_goodput") or {}).get("successful")
                                       or {}).get("mean"),
    }


def _pctl(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None
