"""The scheduler's queue as admission control sees it (`QueueSnapshot`), built after every step.

A function of the scheduler and the cost model only, so the engine core and the deterministic
scheduling simulation in the tests build it the same way.
"""
from __future__ import annotations

from rtserve.engine.cost_model import StepCostModel, StepFeatures
from rtserve.engine.request import Request
from rtserve.engine.scheduler import Scheduler
from rtserve.protocol import QueueSnapshot


def build_queue_snapshot(sched: Scheduler, cost_model: StepCostModel, num_requests_added: int,
                         max_model_len: int, now: float) -> QueueSnapshot:
    """What admission control in the engine client needs to predict a new request's TTFT.

    A request the policy limits to a fixed share of each step (a starving batch request) is not work
    ahead of anyone: the policy takes its share's time off the budget of an arriving prompt instead.
    Nor are the running requests whose decodes sit out an interactive prompt's steps and whose slots
    and blocks it may take (`beside_interactive_prompt`: running batch work under the deadline policy).
    """
    policy = sched.policy
    running = policy.beside_interactive_prompt([r for r in sched.running if not r.is_paused])
    num_decodes = sum(1 for r in running if r.num_remaining_prefill_tokens == 0)
    num_masked = sum(1 for r in running if r.num_remaining_prefill_tokens == 0 and r.grammar is not None)
    budget = sched.config.max_num_batched_tokens
    num_free_slots = sched.config.max_num_seqs - len(running)
    max_num_running = policy.max_num_running(running)
    if max_num_running is not None:
        num_free_slots = min(num_free_slots, max_num_running - len(running))
    running_prefills = [r for r in running if r.num_remaining_prefill_tokens > 0]
    shares = {r.request_id: share for r in (*running_prefills, *sched.waiting)
              if (share := policy.max_chunk_tokens(r, now)) is not None}
    plan = policy.plan_step(running, sched.waiting, now, budget - num_decodes)  # the next step's
    prefill_token_budget = policy.interactive_prefill_tokens(plan, budget - num_decodes)
    num_prefill = sum(r.num_remaining_prefill_tokens + 1 for r in (*running_prefills, *sched.waiting))
    num_context = sum(r.num_computed_tokens for r in running)
    step_s = cost_model.predict_s(StepFeatures(num_decodes, min(num_prefill, prefill_token_budget), num_context,
                                               num_masked_rows=num_masked))
    if plan.time_left_s is not None and num_prefill > 0:  # the step as its plan will run it
        planned_s = cost_model.predict_s(StepFeatures(num_decodes, 0, num_context, num_masked_rows=num_masked)) + min(
            plan.time_left_s, cost_model.prefill_chunk_s(min(num_prefill, budget - num_decodes)))
        step_s = max(step_s, planned_s)

    def ahead(requests) -> list[tuple[tuple[int, float], int]]:
        return [(policy.order_key(r, now), r.num_remaining_prefill_tokens + 1) for r in requests
                if r.request_id not in shares]

    return QueueSnapshot(
        timestamp=now, policy=policy.name, num_requests_added=num_requests_added,
        waiting=ahead(sched.waiting), num_running=len(sched.running), num_decodes=num_decodes,
        num_masked_decodes=num_masked,
        running_prefills=ahead(running_prefills),
        num_context_tokens=num_context,
        running_remaining_tokens=sorted(remaining_tokens(r, max_model_len) for r in running),
        num_free_slots=num_free_slots,
        num_preemptible=policy.num_firm_victims(running, now),
        prefill_token_budget=max(prefill_token_budget, 1),
        step_s=step_s if running or sched.waiting else 0.0,
        cost_coeffs=cost_model.coeffs, cost_calibrated=cost_model.is_calibrated,
        cost_mean_abs_error_s=cost_model.mean_abs_error_s, cost_mean_rel_error=cost_model.mean_rel_error)


def remaining_tokens(req: Request, max_model_len: int) -> int:
    """Output tokens the request may still generate (its max_tokens or the context length bound it)."""
    limit = max_model_len - req.num_prompt_tokens
    if req.sampling_params.max_tokens is not None:
        limit = min(limit, req.sampling_params.max_tokens)
    return max(limit - req.num_output_tokens, 0)
