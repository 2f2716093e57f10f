"""A short run of benchmarks/soak.py against a real server (SOAK_DURATION_S to lengthen it; the benchmark
runs it for 30 minutes): no 5xx, and after the load the running/waiting counts and KV usage are back to 0,
the API process's FDs and threads back to their baseline and its RSS within the bound."""
from __future__ import annotations

import csv
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import soak  # noqa: E402

pytestmark = pytest.mark.slow


def test_short_soak(tmp_path):
    duration_s = os.environ.get("SOAK_DURATION_S", "60")
    status = soak.main(["--duration-s", duration_s, "--warmup-s", "4", "--rate", "2", "--sample-s", "4",
                        "--malformed-share", "0.1", "--out", str(tmp_path), "--check", "--", "--no-rt-calibrate"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert status == 0, summary["problems"]
    assert summary["num_5xx"] == 0 and summary["statuses"].get("200", 0) > 0
    assert any(code.startswith("4") for code in summary["statuses"]), summary["statuses"]  # the malformed ones
    with open(tmp_path / "soak.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 2 and float(rows[-1]["running"]) == 0
    assert (tmp_path / "soak.png").stat().st_size > 0
