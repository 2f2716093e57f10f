"""Wire objects of the Batch API, built from store rows: OpenAI `file` and `batch`, the output/error file
lines, Anthropic `message_batch` and its results lines. The one place these shapes are written.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

OPENAI_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
ANTHROPIC_ENDPOINT = "/v1/messages"

ERROR_LINE = {  # OpenAI error-file `error` objects for items that never ran
    "expired": {"code": "batch_expired",
                "message": "This request could not be executed before the completion window expired."},
    "cancelled": {"code": "batch_cancelled", "message": "This request was not executed: the batch was cancelled."},
}


NEW_BATCH_DEFAULTS = dict.fromkeys(
    ("model", "metadata", "errors", "output_file_id", "error_file_id", "input_file_id", "in_progress_at",
     "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at", "ended_at",
     "archived_at", "output_expires_s"))
NO_ITEMS = {"pending": 0, "succeeded": 0, "errored": 0, "cancelled": 0, "expired": 0}
NO_USAGE = {"input_tokens": 0, "output_tokens": 0, "cached_tokens": 0}


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed",
            "expires_at": row["expires_at"], "status_details": None}


def _json_or_none(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def batch_object(row: dict[str, Any], counts: dict[str, int], usage: dict[str, int]) -> dict[str, Any]:
    """OpenAI `batch`: `request_counts.completed` counts 200 answers, `failed` counts non-200 answers."""
    errors = _json_or_none(row["errors"])
    keys = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
            "expired_at", "cancelling_at", "cancelled_at")
    return {
        "id": row["id"], "object": "batch", "endpoint": row["endpoint"], "model": row["model"],
        "errors": None if errors is None else {"object": "list", "data": errors},
        "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
        "status": row["status"], "output_file_id": row["output_file_id"], "error_file_id": row["error_file_id"],
        **{k: row[k] for k in keys},
        "request_counts": {"total": sum(counts.values()), "completed": counts["succeeded"],
                           "failed": counts["errored"]},
        "usage": {"input_tokens": usage["input_tokens"],
                  "input_tokens_details": {"cached_tokens": usage["cached_tokens"]},
                  "output_tokens": usage["output_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": usage["input_tokens"] + usage["output_tokens"]},
        "metadata": _json_or_none(row["metadata"]),
    }


def output_line(batch_id: str, item: dict[str, Any]) -> dict[str, Any]:
    """One line of an OpenAI output or error file: `response` for an answered item, else `error`."""
    line_id = f"batch_req_{batch_id.removeprefix('batch_')}_{item['idx']}"
    if item["state"] in ("succeeded", "errored"):
        return {"id": line_id, "custom_id": item["custom_id"],
                "response": {"status_code": item["status_code"], "request_id": item["request_id"],
                             "body": json.loads(item["result"])}, "error": None}
    return {"id": line_id, "custom_id": item["custom_id"], "response": None, "error": ERROR_LINE[item["state"]]}


def _rfc3339(ts: int | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


PROCESSING_STATUS = {"validating": "in_progress", "in_progress": "in_progress", "finalizing": "in_progress",
                     "cancelling": "canceling", "completed": "ended", "cancelled": "ended", "expired": "ended",
                     "failed": "ended"}


def message_batch_object(row: dict[str, Any], counts: dict[str, int], results_url: str) -> dict[str, Any]:
    """Anthropic `message_batch`. As Anthropic defines the counts, every request is `processing` until the
    whole batch has ended; only then do the other counts fill in."""
    status = PROCESSING_STATUS[row["status"]]
    ended = status == "ended"
    total = sum(counts.values())
    request_counts = {"processing": 0 if ended else total,
                      "succeeded": counts["succeeded"] if ended else 0,
                      "errored": counts["errored"] if ended else 0,
                      "canceled": counts["cancelled"] if ended else 0,
                      "expired": counts["expired"] if ended else 0}
    return {"id": row["id"], "type": "message_batch", "processing_status": status,
            "request_counts": request_counts, "ended_at": _rfc3339(row["ended_at"]),
            "created_at": _rfc3339(row["created_at"]), "expires_at": _rfc3339(row["expires_at"]),
            "archived_at": _rfc3339(row["archived_at"]), "cancel_initiated_at": _rfc3339(row["cancelling_at"]),
            "results_url": results_url if ended and row["archived_at"] is None else None}


def anthropic_result_line(item: dict[str, Any]) -> dict[str, Any]:
    state = item["state"]
    if state == "succeeded":
        result: dict[str, Any] = {"type": "succeeded", "message": json.loads(item["result"])}
    elif state == "errored":
        result = {"type": "errored", "error": json.loads(item["result"])}
    else:
        result = {"type": "canceled" if state == "cancelled" else "expired"}
    return {"custom_id": item["custom_id"], "result": result}


def usage_of(api: str, body: dict[str, Any]) -> tuple[int, int, int]:
    """(input, output, cached) tokens from a 200 response body of either API."""
    usage = body.get("usage") or {}
    if api == "anthropic":
        return (usage.get("input_tokens", 0), usage.get("output_tokens", 0),
                usage.get("cache_read_input_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    return usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), details.get("cached_tokens") or 0


def json_text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
