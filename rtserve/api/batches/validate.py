"""Validation of an OpenAI batch input file: every line must be a request the endpoint would accept.

A line is `{"custom_id": str, "method": "POST", "url": <the batch's endpoint>, "body": {...}}`. The body is
checked by the endpoint's own job builder (routes_openai.chat_job / completion_job: schema, model, sampling
fields, prompt length), so a line passes here exactly when the online endpoint would accept it. Errors are
OpenAI's batch `errors` entries: `{"code", "message", "param", "line"}` with 1-based line numbers.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from rtserve.api import schemas_openai as S
from rtserve.api.errors import ApiError, from_validation_errors

MAX_ERRORS = 100  # a file full of bad lines reports this many, not all of them

BodyCheck = Callable[[str, dict[str, Any]], None]


@dataclass
class ValidatedInput:
    items: list[tuple[str, str]] = field(default_factory=list)  # (custom_id, body JSON) in input order
    errors: list[dict[str, Any]] = field(default_factory=list)
    model: str | None = None


def batch_body(body: dict[str, Any]) -> dict[str, Any]:
    """An item's body as submitted (and validated): the `batch` real-time class, never streamed."""
    out = {k: v for k, v in body.items() if k not in ("service_tier", "rt", "stream", "stream_options")}
    return {**out, "stream": False, "rt": {"class": "batch"}}


def _error(line: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def check_openai_body(state: Any) -> BodyCheck:
    """A BodyCheck backed by the app's own endpoint job builders (raises ApiError as the endpoint would)."""
    from rtserve.api.routes_openai import chat_job, completion_job

    def check(endpoint: str, body: dict[str, Any]) -> None:
        model = S.ChatCompletionRequest if endpoint == "/v1/chat/completions" else S.CompletionRequest
        try:
            req = model.model_validate(body)
        except ValidationError as exc:
            raise from_validation_errors(list(exc.errors(include_url=False, include_input=False))) from None
        (chat_job if endpoint == "/v1/chat/completions" else completion_job)(state, req, 0.0)

    return check


def _check_line(n: int, raw: str, endpoint: str, seen: set[str],
                check_body: BodyCheck) -> tuple[str, dict[str, Any]] | dict[str, Any]:
    """(custom_id, body) for a good line, else its error entry."""
    try:
        line = json.loads(raw)
    except json.JSONDecodeError:
        return _error(n, "invalid_json_line", "This line is not parseable as valid JSON.")
    if not isinstance(line, dict):
        return _error(n, "invalid_json_line", "This line is not a JSON object.")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return _error(n, "missing_required_parameter", "custom_id is required and must be a non-empty string.",
                      "custom_id")
    if custom_id in seen:
        return _error(n, "duplicate_custom_id", f"The custom_id {custom_id[:64]!r} is used by an earlier line.",
                      "custom_id")
    seen.add(custom_id)
    if line.get("method", "POST") != "POST":
        return _error(n, "invalid_value", "method must be POST.", "method")
    if line.get("url") != endpoint:
        return _error(n, "mismatched_endpoint", f"url must be the batch's endpoint {endpoint} "
                      f"(got {str(line.get('url'))[:64]!r}).", "url")
    body = line.get("body")
    if not isinstance(body, dict):
        return _error(n, "missing_required_parameter", "body is required and must be a JSON object.", "body")
    if body.get("stream"):
        return _error(n, "invalid_value", "stream is not supported in a batch.", "body.stream")
    try:
        check_body(endpoint, batch_body(body))
    except ApiError as err:
        return _error(n, err.code or "invalid_value", err.message, f"body.{err.param}" if err.param else "body")
    return custom_id, body


def validate_lines(lines: Iterable[bytes], endpoint: str, check_body: BodyCheck) -> ValidatedInput:
    """Check every non-blank line; the batch may run only when `errors` is empty."""
    out, seen = ValidatedInput(), set()
    for n, raw in enumerate(lines, start=1):
        if len(out.errors) >= MAX_ERRORS:
            break
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            out.errors.append(_error(n, "invalid_json_line", "This line is not valid UTF-8."))
            continue
        if not text:
            continue
        checked = _check_line(n, text, endpoint, seen, check_body)
        if isinstance(checked, dict):
            out.errors.append(checked)
            continue
        custom_id, body = checked
        out.model = out.model or body.get("model")
        out.items.append((custom_id, json.dumps(body, separators=(",", ":"))))
    if not out.items and not out.errors:
        out.errors.append(_error(1, "empty_file", "The input file has no requests."))
    return out
