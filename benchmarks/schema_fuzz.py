"""Schemathesis against a real `rtserve serve` (SmolLM2), more examples than the test suite runs.

Starts the server (extra `rtserve serve` arguments after `--`), runs `schemathesis run` on its
/openapi.json in positive and then negative mode with the checks the test suite uses (no 5xx, documented
status codes and media types, bodies matching the schema: the OpenAI / Anthropic error objects for every
error), then checks the server is ready and idle. `--max-tokens-cap` keeps each generation short enough for
the request timeout: a fuzzed request asks for up to that many tokens.

Usage: python benchmarks/schema_fuzz.py [--examples 100] [--seed 1] [--request-timeout-s 30]
       [-- extra serve args]
Exit status 1 if a mode found a failure or the server was not ready and idle afterwards.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.integration.fake_engine import ServerProcess  # noqa: E402

KEY = "fuzz-key"
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
IDLE = ("vllm:num_requests_running{", "vllm:num_requests_waiting{", "vllm:kv_cache_usage_perc{")


def main(argv: list[str]) -> int:
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=100, help="max examples per operation and mode")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--request-timeout-s", type=float, default=30.0)
    p.add_argument("--max-tokens-cap", type=int, default=32)
    args = p.parse_args(argv)
    failed = False
    auth = {"Authorization": f"Bearer {KEY}"}
    with ServerProcess("--no-rt-calibrate", "--api-key", KEY, "--no-access-log", "--max-tokens-cap",
                       str(args.max_tokens_cap), *serve_args) as server, tempfile.TemporaryDirectory() as work:
        for mode in ("positive", "negative"):
            t0 = time.monotonic()
            run = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
                                  "-H", f"Authorization: Bearer {KEY}", "--mode", mode, "-n", str(args.examples),
                                  "--seed", str(args.seed), "--checks", CHECKS, "--no-color",
                                  "--request-timeout", str(args.request_timeout_s), "--exclude-path", "/stats/stream"],
                                 capture_output=True, text=True, cwd=work)
            summary = [line for line in run.stdout.splitlines() if line.strip()][-30:]
            print(f"== {mode}: exit {run.returncode} in {time.monotonic() - t0:.0f} s\n" + "\n".join(summary))
            failed |= run.returncode != 0
        ready = httpx.get(server.url + "/ready", headers=auth, timeout=30).status_code
        metrics = httpx.get(server.url + "/metrics", headers=auth, timeout=30).text
        gauges = [line for line in metrics.splitlines() if line.startswith(IDLE)]
        print(f"after: /ready {ready}; " + "; ".join(gauges))
        failed |= ready != 200 or any(float(g.rsplit(" ", 1)[1]) != 0 for g in gauges)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
