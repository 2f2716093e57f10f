"""The model's vocabulary as xgrammar sees it (`xgrammar.TokenizerInfo`), read from the model files.

A GGUF model lists its tokens in `tokenizer.ggml.tokens`; a Hugging Face directory in tokenizer.json.
Byte-level BPE vocabularies ("gpt2") hold tokens in the byte-to-unicode spelling; a GGUF token
written in plain text (an added token with characters outside that alphabet) is respelled, as the
tokenizer does. `vocab_size` is the model's (logit rows may be padded past the tokenizer's).
"""
from __future__ import annotations

import json
import os
from typing import Any


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def tokenizer_info_for_model(path: str, vocab_size: int, stop_token_ids: tuple[int, ...]) -> Any:
    """TokenizerInfo of the model at `path` (a GGUF file or a Hugging Face directory)."""
    import xgrammar as xgr
    if os.path.isdir(path):
        with open(os.path.join(path, "tokenizer.json"), encoding="utf-8") as f:
            text = f.read()
        data = json.loads(text)
        model_vocab = data["model"]["vocab"]  # BPE/WordPiece: {token: id}; Unigram: [[token, score], ...]
        vocab = dict(model_vocab) if isinstance(model_vocab, dict) else {t: i for i, (t, _) in enumerate(model_vocab)}
        vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
        tokens = [""] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            tokens[i] = token
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(text)
        return xgr.TokenizerInfo(tokens, meta["vocab_type"], vocab_size=vocab_size,
                                 stop_token_ids=list(stop_token_ids), add_prefix_space=meta["add_prefix_space"])
    from rtserve.model.gguf import GGUFFile
    metadata = GGUFFile(path).metadata
    tokens = list(metadata["tokenizer.ggml.tokens"])
    kind = metadata.get("tokenizer.ggml.model")
    if kind == "gpt2":
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        tokens = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()) for t in tokens]
        vocab_type = xgr.VocabType.BYTE_LEVEL
    elif kind == "llama":
        vocab_type = xgr.VocabType.BYTE_FALLBACK
    else:
        raise ValueError(f"structured outputs: unsupported GGUF tokenizer {kind!r}")
    return xgr.TokenizerInfo(tokens, vocab_type, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids),
                             add_prefix_space=kind == "llama")


def raw_tokenizer_info(tokens: list[str], vocab_size: int, stop_token_ids: tuple[int, ...]) -> Any:
    """TokenizerInfo of a vocabulary given as plain strings (tests, tiny models)."""
    import xgrammar as xgr
    return xgr.TokenizerInfo(tokens, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
