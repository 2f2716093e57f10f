"""The `rt` request extension at the API edge: parsing, refusals (429/529 + Retry-After) and reporting.

Request body, in every API (OpenAI chat/completions, Anthropic messages, realtime `response.create`):
    {"rt": {"class": "firm", "ttft_ms": 300, "itl_ms": 50, "deadline_ms": 4000}}
Every field is optional; unset budgets take the server's per-class defaults. OpenAI's `service_tier`
maps onto a class when `rt.class` is absent: "priority" -> firm, "default"/"auto" -> soft, "flex" -> batch.
`hard` is refused with a 400 (see rt_policy.HARD_CLASS_MESSAGE).

Responses: the final SSE chunk (or the response body) carries `"rt": {...}` (RTReport.to_wire());
non-streaming responses also carry a `Server-Timing` header. A firm request dropped before its first
token ends with the error code `deadline_exceeded`; one stopped mid-stream ends with finish reason
"deadline" (Anthropic stop_reason "deadline").
"""
from __future__ import annotations

import math
from typing import Any

from rtserve.api.errors import ApiError
from rtserve.client.async_llm import AdmissionRejected
from rtserve.client.outputs import RequestOutput
from rtserve.client.rt_report import RTReport
from rtserve.engine.rt_params import HARD_CLASS_MESSAGE
from rtserve.protocol import RTClass, RTParams

SERVICE_TIERS = {"priority": RTClass.FIRM, "default": RTClass.SOFT, "auto": RTClass.SOFT, "flex": RTClass.BATCH}
RT_KEYS = {"class": None, "ttft_ms": "ttft_s", "itl_ms": "itl_s", "deadline_ms": "deadline_s"}


def parse_rt(raw: Any, service_tier: Any = None) -> RTParams | None:
    """`rt` object and/or `service_tier` -> RTParams (seconds); None when neither is given.

    Raises ApiError(400) naming the offending field (`rt`, `rt.class`, `rt.ttft_ms`, `service_tier`, ...).
    """
    tier_class = None
    if service_tier is not None:
        if service_tier not in SERVICE_TIERS:
            raise ApiError(400, f"service_tier must be one of {', '.join(SERVICE_TIERS)} (got {service_tier!r}).",
                           param="service_tier", code="invalid_value")
        tier_class = SERVICE_TIERS[service_tier]
    if raw is None:
        return None if tier_class is None else RTParams(tier_class)
    if not isinstance(raw, dict):
        raise ApiError(400, "rt must be an object such as {\"class\": \"firm\", \"ttft_ms\": 300}.",
                       param="rt", code="invalid_value")
    unknown = sorted(set(raw) - set(RT_KEYS))
    if unknown:
        raise ApiError(400, f"rt.{unknown[0]} is not a known field (use {', '.join(RT_KEYS)}).",
                       param=f"rt.{unknown[0]}", code="invalid_value")
    rt_class = raw.get("class", tier_class or RTClass.SOFT)
    if rt_class == "hard":
        raise ApiError(400, HARD_CLASS_MESSAGE, param="rt.class", code="unsupported_rt_class")
    if rt_class not in RTClass.ALL:
        raise ApiError(400, f"rt.class must be one of {', '.join(RTClass.ALL)} (got {rt_class!r}).",
                       param="rt.class", code="invalid_value")
    budgets = {}
    for key, attr in RT_KEYS.items():
        if attr is None or raw.get(key) is None:
            continue
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ApiError(400, f"rt.{key} must be a positive number of milliseconds (got {value!r}).",
                           param=f"rt.{key}", code="invalid_value")
        budgets[attr] = value / 1000.0
    return RTParams(rt_class, **budgets)


def rejection_error(exc: Any, anthropic: bool = False) -> ApiError:
    """AdmissionRejected -> 429 (OpenAI) / 529 (Anthropic) with Retry-After and retry-after-ms."""
    retry_s = max(float(exc.retry_after_s), 0.001)
    headers = {"retry-after": str(max(1, math.ceil(retry_s))), "retry-after-ms": str(max(1, round(retry_s * 1000)))}
    code = "queue_full" if exc.reason == "queue_full" else "deadline_unattainable"
    return ApiError(529 if anthropic else 429, str(exc), code=code, headers=headers)


def deadline_error(message: str | None) -> ApiError:
    """A firm request dropped before its first token (FinishReason.DEADLINE with no output)."""
    return ApiError(504, message or "deadline: the request's budget passed before its first token.",
                    code="deadline_exceeded", headers={"x-should-retry": "false"})


def server_timing(reports: list[RTReport | None]) -> str:
    """`Server-Timing` value from the first choice's report: ttft, itl p50/p99/max and e2e, in ms."""
    report = next((r for r in reports if r is not None), None)
    if report is None:
        return ""
    parts = [("ttft", report.ttft_s), ("itl-p50", report.itl_p50_s), ("itl-p99", report.itl_p99_s),
             ("itl-max", report.itl_max_s), ("e2e", report.e2e_s)]
    timing = ", ".join(f"{name};dur={value * 1000:.1f}" for name, value in parts if value is not None)
    return f'{timing}, rt;desc="{report.rt_class} {"met" if report.met else "missed " + "+".join(report.missed)}"'


def rt_object(reports: list[RTReport | None]) -> dict[str, Any] | None:
    """The response's `rt` object: the single choice's report, or per-choice reports under `choices`."""
    wire = [r.to_wire() for r in reports if r is not None]
    if not wire:
        return None
    if len(wire) == 1:
        return wire[0]
    return {**wire[0], "deadline_met": all(w["deadline_met"] for w in wire), "choices": wire}


def admit(engine: Any, num_prompt_tokens: int, rt: RTParams | None, arrival_s: float,
          anthropic: bool = False) -> RTParams:
    """Resolve budgets and run admission control before anything is sent: 400 / 429 / 529 on refusal."""
    try:
        return engine.check_admission(num_prompt_tokens, rt, arrival_s)
    except AdmissionRejected as exc:
        raise rejection_error(exc, anthropic) from None
    except ValueError as exc:
        param = getattr(exc, "param", None)
        raise ApiError(400, str(exc), param=param, code="unsupported_rt_class" if param == "rt.class" and
                       "hard" in str(exc) else "invalid_value") from None


def is_deadline_drop(out: RequestOutput) -> bool:
    """Dropped for a deadline before its first token: nothing was generated for the client."""
    return out.finish_reason == "deadline" and out.num_output_tokens == 0


async def first_output_of_firm(outputs: Any, rt: RTParams | None) -> tuple[int, RequestOutput] | None:
    """A firm stream sends nothing until its first delta: a drop before the first token becomes a 504.

    Returns the first `(choice, delta)` to replay (None for other classes, which start at once).
    """
    if rt is None or rt.rt_class != RTClass.FIRM:
        return None
    item = await outputs.get()
    if item is not None and is_deadline_drop(item[1]):
        await outputs.aclose()
        raise deadline_error(item[1].error)
    return item
