"""OpenAI Batches: POST /v1/batches, GET /v1/batches/{id}, GET /v1/batches (cursor: after, limit),
POST /v1/batches/{id}/cancel.

A new batch is `validating` until the runner has checked every line of its input file; then `in_progress`
(or `failed` with the `errors` list, nothing run), `finalizing` while its output/error files are written,
and `completed`, `expired` or (after `cancelling`) `cancelled`.
"""
from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response

from rtserve.api.batches import objects as O
from rtserve.api.batches.routes_files import MAX_EXPIRY_S, MIN_EXPIRY_S, get_owned_file, json_ok, page_limit
from rtserve.api.batches.service import BatchService, service_of
from rtserve.api.errors import ApiError
from rtserve.api.limits import read_json_body

router = APIRouter()

COMPLETION_WINDOW = "24h"
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    anchor: str
    seconds: int


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: ExpiresAfter | None = None


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise ApiError(400, f"metadata may have at most {MAX_METADATA_PAIRS} pairs.", param="metadata",
                       code="invalid_value")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise ApiError(400, f"metadata keys are at most {MAX_METADATA_KEY} characters and values at most "
                           f"{MAX_METADATA_VALUE}.", param="metadata", code="invalid_value")


def _output_expiry(expires: ExpiresAfter | None) -> int | None:
    """`output_expires_after` -> seconds the output/error files are kept (None: the server's retention)."""
    if expires is None:
        return None
    if expires.anchor != "created_at":
        raise ApiError(400, "output_expires_after.anchor must be 'created_at'.", param="output_expires_after.anchor",
                       code="invalid_value")
    if not MIN_EXPIRY_S <= expires.seconds <= MAX_EXPIRY_S:
        raise ApiError(400, f"output_expires_after.seconds must be from {MIN_EXPIRY_S} to {MAX_EXPIRY_S}.",
                       param="output_expires_after.seconds", code="invalid_value")
    return expires.seconds


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


async def batch_view(service: BatchService, row: dict[str, Any]) -> dict[str, Any]:
    counts = await service.runner.call(service.store.item_counts, row["id"])
    usage = await service.runner.call(service.store.usage_totals, row["id"])
    return O.batch_object(row, counts, usage)


async def get_owned_batch(service: BatchService, request: Request, batch_id: str) -> dict[str, Any]:
    row = await service.runner.call(service.store.get_batch, batch_id, service.owner_of(request), "openai")
    if row is None:
        raise ApiError(404, f"No batch found with id '{batch_id[:80]}'.", param="batch_id", code="batch_not_found")
    return row


@router.post("/v1/batches")
async def create_batch(request: Request) -> Response:
    service = service_of(request)
    req = await read_json_body(request, CreateBatchRequest)
    if req.endpoint not in O.OPENAI_ENDPOINTS:
        raise ApiError(400, f"endpoint must be one of {', '.join(O.OPENAI_ENDPOINTS)} (got {req.endpoint[:64]!r}).",
                       param="endpoint", code="invalid_value")
    if req.completion_window != COMPLETION_WINDOW:
        raise ApiError(400, f"completion_window must be '{COMPLETION_WINDOW}'.", param="completion_window",
                       code="invalid_value")
    _check_metadata(req.metadata)
    output_expires_s = _output_expiry(req.output_expires_after)
    input_file = get_owned_file(service, request, req.input_file_id)
    if input_file["purpose"] != "batch":
        raise ApiError(400, "The input file must have purpose 'batch'.", param="input_file_id", code="invalid_value")
    num_lines = await service.runner.call(_count_lines, service.store.file_path(input_file["id"]))
    if num_lines > service.settings.max_batch_requests:
        raise ApiError(400, f"The input file has {num_lines} requests; this server allows at most "
                       f"{service.settings.max_batch_requests} per batch.", param="input_file_id",
                       code="too_many_requests_in_batch")
    now = int(service.runner.clock())
    row = {"id": f"batch_{uuid.uuid4().hex}", "owner": service.owner_of(request), "api": "openai",
           "endpoint": req.endpoint, "input_file_id": input_file["id"], "completion_window": COMPLETION_WINDOW,
           "status": "validating", "metadata": None if req.metadata is None else O.json_text(req.metadata),
           "created_at": now, "expires_at": now + int(service.settings.completion_window_s),
           "output_expires_s": output_expires_s}
    await service.runner.call(service.store.add_batch, row)
    service.runner.wake()
    return json_ok(O.batch_object({**O.NEW_BATCH_DEFAULTS, **row}, O.NO_ITEMS, O.NO_USAGE))  # as created


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(request: Request, batch_id: str) -> Response:
    service = service_of(request)
    return json_ok(await batch_view(service, await get_owned_batch(service, request, batch_id)))


@router.get("/v1/batches")
async def list_batches(request: Request) -> Response:
    service, q = service_of(request), request.query_params
    limit = page_limit(q.get("limit"), 20, 100)
    rows, has_more = await service.runner.call(service.store.list_batches, service.owner_of(request), "openai",
                                               q.get("after"), None, limit)
    data = [await batch_view(service, r) for r in rows]
    return json_ok({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None, "has_more": has_more})


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str) -> Response:
    service = service_of(request)
    row = await get_owned_batch(service, request, batch_id)
    await cancel(service, row, conflict_message=f"Cannot cancel a batch with status '{row['status']}'.")
    return json_ok(await batch_view(service, await get_owned_batch(service, request, batch_id)))


async def cancel(service: BatchService, row: dict[str, Any], conflict_message: str) -> None:
    """validating/in_progress -> cancelling; 409 once it has ended. The runner lets the items in flight
    finish, then settles the rest as cancelled and writes the partial results."""
    if row["status"] in ("cancelling", "cancelled"):
        return
    now = int(service.runner.clock())
    if not await service.runner.call(service.store.update_batch, row["id"], ("validating", "in_progress"),
                                     status="cancelling", cancelling_at=now):
        raise ApiError(409, conflict_message, param="batch_id", code="batch_not_cancellable")
    service.runner.wake()
