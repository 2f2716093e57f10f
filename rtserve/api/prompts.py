"""Request content -> prompt token ids (chat template for message lists; plain text or ids for completions).

Conversations go through the tokenizer's `encode_chat`: the template's own markup gives the control tokens
and message text is always read as text (a user typing `<|im_start|>` gets no role boundary).
Anything the tokenizer or template rejects (bad roles, lone surrogates, ...) is a 400, not a 500.
"""
from __future__ import annotations

from typing import Any

from rtserve.api.errors import ApiError

ROLE_ALIASES = {"developer": "system"}
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})


def text_of(content: Any, param: str, text_types: frozenset[str] = frozenset({"text", "input_text"})) -> str:
    """Message content (a string, None, or a list of parts/blocks with `.type`/`.text`) as plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        if part.type not in text_types:
            raise ApiError(400, f"Content part type {part.type[:40]!r} is not supported (text only).",
                           param=f"{param}[{i}].type")
        texts.append(part.text or "")
    return "\n".join(texts)


def render_chat(tokenizer: Any, messages: list[dict[str, str]], param: str = "messages") -> list[int]:
    try:
        return list(tokenizer.encode_chat(messages, add_generation_prompt=True))
    except ApiError:
        raise
    except Exception as exc:  # template/tokenizer errors are about the input
        raise ApiError(400, f"Could not render the conversation: {type(exc).__name__}: {exc}", param=param)


def chat_prompt_ids(tokenizer: Any, messages: list[Any]) -> list[int]:
    """OpenAI `messages` (pydantic ChatMessage list) -> token ids."""
    if not messages:
        raise ApiError(400, "messages must contain at least one message.", param="messages")
    rendered = []
    for i, m in enumerate(messages):
        role = ROLE_ALIASES.get(m.role, m.role)
        if role not in CHAT_ROLES:
            raise ApiError(400, f"Unknown role {m.role[:40]!r}.", param=f"messages[{i}].role")
        rendered.append({"role": role, "content": text_of(m.content, f"messages[{i}].content")})
    return render_chat(tokenizer, rendered)


def completion_prompt_ids(tokenizer: Any, prompt: Any, parse_special_tokens: bool = True) -> list[list[int]]:
    """`prompt` as a string, a list of strings, a list of ids or a list of id lists -> one id list each.

    A raw prompt is the caller's own text, so by default special-token text in it (`<|im_start|>`) maps
    to the special token, as in vLLM; `parse_special_tokens=False` reads it as plain text instead.
    """
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise ApiError(400, "prompt must not be empty.", param="prompt")
    out = []
    for p in prompts:
        if isinstance(p, str):
            try:
                out.append(list(tokenizer.encode(p, add_special_tokens=True) if parse_special_tokens
                                else _with_bos(tokenizer, tokenizer.encode_as_text(p))))
            except Exception as exc:
                raise ApiError(400, f"Could not tokenize the prompt: {type(exc).__name__}", param="prompt")
        else:
            if any(t < 0 or t >= tokenizer.vocab_size for t in p):
                raise ApiError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size}).", param="prompt")
            out.append(list(p))
    return out


def _with_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    """`ids` with the BOS that `encode(..., add_special_tokens=True)` would have put in front."""
    bos = getattr(tokenizer, "bos_token_id", None)
    adds_bos = bos is not None and tokenizer.encode("", add_special_tokens=True)[:1] == [bos]
    return ([bos] if adds_bos else []) + ids
