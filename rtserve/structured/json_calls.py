"""Streaming parser for tool calls written as JSON objects in the text (Llama 3 JSON, Mistral).

A `JsonCallSyntax` says how a run of calls opens (`start`, with the function's name in group "name",
up to where its arguments begin), how a further call of the same run opens (`next`), what closes the
run (`end`, e.g. Mistral's "]"), and how deep in brackets the arguments sit (1: a value inside the
call object; 0: the call is its arguments alone). The parser finds `start` anywhere in the text,
streams the arguments as they arrive, and finds where they end by counting brackets outside JSON
strings, so no end marker is held back. Patterns are matched with `regex`'s partial matching: text
that may still become an opening is held back until it cannot.
"""
from __future__ import annotations

from dataclasses import dataclass

import regex

from rtserve.structured.tools import ParsedCall, ParseEvents


@dataclass(frozen=True)
class JsonCallSyntax:
    start: regex.Pattern
    next: regex.Pattern
    end: regex.Pattern | None = None
    args_depth: int = 1


class _Scanner:
    """Bracket depth over JSON text, outside strings."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.in_string = self.escaped = False

    def step(self, ch: str) -> None:
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1


class JsonCallParser:
    """Splits generated text into plain text and calls, incrementally; the interface of
    `rtserve.structured.tools.ToolCallParser` (`feed`, `finish`, `calls`)."""

    def __init__(self, syntax: JsonCallSyntax) -> None:
        self.syntax = syntax
        self.calls: list[ParsedCall] = []
        self._buffer = ""
        self._state = "text"  # "text" | "args" | "tail" (after the arguments, inside the call) | "after"
        self._scan = _Scanner(0)
        self._args_started = False
        self._strip = False  # whitespace right after a run of calls separates it from the text: dropped

    def feed(self, text: str) -> ParseEvents:
        self._buffer += text
        events = ParseEvents()
        while self._buffer:
            if self._state == "text":
                if self._strip:
                    self._buffer = self._buffer.lstrip()
                    self._strip = not self._buffer
                    continue
                if not self._find_start(events):
                    break
            elif self._state in ("args", "tail"):
                self._scan_call(events)
            elif not self._after_call(events):
                break
        return events

    def finish(self) -> ParseEvents:
        """The held-back text at the end of the output (an unfinished call stays incomplete)."""
        events = ParseEvents()
        if self._state == "args" and self._buffer:
            self._add_args(events, self._buffer)
        elif self._state in ("text", "after"):
            events.text = self._buffer.lstrip() if self._state == "after" or self._strip else self._buffer
        self._buffer = ""
        return events

    def _find_start(self, events: ParseEvents) -> bool:
        m = self.syntax.start.search(self._buffer, partial=True)
        if m is None or m.partial:
            cut = len(self._buffer) if m is None else m.start()
            events.text += self._buffer[:cut]
            self._buffer = self._buffer[cut:]
            return False
        events.text += self._buffer[:m.start()]
        self._open(m, events)
        return True

    def _open(self, m: regex.Match, events: ParseEvents) -> None:
        self.calls.append(ParsedCall(m.group("name")))
        events.started.append((len(self.calls) - 1, m.group("name")))
        self._buffer = self._buffer[m.end():]
        self._state, self._args_started = "args", False
        self._scan = _Scanner(self.syntax.args_depth)

    def _scan_call(self, events: ParseEvents) -> None:
        """Consume the buffer up to the end of the call (or all of it), streaming the arguments."""
        base, scan = self.syntax.args_depth, self._scan
        i, args_from = 0, 0
        while i < len(self._buffer):
            ch = self._buffer[i]
            if self._state == "args" and not self._args_started:
                if ch.isspace():
                    i, args_from = i + 1, i + 1
                    continue
                self._args_started = True
            at_value_end = (self._state == "args" and not scan.in_string and scan.depth == base
                            and ch in ",}]" and i > args_from)  # a scalar argument value ends here
            if at_value_end:
                self._add_args(events, self._buffer[args_from:i])
                self._state = "tail"
            scan.step(ch)
            i += 1
            if self._state == "args" and not scan.in_string and scan.depth == base and ch in "}]":
                self._add_args(events, self._buffer[args_from:i])  # the arguments' closing bracket
                self._state = "tail"
            if self._state == "tail" and scan.depth <= 0:
                self.calls[-1].is_complete = True
                self._buffer, self._state = self._buffer[i:], "after"
                return
        if self._state == "args":
            self._add_args(events, self._buffer[args_from:])
        self._buffer = ""

    def _after_call(self, events: ParseEvents) -> bool:
        """Right after a call: another call of the run, the run's end, or back to text."""
        self._buffer = self._buffer.lstrip()
        if not self._buffer:
            return False
        m = self.syntax.next.match(self._buffer, partial=True)
        if m is not None and not m.partial:
            self._open(m, events)
            return True
        end = self.syntax.end.match(self._buffer, partial=True) if self.syntax.end is not None else None
        if (m is not None and m.partial) or (end is not None and end.partial):
            return False
        if end is not None:
            self._buffer, self._strip = self._buffer[end.end():], True
        self._state = "text"
        return True

    def _add_args(self, events: ParseEvents, fragment: str) -> None:
        if fragment:
            self.calls[-1].arguments += fragment
            events.arguments.append((len(self.calls) - 1, fragment))
