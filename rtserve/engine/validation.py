"""Request validation shared by the engine client (early, in the API process) and the engine core."""
from __future__ import annotations

from rtserve.config import LimitsConfig
from rtserve.sampling_params import SamplingParams


class InvalidRequest(ValueError):
    """A bad request; `param` names the offending field for API error objects."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def validate_request(prompt_token_ids: list[int], params: SamplingParams, *, max_model_len: int,
                     vocab_size: int, limits: LimitsConfig) -> None:
    """Raise InvalidRequest (a ValueError) naming the parameter; return None if the request is fine."""
    if not prompt_token_ids:
        raise InvalidRequest("prompt must not be empty", "prompt")
    n = len(prompt_token_ids)
    if n >= max_model_len:
        raise InvalidRequest(
            f"prompt is {n} tokens, but the context length is {max_model_len} (at least one token must "
            f"be left to generate)", "prompt")
    bad = next((t for t in prompt_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"prompt contains token id {bad}, outside the vocabulary [0, {vocab_size})",
                             "prompt")
    try:
        params.validate(max_tokens_cap=limits.max_tokens_cap, max_n=limits.max_n,
                        max_logprobs=limits.max_logprobs)
    except InvalidRequest:
        raise
    except ValueError as exc:
        raise InvalidRequest(str(exc), str(exc).split(" ", 1)[0]) from None
    if any(t >= vocab_size for t in params.prediction):
        raise InvalidRequest(f"prediction has a token id outside the vocabulary [0, {vocab_size})", "prediction")
    bad = next((t for t in params.logit_bias if t >= vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"logit_bias has token id {bad}, outside the vocabulary [0, {vocab_size})",
                             "logit_bias")
    if params.max_tokens is not None and n + params.max_tokens > max_model_len:
        raise InvalidRequest(
            f"max_tokens ({params.max_tokens}) plus the prompt ({n} tokens) exceeds the context length "
            f"({max_model_len})", "max_tokens")
    if len(params.stop) > limits.max_stop_strings:
        raise InvalidRequest(f"stop may hold at most {limits.max_stop_strings} strings", "stop")
    if any(len(s) > limits.max_stop_string_len for s in params.stop):
        raise InvalidRequest(f"each stop string must be at most {limits.max_stop_string_len} characters",
                             "stop")
