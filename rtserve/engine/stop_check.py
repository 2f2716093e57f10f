"""Token-level stop conditions, checked in the engine after each sampled token.

Stop *strings* need detokenized text and are matched in the API process (client/stop_strings.py).
"""
from __future__ import annotations

from rtserve.engine.request import Request
from rtserve.protocol import FinishReason


def check_stop(req: Request, max_model_len: int) -> tuple[str | None, int | None]:
    """(finish_reason, stop_reason) after the request's last token was appended, or (None, None)."""
    params = req.sampling_params
    token_id = req.output_token_ids[-1]
    if req.num_output_tokens >= params.min_tokens:
        if not params.ignore_eos and token_id in req.eos_token_ids:
            return FinishReason.STOP, None
        if token_id in params.stop_token_ids:
            return FinishReason.STOP, token_id
    if params.max_tokens is not None and req.num_output_tokens >= params.max_tokens:
        return FinishReason.LENGTH, None
    if req.num_tokens >= max_model_len:
        return FinishReason.LENGTH, None
    return None, None
