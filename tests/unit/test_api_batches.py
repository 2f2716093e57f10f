"""Batch API routes and runner against the fake engine, in process (the app's lifespan runs the runner):
object shapes, status lifecycle, output/error files, validation errors, cancel, expiry, retention,
size caps, API keys and owner scoping, Anthropic Message Batches."""
from __future__ import annotations

import asyncio
import json
import os

import pytest

from rtserve.api.batches.settings import BatchSettings
from tests.integration.fake_engine import FakeEngine, asgi_client, build_test_app

CHAT = "/v1/chat/completions"
ENDED = ("completed", "failed", "expired", "cancelled")


def chat_line(custom_id: str, content: str = "hi", **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": "fake-model", "messages": [{"role": "user", "content": content}], "max_tokens": 5,
                     **body}}


def jsonl(lines: list) -> bytes:
    return "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines).encode() + b"\n"


class Clock:
    def __init__(self) -> None:
        self.now_s = 1_000_000.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
async def make_client(tmp_path):
    """make_client(engine=None, keys=(), **batch_settings) -> an httpx client on a running app."""
    stack = []

    async def make(engine: FakeEngine | None = None, keys: tuple[str, ...] = (), server: dict | None = None,
                   **fields):
        fields.setdefault("sweep_interval_s", 0.05)
        settings = BatchSettings(str(tmp_path / "data"), **fields)
        app, engine = build_test_app(engine, batches=settings, api_keys=keys, **(server or {}))
        app.state.batches.runner.clock = Clock()
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        headers = {"authorization": f"Bearer {keys[0]}"} if keys else {}
        client = asgi_client(app, headers=headers)
        await client.__aenter__()
        client.engine, client.app, client.clock = engine, app, app.state.batches.runner.clock
        stack.append((lifespan, client))
        return client

    yield make
    for lifespan, client in reversed(stack):
        await client.__aexit__(None, None, None)
        await lifespan.__aexit__(None, None, None)


async def upload(c, content: bytes, **headers) -> str:
    r = await c.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["id"]


async def create_batch(c, lines: list, **extra) -> dict:
    file_id = await upload(c, jsonl(lines))
    r = await c.post("/v1/batches", json={"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h",
                                          **extra})
    assert r.status_code == 200, r.text
    return r.json()


async def wait_status(c, batch_id: str, statuses=ENDED, path: str = "/v1/batches") -> dict:
    for _ in range(2000):  # a generous bound, not a timing assertion
        body = (await c.get(f"{path}/{batch_id}")).json()
        if body.get("status", body.get("processing_status")) in statuses:
            return body
        await asyncio.sleep(0.01)
    raise AssertionError(f"batch never reached {statuses}: {body}")


async def wait_started(engine: FakeEngine, num: int) -> None:
    for _ in range(2000):
        if len(engine.started) >= num:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {len(engine.started)} requests reached the engine")


async def read_jsonl(c, file_id: str) -> list[dict]:
    r = await c.get(f"/v1/files/{file_id}/content")
    assert r.status_code == 200
    return [json.loads(line) for line in r.text.splitlines()]


async def test_chat_batch_lifecycle_and_output_file(make_client):
    c = await make_client()
    created = await create_batch(c, [chat_line(f"r{i}", f"question {i}") for i in range(3)], metadata={"k": "v"},
                                 output_expires_after={"anchor": "created_at", "seconds": 7200})
    assert created["object"] == "batch" and created["status"] == "validating"
    assert created["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert created["metadata"] == {"k": "v"} and created["expires_at"] - created["created_at"] == 24 * 3600
    done = await wait_status(c, created["id"])
    assert done["status"] == "completed" and done["error_file_id"] is None
    assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert done["in_progress_at"] and done["finalizing_at"] and done["completed_at"]
    assert done["usage"]["output_tokens"] == 15
    out = await read_jsonl(c, done["output_file_id"])
    assert [line["custom_id"] for line in out] == ["r0", "r1", "r2"]
    online = (await c.post(CHAT, json=chat_line("x", "question 1")["body"])).json()
    line = out[1]
    assert line["error"] is None and line["response"]["status_code"] == 200 and line["response"]["request_id"]
    assert line["response"]["body"]["choices"] == online["choices"]
    assert line["response"]["body"]["usage"] == online["usage"]
    assert [p.rt_class for p in c.engine.rt_params[:3]] == ["batch"] * 3  # items ran as batch class
    meta = (await c.get(f"/v1/files/{done['output_file_id']}")).json()
    assert meta["purpose"] == "batch_output" and meta["object"] == "file"
    assert meta["expires_at"] - meta["created_at"] == 7200  # output_expires_after


async def test_items_run_as_batch_whatever_class_they_ask_for(make_client):
    c = await make_client()
    lines = [chat_line("a", rt={"class": "firm", "ttft_ms": 100}), chat_line("b", service_tier="priority"),
             chat_line("c", stream_options={"include_usage": True})]
    done = await wait_status(c, (await create_batch(c, lines))["id"])
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 3
    assert [p.rt_class for p in c.engine.rt_params] == ["batch"] * 3


async def test_validation_failure_lists_lines_and_runs_nothing(make_client):
    c = await make_client()
    lines = [chat_line("ok"), "not json", {"method": "POST", "url": CHAT, "body": {}}, chat_line("ok"),
             {**chat_line("wrong-url"), "url": "/v1/completions"}, chat_line("too-long", max_tokens=10**6),
             chat_line("streamed", stream=True), chat_line("empty", messages=[])]
    created = await create_batch(c, lines)
    failed = await wait_status(c, created["id"])
    assert failed["status"] == "failed" and failed["failed_at"] and failed["output_file_id"] is None
    errors = failed["errors"]["data"]
    assert failed["errors"]["object"] == "list"
    assert [(e["line"], e["code"], e["param"]) for e in errors] == [
        (2, "invalid_json_line", None), (3, "missing_required_parameter", "custom_id"),
        (4, "duplicate_custom_id", "custom_id"), (5, "mismatched_endpoint", "url"),
        (6, "invalid_value", "body.max_tokens"), (7, "invalid_value", "body.stream"),
        (8, "invalid_value", "body.messages")]
    assert c.engine.started == []


async def test_item_failure_is_that_items_error_line(make_client):
    c = await make_client(FakeEngine(error_after=1))
    done = await wait_status(c, (await create_batch(c, [chat_line("a"), chat_line("b")]))["id"])
    assert done["status"] == "completed" and done["output_file_id"] is None
    assert done["request_counts"] == {"total": 2, "completed": 0, "failed": 2}
    errors = await read_jsonl(c, done["error_file_id"])
    assert [e["custom_id"] for e in errors] == ["a", "b"]
    assert errors[0]["response"]["status_code"] == 500 and "error" in errors[0]["response"]["body"]


async def test_in_flight_is_bounded_and_cancel_settles_the_rest(make_client):
    engine = FakeEngine(gate=asyncio.Event())
    c = await make_client(engine, max_in_flight=2)
    created = await create_batch(c, [chat_line(f"r{i}") for i in range(6)])
    await wait_started(engine, 2)
    await asyncio.sleep(0.05)
    assert len(engine.started) == 2  # never more than max_in_flight submitted
    r = await c.post(f"/v1/batches/{created['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelling" and r.json()["cancelling_at"]
    engine.gate.set()
    done = await wait_status(c, created["id"])
    assert done["status"] == "cancelled" and done["cancelled_at"]
    assert done["request_counts"] == {"total": 6, "completed": 2, "failed": 0}
    assert len(engine.started) == 2
    out, errors = await read_jsonl(c, done["output_file_id"]), await read_jsonl(c, done["error_file_id"])
    assert sorted(line["custom_id"] for line in out + errors) == [f"r{i}" for i in range(6)]
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    again = await c.post(f"/v1/batches/{created['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


async def test_cancel_of_a_completed_batch_is_a_conflict(make_client):
    c = await make_client()
    done = await wait_status(c, (await create_batch(c, [chat_line("a")]))["id"])
    r = await c.post(f"/v1/batches/{done['id']}/cancel")
    assert r.status_code == 409 and r.json()["error"]["code"] == "batch_not_cancellable"


async def test_completion_window_expiry_marks_the_rest_expired(make_client):
    engine = FakeEngine(gate=asyncio.Event())
    c = await make_client(engine, max_in_flight=1)
    created = await create_batch(c, [chat_line(f"r{i}") for i in range(3)])
    await wait_started(engine, 1)
    c.clock.now_s += 24 * 3600 + 1
    c.app.state.batches.runner.wake()
    await wait_status(c, created["id"], ("finalizing",))
    engine.gate.set()  # the item in flight still finishes
    done = await wait_status(c, created["id"])
    assert done["status"] == "expired" and done["expired_at"]
    assert done["request_counts"] == {"total": 3, "completed": 1, "failed": 0}
    errors = await read_jsonl(c, done["error_file_id"])
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("r1", "batch_expired"), ("r2", "batch_expired")]


async def test_retention_deletes_files_and_results(make_client):
    c = await make_client(retention_s=3600)
    done = await wait_status(c, (await create_batch(c, [chat_line("a")]))["id"])
    files_dir = c.app.state.batches.settings.files_dir
    assert len(os.listdir(files_dir)) == 2  # input + output
    c.clock.now_s += 3601
    runner = c.app.state.batches.runner
    await runner.sweep()
    assert os.listdir(files_dir) == []
    assert (await c.get(f"/v1/files/{done['output_file_id']}")).status_code == 404
    assert (await c.get(f"/v1/files/{done['input_file_id']}")).status_code == 404
    assert (await c.get(f"/v1/batches/{done['id']}")).json()["status"] == "completed"


async def test_files_routes(make_client):
    c = await make_client(max_file_bytes=1000)
    ids = [await upload(c, jsonl([chat_line(str(i))])) for i in range(3)]
    listed = (await c.get("/v1/files", params={"limit": 2})).json()
    assert listed["object"] == "list" and [f["id"] for f in listed["data"]] == ids[::-1][:2] and listed["has_more"]
    rest = (await c.get("/v1/files", params={"limit": 2, "after": ids[1]})).json()
    assert [f["id"] for f in rest["data"]] == [ids[0]] and not rest["has_more"]
    assert (await c.get(f"/v1/files/{ids[0]}/content")).content == jsonl([chat_line("0")])
    r = await c.delete(f"/v1/files/{ids[0]}")
    assert r.json() == {"id": ids[0], "object": "file", "deleted": True}
    r = await c.get(f"/v1/files/{ids[0]}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"
    big = await c.post("/v1/files", files={"file": ("big.jsonl", b"x" * 1001)}, data={"purpose": "batch"})
    assert big.status_code == 413 and big.json()["error"]["param"] == "file"
    wrong = await c.post("/v1/files", files={"file": ("a.jsonl", b"{}")}, data={"purpose": "fine-tune"})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "purpose"
    missing = await c.post("/v1/files", data={"purpose": "batch"}, files={"other": ("a", b"x")})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
    not_multipart = await c.post("/v1/files", json={"purpose": "batch"})
    assert not_multipart.status_code == 400
    expiring = await c.post("/v1/files", files={"file": ("a.jsonl", b"{}")}, data={
        "purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"})
    assert expiring.json()["expires_at"] - expiring.json()["created_at"] == 3600
    too_soon = await c.post("/v1/files", files={"file": ("a.jsonl", b"{}")}, data={
        "purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": "5"})
    assert too_soon.status_code == 400 and too_soon.json()["error"]["param"] == "expires_after.seconds"


async def test_upload_over_the_body_limit_is_413_before_parsing(make_client):
    c = await make_client(max_file_bytes=1000)
    r = await c.post("/v1/files", files={"file": ("big.jsonl", b"x" * 200_000)}, data={"purpose": "batch"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


async def test_create_batch_bad_fields(make_client):
    c = await make_client(max_batch_requests=2)
    file_id = await upload(c, jsonl([chat_line(f"r{i}") for i in range(3)]))
    base = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
    cases = [({**base, "endpoint": "/v1/embeddings"}, 400, "endpoint"),
             ({**base, "completion_window": "1h"}, 400, "completion_window"),
             ({**base, "input_file_id": "file-nope"}, 404, "id"),
             (base, 400, "input_file_id"),  # 3 requests over the cap of 2
             ({**base, "metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata"),
             ({**base, "output_expires_after": {"anchor": "created_at", "seconds": 60}}, 400,
              "output_expires_after.seconds"),
             ({**base, "output_expires_after": {"anchor": "now", "seconds": 7200}}, 400,
              "output_expires_after.anchor"),
             ({"endpoint": CHAT, "completion_window": "24h"}, 400, "input_file_id")]
    for body, status, param in cases:
        r = await c.post("/v1/batches", json=body)
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), (body, r.text)
    assert (await c.get("/v1/batches/batch_nope")).status_code == 404
    assert (await c.post("/v1/batches/batch_nope/cancel")).status_code == 404


async def test_list_batches_pagination(make_client):
    c = await make_client()
    ids = [(await create_batch(c, [chat_line("a")]))["id"] for _ in range(3)]
    page = (await c.get("/v1/batches", params={"limit": 2})).json()
    assert page["object"] == "list" and [b["id"] for b in page["data"]] == ids[::-1][:2] and page["has_more"]
    assert page["first_id"] == ids[2] and page["last_id"] == ids[1]
    rest = (await c.get("/v1/batches", params={"limit": 2, "after": page["last_id"]})).json()
    assert [b["id"] for b in rest["data"]] == [ids[0]] and not rest["has_more"]
    assert (await c.get("/v1/batches", params={"limit": 0})).status_code == 400


async def test_api_keys_on_every_route_and_owner_scoping(make_client):
    c = await make_client(keys=("key-a", "key-b"))
    file_id = await upload(c, jsonl([chat_line("a")]))
    batch = (await c.post("/v1/batches", json={"input_file_id": file_id, "endpoint": CHAT,
                                               "completion_window": "24h"})).json()
    await wait_status(c, batch["id"])  # items pass the key check too (they run with a configured key)
    other = {"authorization": "Bearer key-b"}
    assert (await c.get(f"/v1/files/{file_id}", headers=other)).status_code == 404
    assert (await c.get(f"/v1/batches/{batch['id']}", headers=other)).status_code == 404
    assert (await c.get("/v1/batches", headers=other)).json()["data"] == []
    assert (await c.get("/v1/batches", headers={"x-api-key": "key-a"})).json()["data"][0]["id"] == batch["id"]
    for method, path in [("GET", "/v1/files"), ("POST", "/v1/files"), ("GET", f"/v1/files/{file_id}/content"),
                         ("DELETE", f"/v1/files/{file_id}"), ("POST", "/v1/batches"), ("GET", "/v1/batches"),
                         ("POST", f"/v1/batches/{batch['id']}/cancel"), ("GET", "/v1/messages/batches"),
                         ("POST", "/v1/messages/batches")]:
        r = await c.request(method, path, headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401, (method, path)


async def test_items_do_not_take_the_keys_concurrency_slots(make_client):
    engine = FakeEngine(gate=asyncio.Event())
    c = await make_client(engine, keys=("k",), server={"max_concurrent_per_key": 1}, max_in_flight=2)
    created = await create_batch(c, [chat_line(f"r{i}") for i in range(3)])
    await wait_started(engine, 2)  # two items in flight under key k's one slot
    assert (await c.get(f"/v1/batches/{created['id']}")).status_code == 200  # k still has its slot
    engine.gate.set()
    assert (await wait_status(c, created["id"]))["request_counts"]["completed"] == 3


# ---- Anthropic Message Batches -------------------------------------------------------------------------

def message_request(custom_id: str, **params) -> dict:
    return {"custom_id": custom_id, "params": {"model": "fake-model", "max_tokens": 4,
                                               "messages": [{"role": "user", "content": "hi"}], **params}}


async def test_message_batch_lifecycle_and_results(make_client):
    c = await make_client()
    r = await c.post("/v1/messages/batches", json={"requests": [message_request("a"),
                                                                message_request("b", max_tokens=-1)]})
    assert r.status_code == 200, r.text
    created = r.json()
    assert created["type"] == "message_batch" and created["id"].startswith("msgbatch_")
    assert created["processing_status"] == "in_progress" and created["results_url"] is None
    assert created["request_counts"] == {"processing": 2, "succeeded": 0, "errored": 0, "canceled": 0,
                                         "expired": 0}
    done = await wait_status(c, created["id"], ("ended",), path="/v1/messages/batches")
    assert done["request_counts"] == {"processing": 0, "succeeded": 1, "errored": 1, "canceled": 0, "expired": 0}
    assert done["ended_at"].endswith("Z") and done["results_url"].endswith(f"/{created['id']}/results")
    raw = (await c.get(f"/v1/messages/batches/{created['id']}/results")).text
    results = [json.loads(line) for line in raw.splitlines()]
    assert [x["custom_id"] for x in results] == ["a", "b"]
    online = (await c.post("/v1/messages", json=message_request("a")["params"])).json()
    assert results[0]["result"]["type"] == "succeeded"
    assert results[0]["result"]["message"]["content"] == online["content"]
    assert results[1]["result"]["type"] == "errored"
    assert results[1]["result"]["error"]["error"]["type"] == "invalid_request_error"
    r = await c.delete(f"/v1/messages/batches/{created['id']}")
    assert r.json() == {"id": created["id"], "type": "message_batch_deleted"}
    assert (await c.get(f"/v1/messages/batches/{created['id']}")).json()["error"]["type"] == "not_found_error"


async def test_message_batch_cancel_and_bad_requests(make_client):
    engine = FakeEngine(gate=asyncio.Event())
    c = await make_client(engine, max_in_flight=1, max_batch_requests=3)
    created = (await c.post("/v1/messages/batches",
                            json={"requests": [message_request(f"r{i}") for i in range(3)]})).json()
    early = await c.get(f"/v1/messages/batches/{created['id']}/results")
    assert early.status_code == 400 and early.json()["type"] == "error"
    r = await c.post(f"/v1/messages/batches/{created['id']}/cancel")
    assert r.json()["processing_status"] == "canceling" and r.json()["cancel_initiated_at"]
    engine.gate.set()
    done = await wait_status(c, created["id"], ("ended",), path="/v1/messages/batches")
    counts = done["request_counts"]
    assert counts["canceled"] + counts["succeeded"] == 3 and counts["canceled"] >= 2
    results = (await c.get(f"/v1/messages/batches/{created['id']}/results")).text.splitlines()
    assert sum(json.loads(x)["result"]["type"] == "canceled" for x in results) == counts["canceled"]
    bad = [({"requests": []}, "requests"),
           ({"requests": [message_request(f"r{i}") for i in range(4)]}, "requests"),
           ({"requests": [message_request("a"), message_request("a")]}, "requests[1].custom_id"),
           ({"requests": [message_request("bad id!")]}, "requests[0].custom_id"),
           ({"requests": [message_request("a", stream=True)]}, "requests[0].params.stream")]
    for body, param in bad:
        r = await c.post("/v1/messages/batches", json=body)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (param, r.text)
        assert param.split("[")[0] in r.json()["error"]["message"]
    assert (await c.get("/v1/messages/batches/msgbatch_nope")).status_code == 404


async def test_message_batch_list_pagination(make_client):
    c = await make_client()
    ids = [(await c.post("/v1/messages/batches", json={"requests": [message_request("a")]})).json()["id"]
           for _ in range(3)]
    page = (await c.get("/v1/messages/batches", params={"limit": 2})).json()
    assert [b["id"] for b in page["data"]] == ids[::-1][:2] and page["has_more"]
    assert page["first_id"] == ids[2] and page["last_id"] == ids[1]
    rest = (await c.get("/v1/messages/batches", params={"limit": 2, "after_id": page["last_id"]})).json()
    assert [b["id"] for b in rest["data"]] == [ids[0]] and not rest["has_more"]
    newer = (await c.get("/v1/messages/batches", params={"before_id": ids[0]})).json()
    assert [b["id"] for b in newer["data"]] == [ids[2], ids[1]]


def test_serve_flags_build_the_batch_settings_and_keys(tmp_path):
    from rtserve.api.server import build_parser, settings_from_args

    args = build_parser().parse_args(["--api-key", "a", "--api-key", "b", "--data-dir", str(tmp_path),
                                      "--max-file-bytes", "10", "--max-batch-requests", "5",
                                      "--batch-max-in-flight", "3", "--batch-retention-s", "60"])
    s = settings_from_args(args)
    assert (s.api_key, s.api_keys, s.all_api_keys) == ("a", ("b",), ("a", "b"))
    assert s.batches == BatchSettings(str(tmp_path), max_file_bytes=10, max_batch_requests=5, max_in_flight=3,
                                      retention_s=60)
    assert settings_from_args(build_parser().parse_args(["--no-batch-api"])).batches is None


def test_a_data_dir_serves_one_process_at_a_time(tmp_path):
    from rtserve.api.batches.store import BatchStore

    first = BatchStore(str(tmp_path / "db"), str(tmp_path / "files"))
    with pytest.raises(RuntimeError, match="in use by another rtserve process"):
        BatchStore(str(tmp_path / "db"), str(tmp_path / "files"))
    first.close()
    BatchStore(str(tmp_path / "db"), str(tmp_path / "files")).close()


class HoldingEngine(FakeEngine):
    """Answers prompts containing "run 0" at once and holds every other request until the app stops."""

    async def generate(self, prompt_ids, params, request_id, **kwargs):
        if "run 0" not in self.tokenizer.decode(prompt_ids):
            await asyncio.Event().wait()
        async for out in super().generate(prompt_ids, params, request_id, **kwargs):
            yield out


async def test_graceful_restart_resumes_in_progress_and_cancelling_batches(tmp_path):
    data = str(tmp_path / "data")

    async def run_app(engine: FakeEngine, work) -> None:
        app, _ = build_test_app(engine, batches=BatchSettings(data, max_in_flight=2, sweep_interval_s=0.05))
        async with app.router.lifespan_context(app), asgi_client(app) as c:
            await work(c)

    ids = {}

    async def first_life(c) -> None:
        ids["cancel"] = (await create_batch(c, [chat_line("c0")]))["id"]  # c0 takes one slot and is held
        ids["run"] = (await create_batch(c, [chat_line(f"r{i}", f"run {i}") for i in range(3)]))["id"]
        while (await c.get(f"/v1/batches/{ids['run']}")).json()["request_counts"]["completed"] < 1:
            await asyncio.sleep(0.01)  # r0 answered; r1 now holds the other slot
        assert (await c.post(f"/v1/batches/{ids['cancel']}/cancel")).json()["status"] == "cancelling"

    await run_app(HoldingEngine(), first_life)  # stops with c0 and r1 in flight: both stay pending
    second = FakeEngine()

    async def second_life(c) -> None:
        done = await wait_status(c, ids["run"])
        assert done["status"] == "completed" and done["request_counts"]["completed"] == 3
        assert [x["custom_id"] for x in await read_jsonl(c, done["output_file_id"])] == ["r0", "r1", "r2"]
        cancelled = await wait_status(c, ids["cancel"])
        assert cancelled["status"] == "cancelled" and cancelled["output_file_id"] is None
        assert [e["custom_id"] for e in await read_jsonl(c, cancelled["error_file_id"])] == ["c0"]

    await run_app(second, second_life)
    ran = sorted(second.tokenizer.decode(second.prompts[r]) for r in second.started)
    assert len(ran) == 2 and "run 1" in ran[0] and "run 2" in ran[1]  # r0 was not run again, c0 not at all
