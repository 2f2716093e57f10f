"""Anthropic Messages request models (unknown fields accepted) and response/event objects."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class ContentBlock(_Lenient):
    type: str
    text: str | None = None
    cache_control: dict[str, Any] | None = None
    content: str | list[dict[str, Any]] | None = None  # tool_result


class Message(_Lenient):
    role: str
    content: str | list[ContentBlock]


class CountTokensRequest(_Lenient):
    model: str | None = None
    messages: list[Message]
    system: str | list[ContentBlock] | None = None
    tools: list[dict[str, Any]] | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int
    stream: bool | None = False
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None


def has_cache_control(req: CountTokensRequest) -> bool:
    """Whether any system block, message block or tool carries a `cache_control` breakpoint."""
    blocks: list[Any] = list(req.system) if isinstance(req.system, list) else []
    for m in req.messages:
        if isinstance(m.content, list):
            blocks += m.content
    return (any(b.cache_control is not None for b in blocks)
            or any(isinstance(t, dict) and t.get("cache_control") for t in req.tools or []))


def usage_object(num_prompt: int, num_cached: int, num_output: int, cache_control: bool) -> dict[str, Any]:
    """input + cache_creation + cache_read == prompt tokens (Anthropic's accounting).

    cache_read = prefix-cache hit tokens; cache_creation = the computed prompt tokens when the request
    had a cache_control breakpoint (they are now cached), else 0.
    """
    num_computed = max(num_prompt - num_cached, 0)
    num_created = num_computed if cache_control else 0
    return {"input_tokens": num_computed - num_created, "output_tokens": num_output,
            "cache_creation_input_tokens": num_created, "cache_read_input_tokens": num_cached}


def stop_reason_of(finish_reason: str | None, stop_reason: int | str | None) -> tuple[str, str | None]:
    """Engine finish -> (Anthropic stop_reason, stop_sequence)."""
    if finish_reason == "length":
        return "max_tokens", None
    if finish_reason == "deadline":  # rtserve: a firm request stopped at its deadline_ms
        return "deadline", None
    if isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    return "end_turn", None


def message_object(message_id: str, model: str, text: str | None, stop_reason: str | None,
                   stop_sequence: str | None, usage: dict[str, Any]) -> dict[str, Any]:
    content = [] if text is None else [{"type": "text", "text": text}]
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage}


def message_start(message: dict[str, Any]) -> dict[str, Any]:
    return {"type": "message_start", "message": message}


def content_block_start(index: int) -> dict[str, Any]:
    return {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}


def text_delta(index: int, text: str) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}


def content_block_stop(index: int) -> dict[str, Any]:
    return {"type": "content_block_stop", "index": index}


def message_delta(stop_reason: str, stop_sequence: str | None, usage: dict[str, Any]) -> dict[str, Any]:
    return {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": usage}


PING = {"type": "ping"}
MESSAGE_STOP = {"type": "message_stop"}
