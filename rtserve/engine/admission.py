"""Admission control on arrival: bounded queues for everyone, and TTFT prediction for firm requests.

The decision is made in the engine client (API process) from the engine's latest `QueueSnapshot`
plus the requests it sent that the snapshot does not reflect yet, so it costs microseconds and never
waits for the engine's current step (a decision inside the engine core would wait up to one step).

Predicted TTFT of a new request = time already spent since arrival + the rest of the step in flight
    + max(compute: every prefill token ahead of it in the policy's order (running or waiting), its own
               prompt included,
               at the prefill token budget per step, each step costed by the step-time model,
          slot:    time until enough running sequences finish to give it a sequence slot; a firm
                   request counts the batch and soft requests it may preempt as free slots).
A firm request whose predicted TTFT exceeds its budget is refused before any byte is sent; its
Retry-After is the excess (how much the queue ahead must drain first). Soft requests are admitted
whenever the queue has room, unless `soft_overload="reject"`: then one predicted to land more than
`soft_overload_bound_s` past its TTFT budget is refused the same way (Retry-After: the excess over that
bound). Batch requests are admitted whenever the queue has room. Pure functions of their inputs:
unit-tested with fake snapshots.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from rtserve.config import RTConfig
from rtserve.engine.cost_model import StepCostModel, StepFeatures, prefill_pairs
from rtserve.engine.rt_params import BACKGROUND, ON_TIME, OrderKey
from rtserve.protocol import QueueSnapshot, RTClass, RTParams

MIN_RETRY_AFTER_S = 0.05
MAX_RETRY_AFTER_S = 60.0  # OpenAI/Anthropic SDKs ≤ 2.x ignore a Retry-After above 60 s


@dataclass(frozen=True)
class PendingRequest:
    """A request sent to the engine core after the latest snapshot was taken (`seq` = its send count)."""

    seq: int
    order_key: OrderKey
    num_prefill_tokens: int


@dataclass(frozen=True)
class AdmissionDecision:
    admitted: bool
    predicted_ttft_s: float = 0.0
    retry_after_s: float = 0.0
    reason: str = ""  # "" | "queue_full" | "ttft" | "deadline"
    message: str = ""


def order_key(policy: str, rt: RTParams, arrival_s: float, config: RTConfig) -> OrderKey:
    """A new request's place in the waiting order (the policy's key in the engine core, at arrival)."""
    if policy == "fcfs":
        return ON_TIME, arrival_s
    if rt.ttft_s is None:
        return BACKGROUND, arrival_s
    return ON_TIME, arrival_s + rt.ttft_s


def predict_ttft_s(snap: QueueSnapshot, pending: list[PendingRequest], key: OrderKey,
                   num_prompt_tokens: int, elapsed_s: float = 0.0, now: float | None = None,
                   can_preempt: bool = False) -> float:
    """Predicted time from now to the first token of a request with this order key and prompt.

    With `now`, the part of the step in flight since the snapshot (`step_s` long) still to run counts.
    `can_preempt`: the request (an on-time firm one) takes a preemptible request's slot instead of
    waiting for a stream to finish.
    """
    in_flight_s = 0.0 if now is None else max(snap.step_s - (now - snap.timestamp), 0.0)
    model = StepCostModel.from_coeffs(snap.cost_coeffs, snap.cost_calibrated)
    ahead = [n for k, n in snap.waiting if k <= key] + [p.num_prefill_tokens for p in pending if p.order_key <= key]
    running_ahead = sum(n for k, n in snap.running_prefills if k <= key)
    num_tokens = running_ahead + sum(ahead) + num_prompt_tokens
    per_step = max(snap.prefill_token_budget, 1)
    num_steps = math.ceil(num_tokens / per_step)
    step_s = model.predict_s(StepFeatures(snap.num_decodes, min(per_step, num_tokens), snap.num_context_tokens,
                                          num_masked_rows=snap.num_masked_decodes))
    # Prefill attention grows with each prompt's length, whatever the chunking: its pairs once, in total
    # (a running prefill's remaining tokens counted from position 0: a lower bound).
    prompts = [n for k, n in snap.running_prefills if k <= key] + ahead + [num_prompt_tokens]
    compute_s = num_steps * step_s + model.prefill_attention_s(sum(prefill_pairs(n) for n in prompts))
    num_short = len(ahead) + 1 - snap.num_free_slots - (snap.num_preemptible if can_preempt else 0)
    slot_s = 0.0
    if num_short > 0:
        decode_s = model.predict_s(StepFeatures(max(snap.num_decodes, 1), 0, snap.num_context_tokens,
                                                num_masked_rows=snap.num_masked_decodes))
        remaining = snap.running_remaining_tokens
        num_steps_to_slot = remaining[min(num_short, len(remaining)) - 1] if remaining else 0
        slot_s = num_steps_to_slot * decode_s
    # The model predicts a typical step; its mean relative error, twice, pads the whole wait.
    return elapsed_s + (in_flight_s + max(compute_s, slot_s)) * (1.0 + 2.0 * snap.cost_mean_rel_error)


def _queue_drain_s(snap: QueueSnapshot, pending: list[PendingRequest]) -> float:
    return predict_ttft_s(snap, pending, (math.inf, math.inf), 0)


def decide(config: RTConfig, snap: QueueSnapshot | None, pending: list[PendingRequest], rt: RTParams,
           arrival_s: float, num_prompt_tokens: int, now: float) -> AdmissionDecision:
    """Admit or refuse a request whose `rt` budgets are already resolved."""
    if snap is None:
        return AdmissionDecision(True)
    num_waiting = len(snap.waiting) + len(pending)
    waiting_tokens = sum(n for _, n in snap.waiting) + sum(p.num_prefill_tokens for p in pending)
    if num_waiting >= config.max_num_waiting or waiting_tokens + num_prompt_tokens > config.max_waiting_tokens:
        retry = _clamp(_queue_drain_s(snap, pending) if snap.cost_calibrated else 1.0)
        return AdmissionDecision(False, 0.0, retry, "queue_full",
                                 f"The server is overloaded: {num_waiting} requests ({waiting_tokens} prompt "
                                 f"tokens) are already waiting. Retry after {retry:.2f} s.")
    if snap.policy != "deadline" or not snap.cost_calibrated:
        return AdmissionDecision(True)
    if rt.rt_class == RTClass.FIRM:
        return _decide_firm(config, snap, pending, rt, arrival_s, num_prompt_tokens, now)
    if rt.rt_class == RTClass.SOFT and config.soft_overload == "reject" and rt.ttft_s is not None:
        return _decide_soft(config, snap, pending, rt, arrival_s, num_prompt_tokens, now)
    return AdmissionDecision(True)


def _decide_firm(config: RTConfig, snap: QueueSnapshot, pending: list[PendingRequest], rt: RTParams,
                 arrival_s: float, num_prompt_tokens: int, now: float) -> AdmissionDecision:
    """Refuse a firm request predicted to miss its TTFT or deadline budget (less the delivery margin)."""
    key = order_key(snap.policy, rt, arrival_s, config)
    predicted = predict_ttft_s(snap, pending, key, num_prompt_tokens, max(now - arrival_s, 0.0), now,
                               can_preempt=True)
    for budget, name in ((rt.ttft_s, "ttft"), (rt.deadline_s, "deadline")):
        if budget is not None and predicted > budget - config.firm_delivery_margin_s:
            retry = _clamp(predicted - budget + config.firm_delivery_margin_s)
            return AdmissionDecision(
                False, predicted, retry, name,
                f"firm request refused: predicted time to first token {predicted * 1000:.0f} ms exceeds its "
                f"{'ttft_ms' if name == 'ttft' else 'deadline_ms'} budget of {budget * 1000:.0f} ms. "
                f"Retry after {retry:.2f} s, or send it as class 'soft'.")
    return AdmissionDecision(True, predicted)


def _decide_soft(config: RTConfig, snap: QueueSnapshot, pending: list[PendingRequest], rt: RTParams,
                 arrival_s: float, num_prompt_tokens: int, now: float) -> AdmissionDecision:
    """Refuse a soft request predicted to start more than `soft_overload_bound_s` past its TTFT budget.

    A soft request preempts nothing, so its slot wait counts every running stream. Retry-After is the
    excess over the bound: how much the queue ahead must drain before it would be admitted.
    """
    key = order_key(snap.policy, rt, arrival_s, config)
    predicted = predict_ttft_s(snap, pending, key, num_prompt_tokens, max(now - arrival_s, 0.0), now)
    late_s = predicted - rt.ttft_s
    if late_s <= config.soft_overload_bound_s:
        return AdmissionDecision(True, predicted)
    retry = _clamp(late_s - config.soft_overload_bound_s)
    return AdmissionDecision(
        False, predicted, retry, "ttft",
        f"soft request refused: predicted time to first token {predicted * 1000:.0f} ms exceeds its ttft_ms "
        f"budget of {rt.ttft_s * 1000:.0f} ms by more than the server's bound of "
        f"{config.soft_overload_bound_s * 1000:.0f} ms for late soft requests. Retry after {retry:.2f} s, "
        f"or send it as class 'batch'.")


def _clamp(retry_s: float) -> float:
    return min(max(retry_s, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S)
