"""Resolving and validating a request's real-time budgets (shared by the engine client and core).

Light on purpose (no torch): the API process imports it to validate `rt` before any byte is sent.
"""
from __future__ import annotations

import dataclasses
import math

from rtserve.config import RTConfig
from rtserve.engine.validation import InvalidRequest
from rtserve.protocol import RTClass, RTParams

# Where a request stands in the deadline policy's order: `(tier, time)`, smaller first (rt_policy.py).
OrderKey = tuple[int, float]
STARVING, ON_TIME, LATE, BACKGROUND = -1, 0, 1, 2

HARD_CLASS_MESSAGE = (
    "rt class 'hard' is not supported: a Linux process with a garbage collector cannot guarantee hard "
    "deadlines. Use 'firm' (refused at once if it cannot make its deadline, dropped if it becomes late, "
    "never served late).")


def resolve_rt(params: RTParams | None, config: RTConfig) -> RTParams:
    """Fill unset budgets from the server's per-class defaults; raise InvalidRequest naming the field."""
    params = params or RTParams()
    if params.rt_class == "hard":
        raise InvalidRequest(HARD_CLASS_MESSAGE, "rt.class")
    if params.rt_class not in RTClass.ALL:
        raise InvalidRequest(f"rt.class must be one of {', '.join(RTClass.ALL)} (got {params.rt_class!r})",
                             "rt.class")
    defaults = config.defaults_for(params.rt_class)
    resolved = {}
    for name, field in (("ttft_s", "rt.ttft_ms"), ("itl_s", "rt.itl_ms"), ("deadline_s", "rt.deadline_ms")):
        value = getattr(params, name)
        if value is not None and not _is_positive_number(value):
            raise InvalidRequest(f"{field} must be a positive number of milliseconds", field)
        resolved[name] = getattr(defaults, name) if value is None else float(value)
    if params.rt_class == RTClass.BATCH:  # batch never has budgets, whatever it sent
        resolved = {"ttft_s": None, "itl_s": None, "deadline_s": None}
    return dataclasses.replace(params, **resolved)


def _is_positive_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)
