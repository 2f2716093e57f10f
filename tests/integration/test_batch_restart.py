"""The batch API across a real SIGKILL and restart (fake engine, real uvicorn processes), and driven by the
official openai and anthropic SDKs."""
from __future__ import annotations

import json
import re
import sqlite3
import sys
import time
from collections import Counter

import anthropic
import httpx
import openai
import pytest

try:
    from tests.integration.fake_engine import ServerProcess
except ImportError:  # tests/integration not importable as a package
    from fake_engine import ServerProcess

KEY = "batch-test-key"
CHAT = "/v1/chat/completions"


def fake_server(data_dir, log=None, step_s=0.0, max_in_flight=2) -> ServerProcess:
    server = ServerProcess("--no-batch-api", startup_timeout_s=60)
    server.cmd = [sys.executable, "-m", "tests.integration.batch_fake_server", "--port", str(server.port),
                  "--data-dir", str(data_dir), "--step-s", str(step_s), "--max-in-flight", str(max_in_flight),
                  "--api-key", KEY, *(["--log", str(log)] if log else [])]
    return server


def lines_file(num: int) -> bytes:
    return "".join(json.dumps({"custom_id": f"item-{i}", "method": "POST", "url": CHAT,
                               "body": {"model": "fake-model", "max_tokens": 8,
                                        "messages": [{"role": "user", "content": f"item-{i}"}]}}) + "\n"
                   for i in range(num)).encode()


def wait_for(predicate, what: str, limit_s: float = 120.0):
    """Poll until predicate() is truthy (a generous bound against hangs, not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def test_sigkill_mid_batch_then_restart_completes_each_item_once(tmp_path):
    data_dir, log = tmp_path / "data", tmp_path / "engine.log"
    headers = {"authorization": f"Bearer {KEY}"}
    num = 24
    with fake_server(data_dir, log, step_s=0.02) as server:
        file_id = httpx.post(server.url + "/v1/files", headers=headers, data={"purpose": "batch"},
                             files={"file": ("in.jsonl", lines_file(num))}).json()["id"]
        batch = httpx.post(server.url + "/v1/batches", headers=headers, json={
            "input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}).json()
        url = f"{server.url}/v1/batches/{batch['id']}"
        wait_for(lambda: httpx.get(url, headers=headers).json()["request_counts"]["completed"] >= 4,
                 "4 items answered")
        server.proc.kill()  # SIGKILL: no shutdown code runs
        server.proc.wait(10)
    db = sqlite3.connect(str(data_dir / "batches.sqlite3"))
    answered_before = {row[0] for row in db.execute("SELECT custom_id FROM items WHERE state = 'succeeded'")}
    db.close()
    assert 4 <= len(answered_before) < num
    with fake_server(data_dir, log, step_s=0.0) as server:
        url = f"{server.url}/v1/batches/{batch['id']}"
        done = wait_for(lambda: (b := httpx.get(url, headers=headers).json())["status"] == "completed" and b,
                        "the batch to complete after the restart")
        assert done["request_counts"] == {"total": num, "completed": num, "failed": 0}
        out = httpx.get(f"{server.url}/v1/files/{done['output_file_id']}/content", headers=headers).text
    ids = [json.loads(line)["custom_id"] for line in out.splitlines()]
    assert sorted(ids) == sorted(f"item-{i}" for i in range(num))  # one line per custom_id, none lost
    runs = Counter(re.search(r"item-\d+", line).group() for line in log.read_text().splitlines())
    assert set(runs) == set(ids)
    assert all(runs[cid] == 1 for cid in answered_before)  # answered before the kill: never run again
    assert sum(runs.values()) <= num + 2  # at most the 2 in flight at the kill ran twice


@pytest.fixture(scope="module")
def sdk_server(tmp_path_factory):
    with fake_server(tmp_path_factory.mktemp("sdk-data"), step_s=0.005) as server:
        yield server


def test_openai_sdk_files_and_batches(sdk_server):
    client = openai.OpenAI(base_url=sdk_server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    uploaded = client.files.create(file=("in.jsonl", lines_file(3)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(lines_file(3))
    assert client.files.retrieve(uploaded.id).filename == "in.jsonl"
    assert uploaded.id in [f.id for f in client.files.list()]
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h",
                                  metadata={"purpose": "sdk test"})
    assert batch.status == "validating" and batch.metadata == {"purpose": "sdk test"}
    done = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status == "completed" and b, "completion")
    assert done.request_counts.total == 3 and done.request_counts.completed == 3
    lines = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert [x["custom_id"] for x in lines] == ["item-0", "item-1", "item-2"]
    assert all(x["response"]["status_code"] == 200 for x in lines)
    assert batch.id in [b.id for b in client.batches.list(limit=10)]
    slow = client.batches.create(input_file_id=client.files.create(file=("big.jsonl", lines_file(200)),
                                                                   purpose="batch").id,
                                 endpoint=CHAT, completion_window="24h")
    assert client.batches.cancel(slow.id).status in ("cancelling", "cancelled")
    ended = wait_for(lambda: (b := client.batches.retrieve(slow.id)).status == "cancelled" and b, "cancellation")
    assert ended.request_counts.completed < 200
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_unknown")
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=sdk_server.url + "/v1", api_key="wrong", max_retries=0).batches.list()


def test_anthropic_sdk_message_batches(sdk_server):
    client = anthropic.Anthropic(base_url=sdk_server.url, api_key=KEY, max_retries=0, timeout=30)
    params = {"model": "fake-model", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    batch = client.messages.batches.create(requests=[{"custom_id": "a", "params": params},
                                                     {"custom_id": "b", "params": {**params, "max_tokens": 0}}])
    assert batch.processing_status == "in_progress" and batch.request_counts.processing == 2
    done = wait_for(lambda: (b := client.messages.batches.retrieve(batch.id)).processing_status == "ended" and b,
                    "the message batch to end")
    assert (done.request_counts.succeeded, done.request_counts.errored) == (1, 1)
    results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert results["a"].type == "succeeded" and results["a"].message.content[0].text
    assert results["b"].type == "errored" and results["b"].error.error.type == "invalid_request_error"
    assert batch.id in [b.id for b in client.messages.batches.list(limit=5)]
    many = client.messages.batches.create(requests=[{"custom_id": f"r{i}", "params": params} for i in range(200)])
    assert client.messages.batches.cancel(many.id).processing_status in ("canceling", "ended")
    ended = wait_for(lambda: (b := client.messages.batches.retrieve(many.id)).processing_status == "ended" and b,
                     "the cancelled batch to end")
    assert ended.request_counts.canceled > 0
    assert sum(r.result.type == "canceled" for r in client.messages.batches.results(many.id)) == \
        ended.request_counts.canceled
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve("msgbatch_unknown")
    assert client.messages.batches.delete(batch.id).type == "message_batch_deleted"


def test_rtserve_batch_cli(sdk_server, tmp_path, capsys):
    from rtserve.cli import main

    source, out, err = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    source.write_bytes(lines_file(3))
    common = ["batch", "--base-url", sdk_server.url, "--api-key", KEY, "--poll-s", "0.05"]
    assert main([*common, "submit", str(source), "--wait", "--output", str(out), "--errors", str(err)]) == 0
    batch_id = capsys.readouterr().out.strip().splitlines()[0]
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == ["item-0", "item-1", "item-2"]
    assert not err.exists()  # no error file: every item answered 200
    assert main([*common, "status", batch_id]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "completed"
    assert main([*common, "list", "--limit", "50"]) == 0
    assert batch_id in capsys.readouterr().out
    assert main([*common, "results", batch_id]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    with pytest.raises(SystemExit, match="HTTP 409"):
        main([*common, "cancel", batch_id])
    with pytest.raises(SystemExit, match="HTTP 401"):
        main(["batch", "--base-url", sdk_server.url, "--api-key", "wrong", "list"])
