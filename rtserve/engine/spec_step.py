"""Speculative decoding's two touch points in the engine step, beside `schedule -> execute -> update`:

before scheduling, every decoding request gets its draft tokens for this step (k chosen from its
measured acceptance against the predicted cost of verifying them, within the real-time policy's
step-time budget); after the update, what was accepted feeds the estimates and the metrics.
"""
from __future__ import annotations

import math

from rtserve.engine.cost_model import StepCostModel, StepFeatures
from rtserve.engine.request import Request
from rtserve.engine.scheduler import Scheduler
from rtserve.engine.scheduler_output import RunnerOutput, SchedulerOutput
from rtserve.spec.speculator import DraftStep, Speculator


def propose_drafts(speculator: Speculator, scheduler: Scheduler, cost_model: StepCostModel,
                   max_model_len: int) -> None:
    """Set `spec_token_ids`/`spec_probs` on each running request about to decode (others: none)."""
    for req in scheduler.running:
        req.spec_token_ids, req.spec_probs = [], None
    running = [r for r in scheduler.running if not r.is_paused]
    decoding = [r for r in running if r.num_tokens - r.num_computed_tokens == 1]
    if not decoding:
        return
    # What the step will hold besides the drafts: the decodes, and prefill up to the token budget.
    budget = scheduler.config.max_num_batched_tokens - len(decoding)
    pending = sum(r.num_tokens - r.num_computed_tokens for r in running) - len(decoding)
    can_admit = len(scheduler.running) < scheduler.config.max_num_seqs
    num_prefill = min(budget, pending + (sum(r.num_tokens for r in scheduler.waiting) if can_admit else 0))
    num_context = sum(r.num_computed_tokens for r in running)

    # Drafts are decode rows (runner/input_batch.py); each attends to its whole sequence, as a decode
    # does: it reads a context's worth. The chooser scans every draft count: one line, not a model call each.
    # Rows a grammar masks cost more (cost_model.MASK_ROW_S); each draft is charged as one when any
    # decoding request is constrained.
    num_masked = sum(r.grammar is not None for r in decoding)
    cost_model_s = cost_model.line_s(StepFeatures(len(decoding), num_prefill, num_context, num_masked_rows=num_masked),
                                     StepFeatures(1, 0, num_context // len(decoding), num_prefill_seqs=0,
                                                  num_masked_rows=int(num_masked > 0)))

    time_budget_s = scheduler.policy.step_time_budget_s(running, scheduler.clock())
    step = DraftStep(len(decoding), num_prefill, cost_model_s, math.inf if time_budget_s is None else time_budget_s)
    spare = budget - num_prefill
    caps = [min(_max_drafts(r, max_model_len), spare) for r in decoding]
    proposals = speculator.propose(decoding, caps, step)
    for req, proposal in zip(decoding, proposals):
        req.spec_token_ids, req.spec_probs = proposal.token_ids, proposal.probs


def _max_drafts(req: Request, max_model_len: int) -> int:
    """Drafts worth verifying: the step emits up to k + 1 tokens, so stay inside the request's limits."""
    params = req.sampling_params
    cap = max_model_len - req.num_tokens - 1
    if params.max_tokens is not None:
        cap = min(cap, params.max_tokens - req.num_output_tokens - 1)
    return max(cap, 0)


def observe_acceptance(speculator: Speculator, sched: SchedulerOutput, result: RunnerOutput) -> None:
    for seq in sched.seqs:
        emitted = result.spec_token_ids.get(seq.request.request_id)
        if seq.spec_token_ids and emitted is not None:
            speculator.observe(seq.request.request_id, len(seq.spec_token_ids), len(emitted) - 1)
