"""The engine step's grammar chores: hold a request until its grammar has compiled, and jump-forward.

A request whose grammar is still compiling when its next step could sample is held (paused, keeping
its blocks) until the compile is done, so no step waits on a compile: the others keep their pace.

Jump-forward decoding for constrained requests, as drafts the verify step checks.

Where a request's grammar forces a run of text (a JSON key, the punctuation between values), the
matcher's forced tokens become that request's draft tokens for the step, before scheduling. The
verify step (rtserve/sample/rejection.py) masks every row with the grammar, so a forced token whose
row allows nothing else is accepted for sure, and one the model would tokenize differently is
rejected like any other draft: output is what plain constrained decoding gives, in fewer steps.
Each draft is a decode row, so under a step-time budget (the deadline policy's ITL budgets) only as
many as the cost model predicts fit are proposed. With a speculator configured, its drafts (checked
against the grammar the same way) are used instead, so its acceptance statistics stay its own.
"""
from __future__ import annotations

import math

from rtserve.engine.cost_model import StepCostModel, StepFeatures
from rtserve.engine.scheduler import Scheduler

MAX_JUMP_TOKENS = 4  # drafts per request and step
_UNBOUNDED = 1 << 30


def hold_until_compiled(scheduler: Scheduler) -> None:
    """Pause constrained requests that could sample this step before their grammar is ready; resume
    them once it is (or once it failed: the engine then fails them)."""
    for req in (*scheduler.running, *scheduler.waiting):
        grammar = req.grammar
        if grammar is None:
            continue
        if grammar.is_held:
            if grammar.is_ready or grammar.error is not None:
                req.is_paused = grammar.is_held = False
        elif (not req.is_paused and not grammar.is_ready and grammar.error is None
              and req.num_tokens - req.num_computed_tokens <= scheduler.config.max_num_batched_tokens):
            req.is_paused = grammar.is_held = True


def propose_jump_forward(scheduler: Scheduler, cost_model: StepCostModel, max_model_len: int,
                         max_tokens: int = MAX_JUMP_TOKENS) -> None:
    """Set `spec_token_ids` of constrained requests about to decode to their grammar's forced tokens."""
    running = [r for r in scheduler.running if not r.is_paused]
    decoding = [r for r in running if r.num_tokens - r.num_computed_tokens == 1]
    proposals = []
    for req in decoding:
        if req.grammar is None or req.spec_token_ids or not req.grammar.is_ready:
            continue
        cap = min(max_tokens, max_model_len - req.num_tokens - 1)
        if req.sampling_params.max_tokens is not None:
            cap = min(cap, req.sampling_params.max_tokens - req.num_output_tokens - 1)
        tokens = req.grammar.jump_forward_tokens()[:cap] if cap > 0 else []
        if tokens:
            proposals.append((req, tokens))
    num_rows = _rows_within_budget(scheduler, cost_model, running, decoding)
    for req, tokens in proposals:
        tokens = tokens[:num_rows]
        num_rows -= len(tokens)
        if tokens:
            req.spec_token_ids, req.spec_probs = tokens, None


def _rows_within_budget(scheduler: Scheduler, cost_model: StepCostModel, running, decoding) -> int:
    """Draft rows the step can add and still end within the policy's step-time budget."""
    budget_s = scheduler.policy.step_time_budget_s(running, scheduler.clock())
    if budget_s is None or not decoding:
        return _UNBOUNDED
    num_context = sum(r.num_computed_tokens for r in running)
    line = cost_model.line_s(StepFeatures(len(decoding), 0, num_context),
                             StepFeatures(1, 0, num_context // len(decoding), num_prefill_seqs=0))
    per_row_s = line(1) - line(0)
    if per_row_s <= 0:
        return _UNBOUNDED
    return max(math.floor((budget_s - line(0)) / per_row_s), 0)
