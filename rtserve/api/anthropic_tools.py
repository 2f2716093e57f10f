"""Anthropic tool use: `tools` / `tool_choice` in, `tool_use` / `tool_result` blocks in the history,
`tool_use` blocks and stop_reason "tool_use" out, streamed as `content_block_start` (a tool_use block
with empty input) followed by `input_json_delta` fragments.

Tool choice maps onto the shared tool grammar (rtserve/structured/tools.py): auto -> "auto",
any -> "required", tool -> that tool, none -> no tools offered; `disable_parallel_tool_use` allows a
single call. Server tools (a `type` other than "custom"), extended thinking, MCP servers, containers
and context management are refused.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from rtserve.api import schemas_anthropic as A
from rtserve.api.errors import ApiError
from rtserve.api.structured_fields import ToolContext
from rtserve.api.tool_fields import tool_spec
from rtserve.structured.tool_formats import HERMES, ToolFormat
from rtserve.structured.tools import Turn, new_call_id

_SET = lambda v: v is not None  # noqa: E731
REFUSED_MESSAGES = {"thinking": lambda v: isinstance(v, dict) and v.get("type") != "disabled",
                    "mcp_servers": _SET, "container": _SET, "context_management": _SET}
KNOWN_MESSAGES_EXTRA = {"rt", "metadata", "service_tier", "tool_choice"}
_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def anthropic_tool_context(req: A.CountTokensRequest, fmt: ToolFormat = HERMES) -> ToolContext:
    extra = req.model_extra or {}
    tools = []
    for i, tool in enumerate(req.tools or []):
        if not isinstance(tool, dict):
            raise ApiError(400, f"tools.{i} must be an object.", param=f"tools[{i}]")
        if tool.get("type") not in (None, "custom"):
            raise ApiError(400, f"tools.{i}.type: server tools ({str(tool.get('type'))[:40]}) are not supported.",
                           param=f"tools[{i}].type")
        if "input_schema" not in tool:
            raise ApiError(400, f"tools.{i}.input_schema is required.", param=f"tools[{i}].input_schema")
        tools.append(tool_spec(tool.get("name"), tool.get("description"), tool["input_schema"], f"tools[{i}]",
                               "input_schema"))
    if len({t.name for t in tools}) != len(tools):
        raise ApiError(400, "tools must have distinct names.", param="tools")
    choice = extra.get("tool_choice")
    mode, parallel = ("auto" if tools else "none"), True
    if choice is not None:
        if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
            raise ApiError(400, "tool_choice.type must be 'auto', 'any', 'tool' or 'none'.", param="tool_choice")
        mode = _CHOICES.get(choice["type"]) or choice.get("name")
        if choice["type"] == "tool" and mode not in {t.name for t in tools}:
            raise ApiError(400, f"tool_choice.name is not one of the tools: {str(mode)[:64]!r}.",
                           param="tool_choice.name")
        if mode != "none" and not tools:
            raise ApiError(400, "tool_choice requires tools.", param="tool_choice")
        parallel = not choice.get("disable_parallel_tool_use", False)
    offered = tools if mode != "none" else []
    return ToolContext(fmt.grammar(offered, mode, parallel), offered, mode, fmt)


def anthropic_turns(req: A.CountTokensRequest, system: str | None) -> list[Turn]:
    """The conversation with tool_use blocks as calls and each tool_result block as a "tool" turn
    (checked: it must answer an earlier tool_use)."""
    turns: list[Turn] = [Turn("system", system)] if system else []
    known_ids: set[str] = set()
    for i, m in enumerate(req.messages):
        if m.role not in ("user", "assistant"):
            raise ApiError(400, f"messages.{i}.role: must be 'user' or 'assistant'.", param=f"messages[{i}].role")
        blocks = [m.content] if isinstance(m.content, str) else m.content
        turn = Turn(m.role, "")
        texts: list[str] = []
        for j, block in enumerate(blocks):
            param = f"messages[{i}].content[{j}]"
            if isinstance(block, str) or block.type == "text":
                texts.append(block if isinstance(block, str) else block.text or "")
            elif block.type == "tool_use" and m.role == "assistant":
                turn.calls.append(_history_call(block, param, known_ids))
            elif block.type == "tool_result" and m.role == "user":
                _flush(turns, turn, texts)
                turn = Turn(m.role, "")
                turns.append(_tool_result(block, param, known_ids))
            else:
                raise ApiError(400, f"{param}.type: {block.type[:40]!r} blocks are not supported here.",
                               param=f"{param}.type")
        _flush(turns, turn, texts)
    return turns


def _flush(turns: list[Turn], turn: Turn, texts: list[str]) -> None:
    turn.content = "\n".join(texts)
    texts.clear()
    if turn.content or turn.calls:
        turns.append(turn)


def _history_call(block: Any, param: str, known_ids: set[str]) -> tuple[str, str, dict]:
    extra = block.model_extra or {}
    if not isinstance(extra.get("input"), dict) or not isinstance(extra.get("name"), str):
        raise ApiError(400, f"{param}: a tool_use block needs a name and an input object.", param=f"{param}.input")
    call_id = extra["id"] if isinstance(extra.get("id"), str) else param
    known_ids.add(call_id)
    return call_id, extra["name"], extra["input"]


def _tool_result(block: Any, param: str, known_ids: set[str]) -> Turn:
    extra = block.model_extra or {}
    if extra.get("tool_use_id") not in known_ids:
        raise ApiError(400, f"{param}.tool_use_id does not match a tool_use block of an earlier assistant message.",
                       param=f"{param}.tool_use_id")
    content = block.content
    if isinstance(content, list):
        bad = next((b for b in content if not isinstance(b, dict) or b.get("type") != "text"), None)
        if bad is not None:
            raise ApiError(400, f"{param}.content: only text blocks are supported in a tool_result.",
                           param=f"{param}.content")
        content = "\n".join(b.get("text", "") for b in content)
    text = ("Error: " if extra.get("is_error") else "") + (content or "")
    return Turn("tool", text, call_id=extra["tool_use_id"])


def message_content(text: str, stop_reason: str, fmt: ToolFormat = HERMES) -> tuple[list[dict[str, Any]], str]:
    """A whole reply's content blocks and stop_reason ("tool_use" when it stopped after a call)."""
    parser = fmt.parser()
    plain = parser.feed(text).text + parser.finish().text
    blocks: list[dict[str, Any]] = [{"type": "text", "text": plain.strip()}] if plain.strip() else []
    calls = [(c.name, _input(c.arguments)) for c in parser.calls if c.is_complete]
    calls = [(name, args) for name, args in calls if args is not None]  # the grammar makes this all of them
    blocks += [{"type": "tool_use", "id": new_call_id("toolu_"), "name": name, "input": args} for name, args in calls]
    return blocks, "tool_use" if calls and stop_reason == "end_turn" else stop_reason


def _input(arguments: str) -> dict | None:
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class TextBlocks:
    """Streaming without tools: one text block, opened at once."""

    def start(self) -> Iterator[tuple[str, dict]]:
        yield "content_block_start", A.content_block_start(0)

    def feed(self, text: str) -> Iterator[tuple[str, dict]]:
        if text:
            yield "content_block_delta", A.text_delta(0, text)

    def close(self) -> Iterator[tuple[str, dict]]:
        yield "content_block_stop", A.content_block_stop(0)

    def stop_reason(self, stop_reason: str) -> str:
        return stop_reason


class ToolUseBlocks:
    """Streaming with tools: a text block while the reply is text, a tool_use block per call."""

    def __init__(self, fmt: ToolFormat = HERMES) -> None:
        self.parser = fmt.parser()
        self.index = -1  # the open block's index
        self.open_kind: str | None = None

    def start(self) -> Iterator[tuple[str, dict]]:
        return iter(())

    def feed(self, text: str) -> Iterator[tuple[str, dict]]:
        events = self.parser.feed(text)
        yield from self._emit(events.text, events.started, events.arguments)

    def _emit(self, text: str, started: list, arguments: list) -> Iterator[tuple[str, dict]]:
        if text and (self.open_kind == "text" or text.strip()):
            if self.open_kind != "text":
                yield from self._open({"type": "text", "text": ""}, "text")
            yield "content_block_delta", A.text_delta(self.index, text)
        pending = {i: [] for i, _ in started}
        for i, fragment in arguments:
            pending.setdefault(i, []).append(fragment)
        for call_index, fragments in pending.items():
            name = next((n for i, n in started if i == call_index), None)
            if name is not None:
                yield from self._open({"type": "tool_use", "id": new_call_id("toolu_"), "name": name, "input": {}},
                                      "tool_use")
            for fragment in fragments:
                yield "content_block_delta", {"type": "content_block_delta", "index": self.index,
                                              "delta": {"type": "input_json_delta", "partial_json": fragment}}

    def _open(self, block: dict, kind: str) -> Iterator[tuple[str, dict]]:
        if self.open_kind is not None:
            yield "content_block_stop", A.content_block_stop(self.index)
        self.index += 1
        self.open_kind = kind
        yield "content_block_start", {"type": "content_block_start", "index": self.index, "content_block": block}

    def close(self) -> Iterator[tuple[str, dict]]:
        tail = self.parser.finish()
        yield from self._emit(tail.text, [], tail.arguments)
        if self.open_kind is None:  # an empty reply still has one (empty) text block
            yield from self._open({"type": "text", "text": ""}, "text")
        yield "content_block_stop", A.content_block_stop(self.index)

    def stop_reason(self, stop_reason: str) -> str:
        if stop_reason == "end_turn" and any(c.is_complete for c in self.parser.calls):
            return "tool_use"
        return stop_reason
