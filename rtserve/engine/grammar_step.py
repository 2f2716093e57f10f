"""Jump-forward decoding for constrained requests, as drafts the verify step checks.

Where a request's grammar forces a run of text (a JSON key, the punctuation between values), the
matcher's forced tokens become that request's draft tokens for the step, before scheduling. The
verify step (rtserve/sample/rejection.py) masks every row with the grammar, so a forced token whose
row allows nothing else is accepted for sure, and one the model would tokenize differently is
rejected like any other draft: output is exactly what plain constrained decoding gives, in fewer
steps. With a speculator configured, its drafts (checked against the grammar the same way) are used
instead, so its acceptance statistics stay its own.
"""
from __future__ import annotations

from rtserve.engine.scheduler import Scheduler

MAX_JUMP_TOKENS = 4  # drafts per request and step: each is a decode row, priced like one


def propose_jump_forward(scheduler: Scheduler, max_model_len: int, max_tokens: int = MAX_JUMP_TOKENS) -> None:
    """Set `spec_token_ids` of constrained requests about to decode to their grammar's forced tokens."""
    for req in scheduler.running:
        if (req.grammar is None or req.is_paused or req.spec_token_ids
                or req.num_tokens - req.num_computed_tokens != 1 or not req.grammar.is_ready):
            continue
        cap = min(max_tokens, max_model_len - req.num_tokens - 1)
        if req.sampling_params.max_tokens is not None:
            cap = min(cap, req.sampling_params.max_tokens - req.num_output_tokens - 1)
        if cap > 0:
            req.spec_token_ids, req.spec_probs = req.grammar.jump_forward_tokens()[:cap], None
