"""OpenAI tool fields read and checked at the edge: `tools`, `tool_choice`, and a history with tool calls
and tool results, rendered through the chat template in the model's tool-call format
(rtserve/structured/tool_formats.py says which and how)."""
from __future__ import annotations

import json
from typing import Any

from rtserve.api.errors import ApiError
from rtserve.api.prompts import CHAT_ROLES, ROLE_ALIASES, render_chat, text_of
from rtserve.structured.tool_formats import HERMES, ToolFormat, choose_tool_format
from rtserve.structured.tools import NAME_PATTERN, ToolSpec, Turn, tool_dicts


def json_object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ApiError(400, f"{param} must be an object.", param=param, code="invalid_type")
    return value


def parse_openai_tools(value: Any) -> list[ToolSpec]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "tools must be a non-empty list.", param="tools", code="invalid_type")
    tools: list[ToolSpec] = []
    for i, tool in enumerate(value):
        tool = json_object(tool, f"tools[{i}]")
        if tool.get("type") != "function":
            raise ApiError(400, f"tools[{i}].type must be 'function'.", param=f"tools[{i}].type")
        fn = json_object(tool.get("function"), f"tools[{i}].function")
        tools.append(tool_spec(fn.get("name"), fn.get("description"), fn.get("parameters"), f"tools[{i}].function"))
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ApiError(400, "tools must have distinct names.", param="tools")
    return tools


def tool_spec(name: Any, description: Any, parameters: Any, param: str, schema_key: str = "parameters") -> ToolSpec:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ApiError(400, f"{param}.name must match [a-zA-Z0-9_-]{{1,64}}.", param=f"{param}.name")
    if description is not None and not isinstance(description, str):
        raise ApiError(400, f"{param}.description must be a string.", param=f"{param}.description")
    schema = {"type": "object", "properties": {}} if parameters is None else parameters
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        raise ApiError(400, f"{param}.{schema_key} must be a JSON schema of type object.",
                       param=f"{param}.{schema_key}")
    return ToolSpec(name, description, schema)


def tool_mode(choice: Any, tools: list[ToolSpec]) -> str:
    """OpenAI tool_choice -> "none" | "auto" | "required" | the named tool."""
    if choice is None:
        return "auto" if tools else "none"
    if choice in ("none", "auto", "required"):
        mode = choice
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        mode = choice["function"].get("name")
        if mode not in {t.name for t in tools}:
            raise ApiError(400, f"tool_choice names a function that is not in tools: {str(mode)[:64]!r}.",
                           param="tool_choice")
    else:
        raise ApiError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', "
                       "'function': {'name': ...}}.", param="tool_choice")
    if mode != "none" and not tools:
        raise ApiError(400, "tool_choice requires tools.", param="tool_choice")
    return mode


def needs_tool_rendering(messages: list[Any]) -> bool:
    """Whether the history holds tool calls or tool results (rendered by `openai_messages`)."""
    return any(m.role == "tool" or (m.model_extra or {}).get("tool_calls") for m in messages)


def openai_turns(messages: list[Any]) -> list[Turn]:
    """OpenAI messages with tool calls and tool results, checked: a result must answer an earlier call."""
    turns: list[Turn] = []
    known_ids: set[str] = set()
    for i, m in enumerate(messages):
        role = ROLE_ALIASES.get(m.role, m.role)
        if role not in CHAT_ROLES:
            raise ApiError(400, f"Unknown role {m.role[:40]!r}.", param=f"messages[{i}].role")
        extra = m.model_extra or {}
        turn = Turn(role, text_of(m.content, f"messages[{i}].content"))
        if role == "assistant" and extra.get("tool_calls"):
            turn.calls = _history_calls(extra["tool_calls"], i, known_ids)
        elif role == "tool":
            turn.call_id = extra.get("tool_call_id")
            if turn.call_id not in known_ids:
                raise ApiError(400, f"messages[{i}].tool_call_id does not match a tool call of an earlier "
                               "assistant message.", param=f"messages[{i}].tool_call_id")
        turns.append(turn)
    return turns


def tool_format_of(state: Any) -> ToolFormat:
    """The served model's tool-call format: the server's `tool_call_parser` setting, "auto" reading
    the chat template."""
    return choose_tool_format(getattr(state.engine.tokenizer, "chat_template", None),
                              getattr(state.settings, "tool_call_parser", "auto"))


def render_turns(tokenizer: Any, turns: list[Turn], tools: list[ToolSpec], param: str = "messages",
                 fmt: ToolFormat = HERMES) -> list[int]:
    """Prompt ids: through the template's own tool rendering when it renders `fmt`'s calls, else
    `fmt`'s generic prompt."""
    if not fmt.renders_natively(getattr(tokenizer, "chat_template", None)):
        return render_chat(tokenizer, fmt.generic_messages(turns, tools), param)
    try:
        kwargs = {"tools": tool_dicts(tools)} if tools else {}
        return list(tokenizer.encode_chat(fmt.native_messages(turns), add_generation_prompt=True, **kwargs))
    except Exception as exc:  # template errors are about the input
        raise ApiError(400, f"Could not render the conversation: {type(exc).__name__}: {exc}", param=param)


def _history_calls(calls: Any, i: int, known_ids: set[str]) -> list[tuple[str, str, dict]]:
    param = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise ApiError(400, f"{param} must be a list.", param=param)
    rendered = []
    for j, call in enumerate(calls):
        fn = json_object(json_object(call, f"{param}[{j}]").get("function"), f"{param}[{j}].function")
        name, arguments = fn.get("name"), fn.get("arguments")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ApiError(400, f"{param}[{j}].function.name is not a valid function name.",
                           param=f"{param}[{j}].function.name")
        try:
            args = json.loads(arguments) if isinstance(arguments, str) else None
        except json.JSONDecodeError:
            args = None
        if not isinstance(args, dict):
            raise ApiError(400, f"{param}[{j}].function.arguments must be a JSON object in a string.",
                           param=f"{param}[{j}].function.arguments")
        call_id = call.get("id") if isinstance(call.get("id"), str) else f"call_{i}_{j}"
        known_ids.add(call_id)
        rendered.append((call_id, name, args))
    return rendered
