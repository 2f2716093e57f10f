"""Tool calling, independent of the wire API: the prompt that offers tools, the grammar that shapes
a call, and the parser that reads calls back out of the generated text.

Calls are written in the Hermes / Qwen format, which many open models are trained on:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that renders `tools` itself and writes calls in this format (Hermes, Qwen) is given
the tools and the history's calls and results as they are (`native_messages`). Any other template is
used as it is, with the tools offered in the system message with the documented prompt below
(`tools_system_prompt`), past calls rendered in that format and a tool's result as
`<tool_response>...</tool_response>` in a "tool" message (`generic_messages`). With tool_choice "required" or a
named tool the output is nothing but calls (`tags_with_separator`); with "auto" it is free text where
a call, once its `<tool_call>` marker appears, is constrained to a valid call (`triggered_tags`).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from rtserve.sampling_params import StructuredOutputs

CALL_BEGIN = "<tool_call>\n"
CALL_TRIGGER = "<tool_call>"
CALL_END = "}\n</tool_call>"
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_HEADER = re.compile(r'^<tool_call>\n\{"name": "([a-zA-Z0-9_-]{1,64})", "arguments": ')


@dataclass
class Turn:
    """One message of a conversation with tools, whichever API it came from."""

    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    calls: list[tuple[str, str, dict]] = field(default_factory=list)  # assistant: (id, name, arguments)
    call_id: str | None = None  # tool: the id of the call this is the result of


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str | None
    parameters: dict  # a JSON schema of type object


def call_header(name: str) -> str:
    return f'{CALL_BEGIN}{{"name": "{name}", "arguments": '


def tool_call_grammar(tools: list[ToolSpec], mode: str, parallel: bool) -> StructuredOutputs | None:
    """The structural tag for `mode`: "auto" (text, calls constrained from their marker on),
    "required" (one or more calls and nothing else) or a tool's name (calls of that tool only).
    `parallel=False` allows a single call. None for "none"."""
    if mode == "none" or not tools:
        return None
    chosen = tools if mode in ("auto", "required") else [t for t in tools if t.name == mode]
    tags = [{"type": "tag", "begin": call_header(t.name),
             "content": {"type": "json_schema", "json_schema": t.parameters}, "end": CALL_END} for t in chosen]
    if mode == "auto":
        fmt = {"type": "triggered_tags", "triggers": [CALL_TRIGGER], "tags": tags,
               "stop_after_first": not parallel}
    else:
        fmt = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
               "stop_after_first": not parallel}
    # Keys in their given order: xgrammar writes an object's properties in the schema's order.
    return StructuredOutputs("structural_tag", json.dumps({"type": "structural_tag", "format": fmt}))


def tools_system_prompt(tools: list[ToolSpec]) -> str:
    """The generic tool prompt (Hermes style), appended to the system message."""
    lines = [json.dumps({"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                          "parameters": t.parameters}}) for t in tools]
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            + "\n".join(lines) + "\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def template_renders_tools(template: str | None) -> bool:
    """Whether a chat template offers `tools` itself and writes calls as <tool_call> blocks."""
    return bool(template) and "tools" in template and CALL_TRIGGER in template


def tool_dicts(tools: list[ToolSpec]) -> list[dict]:
    """The tools as a chat template's `tools` variable (OpenAI's shape, as transformers passes them)."""
    return [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                              "parameters": t.parameters}} for t in tools]


def native_messages(turns: list[Turn]) -> list[dict]:
    """Messages for a template that renders tools: calls as `tool_calls` (arguments as objects)."""
    out = []
    for t in turns:
        message: dict = {"role": t.role, "content": t.content}
        if t.calls:
            message["tool_calls"] = [{"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                                     for i, n, a in t.calls]
        if t.call_id is not None:
            message["tool_call_id"] = t.call_id
        out.append(message)
    return out


def generic_messages(turns: list[Turn], tools: list[ToolSpec], write_call=None, system_prompt=None
                     ) -> list[dict[str, str]]:
    """Plain role/content messages: calls and results written out, the tools in the system message
    (calls written by `write_call`, tools offered by `system_prompt`: this format's by default)."""
    write_call, system_prompt = write_call or render_call, system_prompt or tools_system_prompt
    out = []
    for t in turns:
        content = render_result(t.content) if t.role == "tool" else "\n".join(
            [t.content] * bool(t.content) + [write_call(n, json.dumps(a)) for _, n, a in t.calls])
        out.append({"role": t.role, "content": content})
    if tools:
        prompt = system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def render_call(name: str, arguments: str) -> str:
    """A past call as the model writes it (`arguments`: JSON text of an object)."""
    return f"{call_header(name)}{arguments}{CALL_END}"


def render_result(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


def new_call_id(prefix: str = "call_") -> str:
    return prefix + uuid.uuid4().hex[:24]


@dataclass
class ParsedCall:
    name: str
    arguments: str = ""
    is_complete: bool = False


@dataclass
class ParseEvents:
    """What one `feed` added: text outside calls, started calls (index, name), argument fragments."""

    text: str = ""
    started: list[tuple[int, str]] = field(default_factory=list)
    arguments: list[tuple[int, str]] = field(default_factory=list)


class ToolCallParser:
    """Splits generated text into plain text and calls, incrementally (for streaming).

    Text that may still turn out to be the start of a marker is held back until it cannot; a call's
    arguments stream as they arrive, holding back what may be the start of its end marker.
    """

    def __init__(self) -> None:
        self.calls: list[ParsedCall] = []
        self._buffer = ""
        self._in_call = False
        self._after_call = False  # whitespace right after a call separates calls: not text

    def feed(self, text: str) -> ParseEvents:
        self._buffer += text
        events = ParseEvents()
        while True:
            if not self._in_call:
                if self._after_call:
                    self._buffer = self._buffer.lstrip()
                    if not self._buffer:
                        return events
                    self._after_call = False
                at = self._buffer.find(CALL_TRIGGER)
                if at < 0:
                    keep = _partial_suffix(self._buffer, CALL_TRIGGER)
                    events.text += self._buffer[:len(self._buffer) - keep]
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    return events
                header = _HEADER.match(self._buffer[at:])
                if header is None:
                    if len(self._buffer) - at < 96 and _could_be_header(self._buffer[at:]):
                        events.text += self._buffer[:at]
                        self._buffer = self._buffer[at:]
                        return events
                    events.text += self._buffer[:at + len(CALL_TRIGGER)]  # a marker not followed by a call
                    self._buffer = self._buffer[at + len(CALL_TRIGGER):]
                    continue
                events.text += self._buffer[:at]
                self.calls.append(ParsedCall(header.group(1)))
                events.started.append((len(self.calls) - 1, header.group(1)))
                self._buffer = self._buffer[at + header.end():]
                self._in_call = True
            call = self.calls[-1]
            end = self._buffer.find(CALL_END)
            if end < 0:
                keep = _partial_suffix(self._buffer, CALL_END)
                cut = len(self._buffer) - keep
                fragment, self._buffer = self._buffer[:cut], self._buffer[cut:]
                if fragment:
                    call.arguments += fragment
                    events.arguments.append((len(self.calls) - 1, fragment))
                return events
            fragment = self._buffer[:end]
            if fragment:
                call.arguments += fragment
                events.arguments.append((len(self.calls) - 1, fragment))
            call.is_complete = True
            self._buffer = self._buffer[end + len(CALL_END):]
            self._in_call, self._after_call = False, True

    def finish(self) -> ParseEvents:
        """The held-back text at the end of the output (an unfinished call stays incomplete)."""
        events = ParseEvents()
        if self._in_call:
            if self._buffer:
                self.calls[-1].arguments += self._buffer
                events.arguments.append((len(self.calls) - 1, self._buffer))
        else:
            events.text = self._buffer
        self._buffer = ""
        return events


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _could_be_header(text: str) -> bool:
    """Whether `text` (starting with the trigger) is a prefix of some call header."""
    probe = call_header("x")
    prefix = probe[:probe.index('"name": "') + len('"name": "')]
    if len(text) <= len(prefix):
        return prefix.startswith(text)
    if not text.startswith(prefix):
        return False
    rest = text[len(prefix):]
    name = re.match(r"[a-zA-Z0-9_-]*", rest).group(0)
    tail = rest[len(name):]
    return '", "arguments": '.startswith(tail)
