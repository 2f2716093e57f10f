"""Anthropic Message Batches: POST /v1/messages/batches, GET /v1/messages/batches/{id}, GET
/v1/messages/batches (before_id, after_id, limit), POST /v1/messages/batches/{id}/cancel, GET
/v1/messages/batches/{id}/results (JSONL), DELETE /v1/messages/batches/{id}.

Each request's `params` is a /v1/messages body; it is checked when it runs, so a bad one becomes that
request's `errored` result (the endpoint's own error object), as Anthropic does. The request list itself
(custom ids, count, stream) is checked at creation, with a 400 naming the field.
"""
from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response, StreamingResponse

from rtserve.api.batches import objects as O
from rtserve.api.batches.routes_files import json_ok, page_limit
from rtserve.api.batches.routes_openai import cancel
from rtserve.api.batches.service import BatchService, service_of
from rtserve.api.errors import ApiError
from rtserve.api.limits import read_json_body

router = APIRouter()

CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class BatchRequestLine(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    custom_id: str
    params: dict[str, Any]


class CreateMessageBatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    requests: list[BatchRequestLine]


def results_url(request: Request, batch_id: str) -> str:
    return str(request.base_url).rstrip("/") + f"/v1/messages/batches/{batch_id}/results"


async def message_batch_view(service: BatchService, request: Request, row: dict[str, Any]) -> dict[str, Any]:
    counts = await service.runner.call(service.store.item_counts, row["id"])
    return O.message_batch_object(row, counts, results_url(request, row["id"]))


async def get_owned(service: BatchService, request: Request, batch_id: str) -> dict[str, Any]:
    row = await service.runner.call(service.store.get_batch, batch_id, service.owner_of(request), "anthropic")
    if row is None:
        raise ApiError(404, f"No message batch with id '{batch_id[:80]}'.")
    return row


def _checked_items(service: BatchService, req: CreateMessageBatch) -> list[tuple[str, str]]:
    if not req.requests:
        raise ApiError(400, "requests: at least one request is required.", param="requests")
    if len(req.requests) > service.settings.max_batch_requests:
        raise ApiError(400, f"requests: at most {service.settings.max_batch_requests} requests per batch "
                       f"(got {len(req.requests)}).", param="requests")
    seen: set[str] = set()
    items = []
    for i, line in enumerate(req.requests):
        if not CUSTOM_ID.match(line.custom_id):
            raise ApiError(400, f"requests.{i}.custom_id: 1 to 64 letters, digits, '_' or '-'.",
                           param=f"requests[{i}].custom_id")
        if line.custom_id in seen:
            raise ApiError(400, f"requests.{i}.custom_id: {line.custom_id!r} is used by an earlier request.",
                           param=f"requests[{i}].custom_id")
        if line.params.get("stream"):
            raise ApiError(400, f"requests.{i}.params.stream: streaming is not supported in a batch.",
                           param=f"requests[{i}].params.stream")
        seen.add(line.custom_id)
        items.append((line.custom_id, O.json_text(line.params)))
    return items


@router.post("/v1/messages/batches")
async def create_message_batch(request: Request) -> Response:
    service = service_of(request)
    req = await read_json_body(request, CreateMessageBatch)
    items = _checked_items(service, req)
    now = int(service.runner.clock())
    row = {"id": f"msgbatch_{uuid.uuid4().hex}", "owner": service.owner_of(request), "api": "anthropic",
           "endpoint": O.ANTHROPIC_ENDPOINT, "completion_window": "24h", "status": "in_progress",
           "created_at": now, "in_progress_at": now, "expires_at": now + int(service.settings.completion_window_s)}
    await service.runner.call(service.store.add_batch, row, items)
    service.runner.wake()
    counts = {**O.NO_ITEMS, "pending": len(items)}
    return json_ok(O.message_batch_object({**O.NEW_BATCH_DEFAULTS, **row}, counts, ""))  # as created


@router.get("/v1/messages/batches")
async def list_message_batches(request: Request) -> Response:
    service, q = service_of(request), request.query_params
    limit = page_limit(q.get("limit"), 20, 1000)
    rows, has_more = await service.runner.call(service.store.list_batches, service.owner_of(request),
                                               "anthropic", q.get("after_id"), q.get("before_id"), limit)
    data = [await message_batch_view(service, request, r) for r in rows]
    return json_ok({"data": data, "has_more": has_more, "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None})


@router.get("/v1/messages/batches/{batch_id}")
async def retrieve_message_batch(request: Request, batch_id: str) -> Response:
    service = service_of(request)
    return json_ok(await message_batch_view(service, request, await get_owned(service, request, batch_id)))


@router.post("/v1/messages/batches/{batch_id}/cancel")
async def cancel_message_batch(request: Request, batch_id: str) -> Response:
    service = service_of(request)
    row = await get_owned(service, request, batch_id)
    await cancel(service, row, conflict_message="Cannot cancel a message batch that has already ended.")
    return json_ok(await message_batch_view(service, request, await get_owned(service, request, batch_id)))


@router.get("/v1/messages/batches/{batch_id}/results")
async def message_batch_results(request: Request, batch_id: str) -> Response:
    service = service_of(request)
    row = await get_owned(service, request, batch_id)
    if row["ended_at"] is None:
        raise ApiError(400, f"Message batch {batch_id} has not finished processing; its results are not ready.")
    if row["archived_at"] is not None:
        raise ApiError(404, f"The results of message batch {batch_id} are no longer kept (retention).")

    async def lines() -> AsyncIterator[bytes]:
        last = -1
        while True:  # pages of items; a large batch is never held in memory at once
            page = await service.runner.call(service.store.items_page, batch_id, last, PAGE)
            for item in page:
                yield O.json_text(O.anthropic_result_line(item)).encode() + b"\n"
            if len(page) < PAGE:
                return
            last = page[-1]["idx"]

    return StreamingResponse(lines(), media_type="application/binary")


PAGE = 500


@router.delete("/v1/messages/batches/{batch_id}")
async def delete_message_batch(request: Request, batch_id: str) -> Response:
    service = service_of(request)
    row = await get_owned(service, request, batch_id)
    if row["ended_at"] is None:
        raise ApiError(400, f"Message batch {batch_id} is still processing; cancel it first.")
    await service.runner.call(service.store.delete_batch, batch_id)
    return json_ok({"id": batch_id, "type": "message_batch_deleted"})
