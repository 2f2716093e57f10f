"""The request fields of structured outputs, tools and sampling controls, read and checked at the edge.

Every field the OpenAI schema defines is honoured or refused with a 400 naming it: `response_format`,
vLLM's `structured_outputs`, `tools` / `tool_choice` / `parallel_tool_calls`, `frequency_penalty`,
`presence_penalty`, `logit_bias` (and the `repetition_penalty` extension) and `prediction` (drafts
for the verify step, rtserve/engine/request_drafts.py) are honoured; the fields in
`REFUSED_CHAT` / `REFUSED_COMPLETION` are refused. Other unknown fields are ignored with a warning in
the log, as vLLM does. A grammar is built here (xgrammar, imported on a worker thread) so a bad
schema, regex or grammar is a 400 before the engine sees the request. Tools themselves are read in
rtserve/api/tool_fields.py.
"""
from __future__ import annotations

import asyncio
import difflib
import importlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from rtserve.api.errors import ApiError
from rtserve.api.tool_fields import json_object as _object
from rtserve.api.tool_fields import parse_openai_tools, tool_mode
from rtserve.sampling_params import StructuredOutputs
from rtserve.structured.check import GrammarError, check_structured
from rtserve.structured.tool_formats import HERMES, ToolFormat
from rtserve.structured.tools import ToolSpec

logger = logging.getLogger("rtserve.api")

# Field -> predicate on its value saying it asks for something this server does not do.
_SET = lambda v: v is not None  # noqa: E731
REFUSED_CHAT = {
    "audio": _SET, "web_search_options": _SET, "functions": _SET, "function_call": _SET,
    "reasoning_effort": _SET, "verbosity": _SET, "store": lambda v: bool(v),
    "modalities": lambda v: v is not None and v != ["text"],
}
REFUSED_COMPLETION = {"suffix": _SET, "best_of": lambda v: v is not None and v != 1}
# Known fields read from `model_extra` (by this module or rt_fields), and harmless identifiers.
KNOWN_EXTRA = {"rt", "service_tier", "response_format", "structured_outputs", "tools", "tool_choice",
               "parallel_tool_calls", "frequency_penalty", "presence_penalty", "logit_bias", "repetition_penalty",
               "user", "metadata", "safety_identifier", "prompt_cache_key", "store", "modalities", "prediction"}


def refuse_and_warn(extra: dict[str, Any], refused: dict[str, Any], known: set[str] = KNOWN_EXTRA) -> None:
    """400 for a refused field that asks for something; a log warning for fields nobody reads."""
    for name, asks in refused.items():
        if asks(extra.get(name)):
            raise ApiError(400, f"{name} is not supported by this server.", param=name, code="unsupported_parameter")
    unknown = sorted(set(extra) - known - set(refused))
    if unknown:
        logger.warning("ignoring unknown request fields: %s", ", ".join(n[:40] for n in unknown[:10]))


def sampling_extras(extra: dict[str, Any]) -> dict[str, Any]:
    """frequency_penalty, presence_penalty, repetition_penalty and logit_bias as SamplingParams keywords
    (their ranges are checked by SamplingParams, which names the field)."""
    out: dict[str, Any] = {}
    for name in ("frequency_penalty", "presence_penalty", "repetition_penalty"):
        value = extra.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ApiError(400, f"{name} must be a number.", param=name, code="invalid_type")
            out[name] = float(value)
    bias = extra.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise ApiError(400, "logit_bias must map token ids to numbers.", param="logit_bias", code="invalid_type")
        try:
            out["logit_bias"] = {int(k): float(v) for k, v in bias.items()
                                 if not isinstance(v, bool) and isinstance(v, (int, float))}
        except ValueError:
            raise ApiError(400, "logit_bias keys must be token ids.", param="logit_bias", code="invalid_value")
        if len(out["logit_bias"]) != len(bias):
            raise ApiError(400, "logit_bias values must be numbers.", param="logit_bias", code="invalid_type")
        if len(bias) > 1024:
            raise ApiError(400, "logit_bias may hold at most 1024 tokens.", param="logit_bias")
    return out


def prediction_ids(extra: dict[str, Any], tokenizer: Any, max_len: int) -> list[int]:
    """OpenAI's `prediction: {"type": "content", "content": text or text parts}` as token ids."""
    value = extra.get("prediction")
    if value is None:
        return []
    pred = _object(value, "prediction")
    if pred.get("type") != "content":
        raise ApiError(400, "prediction.type must be 'content'.", param="prediction.type")
    content = pred.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ApiError(400, "prediction.content parts must be text parts.", param="prediction.content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, "prediction.content must be a string or a list of text parts.",
                       param="prediction.content")
    ids = list(tokenizer.encode(content))
    if len(ids) > max_len:
        raise ApiError(400, f"prediction.content is {len(ids)} tokens, more than the context length {max_len}.",
                       param="prediction.content")
    return ids


def prediction_usage(prediction: list[int], outputs: list[list[int]]) -> dict[str, int]:
    """`completion_tokens_details` with a prediction: its tokens that appear in the output (in order,
    difflib's matching blocks), summed over the choices, and the rest."""
    accepted = rejected = 0
    for output in outputs:
        matcher = difflib.SequenceMatcher(None, prediction, output, autojunk=False)
        matched = sum(block.size for block in matcher.get_matching_blocks())
        accepted += matched
        rejected += len(prediction) - matched
    return {"accepted_prediction_tokens": accepted, "rejected_prediction_tokens": rejected}


@dataclass
class ToolContext:
    """How a chat request's output is shaped: its grammar, and whether to read tool calls out of it."""

    structured: StructuredOutputs | None = None
    tools: list[ToolSpec] = field(default_factory=list)
    tool_mode: str = "none"  # "none" | "auto" | "required" | a tool's name
    format: ToolFormat = HERMES  # how calls are written, shaped and parsed

    @property
    def parses_tools(self) -> bool:
        return self.tool_mode != "none"


def parse_schema_spec(schema: Any, param: str) -> StructuredOutputs:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError:
            raise ApiError(400, f"{param} is not valid JSON.", param=param, code="invalid_value")
    if not isinstance(schema, (dict, bool)):
        raise ApiError(400, f"{param} must be a JSON schema object.", param=param, code="invalid_type")
    return StructuredOutputs("json", json.dumps(schema))  # key order kept: xgrammar writes properties in it


def response_format_spec(value: Any) -> StructuredOutputs | None:
    fmt = _object(value, "response_format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs("json_object")
    if kind == "json_schema":
        inner = _object(fmt.get("json_schema"), "response_format.json_schema")
        if "schema" not in inner:
            raise ApiError(400, "response_format.json_schema.schema is required.",
                           param="response_format.json_schema.schema")
        return parse_schema_spec(inner["schema"], "response_format.json_schema.schema")
    raise ApiError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r:.40}.",
                   param="response_format.type", code="invalid_value")


def structured_outputs_spec(value: Any) -> StructuredOutputs:
    """vLLM's `structured_outputs`: exactly one of json, regex, choice, grammar, json_object."""
    so = _object(value, "structured_outputs")
    given = [k for k in ("json", "regex", "choice", "grammar", "json_object") if so.get(k) not in (None, False)]
    if len(given) != 1:
        raise ApiError(400, "structured_outputs must set exactly one of json, regex, choice, grammar, json_object.",
                       param="structured_outputs")
    kind, spec = given[0], so[given[0]]
    param = f"structured_outputs.{kind}"
    if kind == "json":
        return parse_schema_spec(spec, param)
    if kind == "json_object":
        return StructuredOutputs("json_object")
    if kind == "choice":
        if not isinstance(spec, list) or not spec or not all(isinstance(c, str) and c for c in spec):
            raise ApiError(400, f"{param} must be a non-empty list of non-empty strings.", param=param)
        return StructuredOutputs("choice", json.dumps(spec))
    if not isinstance(spec, str) or not spec:
        raise ApiError(400, f"{param} must be a non-empty string.", param=param, code="invalid_type")
    return StructuredOutputs(kind, spec)


def openai_tool_context(extra: dict[str, Any], call_format: ToolFormat = HERMES) -> ToolContext:
    tools = parse_openai_tools(extra["tools"]) if extra.get("tools") is not None else []
    mode = tool_mode(extra.get("tool_choice"), tools)
    parallel = extra.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ApiError(400, "parallel_tool_calls must be a boolean.", param="parallel_tool_calls")
    fmt = response_format_spec(extra["response_format"]) if extra.get("response_format") is not None else None
    so = structured_outputs_spec(extra["structured_outputs"]) if extra.get("structured_outputs") is not None else None
    if fmt is not None and so is not None:
        raise ApiError(400, "response_format and structured_outputs cannot both be set.", param="structured_outputs")
    grammar = fmt or so
    if grammar is not None and mode != "none":
        raise ApiError(400, "response_format / structured_outputs cannot be combined with tools unless tool_choice "
                       "is 'none'.", param="response_format" if fmt is not None else "structured_outputs")
    if mode == "none":  # tools not offered: the reply is a message
        return ToolContext(grammar, [], mode, call_format)
    return ToolContext(call_format.grammar(tools, mode, parallel is not False), tools, mode, call_format)


GRAMMAR_FIELDS = ("response_format", "structured_outputs", "tools")


async def load_grammar_engine(extra: dict[str, Any] | None) -> None:
    """Import xgrammar (about a second, once) on a worker thread when the request needs a grammar,
    so the event loop never stalls on it."""
    if extra and any(extra.get(name) is not None for name in GRAMMAR_FIELDS):
        await asyncio.to_thread(importlib.import_module, "xgrammar")


def check_grammar(spec: StructuredOutputs | None, param: str) -> None:
    """Build the grammar (milliseconds; cached by source); a failure is a 400 naming `param`."""
    if spec is None:
        return
    try:
        check_structured(spec)
    except GrammarError as exc:
        raise ApiError(400, f"{param}: {exc}", param=param, code="invalid_grammar")


def completion_structured(extra: dict[str, Any]) -> tuple[StructuredOutputs | None, str]:
    """/v1/completions: `structured_outputs` or `response_format` (no tools there), and its field name."""
    for name in ("tools", "tool_choice"):
        if extra.get(name) is not None:
            raise ApiError(400, f"{name} is only supported on /v1/chat/completions.", param=name)
    if extra.get("response_format") is not None and extra.get("structured_outputs") is not None:
        raise ApiError(400, "response_format and structured_outputs cannot both be set.", param="structured_outputs")
    if extra.get("structured_outputs") is not None:
        spec = structured_outputs_spec(extra["structured_outputs"])
    elif extra.get("response_format") is not None:
        spec = response_format_spec(extra["response_format"])
    else:
        return None, ""
    return spec, grammar_param(extra, ToolContext(spec))


def grammar_param(extra: dict[str, Any], ctx: ToolContext) -> str:
    """The request field a grammar came from (named by a 400 when it does not build)."""
    if ctx.parses_tools:
        return "tools"
    if extra.get("response_format") is not None:
        return "response_format.json_schema.schema" if ctx.structured.kind == "json" else "response_format"
    so = extra.get("structured_outputs") or {}
    return next((f"structured_outputs.{k}" for k in ("json", "regex", "choice", "grammar") if so.get(k)),
                "structured_outputs")
