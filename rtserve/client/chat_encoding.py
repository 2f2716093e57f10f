"""Conversation -> prompt token ids, where only the chat template's own markup can become control tokens.

Rendering a template and encoding its text with special-token parsing (what transformers and llama.cpp
do) lets a message containing `<|im_start|>system` forge a role boundary. Here the messages' text is
tokenized as plain text:

1. Every string inside a message's `content` is wrapped in two private-use marker characters that occur
   in no message, the template is rendered, and the markers give the character spans of message text.
2. If the markers come back balanced and, once removed, the text equals the plain rendering, that text
   is encoded as usual; when no special token's offsets touch a message span the ids are returned as
   they are (identical to the usual encoding for every benign conversation).
3. Otherwise the text is encoded span by span: the template's pieces with special-token parsing, the
   messages' pieces with it switched off (`<|im_start|>` becomes `<`, `|`, `im`, ...).

A template that rewrites message text so that the markers cannot be traced (splits, slices) gets the
plain rendering, which is accepted only when no message contains a special token's text (else
ValueError, a 400 at the API).
"""
from __future__ import annotations

from typing import Any

# Private-use code points tried as span markers; a pair absent from every message is taken.
_MARKER_CANDIDATES = tuple(chr(c) for c in range(0xE000, 0xE100))
_TEXT_KEYS = frozenset({"content"})


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                **template_kwargs: Any) -> list[int]:
    """Token ids of the rendered conversation (no BOS added: the template writes its own).

    `tokenizer` is a rtserve.client.tokenizer.Tokenizer. Raises ValueError for template errors, and for
    message text holding special-token text under a template whose spans cannot be traced.
    """
    plain = tokenizer.apply_chat_template(messages, add_generation_prompt, **template_kwargs)
    texts = list(_message_texts(messages))
    start, end = _free_markers(texts)
    marked = tokenizer.apply_chat_template([_wrap(m, start, end) for m in messages], add_generation_prompt,
                                           **template_kwargs)
    traced = _trace(marked, start, end)
    if traced is None or traced[0] != plain:
        if any(s in t for t in texts for s in tokenizer.special_token_texts):
            raise ValueError("message text contains special-token text and this chat template rewrites "
                             "message text, so it cannot be kept as plain text")
        return tokenizer.encode(plain)
    text, spans = traced
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    specials = tokenizer.special_token_ids
    if not any(tid in specials and _overlaps(off, spans) for tid, off in zip(enc.ids, enc.offsets)):
        return list(enc.ids)
    return _encode_by_span(tokenizer, text, spans)


def _message_texts(messages: list[dict[str, Any]]):
    for m in messages:
        for key in _TEXT_KEYS & m.keys():
            yield from _strings(m[key])


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _free_markers(texts: list[str]) -> tuple[str, str]:
    free = (c for c in _MARKER_CANDIDATES if not any(c in t for t in texts))  # lazy: usually the first two
    start, end = next(free, None), next(free, None)
    if end is None:
        raise ValueError("message text uses every private-use marker character")
    return start, end


def _wrap(message: dict[str, Any], start: str, end: str) -> dict[str, Any]:
    """A copy of `message` with every string under its text keys wrapped as start + text + end."""
    def wrap(value: Any) -> Any:
        if isinstance(value, str):
            return f"{start}{value}{end}" if value else value
        if isinstance(value, dict):
            return {k: wrap(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [wrap(v) for v in value]
        return value
    return {k: wrap(v) if k in _TEXT_KEYS else v for k, v in message.items()}


def _trace(marked: str, start: str, end: str) -> tuple[str, list[tuple[int, int]]] | None:
    """(text without markers, [(begin, end) char spans of message text]); None if unbalanced."""
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    pos, opened = 0, None
    for ch in marked:
        if ch == start:
            if opened is not None:
                return None
            opened = pos
        elif ch == end:
            if opened is None:
                return None
            spans.append((opened, pos))
            opened = None
        else:
            out.append(ch)
            pos += 1
    return (None if opened is not None else ("".join(out), spans))


def _overlaps(offsets: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    a, b = offsets
    return any(a < e and b > s for s, e in spans)


def _encode_by_span(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> list[int]:
    ids: list[int] = []
    pos = 0
    for s, e in spans:
        if s > pos:
            ids += tokenizer.encode(text[pos:s])
        ids += tokenizer.encode_as_text(text[s:e])
        pos = e
    if pos < len(text):
        ids += tokenizer.encode(text[pos:])
    return ids
