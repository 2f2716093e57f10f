"""The OpenAPI schema served at /openapi.json (behind the API key like every route but liveness).

Routes read their bodies themselves (`read_json_body`: 400s, never 422s), so FastAPI cannot see their
request models; this module adds them: `REQUEST_MODELS` names the pydantic model of every JSON body, and
each operation gets its family's error object (OpenAI or Anthropic, as `errors.error_body` writes it) as
its `default` response, so a schema fuzzer can check every 4xx/5xx body against the shape the official
SDKs parse. Streaming routes also declare `text/event-stream`.
"""
from __future__ import annotations

import importlib
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from rtserve.api.errors import is_anthropic_path

# (method, path) -> "module:Model" of its JSON body; resolved only for the routes the app has.
REQUEST_MODELS: dict[tuple[str, str], str] = {
    ("post", "/v1/chat/completions"): "rtserve.api.schemas_openai:ChatCompletionRequest",
    ("post", "/v1/completions"): "rtserve.api.schemas_openai:CompletionRequest",
    ("post", "/tokenize"): "rtserve.api.schemas_openai:TokenizeRequest",
    ("post", "/detokenize"): "rtserve.api.schemas_openai:DetokenizeRequest",
    ("post", "/v1/messages"): "rtserve.api.schemas_anthropic:MessagesRequest",
    ("post", "/v1/messages/count_tokens"): "rtserve.api.schemas_anthropic:CountTokensRequest",
    ("post", "/v1/batches"): "rtserve.api.batches.routes_openai:CreateBatchRequest",
    ("post", "/v1/messages/batches"): "rtserve.api.batches.routes_anthropic:CreateMessageBatch",
}
STREAMING_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/messages"})
# Successful responses that are not JSON (None: no body).
OTHER_MEDIA = {"/health": None, "/metrics": "text/plain", "/": "text/html", "/dashboard": "text/html",
               "/ui/{name}": "*/*", "/stats/stream": "text/event-stream",
               "/v1/files/{file_id}/content": "application/jsonl",
               "/v1/messages/batches/{batch_id}/results": "application/binary"}  # JSONL, as Anthropic sends it
# Bodies that are not JSON: an upload's form fields.
FORM_BODIES = {("post", "/v1/files"): {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string"}}}}}}

OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "additionalProperties": False,
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
ANTHROPIC_ERROR = {"type": "object", "required": ["type", "error"], "properties": {
    "type": {"const": "error"},
    "error": {"type": "object", "required": ["type", "message"],
              "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}}}


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` (served at app.openapi_url) the schema built here, computed once."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_schema(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _model(ref: str) -> type[BaseModel] | None:
    module, _, name = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def build_schema(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    operations = [(path, method, op) for path, item in schema.get("paths", {}).items()
                  for method, op in item.items() if isinstance(op, dict)]
    models = {key: m for key in REQUEST_MODELS
              if any((method, path) == key for path, method, _ in operations)
              and (m := _model(REQUEST_MODELS[key])) is not None}
    refs, defs = models_json_schema([(m, "validation") for m in models.values()],
                                    ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(defs.get("$defs", {}))
    components["OpenAIError"], components["AnthropicError"] = OPENAI_ERROR, ANTHROPIC_ERROR
    _narrow(components, _served_names(app))
    for path, method, op in operations:
        model = models.get((method, path))
        if model is not None:
            op["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": refs[(model, "validation")]}}}
        elif (method, path) in FORM_BODIES:
            op["requestBody"] = {"required": True, "content": FORM_BODIES[(method, path)]}
        _describe_responses(path, op)
    return schema


def _served_names(app: FastAPI) -> list[str]:
    state = getattr(app.state, "rtserve", None)
    if state is None:
        return []
    return list(dict.fromkeys((*state.settings.served_model_names, state.model_name)))


# Values the routes accept, which the pydantic models leave as plain strings.
_ROLES = {"ChatMessage": ["system", "developer", "user", "assistant", "tool"], "Message": ["user", "assistant"]}


def _narrow(components: dict[str, Any], model_names: list[str]) -> None:
    """Document what the routes check beyond the models' types: served model ids (others get 404) and roles."""
    for name, schema in components.items():
        props = schema.get("properties", {})
        if name in _ROLES and "role" in props:
            props["role"] = {"type": "string", "enum": _ROLES[name]}
        if model_names and "model" in props and name.endswith("Request") and name != "MessagesRequest":
            props["model"] = {"anyOf": [{"type": "string", "enum": model_names}, {"type": "null"}]}


def _describe_responses(path: str, op: dict[str, Any]) -> None:
    ok = op.setdefault("responses", {}).setdefault("200", {"description": "Successful Response"})
    content = ok.setdefault("content", {"application/json": {"schema": {}}})
    if path in OTHER_MEDIA:
        media = OTHER_MEDIA[path]
        ok["content"] = {media: {"schema": {}}} if media else {}
        if not ok["content"]:
            del ok["content"]
    elif path in STREAMING_PATHS:
        content["text/event-stream"] = {"schema": {}}
    error = "AnthropicError" if is_anthropic_path(path) else "OpenAIError"
    op["responses"].pop("422", None)  # bodies are read by the routes: a bad one is a 400, never a 422
    op["responses"]["default"] = {"description": "Error", "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{error}"}}}}
