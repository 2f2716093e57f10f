"""When a firm request must be dropped: the rule behind "never served late".

A firm request has up to three deadlines for its next token: the TTFT deadline (arrival + ttft_s)
before its first token, then the ITL deadline (previous token + itl_s) for every later one, and its
whole-response deadline (arrival + deadline_s) for all of them. Its next token is *certainly late*
when even the least work that must still happen before it (its remaining prefill, or one decode, in a
step of its own) is predicted by the cost model to end after the earliest of them. Then the request is
dropped (FinishReason.DEADLINE, KV freed) instead of costing another step; and a token that was
sampled after its deadline anyway (a step ran longer than predicted) is never delivered. Every
deadline is `Request.deadline_margin_s` earlier than its budget: a token sampled on time must also
reach the client on time.
Soft and batch requests never have a deadline enforced: their misses are counted by the client.
Pure functions of the request, the time and the cost model: unit-tested with a fake clock.
"""
from __future__ import annotations

from rtserve.engine.cost_model import StepCostModel, StepFeatures, prefill_pairs
from rtserve.engine.request import Request


def next_token_due(req: Request) -> tuple[float, str] | None:
    """(time, budget name) of the earliest deadline the next token must meet; None without one."""
    dues = []
    if req.first_token_time is None:
        if req.ttft_deadline is not None:
            dues.append((req.ttft_deadline, "ttft"))
    elif req.itl_deadline is not None:
        dues.append((req.itl_deadline, "itl"))
    if req.deadline is not None:
        dues.append((req.deadline, "deadline"))
    return min(dues) if dues else None


def min_time_to_next_token_s(req: Request, cost_model: StepCostModel) -> float:
    """A lower bound on the time until the next token: its remaining work alone, in one step."""
    if not cost_model.is_calibrated:
        return 0.0
    num_remaining = req.num_remaining_prefill_tokens
    masked = int(req.grammar is not None)  # its sampled row pays the grammar mask
    features = StepFeatures(1, 0, 0, num_masked_rows=masked) if num_remaining <= 0 else StepFeatures(
        0, num_remaining + 1, 0, prefill_pairs(num_remaining + 1, req.num_computed_tokens), num_masked_rows=masked)
    return cost_model.predict_s(features)


def drop_reason(req: Request, now: float, cost_model: StepCostModel) -> str | None:
    """Why this firm request must be dropped before the next step, or None (non-firm: always None)."""
    if not req.is_firm:
        return None
    due = next_token_due(req)
    if due is None or now + min_time_to_next_token_s(req, cost_model) <= due[0]:
        return None
    return _describe(req, now, due, "passed" if now > due[0] else "cannot be met")


def late_token_reason(req: Request, now: float) -> str | None:
    """Why a firm token sampled at `now` must not be delivered (it is past its deadline), or None."""
    if not req.is_firm:
        return None
    due = next_token_due(req)
    if due is None or now <= due[0]:
        return None
    return _describe(req, now, due, "was missed")


def _describe(req: Request, now: float, due: tuple[float, str], verb: str) -> str:
    due_s, name = due
    since_ms = (now - req.arrival_time) * 1000
    if name == "ttft":
        where = "queued" if req.num_computed_tokens == 0 else "prefilling"
        return (f"deadline: ttft budget of {req.rt.ttft_s * 1000:.0f} ms {verb} while {where} "
                f"({since_ms:.0f} ms since arrival); dropped without sending a token")
    if name == "itl":
        gap_ms = (now - req.last_token_time) * 1000
        return (f"deadline: itl budget of {req.rt.itl_s * 1000:.0f} ms {verb} for token "
                f"{req.num_output_tokens + 1} ({gap_ms:.0f} ms since token {req.num_output_tokens}); stopped")
    return (f"deadline: deadline_ms budget of {req.rt.deadline_s * 1000:.0f} ms {verb} after "
            f"{req.num_output_tokens} tokens ({since_ms:.0f} ms since arrival); stopped")
