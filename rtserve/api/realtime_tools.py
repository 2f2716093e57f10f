"""Tool calling on /v1/realtime: `tools` / `tool_choice` in session.update and response.create,
`function_call` and `function_call_output` conversation items, and a response's output items.

Tools have the Realtime shape (`{"type": "function", "name", "description", "parameters"}`) and go
through the same grammar, prompt and parser as the HTTP APIs (rtserve/structured/tool_formats.py).
Without tools a response has one message item, announced before its first token (`TextOutput`);
with them (`ToolOutput`) a message item opens at the first text and each call is a `function_call`
item, its arguments streamed as `response.function_call_arguments.delta` and closed by
`response.function_call_arguments.done`. The client answers a call with a `function_call_output`
item whose `call_id` must name an earlier call.
"""
from __future__ import annotations

import json
from typing import Any

from rtserve.api import realtime_events as E
from rtserve.api.errors import ApiError
from rtserve.api.tool_fields import json_object, tool_spec
from rtserve.structured.tool_formats import ToolFormat
from rtserve.structured.tools import ParseEvents, ToolSpec, Turn

Event = tuple[str, dict[str, Any]]


def parse_tools(value: Any, where: str) -> list[ToolSpec]:
    if not isinstance(value, list):
        raise ApiError(400, f"{where}.tools must be a list.", param=f"{where}.tools")
    tools = []
    for i, tool in enumerate(value):
        param = f"{where}.tools[{i}]"
        tool = json_object(tool, param)
        if tool.get("type", "function") != "function":
            raise ApiError(400, f"{param}.type must be 'function'.", param=f"{param}.type")
        tools.append(tool_spec(tool.get("name"), tool.get("description"), tool.get("parameters"), param))
    if len({t.name for t in tools}) != len(tools):
        raise ApiError(400, f"{where}.tools must have distinct names.", param=f"{where}.tools")
    return tools


def tool_mode(choice: Any, tools: list[ToolSpec], where: str) -> str:
    """Realtime tool_choice -> "none" | "auto" | "required" | the named tool."""
    param = f"{where}.tool_choice"
    if choice in ("none", "auto", "required"):
        mode = choice
    elif isinstance(choice, dict) and choice.get("type") == "function":
        mode = choice.get("name")
        if mode not in {t.name for t in tools}:
            raise ApiError(400, f"{param} names a function that is not in tools: {str(mode)[:64]!r}.", param=param)
    else:
        raise ApiError(400, f"{param} must be 'none', 'auto', 'required' or {{'type': 'function', 'name': ...}}.",
                       param=param)
    if mode in ("required",) and not tools:
        raise ApiError(400, f"{param} 'required' needs tools.", param=param)
    return mode if tools else "none"


def function_item(item: dict[str, Any], known_call_ids: set[str]) -> dict[str, Any]:
    """A `function_call` or `function_call_output` item from the client, checked and stored."""
    item_id = item["id"] if isinstance(item.get("id"), str) else E.new_id("item")
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise ApiError(400, "item.call_id must be a non-empty string.", param="item.call_id")
    if item["type"] == "function_call_output":
        if call_id not in known_call_ids:
            raise ApiError(400, "item.call_id does not match an earlier function_call item.", param="item.call_id")
        if not isinstance(item.get("output"), str):
            raise ApiError(400, "item.output must be a string.", param="item.output")
        return {"id": item_id, "object": "realtime.item", "type": "function_call_output", "call_id": call_id,
                "output": item["output"]}
    name, arguments = item.get("name"), item.get("arguments", "{}")
    tool_spec(name, None, None, "item")  # checks the name
    try:
        args = json.loads(arguments) if isinstance(arguments, str) else None
    except json.JSONDecodeError:
        args = None
    if not isinstance(args, dict):
        raise ApiError(400, "item.arguments must be a JSON object in a string.", param="item.arguments")
    known_call_ids.add(call_id)
    return call_item(item_id, call_id, name, arguments, "completed")


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "object": "realtime.item", "type": "function_call", "status": status, "name": name,
            "call_id": call_id, "arguments": arguments}


def item_turns(instructions: str, items: list[dict[str, Any]]) -> list[Turn]:
    """The conversation as turns: a function_call joins the assistant turn before it (or starts one); a
    call cut off before its end (an incomplete item) is left out."""
    turns = [Turn("system", instructions)] if instructions else []
    for it in items:
        if it["type"] == "message":
            turns.append(Turn(it["role"], "".join(p["text"] for p in it["content"])))
        elif it["type"] == "function_call_output":
            turns.append(Turn("tool", it["output"], call_id=it["call_id"]))
        elif it["status"] == "completed":
            if not turns or turns[-1].role != "assistant":
                turns.append(Turn("assistant", ""))
            turns[-1].calls.append((it["call_id"], it["name"], json.loads(it["arguments"] or "{}")))
    return turns


class TextOutput:
    """One message item, announced before the first token."""

    def __init__(self, response_id: str) -> None:
        self.response_id, self.item_id, self.text = response_id, E.new_id("item"), ""
        self.where = E.part_fields(response_id, self.item_id)

    def start(self) -> list[Event]:
        return [("response.output_item.added", {"response_id": self.response_id, "output_index": 0,
                                                "item": E.message_item(self.item_id, "assistant", "", "in_progress")}),
                ("response.content_part.added", {**self.where, "part": {"type": "text", "text": ""}})]

    def feed(self, text: str) -> list[Event]:
        self.text += text
        return [("response.output_text.delta", {**self.where, "delta": text})] if text else []

    def close(self, completed: bool) -> tuple[list[Event], list[dict[str, Any]]]:
        item = E.message_item(self.item_id, "assistant", self.text, "completed" if completed else "incomplete")
        return [("response.output_text.done", {**self.where, "text": self.text}),
                ("response.content_part.done", {**self.where, "part": {"type": "text", "text": self.text}}),
                ("response.output_item.done", {"response_id": self.response_id, "output_index": 0, "item": item})
                ], [item]


class ToolOutput:
    """Output items opened as the reply goes: a message item for text, a function_call item per call."""

    def __init__(self, response_id: str, fmt: ToolFormat) -> None:
        self.response_id, self.parser = response_id, fmt.parser()
        self.items: list[dict[str, Any]] = []  # closed items, in output order
        self.open: dict[str, Any] | None = None  # the item being written: its fields so far

    def start(self) -> list[Event]:
        return []

    def feed(self, text: str) -> list[Event]:
        return self._emit(self.parser.feed(text))

    def close(self, completed: bool) -> tuple[list[Event], list[dict[str, Any]]]:
        events = self._emit(self.parser.finish()) + self._close_open(completed)
        return events, self.items

    def _emit(self, ev: ParseEvents) -> list[Event]:
        events: list[Event] = []
        if ev.text and (self.open is not None and self.open["type"] == "message" or ev.text.strip()):
            if self.open is None or self.open["type"] != "message":
                events += self._close_open(True) + self._open_message()
            self.open["text"] += ev.text
            events.append(("response.output_text.delta", {**self._where(), "content_index": 0, "delta": ev.text}))
        started, fragments = dict(ev.started), {}
        for index, fragment in ev.arguments:
            fragments.setdefault(index, []).append(fragment)
        for index in sorted(set(started) | set(fragments)):  # calls come one after another
            if index in started:
                events += self._close_open(True) + self._open_call(index, started[index])
            for fragment in fragments.get(index, []):
                self.open["arguments"] += fragment
                events.append(("response.function_call_arguments.delta",
                               {**self._where(), "call_id": self.open["call_id"], "delta": fragment}))
        return events

    def _where(self) -> dict[str, Any]:
        return {"response_id": self.response_id, "item_id": self.open["id"], "output_index": len(self.items)}

    def _open_message(self) -> list[Event]:
        self.open = {"type": "message", "id": E.new_id("item"), "text": ""}
        return [("response.output_item.added", {"response_id": self.response_id, "output_index": len(self.items),
                                                "item": E.message_item(self.open["id"], "assistant", "",
                                                                       "in_progress")}),
                ("response.content_part.added", {**self._where(), "content_index": 0,
                                                 "part": {"type": "text", "text": ""}})]

    def _open_call(self, index: int, name: str) -> list[Event]:
        self.open = {"type": "function_call", "id": E.new_id("item"), "call_id": E.new_id("call"), "name": name,
                     "arguments": "", "index": index}
        item = call_item(self.open["id"], self.open["call_id"], name, "", "in_progress")
        return [("response.output_item.added", {"response_id": self.response_id, "output_index": len(self.items),
                                                "item": item})]

    def _close_open(self, completed: bool) -> list[Event]:
        if self.open is None:
            return []
        where, it = self._where(), self.open
        if it["type"] == "message":
            item = E.message_item(it["id"], "assistant", it["text"], "completed" if completed else "incomplete")
            events = [("response.output_text.done", {**where, "content_index": 0, "text": it["text"]}),
                      ("response.content_part.done", {**where, "content_index": 0,
                                                      "part": {"type": "text", "text": it["text"]}})]
        else:
            status = "completed" if self.parser.calls[it["index"]].is_complete else "incomplete"
            item = call_item(it["id"], it["call_id"], it["name"], it["arguments"], status)
            events = [("response.function_call_arguments.done", {**where, "call_id": it["call_id"], "name": it["name"],
                                                                 "arguments": it["arguments"]})]
        events.append(("response.output_item.done", {"response_id": self.response_id, "output_index": len(self.items),
                                                     "item": item}))
        self.items.append(item)
        self.open = None
        return events

    @property
    def has_complete_call(self) -> bool:
        return any(c.is_complete for c in self.parser.calls)
