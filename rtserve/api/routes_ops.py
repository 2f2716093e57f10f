"""Operations routes: /health (liveness), /ready (can generate), /metrics, /v1/models, /tokenize,
/detokenize.
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from starlette.responses import Response

from rtserve.api.app import app_state
from rtserve.api.errors import ApiError
from rtserve.api.limits import read_json_body
from rtserve.api.prompts import chat_prompt_ids, completion_prompt_ids
from rtserve.api.sampling_defaults import OPENAI_DEFAULTS
from rtserve.api.schemas_openai import DetokenizeRequest, TokenizeRequest, model_card
from rtserve.api.sse import dumps

router = APIRouter()

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _json(obj: object, status: int = 200) -> Response:
    return Response(dumps(obj).encode(), status_code=status, media_type="application/json")


@router.get("/health")
async def health(request: Request) -> Response:
    """Liveness: 200 while the engine process is alive (no auth, no generation)."""
    if app_state(request).engine.is_dead:
        return _json({"status": "engine_dead"}, 503)
    return Response(status_code=200)


@router.get("/ready")
async def ready(request: Request) -> Response:
    """Readiness: proves the engine can generate (one token) within the configured timeout."""
    state = app_state(request)
    timeout_s = state.settings.ready_timeout_s
    try:
        is_ready = (not state.engine.is_dead
                    and await asyncio.wait_for(state.engine.check_ready(timeout_s), timeout_s + min(timeout_s, 1.0)))
    except Exception:  # noqa: BLE001 - any failure means not ready
        is_ready = False
    return _json({"status": "ready" if is_ready else "not_ready"}, 200 if is_ready else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = app_state(request)
    body = state.metrics.render(getattr(state.engine, "stats", None))
    return Response(body.encode(), media_type=PROMETHEUS_CONTENT_TYPE)


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    state = app_state(request)
    names = state.settings.served_model_names or (state.model_name,)
    defaults = {**OPENAI_DEFAULTS, **state.settings.sampling_defaults.as_dict()}
    backend = getattr(state.engine, "backend", "")
    data = [model_card(name, state.created, state.engine.max_model_len, defaults, backend) for name in names]
    return _json({"object": "list", "data": data})


@router.post("/tokenize")
async def tokenize(request: Request) -> Response:
    state = app_state(request)
    req = await read_json_body(request, TokenizeRequest)
    state.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise ApiError(400, "Give exactly one of prompt or messages.", param="prompt")
    tokenizer = state.engine.tokenizer
    if req.messages is not None:
        ids = chat_prompt_ids(tokenizer, req.messages)
    elif req.add_special_tokens is False:
        ids = list(tokenizer.encode(req.prompt, add_special_tokens=False))
    else:
        ids = completion_prompt_ids(tokenizer, req.prompt)[0]
    return _json({"tokens": ids, "count": len(ids), "max_model_len": state.engine.max_model_len})


@router.post("/detokenize")
async def detokenize(request: Request) -> Response:
    state = app_state(request)
    req = await read_json_body(request, DetokenizeRequest)
    state.check_model(req.model)
    tokenizer = state.engine.tokenizer
    if any(t < 0 or t >= tokenizer.vocab_size for t in req.tokens):
        raise ApiError(400, f"tokens must be in [0, {tokenizer.vocab_size}).", param="tokens")
    return _json({"prompt": tokenizer.decode(req.tokens)})
