"""The tool-call formats models are trained on, and the choice of one for a model.

Each format gives the grammar that shapes calls (an xgrammar structural tag), the parser that reads
them back out of the text (streaming), and how calls and tools are rendered:

- `hermes` (Hermes, Qwen, and the generic prompt): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
  (rtserve/structured/tools.py).
- `llama3_json` (Llama 3.1 / 3.2 / 3.3): a bare `{"name": ..., "parameters": {...}}`, calls separated by
  "; ", optionally after `<|python_tag|>`; "arguments" is read as well as "parameters".
- `mistral`: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` (the space as Mistral's own
  templates and tokenizer write it), or, for templates of the newer
  tokenizers (they write `[ARGS]`), `[TOOL_CALLS]name[ARGS]{...}` per call.

`choose_tool_format(template, name)` picks one the way vLLM's `--tool-call-parser` does, with an
automatic choice from the chat template: `[TOOL_CALLS]` means mistral, `<tool_call>` hermes,
`<|python_tag|>` or an `ipython` role llama3_json, anything else hermes. A template that renders tools in the chosen
format gets them natively; otherwise the format's generic prompt goes in the system message. The
markers `<|python_tag|>` and `[TOOL_CALLS]` are special tokens that a reply skipping special tokens
loses, so the parsers take them as optional; the grammars write them.
"""
from __future__ import annotations

import functools
import hashlib
import json
import string

import regex

from rtserve.sampling_params import StructuredOutputs
from rtserve.structured import tools as hermes
from rtserve.structured.json_calls import JsonCallParser, JsonCallSyntax
from rtserve.structured.tools import ToolSpec, Turn

TOOL_CALL_PARSERS = ("auto", "hermes", "llama3_json", "mistral")
_NAME = r'"(?P<name>[a-zA-Z0-9_-]{1,64})"'


def _structural(fmt: dict) -> StructuredOutputs:
    # Keys in their given order: xgrammar writes an object's properties in the schema's order.
    return StructuredOutputs("structural_tag", json.dumps({"type": "structural_tag", "format": fmt}))


def _chosen(tools: list[ToolSpec], mode: str) -> list[ToolSpec]:
    return tools if mode in ("auto", "required") else [t for t in tools if t.name == mode]


def _tool_lines(tools: list[ToolSpec]) -> str:
    return "\n".join(json.dumps(d) for d in hermes.tool_dicts(tools))


class ToolFormat:
    """One way of writing calls. `grammar` is None for mode "none" or no tools."""

    name = ""

    def renders_natively(self, template: str | None) -> bool:
        raise NotImplementedError

    def grammar(self, tools: list[ToolSpec], mode: str, parallel: bool) -> StructuredOutputs | None:
        raise NotImplementedError

    def parser(self):
        raise NotImplementedError

    def render_call(self, name: str, arguments: str) -> str:
        """A past call as the model writes it (`arguments`: JSON text of an object)."""
        raise NotImplementedError

    def system_prompt(self, tools: list[ToolSpec]) -> str:
        """The generic tool prompt, for a template that does not render tools."""
        raise NotImplementedError

    def native_messages(self, turns: list[Turn]) -> list[dict]:
        return hermes.native_messages(turns)

    def generic_messages(self, turns: list[Turn], tools: list[ToolSpec]) -> list[dict[str, str]]:
        return hermes.generic_messages(turns, tools, self.render_call, self.system_prompt)


class HermesFormat(ToolFormat):
    name = "hermes"

    def renders_natively(self, template: str | None) -> bool:
        return hermes.template_renders_tools(template)

    def grammar(self, tools, mode, parallel):
        return hermes.tool_call_grammar(tools, mode, parallel)

    def parser(self):
        return hermes.ToolCallParser()

    def render_call(self, name, arguments):
        return hermes.render_call(name, arguments)

    def system_prompt(self, tools):
        return hermes.tools_system_prompt(tools)


class Llama3JsonFormat(ToolFormat):
    name = "llama3_json"
    _OPEN = r'\{\s*"name"\s*:\s*' + _NAME + r'\s*,\s*"(?:parameters|arguments)"\s*:\s*'
    SYNTAX = JsonCallSyntax(start=regex.compile(r"(?:<\|python_tag\|>\s*)?" + _OPEN),
                            next=regex.compile(r";\s*(?:<\|python_tag\|>\s*)?" + _OPEN))

    def renders_natively(self, template):
        return bool(template) and "tools" in template and ("<|python_tag|>" in template or "ipython" in template)

    @staticmethod
    def header(name: str) -> str:
        return f'{{"name": "{name}", "parameters": '

    def grammar(self, tools, mode, parallel):
        if mode == "none" or not tools:
            return None
        tags = [{"type": "tag", "begin": self.header(t.name),
                 "content": {"type": "json_schema", "json_schema": t.parameters}, "end": "}"}
                for t in _chosen(tools, mode)]
        if mode == "auto":
            return _structural({"type": "triggered_tags", "triggers": ['{"name": "'], "tags": tags,
                                "stop_after_first": not parallel})
        return _structural({"type": "tags_with_separator", "tags": tags, "separator": "; ", "at_least_one": True,
                            "stop_after_first": not parallel})

    def parser(self):
        return JsonCallParser(self.SYNTAX)

    def render_call(self, name, arguments):
        return f"{self.header(name)}{arguments}}}"

    def system_prompt(self, tools):
        return ("Given the following functions, please respond with a JSON for a function call with its proper "
                "arguments that best answers the given prompt.\n\nRespond in the format "
                '{"name": function name, "parameters": dictionary of argument name and its value}. '
                "Do not use variables.\n\n" + _tool_lines(tools))


class MistralFormat(ToolFormat):
    """`[TOOL_CALLS]` followed by a JSON list of calls, or (`args_marker`) by `name[ARGS]{...}` per call."""

    name = "mistral"
    _OPEN = r'\{\s*"name"\s*:\s*' + _NAME + r'\s*,\s*"arguments"\s*:\s*'
    LIST_SYNTAX = JsonCallSyntax(start=regex.compile(r"(?:\[TOOL_CALLS\]\s*)?\[\s*" + _OPEN),
                                 next=regex.compile(r",\s*" + _OPEN), end=regex.compile(r"\]"))
    ARGS_SYNTAX = JsonCallSyntax(start=regex.compile(r"\[TOOL_CALLS\]\s*(?P<name>[a-zA-Z0-9_-]{1,64})\[ARGS\]"),
                                 next=regex.compile(r"\[TOOL_CALLS\]\s*(?P<name>[a-zA-Z0-9_-]{1,64})\[ARGS\]"),
                                 args_depth=0)

    def __init__(self, args_marker: bool = False) -> None:
        self.args_marker = args_marker

    def renders_natively(self, template):
        return bool(template) and "[TOOL_CALLS]" in template

    def grammar(self, tools, mode, parallel):
        if mode == "none" or not tools:
            return None
        chosen = _chosen(tools, mode)
        if self.args_marker:
            tags = [{"type": "tag", "begin": f"[TOOL_CALLS]{t.name}[ARGS]",
                     "content": {"type": "json_schema", "json_schema": t.parameters}, "end": ""} for t in chosen]
            if mode == "auto":
                return _structural({"type": "triggered_tags", "triggers": ["[TOOL_CALLS]"], "tags": tags,
                                    "stop_after_first": not parallel})
            return _structural({"type": "tags_with_separator", "tags": tags, "separator": "", "at_least_one": True,
                                "stop_after_first": not parallel})
        calls = {"type": "tags_with_separator", "separator": ", ", "at_least_one": True,
                 "stop_after_first": not parallel,
                 "tags": [{"type": "tag", "begin": f'{{"name": "{t.name}", "arguments": ',
                           "content": {"type": "json_schema", "json_schema": t.parameters}, "end": "}"}
                          for t in chosen]}
        if mode == "auto":
            return _structural({"type": "triggered_tags", "triggers": ["[TOOL_CALLS]"], "stop_after_first": True,
                                "tags": [{"type": "tag", "begin": "[TOOL_CALLS] [", "content": calls, "end": "]"}]})
        return _structural({"type": "sequence", "elements": [{"type": "const_string", "value": "[TOOL_CALLS] ["},
                                                             calls, {"type": "const_string", "value": "]"}]})

    def parser(self):
        return JsonCallParser(self.ARGS_SYNTAX if self.args_marker else self.LIST_SYNTAX)

    def render_call(self, name, arguments):
        if self.args_marker:
            return f"[TOOL_CALLS]{name}[ARGS]{arguments}"
        return f'[TOOL_CALLS] [{{"name": "{name}", "arguments": {arguments}}}]'

    def system_prompt(self, tools):
        example = self.render_call("function_name", "{...}")
        return ("You may call one or more of the following functions. To call one, reply with "
                f"{example} and nothing else.\n\n" + _tool_lines(tools))

    def native_messages(self, turns):
        """Mistral's templates require call ids of 9 letters and digits: other ids are mapped onto
        such ids (the same id always onto the same one)."""
        out = hermes.native_messages(turns)
        for message in out:
            for call in message.get("tool_calls", []):
                call["id"] = mistral_call_id(call["id"])
            if "tool_call_id" in message:
                message["tool_call_id"] = mistral_call_id(message["tool_call_id"])
        return out


_ALNUM = string.ascii_letters + string.digits


def mistral_call_id(call_id: str) -> str:
    if len(call_id) == 9 and call_id.isascii() and call_id.isalnum():
        return call_id
    digest = hashlib.sha256(call_id.encode()).digest()
    return "".join(_ALNUM[b % len(_ALNUM)] for b in digest[:9])


HERMES = HermesFormat()
LLAMA3_JSON = Llama3JsonFormat()


@functools.lru_cache(maxsize=8)
def choose_tool_format(template: str | None, name: str = "auto") -> ToolFormat:
    """The format named (`TOOL_CALL_PARSERS`), or for "auto" the one `template` implies."""
    if name not in TOOL_CALL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r} (one of {', '.join(TOOL_CALL_PARSERS)})")
    text = template or ""
    if name == "auto":
        name = ("mistral" if "[TOOL_CALLS]" in text else "hermes" if hermes.CALL_TRIGGER in text else
                "llama3_json" if "<|python_tag|>" in text or "ipython" in text else "hermes")
    if name == "mistral":
        return MistralFormat(args_marker="[ARGS]" in text)
    return LLAMA3_JSON if name == "llama3_json" else HERMES
