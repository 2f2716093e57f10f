"""The one encoder for /v1/realtime WebSocket events (text-only subset of the OpenAI Realtime GA model).

Server events carry a unique `event_id`; objects follow the GA shapes (`realtime.session`,
`realtime.item`, `realtime.response`). Text parts are `output_text` for the assistant and `input_text`
for user/system items.
"""
from __future__ import annotations

import itertools
import json
import uuid
from typing import Any


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class EventEncoder:
    """Stamps `event_id`s and serialises events as compact JSON text frames."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)

    def encode(self, event_type: str, **fields: Any) -> str:
        event = {"type": event_type, "event_id": f"event_{next(self._counter)}", **fields}
        return json.dumps(event, separators=(",", ":"), ensure_ascii=False)

    def error(self, message: str, *, code: str = "invalid_event", param: str | None = None,
              client_event_id: str | None = None, error_type: str = "invalid_request_error") -> str:
        return self.encode("error", error={"type": error_type, "code": code, "message": message[:500],
                                           "param": param, "event_id": client_event_id})


def session_object(session_id: str, model: str, instructions: str, max_output_tokens: int | str,
                   temperature: float | None) -> dict[str, Any]:
    return {"type": "realtime", "object": "realtime.session", "id": session_id, "model": model,
            "output_modalities": ["text"], "instructions": instructions, "tools": [],
            "max_output_tokens": max_output_tokens, "temperature": temperature}


def message_item(item_id: str, role: str, text: str, status: str = "completed") -> dict[str, Any]:
    part_type = "output_text" if role == "assistant" else "input_text"
    content = [{"type": part_type, "text": text}] if text or status == "completed" else []
    return {"id": item_id, "object": "realtime.item", "type": "message", "status": status, "role": role,
            "content": content}


def response_object(response_id: str, status: str, output: list[dict[str, Any]],
                    usage: dict[str, Any] | None, status_details: dict[str, Any] | None = None,
                    max_output_tokens: int | str = "inf") -> dict[str, Any]:
    return {"object": "realtime.response", "id": response_id, "status": status, "status_details": status_details,
            "output": output, "output_modalities": ["text"], "max_output_tokens": max_output_tokens,
            "usage": usage}


def usage_object(num_prompt: int, num_cached: int, num_output: int) -> dict[str, Any]:
    return {"total_tokens": num_prompt + num_output, "input_tokens": num_prompt, "output_tokens": num_output,
            "input_token_details": {"cached_tokens": num_cached, "text_tokens": num_prompt, "audio_tokens": 0},
            "output_token_details": {"text_tokens": num_output, "audio_tokens": 0}}


def part_fields(response_id: str, item_id: str) -> dict[str, Any]:
    """The location fields shared by content-part and text events of the single output item."""
    return {"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0}
