"""A `tokenizers` Tokenizer built from GGUF metadata, the one transformers builds from the same file.

Two vocabularies, chosen by `tokenizer.ggml.model`:
  - "gpt2": byte-level BPE. Vocabulary in the GPT-2 byte alphabet, the file's merges, and the
    pre-tokenizer split regex named by `tokenizer.ggml.pre` (Llama 3, Qwen2, ...; anything else gets
    GPT-2's own ByteLevel split).
  - "llama": SentencePiece BPE (Llama 2, Mistral, Gemma). Pieces spell a space as `▁`, unknown bytes
    fall back to `<0xNN>` tokens, and the merges, which the file does not list, are rebuilt from the
    vocabulary in the order of `tokenizer.ggml.scores` (Gemma: of the tokens' ids, as its scores do
    not follow the merge order). Llama-style files split on a `▁` prepended to the first word
    (`tokenizer.ggml.add_space_prefix`); Gemma-style ones replace spaces by `▁` and split after each.
Control tokens become special added tokens, user-defined ones plain added tokens; BOS/EOS are added
on `add_special_tokens=True` where `tokenizer.ggml.add_bos_token`/`add_eos_token` ask for them.
"""
from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # llama.cpp token types

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Mistral NeMo / Pixtral's tekken, and GPT-4o's split (Llama 4, Phi-4, ...).
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# `tokenizer.ggml.pre` -> split regex, as transformers maps them; anything else (gpt2, smollm, ...)
# gets the plain GPT-2 ByteLevel pre-tokenizer, again as transformers does.
_PRE_SPLITS = {**dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                                "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
               **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
               "tekken": _TEKKEN_SPLIT, **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT)}
# Architectures whose SentencePiece vocabulary is Gemma's (normalizer-style spaces, id-ordered merges).
_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
SUPPORTED_MODELS = ("gpt2", "llama")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character alphabet."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b], extra = chr(256 + extra), extra + 1
    return mapping


def build_backend_from_gguf(metadata: dict[str, Any]) -> Backend:
    """The tokenizer the metadata describes; ValueError for other vocabularies or malformed lists."""
    model = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    types = metadata.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens or ())
    if model not in SUPPORTED_MODELS:
        raise ValueError(f"unsupported GGUF tokenizer {model!r} (supported: byte-level BPE 'gpt2', "
                         "SentencePiece 'llama')")
    if not isinstance(tokens, list) or len(types) != len(tokens):
        raise ValueError("GGUF tokenizer needs tokenizer.ggml.tokens and a matching .token_type")
    if model == "gpt2":
        backend, spelled = _byte_level(metadata, tokens), set(bytes_to_unicode().values())
    else:
        backend, spelled = _sentencepiece(metadata, tokens), None
    # A "control" token outside the byte alphabet is a llama.cpp mislabel; transformers skips it too.
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, kind in zip(tokens, types)
                                if kind == _CONTROL and (spelled is None or set(t) <= spelled)])
    vocab = backend.get_vocab()
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, kind in zip(tokens, types) if kind == _USER_DEFINED and t in vocab])
    backend.post_processor = _post_processor(metadata, tokens)
    return backend


def _byte_level(metadata: dict[str, Any], tokens: list[str]) -> Backend:
    merges = metadata.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise ValueError("GGUF byte-level BPE tokenizer needs tokenizer.ggml.merges")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode()): i
             for i, tok in enumerate(tokens)}
    backend = Backend(models.BPE(vocab=vocab, merges=_split_merges(merges), fuse_unk=False,
                                 continuing_subword_prefix="", end_of_word_suffix=""))
    split = _PRE_SPLITS.get(metadata.get("tokenizer.ggml.pre", ""))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(metadata: dict[str, Any], tokens: list[str]) -> Backend:
    gemma = metadata.get("general.architecture") in _GEMMA_ARCHITECTURES
    if gemma:  # Gemma files store whitespace-run pieces with real spaces; its vocabulary spells them ▁
        tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if isinstance(metadata.get("tokenizer.ggml.merges"), list):
        merges = _split_merges(metadata["tokenizer.ggml.merges"])
    elif gemma:
        merges = merges_from_vocab(vocab, {tok: -i for i, tok in enumerate(tokens)})
    else:
        scores = metadata.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != len(tokens):
            raise ValueError("GGUF SentencePiece tokenizer needs tokenizer.ggml.scores for every token")
        merges = merges_from_vocab(vocab, dict(zip(tokens, scores)))
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
        unk = tokens[unk_id] if type(unk_id) is int and 0 <= unk_id < len(tokens) else None
        backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk,
                                     byte_fallback=True))
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous")
    else:
        backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
        prefix = metadata.get("tokenizer.ggml.add_space_prefix", True) is not False
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
        if prefix:
            decode.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(decode)
    return backend


def merges_from_vocab(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges a SentencePiece vocabulary implies: every split of a piece into two pieces, best
    score first (ties: longer left, then longer right piece first; within a piece, by the parts' ids)
    -- the order transformers' `generate_merges` gives, so both tokenize alike."""
    # One sort on (best score, longer left, longer right, piece order, left id, right id): the same
    # order as a stable descending sort on the first three after sorting each piece's splits by id.
    keyed = [(-score, -i, i - len(piece), n, vocab[piece[:i]], vocab[piece[i:]], piece, i)
             for n, (piece, score) in enumerate(scores.items()) for i in range(1, len(piece))
             if piece[:i] in vocab and piece[i:] in vocab]
    keyed.sort()
    return [(piece[:i], piece[i:]) for *_, piece, i in keyed]


def _split_merges(merges: list[str]) -> list[tuple[str, str]]:
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise ValueError("GGUF tokenizer.ggml.merges has an entry that is not 'left right'")
    return pairs


def _post_processor(metadata: dict[str, Any], tokens: list[str]) -> processors.TemplateProcessing:
    """Adds BOS/EOS on `add_special_tokens=True` only where the file asks for it (a SentencePiece
    file that does not say adds BOS, as llama.cpp and transformers do)."""
    single, specials = ["$A"], []
    for key, at_start in (("bos", True), ("eos", False)):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        default = key == "bos" and metadata.get("tokenizer.ggml.model") == "llama"
        if metadata.get(f"tokenizer.ggml.add_{key}_token", default) and type(token_id) is int \
                and 0 <= token_id < len(tokens):
            single.insert(0 if at_start else len(single), tokens[token_id])
            specials.append((tokens[token_id], token_id))
    return processors.TemplateProcessing(single=single, special_tokens=specials)
