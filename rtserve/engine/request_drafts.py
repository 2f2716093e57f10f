"""Drafts a request brings itself, verified like a speculator's, and holding a request whose grammar
is still compiling.

Hold: a request whose grammar is still compiling when its next step could sample is paused (keeping
its blocks) until the compile is done, so no step waits on a compile: the others keep their pace.

Drafts, proposed before scheduling to each request about to decode:
- Predicted outputs (`SamplingParams.prediction`, OpenAI's `prediction`): the tokens that follow,
  in the prediction, the output's last tokens (the longest suffix of up to 3 tokens found there,
  nearest the output's own position), or the prediction's start for the first token.
- Jump-forward, for constrained requests: where the grammar forces a run of text (a JSON key, the
  punctuation between values), the matcher's forced tokens.
The verify step (rtserve/sample/rejection.py) masks every row with the grammar, so a forced token
whose row allows nothing else is accepted for sure, and a draft the model would not have produced is
rejected: output is what decoding without drafts gives (greedy: the same tokens; sampled: the same
distribution), in fewer steps. Each draft is a decode row, so under a step-time budget (the
deadline policy's ITL budgets) only as many as the cost model predicts fit are proposed. With a
speculator configured, its drafts are used instead, so its acceptance statistics stay its own.
"""
from __future__ import annotations

import math

from rtserve.engine.cost_model import StepCostModel, StepFeatures
from rtserve.engine.request import Request
from rtserve.engine.scheduler import Scheduler

MAX_JUMP_TOKENS = 4  # grammar-forced drafts per request and step
MAX_PREDICTION_TOKENS = 8  # predicted-output drafts per request and step
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


def propose_request_drafts(scheduler: Scheduler, cost_model: StepCostModel, max_model_len: int) -> None:
    """Set `spec_token_ids` of requests about to decode to their predicted or grammar-forced tokens."""
    running = [r for r in scheduler.running if not r.is_paused]
    decoding = [r for r in running if r.num_tokens - r.num_computed_tokens == 1]
    proposals = []
    for req in decoding:
        if req.spec_token_ids or (req.grammar is None and not req.sampling_params.prediction):
            continue
        cap = min(max_model_len - req.num_tokens - 1, _UNBOUNDED)
        if req.sampling_params.max_tokens is not None:
            cap = min(cap, req.sampling_params.max_tokens - req.num_output_tokens - 1)
        tokens = _drafts_of(req, cap) if cap > 0 else []
        if tokens:
            proposals.append((req, tokens))
    if not proposals:
        return
    num_rows = _rows_within_budget(scheduler, cost_model, running, decoding)
    for req, tokens in proposals:
        tokens = tokens[:num_rows]
        num_rows -= len(tokens)
        if tokens:
            req.spec_token_ids, req.spec_probs = tokens, None


def _drafts_of(req: Request, cap: int) -> list[int]:
    if req.sampling_params.prediction:
        return predicted_continuation(req.sampling_params.prediction, req.output_token_ids,
                                      min(cap, MAX_PREDICTION_TOKENS))
    if not req.grammar.is_ready:
        return []
    return req.grammar.jump_forward_tokens()[:min(cap, MAX_JUMP_TOKENS)]


def predicted_continuation(prediction: list[int], output: list[int], k: int, max_suffix: int = 3) -> list[int]:
    """Up to k tokens of `prediction` expected to follow `output` (empty when nothing matches)."""
    if not output:
        return prediction[:k]
    for m in range(min(max_suffix, len(output)), 0, -1):
        suffix = output[-m:]
        ends = [i + m for i in range(len(prediction) - m + 1) if prediction[i:i + m] == suffix]
        ends = [e for e in ends if e < len(prediction)]
        if ends:
            end = min(ends, key=lambda e: abs(e - len(output)))
            return prediction[end:end + k]
    return []


def _rows_within_budget(scheduler: Scheduler, cost_model: StepCostModel, running, decoding) -> int:
    """Draft rows the step can add and still end within the policy's step-time budget."""
    budget_s = scheduler.policy.step_time_budget_s(running, scheduler.clock())
    if budget_s is None or not decoding:
        return _UNBOUNDED
    num_context = sum(r.num_computed_tokens for r in running)
    num_masked = sum(r.grammar is not None for r in decoding)
    # A draft row of a constrained request is masked too (the costlier case is assumed for every row).
    line = cost_model.line_s(StepFeatures(len(decoding), 0, num_context, num_masked_rows=num_masked),
                             StepFeatures(1, 0, num_context // len(decoding), num_prefill_seqs=0,
                                          num_masked_rows=int(num_masked > 0)))
    per_row_s = line(1) - line(0)
    if per_row_s <= 0:
        return _UNBOUNDED
    return max(math.floor((budget_s - line(0)) / per_row_s), 0)
