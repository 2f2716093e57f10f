"""The one Server-Sent Events encoder: OpenAI data-only framing and Anthropic named events.

Framing follows the WHATWG SSE rules with LF separators only (`\\n\\n`, never CRLF): benchmark clients
split on "\\n\\n" and strip the exact prefix "data: ".
"""
from __future__ import annotations

import json
from typing import Any

SSE_DONE = b"data: [DONE]\n\n"


def dumps(obj: Any) -> str:
    """Compact JSON, non-ASCII kept as UTF-8 (lone surrogates are escaped by json, so output stays valid)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _utf8(text: str) -> bytes:
    # A lone surrogate cannot be UTF-8 encoded; replace it rather than fail mid-stream.
    return text.encode("utf-8", errors="replace")


def sse_data(obj: Any) -> bytes:
    """OpenAI framing: `data: <json>\\n\\n` (no `event:` line)."""
    return _utf8(f"data: {dumps(obj)}\n\n")


def sse_event(event: str, obj: Any) -> bytes:
    """Anthropic framing: `event: <name>\\ndata: <json>\\n\\n`; the JSON carries the same `type`."""
    return _utf8(f"event: {event}\ndata: {dumps(obj)}\n\n")


def sse_comment(text: str = "") -> bytes:
    """A comment line (`: text`), ignored by every SSE parser; usable as a keep-alive."""
    return _utf8(f": {text}\n\n")
