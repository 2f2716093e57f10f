"""The batch API on a real `rtserve serve` (default SmolLM2): each item's answer equals the online answer
to the same greedy request, items run as the `batch` class, and items sharing a system prompt reuse its
cached prefix (one item in flight, so each finds the previous one's blocks)."""
from __future__ import annotations

import json
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
QUESTIONS = ["What is the capital of France?", "What is the capital of Italy?", "What is the capital of Spain?"]


def body(question: str) -> dict:
    return {"model": "SmolLM2-135M-Instruct", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]}


def test_batch_items_equal_online_answers(tmp_path):
    with ServerProcess("--no-rt-calibrate", "--data-dir", str(tmp_path), "--batch-max-in-flight", "1") as server:
        lines = "".join(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                                    "body": body(q)}) + "\n" for i, q in enumerate(QUESTIONS))
        file_id = httpx.post(server.url + "/v1/files", data={"purpose": "batch"},
                             files={"file": ("quiz.jsonl", lines.encode())}).json()["id"]
        batch = httpx.post(server.url + "/v1/batches", json={"input_file_id": file_id, "completion_window": "24h",
                                                             "endpoint": "/v1/chat/completions"}).json()
        deadline = time.monotonic() + 300  # a bound against a hang, not a timing assertion
        while (done := httpx.get(f"{server.url}/v1/batches/{batch['id']}").json())["status"] not in (
                "completed", "failed") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert done["status"] == "completed", done
        assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
        out = httpx.get(f"{server.url}/v1/files/{done['output_file_id']}/content").text
        results = {line["custom_id"]: line["response"]["body"] for line in map(json.loads, out.splitlines())}
        online = [httpx.post(server.url + "/v1/chat/completions", json=body(q), timeout=120).json()
                  for q in QUESTIONS]
    for i, answer in enumerate(online):
        item = results[f"q{i}"]
        assert item["choices"][0]["message"] == answer["choices"][0]["message"]
        assert item["choices"][0]["finish_reason"] == answer["choices"][0]["finish_reason"]
        assert item["usage"]["completion_tokens"] == answer["usage"]["completion_tokens"]
        assert item["rt"]["class"] == "batch" and answer["rt"]["class"] == "soft"
    assert "Paris" in results["q0"]["choices"][0]["message"]["content"]
    cached = [results[f"q{i}"]["usage"]["prompt_tokens_details"]["cached_tokens"] for i in range(3)]
    assert cached[1] > 0 and cached[2] > 0  # the shared system prompt's blocks were reused
    assert done["usage"]["input_tokens_details"]["cached_tokens"] == sum(cached)
