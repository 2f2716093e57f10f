"""OpenAI Files: POST /v1/files (multipart, purpose=batch), GET /v1/files, GET /v1/files/{id},
GET /v1/files/{id}/content, DELETE /v1/files/{id}. A file is visible only to the API key that made it.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import IO, Any

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile
from starlette.responses import FileResponse, Response

from rtserve.api.batches import objects as O
from rtserve.api.batches.service import BatchService, service_of
from rtserve.api.errors import ApiError
from rtserve.api.sse import dumps

router = APIRouter()

CHUNK_BYTES = 1024 * 1024
MIN_EXPIRY_S, MAX_EXPIRY_S = 3600, 30 * 24 * 3600  # OpenAI's expires_after[seconds] range


def json_ok(body: Any) -> Response:
    return Response(dumps(body).encode(), media_type="application/json")


def page_limit(raw: str | None, default: int, maximum: int, param: str = "limit") -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= maximum:
        raise ApiError(400, f"{param} must be an integer from 1 to {maximum} (got {raw[:20]!r}).", param=param,
                       code="invalid_value")
    return value


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    f.seek(0)
    while chunk := f.read(CHUNK_BYTES):
        yield chunk


def _expiry_seconds(form: Any, default_s: float) -> int:
    anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return int(default_s)
    if anchor != "created_at":
        raise ApiError(400, "expires_after[anchor] must be 'created_at'.", param="expires_after.anchor",
                       code="invalid_value")
    try:
        value = int(seconds)
    except (TypeError, ValueError):
        value = -1
    if not MIN_EXPIRY_S <= value <= MAX_EXPIRY_S:
        raise ApiError(400, f"expires_after[seconds] must be from {MIN_EXPIRY_S} to {MAX_EXPIRY_S}.",
                       param="expires_after.seconds", code="invalid_value")
    return value


def get_owned_file(service: BatchService, request: Request, file_id: str) -> dict[str, Any]:
    row = service.store.get_file(file_id, service.owner_of(request))
    if row is None:
        raise ApiError(404, f"No such File object: {file_id[:80]}", param="id", code="file_not_found")
    return row


@router.post("/v1/files")
async def create_file(request: Request) -> Response:
    service = service_of(request)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "Upload the file as multipart/form-data with the fields `file` and `purpose`.",
                       param="file", code="invalid_value")
    async with request.form(max_files=1, max_fields=8) as form:
        upload, purpose = form.get("file"), form.get("purpose")
        if purpose != "batch":
            raise ApiError(400, f"purpose must be 'batch' (got {str(purpose)[:40]!r}): this server stores batch "
                           "input files only.", param="purpose", code="invalid_value")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "file is required (a multipart file field).", param="file",
                           code="missing_required_parameter")
        if upload.size is not None and upload.size > service.settings.max_file_bytes:
            raise ApiError(413, f"The file is larger than the limit of {service.settings.max_file_bytes} bytes.",
                           param="file", code="file_too_large")
        expiry_s = _expiry_seconds(form, service.settings.retention_s)
        file_id, now = f"file-{uuid.uuid4().hex}", int(service.runner.clock())
        num_bytes = await service.runner.call(service.store.write_file_bytes, file_id, _chunks(upload.file))
        row = {"id": file_id, "owner": service.owner_of(request), "purpose": "batch",
               "filename": (upload.filename or "upload.jsonl")[:255], "bytes": num_bytes, "created_at": now,
               "expires_at": now + expiry_s}
        if num_bytes > service.settings.max_file_bytes:
            os.unlink(service.store.file_path(file_id))
            raise ApiError(413, f"The file is larger than the limit of {service.settings.max_file_bytes} bytes.",
                           param="file", code="file_too_large")
        await service.runner.call(service.store.add_file, row)
    return json_ok(O.file_object(row))


@router.get("/v1/files")
async def list_files(request: Request) -> Response:
    service, q = service_of(request), request.query_params
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, "order must be 'asc' or 'desc'.", param="order", code="invalid_value")
    limit = page_limit(q.get("limit"), 10000, 10000)
    rows, has_more = await service.runner.call(service.store.list_files, service.owner_of(request),
                                               q.get("purpose"), q.get("after"), limit, order == "desc")
    data = [O.file_object(r) for r in rows]
    return json_ok({"object": "list", "data": data, "has_more": has_more,
                    "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})


@router.get("/v1/files/{file_id}")
async def retrieve_file(request: Request, file_id: str) -> Response:
    service = service_of(request)
    return json_ok(O.file_object(get_owned_file(service, request, file_id)))


@router.get("/v1/files/{file_id}/content")
async def file_content(request: Request, file_id: str) -> Response:
    service = service_of(request)
    row = get_owned_file(service, request, file_id)
    return FileResponse(service.store.file_path(row["id"]), media_type="application/jsonl",
                        filename=row["filename"], content_disposition_type="attachment")


@router.delete("/v1/files/{file_id}")
async def delete_file(request: Request, file_id: str) -> Response:
    service = service_of(request)
    get_owned_file(service, request, file_id)
    await service.runner.call(service.store.delete_file, file_id, service.owner_of(request))
    return json_ok({"id": file_id, "object": "file", "deleted": True})
