"""Turns engine-core outputs into caller-facing deltas: detokenize, match stop strings, count.

Runs in the API process. The engine knows nothing about text, so a stop string is found here;
`process` then reports that the request must be aborted in the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

from rtserve.client.detokenizer import DecodingTokenizer, IncrementalDetokenizer
from rtserve.client.outputs import RequestOutput
from rtserve.client.stop_strings import StopStringMatcher
from rtserve.protocol import EngineCoreOutput, FinishReason
from rtserve.sampling_params import SamplingParams


@dataclass
class _RequestState:
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher | None  # None when the request has no stop strings
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    num_output_tokens: int = 0  # cumulative, as delivered to the caller

    @property
    def can_stop(self) -> bool:
        # As in vLLM, stop strings only count in text produced after the first min_tokens tokens.
        return self.stop_matcher is not None and self.num_output_tokens > self.params.min_tokens


@dataclass
class _Delta:
    text: str
    num_tokens: int  # how many of the step's new tokens are delivered
    matched: str | None = None  # the stop string that ended the request


class OutputProcessor:
    """Per-request detokenization state. A request's state is dropped when it finishes."""

    def __init__(self, tokenizer: DecodingTokenizer) -> None:
        self._tokenizer = tokenizer
        self._requests: dict[str, _RequestState] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} already exists")
        self._requests[request_id] = _RequestState(
            params=params,
            detokenizer=IncrementalDetokenizer(self._tokenizer, prompt_token_ids, params.skip_special_tokens),
            stop_matcher=(StopStringMatcher(params.stop, params.include_stop_str_in_output)
                          if params.stop else None),
            num_prompt_tokens=len(prompt_token_ids),
        )

    def remove(self, request_id: str) -> None:
        """Forget a request (abort or disconnect); a no-op if it is already gone."""
        self._requests.pop(request_id, None)

    def process(self, out: EngineCoreOutput) -> tuple[RequestOutput, bool]:
        """Return the caller's delta and whether the engine must now abort the request.

        The bool is True only when a stop string ended a request the engine still runs. A finished
        request's state is dropped, so later outputs for it raise KeyError (check `in` first).
        """
        state = self._requests[out.request_id]
        state.num_prompt_tokens = out.num_prompt_tokens or state.num_prompt_tokens
        state.num_cached_tokens = out.num_cached_tokens or state.num_cached_tokens
        engine_finished = out.finished or out.error is not None
        delta = self._detokenize(state, out.new_token_ids)
        if delta.matched is None and engine_finished:
            delta = self._flush(state, delta)

        result = RequestOutput(
            request_id=out.request_id,
            text=delta.text,
            token_ids=list(out.new_token_ids[:delta.num_tokens]),
            logprobs=None if out.new_logprobs is None else list(out.new_logprobs[:delta.num_tokens]),
            num_prompt_tokens=state.num_prompt_tokens,
            num_cached_tokens=state.num_cached_tokens,
            num_output_tokens=state.num_output_tokens,
            error=out.error,
        )
        if delta.matched is not None:
            result.finish_reason, result.stop_reason = FinishReason.STOP, delta.matched
        elif out.error is not None:  # a deadline drop carries its reason in `error` but is no failure
            is_deadline = out.finish_reason == FinishReason.DEADLINE
            result.finish_reason = FinishReason.DEADLINE if is_deadline else FinishReason.ERROR
            result.stop_reason = None
        elif out.finished:
            result.finish_reason, result.stop_reason = out.finish_reason, out.stop_reason
        result.finished = result.finish_reason is not None
        if result.finished:
            del self._requests[out.request_id]
        return result, delta.matched is not None and not engine_finished

    def _detokenize(self, state: _RequestState, token_ids: list[int]) -> _Delta:
        if state.stop_matcher is None:
            state.num_output_tokens += len(token_ids)
            return _Delta(state.detokenizer.add(token_ids), len(token_ids))
        # Token by token, so that a match is charged to the token that completed it.
        pieces = []
        for i, token_id in enumerate(token_ids):
            state.num_output_tokens += 1
            text = state.detokenizer.add([token_id])
            if not state.can_stop:
                pieces.append(text)
                continue
            result = state.stop_matcher.feed(text)
            pieces.append(result.text)
            if result.stopped:
                return _Delta("".join(pieces), i + 1, result.matched)
        return _Delta("".join(pieces), len(token_ids))

    def _flush(self, state: _RequestState, delta: _Delta) -> _Delta:
        """The engine ended the request: release the held-back text (koboldcpp PR #1031)."""
        tail = state.detokenizer.flush()
        if not state.can_stop:
            return _Delta(delta.text + tail, delta.num_tokens)
        result = state.stop_matcher.feed(tail)
        if result.stopped:  # the stop string completed only in the flushed text
            return _Delta(delta.text + result.text, delta.num_tokens, result.matched)
        return _Delta(delta.text + result.text + state.stop_matcher.flush(), delta.num_tokens)
