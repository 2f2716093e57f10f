"""OpenAI tool calls in responses: `message.tool_calls` and streamed `delta.tool_calls`.

A chat choice of a request with tools reads its text through a `ToolCallParser`: text outside calls
is `content`, each call becomes `{"id", "type": "function", "function": {"name", "arguments"}}`.
Streaming follows OpenAI: a call's first delta carries its index, id, type, name and empty
arguments; later deltas carry `function.arguments` fragments only. A choice that made a complete
call and stopped finishes with "tool_calls"; one cut by max_tokens keeps "length" and lists only
its complete calls.
"""
from __future__ import annotations

from typing import Any

from rtserve.structured.tool_formats import HERMES, ToolFormat
from rtserve.structured.tools import ParseEvents, new_call_id


class ChoiceTools:
    """One choice's parser (of the model's tool-call format) and the ids given to its calls."""

    def __init__(self, fmt: ToolFormat = HERMES) -> None:
        self.parser = fmt.parser()
        self.ids: list[str] = []

    def delta(self, text: str, finished: bool) -> dict[str, Any]:
        """The delta fields (`content`, `tool_calls`) for this much more text; empty when nothing to send."""
        events = self.parser.feed(text)
        if finished:
            tail = self.parser.finish()
            events.text += tail.text
            events.arguments += tail.arguments
        return self._delta(events)

    def _delta(self, events: ParseEvents) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if events.text:
            delta["content"] = events.text
        calls: dict[int, dict[str, Any]] = {}  # one entry per call index, in order
        for index, name in events.started:
            self.ids.append(new_call_id())
            calls[index] = {"index": index, "id": self.ids[index], "type": "function",
                            "function": {"name": name, "arguments": ""}}
        for index, fragment in events.arguments:
            entry = calls.setdefault(index, {"index": index, "function": {"arguments": ""}})
            entry["function"]["arguments"] += fragment
        if calls:
            delta["tool_calls"] = list(calls.values())
        return delta

    def finish_reason(self, finish: str | None) -> str | None:
        if finish == "stop" and any(c.is_complete for c in self.parser.calls):
            return "tool_calls"
        return finish


def message_fields(text: str, finish: str | None, fmt: ToolFormat = HERMES) -> tuple[dict[str, Any], str | None]:
    """A whole choice's `content` and `tool_calls`, and its finish_reason."""
    tools = ChoiceTools(fmt)
    events = tools.parser.feed(text)
    tail = tools.parser.finish()
    content = (events.text + tail.text).strip()
    calls = [{"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
             for c in tools.parser.calls if c.is_complete]
    fields: dict[str, Any] = {"content": content or None}
    if calls:
        fields["tool_calls"] = calls
    return fields, tools.finish_reason(finish)
