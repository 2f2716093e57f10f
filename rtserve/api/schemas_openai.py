"""OpenAI request models (lenient: unknown fields are accepted and ignored; known fields strictly typed)
and the response/chunk objects of /v1/chat/completions and /v1/completions.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from rtserve.protocol import TokenLogprob


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(_Lenient):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _SamplingFields(_Lenient):
    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = 0
    skip_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    parse_special_tokens: bool | None = True  # False: special-token text in `prompt` is read as text


class TokenizeRequest(_Lenient):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = True


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[int]


def usage_object(num_prompt: int, num_completion: int, num_cached: int) -> dict[str, Any]:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion, "prompt_tokens_details": {"cached_tokens": num_cached}}


def chat_logprobs(tokenizer: Any, logprobs: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """`{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal": null}`."""
    if logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        token = tokenizer.decode([token_id])
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", errors="replace"))}

    content = [{**entry(lp.token_id, lp.logprob),
                "top_logprobs": [entry(i, v) for i, v in zip(lp.top_ids, lp.top_logprobs)]} for lp in logprobs]
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer: Any, logprobs: list[TokenLogprob] | None,
                        text_offset: int) -> dict[str, Any] | None:
    """Legacy shape: `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`."""
    if logprobs is None:
        return None
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in logprobs:
        token = tokenizer.decode([lp.token_id])
        out["tokens"].append(token)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append({tokenizer.decode([i]): v for i, v in zip(lp.top_ids, lp.top_logprobs)})
        out["text_offset"].append(text_offset)
        text_offset += len(token)
    return out


def chat_chunk(request_id: str, created: int, model: str, choices: list[dict[str, Any]],
               usage: dict[str, Any] | None = None, with_usage_key: bool = False) -> dict[str, Any]:
    chunk: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                             "model": model, "choices": choices}
    if usage is not None or with_usage_key:
        chunk["usage"] = usage
    return chunk


def chat_chunk_choice(index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None,
                      finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_chunk(request_id: str, created: int, model: str, choices: list[dict[str, Any]],
                     usage: dict[str, Any] | None = None, with_usage_key: bool = False) -> dict[str, Any]:
    chunk: dict[str, Any] = {"id": request_id, "object": "text_completion", "created": created, "model": model,
                             "choices": choices}
    if usage is not None or with_usage_key:
        chunk["usage"] = usage
    return chunk


def completion_choice(index: int, text: str, logprobs: dict[str, Any] | None,
                      finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_completion(request_id: str, created: int, model: str, choices: list[dict[str, Any]],
                    usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage}


def chat_choice(index: int, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": logprobs, "finish_reason": finish_reason}


def model_card(model_id: str, created: int, max_model_len: int,
               sampling_defaults: dict[str, Any] | None = None, backend: str = "") -> dict[str, Any]:
    """An OpenAI model object, with vLLM's max_model_len, the sampling defaults in force for fields a
    request leaves unset (and where they came from), and what runs the model (`backend`)."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "rtserve", "root": model_id,
            "parent": None, "max_model_len": max_model_len, "sampling_defaults": sampling_defaults or {},
            "backend": backend}
