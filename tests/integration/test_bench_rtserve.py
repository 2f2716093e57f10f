"""`rtserve bench` against a real `rtserve serve` process (short runs): results.json and plots."""
from __future__ import annotations

import json

import pytest

from rtserve.bench.cli import main
from tests.integration.fake_engine import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    with ServerProcess() as s:
        yield s


def run(server, tmp_path, *flags: str) -> dict:
    assert main(["--base-url", server.url, "--no-progress", "--result-dir", str(tmp_path), *flags]) == 0
    return json.loads((tmp_path / "results.json").read_text())


def test_chat_workload_against_rtserve(server, tmp_path):
    doc = run(server, tmp_path, "--workload", "chat", "--num-requests", "6", "--rate", "4",
              "--output-len", "12", "--ignore-eos", "--goodput", "ttft:60000", "tpot:10000")
    m = doc["phases"][0]["metrics"]
    assert (m["num_requests"], m["num_completed"], m["num_rejected"], m["num_errors"]) == (6, 6, 0, 0)
    assert m["total_output_tokens"] == 6 * 12
    for r in doc["phases"][0]["requests"]:
        assert r["output_tokens_from_usage"] and r["output_tokens"] == 12
        assert 0 < r["ttft_s"] <= r["e2e_s"]
    assert m["slo"]["num_good"] == 6
    assert doc["target"]["owned_by"] == "rtserve" and doc["target"]["rt_extension"] is True
    for name in ("ttft_cdf.png", "itl_cdf.png", "timeline.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_shared_prefix_workload_hits_the_prefix_cache(server, tmp_path):
    doc = run(server, tmp_path, "--workload", "shared-prefix", "--prefix-len", "256", "--num-requests", "4",
              "--max-concurrency", "1", "--output-len", "4", "--no-plots")
    reqs = doc["phases"][0]["requests"]
    assert all(r["status"] == "ok" for r in reqs)
    assert any((r.get("cached_tokens") or 0) >= 128 for r in reqs[1:]), [r.get("cached_tokens") for r in reqs]
