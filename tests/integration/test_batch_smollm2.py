"""The batch API on a real `rtserve serve` (default SmolLM2), killed (SIGKILL) after its first answer and
started again on the same data dir: the batch completes with one line per custom_id, the items answered
before the kill keep their answers (not run again), each answer equals the online answer to the same
greedy request, items run as the `batch` class, and items sharing a system prompt reuse its cached
prefix (one item in flight, so each finds the previous one's blocks)."""
from __future__ import annotations

import json
import sqlite3
import time

import httpx
import pytest

try:
    from tests.integration.fake_engine import ServerProcess
except ImportError:  # tests/integration not importable as a package
    from fake_engine import ServerProcess

pytestmark = pytest.mark.slow

SYSTEM = ("You are a concise assistant for a geography quiz. Answer every question with the name of one city "
          "and nothing else, no punctuation, no explanation, no greeting, in English.")
QUESTIONS = ["What is the capital of France?", "What is the capital of Italy?", "What is the capital of Spain?",
             "What is the capital of Germany?"]
ARGS = ("--no-rt-calibrate", "--batch-max-in-flight", "1")


def body(question: str) -> dict:
    return {"model": "SmolLM2-135M-Instruct", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]}


def poll(url: str, done, limit_s: float = 300.0) -> dict:
    deadline = time.monotonic() + limit_s  # a bound against a hang, not a timing assertion
    while not done(state := httpx.get(url, timeout=60).json()):
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    return state


def test_batch_across_sigkill_equals_online_answers(tmp_path):
    lines = "".join(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body(q)}) + "\n" for i, q in enumerate(QUESTIONS))
    with ServerProcess(*ARGS, "--data-dir", str(tmp_path)) as server:
        file_id = httpx.post(server.url + "/v1/files", data={"purpose": "batch"},
                             files={"file": ("quiz.jsonl", lines.encode())}).json()["id"]
        batch = httpx.post(server.url + "/v1/batches", json={"input_file_id": file_id, "completion_window": "24h",
                                                             "endpoint": "/v1/chat/completions"}).json()
        poll(f"{server.url}/v1/batches/{batch['id']}", lambda b: b["request_counts"]["completed"] >= 1)
        server.proc.kill()
        server.proc.wait(10)
    db = sqlite3.connect(str(tmp_path / "batches.sqlite3"))
    before = dict(db.execute("SELECT custom_id, request_id FROM items WHERE state = 'succeeded'").fetchall())
    db.close()
    assert 1 <= len(before) < len(QUESTIONS)
    with ServerProcess(*ARGS, "--data-dir", str(tmp_path)) as server:
        done = poll(f"{server.url}/v1/batches/{batch['id']}", lambda b: b["status"] in ("completed", "failed"))
        assert done["status"] == "completed", done
        assert done["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
        out = [json.loads(x) for x in httpx.get(f"{server.url}/v1/files/{done['output_file_id']}/content").text
               .splitlines()]
        online = [httpx.post(server.url + "/v1/chat/completions", json=body(q), timeout=120).json()
                  for q in QUESTIONS]
    assert [line["custom_id"] for line in out] == ["q0", "q1", "q2", "q3"]
    assert all(next(x for x in out if x["custom_id"] == cid)["response"]["request_id"] == rid
               for cid, rid in before.items())  # answered before the kill: kept, not run again
    results = {line["custom_id"]: line["response"]["body"] for line in out}
    for i, answer in enumerate(online):
        item = results[f"q{i}"]
        assert item["choices"][0]["message"] == answer["choices"][0]["message"]
        assert item["choices"][0]["finish_reason"] == answer["choices"][0]["finish_reason"]
        assert item["usage"]["completion_tokens"] == answer["usage"]["completion_tokens"]
        assert item["rt"]["class"] == "batch" and answer["rt"]["class"] == "soft"
    assert "Paris" in results["q0"]["choices"][0]["message"]["content"]
    cached = {cid: results[cid]["usage"]["prompt_tokens_details"]["cached_tokens"] for cid in results}
    cold = {"q0", min(set(results) - set(before))}  # the first item on each server found an empty cache
    assert all(cached[cid] > 0 for cid in set(results) - cold)  # the others reused the system prompt's blocks
    assert done["usage"]["input_tokens_details"]["cached_tokens"] == sum(cached.values())
