"""WebSocket /v1/realtime: a text-only subset of the OpenAI Realtime event model, several turns per socket.

Client events: session.update, conversation.item.create, response.create, response.cancel. Each response
streams response.created -> output_item.added -> content_part.added -> output_text.delta* ->
output_text.done -> content_part.done -> output_item.done -> response.done. response.cancel aborts the
engine request at once and answers response.done with status "cancelled"; bad events get an `error`
event and the session stays open. A dropped socket aborts any running response.

Tools (`tools`, `tool_choice` on the session or one response, `function_call` /
`function_call_output` items, function_call output items): rtserve/api/realtime_tools.py. Fields of
the full model this subset does not serve (`audio`, `prompt`, and on responses `input` and
`conversation: "none"`) get an `error` event naming the field, in session.update and response.create
alike.

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
from rtserve.api.realtime_tools import TextOutput, ToolOutput, function_item, item_turns, parse_tools, tool_mode
from rtserve.api.sampling_defaults import with_defaults
from rtserve.api.rt_fields import admit, is_deadline_drop, parse_rt
from rtserve.api.streaming import OutputStream
from rtserve.api.structured_fields import check_grammar, load_grammar_engine
from rtserve.api.tool_fields import render_turns, tool_format_of
from rtserve.client.outputs import RequestOutput
from rtserve.sampling_params import SamplingParams
from rtserve.structured.tool_formats import ToolFormat
from rtserve.structured.tools import ToolSpec, tool_dicts

router = APIRouter()

ITEM_ROLES = frozenset({"user", "system", "assistant"})
# Session / response fields this text-only subset does not serve: refused (an error event naming the
# field) when they ask for something, never silently dropped.
REFUSED_FIELDS = {"audio": lambda v: v is not None, "prompt": lambda v: v is not None,
                  "input": lambda v: v is not None, "conversation": lambda v: v not in (None, "auto")}
TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


@dataclass
class _Progress:
    """How a response's stream ended (the text itself is kept by its output writer)."""

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
        self.tools: list[ToolSpec] = []
        self.tool_choice: Any = "auto"
        self.call_ids: set[str] = set()  # of the conversation's function_call items
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
        return {**E.session_object(self.session_id, self.state.model_name, self.instructions,
                                   self.max_output_tokens, self.temperature),
                "tools": [{"type": "function", **tool_dicts([t])[0]["function"]} for t in self.tools],
                "tool_choice": self.tool_choice}

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
        self.tools, self.tool_choice, _ = self._apply_overrides(session, "session")
        if "instructions" in session:
            self.instructions = session["instructions"]
        if "max_output_tokens" in session:
            self.max_output_tokens = session["max_output_tokens"]
        if "temperature" in session:
            self.temperature = session["temperature"]
        await self.send("session.updated", session=self.session())

    def _apply_overrides(self, obj: dict[str, Any], where: str) -> tuple[list[ToolSpec], Any, str]:
        """Validate the subset of session/response fields this server serves (raises ApiError naming the
        field); returns the tools, tool_choice and tool mode that apply."""
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
                raise ApiError(400, f"{where}.{name} is not supported on /v1/realtime (text and tools only).",
                               param=f"{where}.{name}")
        tools = parse_tools(obj["tools"], where) if obj.get("tools") is not None else self.tools
        choice = obj.get("tool_choice", self.tool_choice)
        return tools, choice, tool_mode(choice, tools, where)

    async def on_item_create(self, event: dict[str, Any]) -> None:
        item = event.get("item")
        if isinstance(item, dict) and item.get("type") in ("function_call", "function_call_output"):
            return await self._add_item(function_item(item, self.call_ids))
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise ApiError(400, "item must be an object of type 'message', 'function_call' or "
                           "'function_call_output'.", param="item.type")
        role, content = item.get("role"), item.get("content")
        if role not in ITEM_ROLES:
            raise ApiError(400, "item.role must be 'user', 'system' or 'assistant'.", param="item.role")
        if not isinstance(content, list) or not all(
                isinstance(p, dict) and p.get("type") in TEXT_PARTS and isinstance(p.get("text"), str)
                for p in content):
            raise ApiError(400, "item.content must be a list of text parts.", param="item.content")
        item_id = item["id"] if isinstance(item.get("id"), str) else E.new_id("item")
        await self._add_item(E.message_item(item_id, role, "".join(p["text"] for p in content)))

    async def _add_item(self, stored: dict[str, Any]) -> None:
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

    def _prompt(self, overrides: dict[str, Any], tools: list[ToolSpec], fmt: ToolFormat) -> list[int]:
        instructions = overrides.get("instructions", self.instructions)
        if not any(it.get("role") == "user" for it in self.items):
            raise ApiError(400, "The conversation has no user message.", param="conversation")
        tokenizer = self.state.engine.tokenizer
        if tools or any(it["type"] != "message" for it in self.items):
            return render_turns(tokenizer, item_turns(instructions, self.items), tools, "conversation", fmt)
        messages = [{"role": "system", "content": instructions}] if instructions else []
        messages += [{"role": it["role"], "content": "".join(p["text"] for p in it["content"])} for it in self.items]
        return render_chat(tokenizer, messages, param="conversation")

    async def _params(self, response_id: str, overrides: dict[str, Any], mot: int | str
                      ) -> tuple[list[int], SamplingParams, TextOutput | ToolOutput]:
        """Prompt ids, sampling parameters and the output writer of a response (ApiError on bad input)."""
        tools, _, mode = self._apply_overrides(overrides, "response")
        fmt = tool_format_of(self.state)
        grammar = fmt.grammar(tools, mode, True) if mode != "none" else None
        if grammar is not None:
            await load_grammar_engine({"tools": True})
            check_grammar(grammar, "response.tools" if "tools" in overrides else "session.tools")
        offered = tools if mode != "none" else []
        prompt_ids = self._prompt(overrides, offered, fmt)
        sampling = with_defaults(self.state.settings.sampling_defaults, temperature=overrides.get(
            "temperature", self.temperature), top_p=None, top_k=None, min_p=None, repetition_penalty=None)
        params = build_sampling_params({}, max_tokens=None if mot == "inf" else mot, structured=grammar, **sampling)
        return prompt_ids, params, ToolOutput(response_id, fmt) if offered else TextOutput(response_id)

    async def respond(self, response_id: str, overrides: dict[str, Any]) -> None:
        arrival_s = time.monotonic()
        mot = overrides.get("max_output_tokens", self.max_output_tokens)
        await self.send("response.created", response=E.response_object(response_id, "in_progress", [], None,
                                                                         max_output_tokens=mot))
        try:
            prompt_ids, params, writer = await self._params(response_id, overrides, mot)
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
        await self.send_all(writer.start())
        outputs = OutputStream([self.state.engine.generate(prompt_ids, params, response_id, rt=rt,
                                                           arrival_s=arrival_s, admitted=True)],
                               [RequestTimer(self.state.metrics, arrival_s)])
        progress = _Progress()
        self.consume_task = asyncio.create_task(self._consume(outputs, writer, progress))
        try:
            await asyncio.wait({self.consume_task})
        finally:  # also when this response task is cancelled because the socket went away
            self.consume_task.cancel()
            await outputs.aclose()
        status, details = self._status(self.consume_task.cancelled(), progress)
        last = progress.last
        events, output = writer.close(status == "completed")
        self.items += output
        self.call_ids.update(it["call_id"] for it in output if it["type"] == "function_call"
                             and it["status"] == "completed")  # only a whole call can be answered
        await self.send_all(events)
        usage = E.usage_object(len(prompt_ids), last.num_cached_tokens if last else 0,
                               last.num_output_tokens if last else 0)
        done = E.response_object(response_id, status, output, usage, details, mot)
        if last is not None and last.rt is not None:
            done["rt"] = last.rt.to_wire()
        await self.send("response.done", response=done)

    async def send_all(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        for event_type, fields in events:
            await self.send(event_type, **fields)

    async def _consume(self, outputs: OutputStream, writer: TextOutput | ToolOutput, progress: _Progress) -> None:
        try:
            async for _, out in outputs:
                progress.last = out
                await self.send_all(writer.feed(out.text))
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
