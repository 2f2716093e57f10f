"""WebSocket /v1/realtime: a text-only subset of the OpenAI Realtime event model, several turns per socket.

Client events: session.update, conversation.item.create, response.create, response.cancel. Each response
streams response.created -> output_item.added -> content_part.added -> output_text.delta* ->
output_text.done -> content_part.done -> output_item.done -> response.done. response.cancel aborts the
engine request at once and answers response.done with status "cancelled"; bad events get an `error`
event and the session stays open. A dropped socket aborts any running response.

Fields of the full model this subset does not serve (`tools`, a `tool_choice` other than auto/none,
`audio`, `prompt`, and on responses `input` and `conversation: "none"`) get an `error` event naming
the field, in session.update and response.create alike.

Real time: `response.create` may carry `response.rt` ({"class", "ttft_ms", "itl_ms", "deadline_ms"});
a refusal at admission is an `error` event (code `queue_full` / `deadline_unattainable`, with
`retry_after_ms`) plus a failed response.done; a firm response stopped at its deadline is "incomplete"
with reason "deadline" (dropped before its first token: "failed", code `deadline_exceeded`);
response.done carries the `rt` object.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from rtserve.api import realtime_events as E
from rtserve.api.app import AppState
from rtserve.api.errors import ApiError, engine_failure
from rtserve.api.limits import build_sampling_params, check_request_limits
from rtserve.api.metrics import RequestTimer
from rtserve.api.prompts import render_chat
from rtserve.api.sampling_defaults import with_defaults
from rtserve.api.rt_fields import admit, is_deadline_drop, parse_rt
from rtserve.api.streaming import OutputStream
from rtserve.client.outputs import RequestOutput

router = APIRouter()

ITEM_ROLES = frozenset({"user", "system", "assistant"})
# Session / response fields this text-only subset does not serve: refused (an error event naming the
# field) when they ask for something, never silently dropped.
REFUSED_FIELDS = {"tools": lambda v: v not in (None, []), "tool_choice": lambda v: v not in (None, "auto", "none"),
                  "audio": lambda v: v is not None, "prompt": lambda v: v is not None,
                  "input": lambda v: v is not None, "conversation": lambda v: v not in (None, "auto")}
TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


@dataclass
class _Progress:
    """What a response produced so far (kept when it is cancelled mid-stream)."""

    text: str = ""
    last: RequestOutput | None = None
    failure: str | None = None


class RealtimeSession:
    """One WebSocket connection: session config, the conversation so far, at most one active response."""

    def __init__(self, state: AppState, ws: WebSocket) -> None:
        self.state, self.ws = state, ws
        self.events = E.EventEncoder()
        self.session_id = E.new_id("sess")
        self.instructions = ""
        self.max_output_tokens: int | str = "inf"
        self.temperature: float | None = None
        self.items: list[dict[str, Any]] = []
        self.response_task: asyncio.Task | None = None
        self.consume_task: asyncio.Task | None = None
        self.response_id: str | None = None
        self._send_lock = asyncio.Lock()

    async def send(self, event_type: str, **fields: Any) -> None:
        async with self._send_lock:
            await self.ws.send_text(self.events.encode(event_type, **fields))

    async def send_error(self, message: str, **kwargs: Any) -> None:
        async with self._send_lock:
            await self.ws.send_text(self.events.error(message, **kwargs))

    def session(self) -> dict[str, Any]:
        return E.session_object(self.session_id, self.state.model_name, self.instructions,
                                self.max_output_tokens, self.temperature)

    async def run(self) -> None:
        await self.send("session.created", session=self.session())
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if message.get("text") is None:
                    await self.send_error("Binary frames are not supported: send JSON text events.")
                    continue
                await self.dispatch(message["text"])
        except (WebSocketDisconnect, RuntimeError):  # RuntimeError: sending on a closed socket
            pass
        finally:
            if self.response_task is not None:
                self.response_task.cancel()
                await asyncio.gather(self.response_task, return_exceptions=True)

    async def dispatch(self, raw: str) -> None:
        try:
            event = json.loads(raw)
        except json.JSONDecodeError:
            return await self.send_error("The event is not valid JSON.")
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return await self.send_error("The 'type' field is missing.", param="type")
        handler = {"session.update": self.on_session_update, "conversation.item.create": self.on_item_create,
                   "response.create": self.on_response_create, "response.cancel": self.on_response_cancel,
                   }.get(event["type"])
        client_event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        if handler is None:
            return await self.send_error(f"Unsupported event type {event['type'][:60]!r}.", param="type",
                                         client_event_id=client_event_id)
        try:
            await handler(event)
        except ApiError as err:
            await self.send_error(err.message, param=err.param, client_event_id=client_event_id)

    async def on_session_update(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise ApiError(400, "session must be an object.", param="session")
        self._apply_overrides(session, "session")
        if "instructions" in session:
            self.instructions = session["instructions"]
        if "max_output_tokens" in session:
            self.max_output_tokens = session["max_output_tokens"]
        if "temperature" in session:
            self.temperature = session["temperature"]
        await self.send("session.updated", session=self.session())

    def _apply_overrides(self, obj: dict[str, Any], where: str) -> None:
        """Validate the text-only subset of session/response fields (raises ApiError naming the field)."""
        if "instructions" in obj and not isinstance(obj["instructions"], str):
            raise ApiError(400, "instructions must be a string.", param=f"{where}.instructions")
        mot = obj.get("max_output_tokens", "inf")
        if mot != "inf" and (isinstance(mot, bool) or not isinstance(mot, int) or mot < 1):
            raise ApiError(400, "max_output_tokens must be a positive integer or 'inf'.",
                           param=f"{where}.max_output_tokens")
        temperature = obj.get("temperature", 1.0)
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, int | float)):
            raise ApiError(400, "temperature must be a number.", param=f"{where}.temperature")
        modalities = obj.get("output_modalities", ["text"])
        if modalities != ["text"]:
            raise ApiError(400, "Only output_modalities ['text'] is supported.", param=f"{where}.output_modalities")
        for name, asks in REFUSED_FIELDS.items():
            if name in obj and asks(obj[name]):
                raise ApiError(400, f"{where}.{name} is not supported on /v1/realtime (text messages only; "
                               "tool calling is served by /v1/chat/completions and /v1/messages).",
                               param=f"{where}.{name}")

    async def on_item_create(self, event: dict[str, Any]) -> None:
        item = event.get("item")
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise ApiError(400, "item must be an object of type 'message'.", param="item.type")
        role, content = item.get("role"), item.get("content")
        if role not in ITEM_ROLES:
            raise ApiError(400, "item.role must be 'user', 'system' or 'assistant'.", param="item.role")
        if not isinstance(content, list) or not all(
                isinstance(p, dict) and p.get("type") in TEXT_PARTS and isinstance(p.get("text"), str)
                for p in content):
            raise ApiError(400, "item.content must be a list of text parts.", param="item.content")
        item_id = item["id"] if isinstance(item.get("id"), str) else E.new_id("item")
        stored = E.message_item(item_id, role, "".join(p["text"] for p in content))
        previous = self.items[-1]["id"] if self.items else None
        self.items.append(stored)
        await self.send("conversation.item.created", previous_item_id=previous, item=stored)

    async def on_response_create(self, event: dict[str, Any]) -> None:
        if self.response_task is not None and not self.response_task.done():
            raise ApiError(400, "The conversation already has an active response.", param="type")
        overrides = event.get("response") or {}
        if not isinstance(overrides, dict):
            raise ApiError(400, "response must be an object.", param="response")
        self._apply_overrides(overrides, "response")
        try:
            parse_rt(overrides.get("rt"))
        except ApiError as err:
            raise ApiError(400, err.message, param=f"response.{err.param}") from None
        self.response_id = E.new_id("resp")
        self.response_task = asyncio.create_task(self.respond(self.response_id, overrides))

    async def on_response_cancel(self, event: dict[str, Any]) -> None:
        wanted = event.get("response_id")
        active = self.response_task is not None and not self.response_task.done()
        if not active or (wanted is not None and wanted != self.response_id):
            raise ApiError(400, "There is no active response to cancel.", param="response_id")
        if self.consume_task is not None:
            self.consume_task.cancel()

    def _prompt(self, overrides: dict[str, Any]) -> list[int]:
        instructions = overrides.get("instructions", self.instructions)
        messages = [{"role": "system", "content": instructions}] if instructions else []
        messages += [{"role": it["role"], "content": "".join(p["text"] for p in it["content"])} for it in self.items]
        if not any(m["role"] == "user" for m in messages):
            raise ApiError(400, "The conversation has no user message.", param="conversation")
        return render_chat(self.state.engine.tokenizer, messages, param="conversation")

    async def respond(self, response_id: str, overrides: dict[str, Any]) -> None:
        arrival_s, item_id = time.monotonic(), E.new_id("item")
        mot = overrides.get("max_output_tokens", self.max_output_tokens)
        temperature = overrides.get("temperature", self.temperature)
        await self.send("response.created", response=E.response_object(response_id, "in_progress", [], None,
                                                                         max_output_tokens=mot))
        try:
            prompt_ids = self._prompt(overrides)
            sampling = with_defaults(self.state.settings.sampling_defaults, temperature=temperature, top_p=None,
                                     top_k=None, min_p=None, repetition_penalty=None)
            params = build_sampling_params({}, max_tokens=None if mot == "inf" else mot, **sampling)
            check_request_limits(self.state.engine, prompt_ids, params, prompt_param="conversation",
                                 param_names={"max_tokens": "max_output_tokens"})
            rt = admit(self.state.engine, len(prompt_ids), parse_rt(overrides.get("rt")), arrival_s)
        except ApiError as err:
            retry = {"retry_after_ms": int(err.headers["retry-after-ms"])} if "retry-after-ms" in err.headers else {}
            await self.send_error(err.message, param=err.param, code=err.code if retry else "invalid_event",
                                  error_type="rate_limit_error" if retry else "invalid_request_error")
            return await self.send("response.done", response=E.response_object(
                response_id, "failed", [], None, {"type": "failed", "error": {"message": err.message,
                                                                              "code": err.code, **retry}}, mot))
        where = E.part_fields(response_id, item_id)
        await self.send("response.output_item.added", response_id=response_id, output_index=0,
                        item=E.message_item(item_id, "assistant", "", "in_progress"))
        await self.send("response.content_part.added", **where, part={"type": "text", "text": ""})
        outputs = OutputStream([self.state.engine.generate(prompt_ids, params, response_id, rt=rt,
                                                           arrival_s=arrival_s, admitted=True)],
                               [RequestTimer(self.state.metrics, arrival_s)])
        progress = _Progress()
        self.consume_task = asyncio.create_task(self._consume(outputs, where, progress))
        try:
            await asyncio.wait({self.consume_task})
        finally:  # also when this response task is cancelled because the socket went away
            self.consume_task.cancel()
            await outputs.aclose()
        status, details = self._status(self.consume_task.cancelled(), progress)
        text, last = progress.text, progress.last
        item = E.message_item(item_id, "assistant", text, "completed" if status == "completed" else "incomplete")
        self.items.append(item)
        await self.send("response.output_text.done", **where, text=text)
        await self.send("response.content_part.done", **where, part={"type": "text", "text": text})
        await self.send("response.output_item.done", response_id=response_id, output_index=0, item=item)
        usage = E.usage_object(len(prompt_ids), last.num_cached_tokens if last else 0,
                               last.num_output_tokens if last else 0)
        done = E.response_object(response_id, status, [item], usage, details, mot)
        if last is not None and last.rt is not None:
            done["rt"] = last.rt.to_wire()
        await self.send("response.done", response=done)

    async def _consume(self, outputs: OutputStream, where: dict[str, Any], progress: _Progress) -> None:
        try:
            async for _, out in outputs:
                progress.last = out
                if out.text:
                    progress.text += out.text
                    await self.send("response.output_text.delta", **where, delta=out.text)
        except Exception as exc:  # noqa: BLE001 - reported in response.done
            progress.failure = engine_failure(exc, self.state.engine.is_dead).message
            return
        if progress.last is not None and progress.last.finish_reason == "error":
            progress.failure = progress.last.error or "engine error"

    @staticmethod
    def _status(cancelled: bool, progress: _Progress) -> tuple[str, dict[str, Any] | None]:
        if cancelled:
            return "cancelled", {"type": "cancelled", "reason": "client_cancelled"}
        if progress.failure is not None:
            return "failed", {"type": "failed", "error": {"type": "server_error", "message": progress.failure}}
        if progress.last is not None and progress.last.finish_reason == "length":
            return "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
        if progress.last is not None and is_deadline_drop(progress.last):
            return "failed", {"type": "failed", "error": {"type": "server_error", "code": "deadline_exceeded",
                                                          "message": progress.last.error}}
        if progress.last is not None and progress.last.finish_reason == "deadline":
            return "incomplete", {"type": "incomplete", "reason": "deadline"}
        return "completed", None


@router.websocket("/v1/realtime")
async def realtime(ws: WebSocket) -> None:
    # A browser that offered subprotocols (["realtime", "openai-insecure-api-key.KEY"]) needs one chosen.
    offered = ws.scope.get("subprotocols") or []
    await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
    await RealtimeSession(ws.app.state.rtserve, ws).run()
