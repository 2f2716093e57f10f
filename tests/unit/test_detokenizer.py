import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from rtserve.client.detokenizer import IncrementalDetokenizer

FFFD = "\ufffd"
TEXT = "hello 世界, 你好 😀🎉 café 日本語 👍🏽 new 字 语言模型 🚀 über"


class HFTokenizer:
    """Duck-typed adapter over `tokenizers.Tokenizer` that records every decode call."""

    def __init__(self, tok: Tokenizer, specials: list[str]) -> None:
        self.tok = tok
        self.special_token_ids = frozenset(tok.token_to_id(s) for s in specials)
        self.decoded_lengths: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        self.decoded_lengths.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids


def byte_level_bpe() -> HFTokenizer:
    """GPT-2 style byte-level BPE trained on a tiny corpus: CJK and emoji split into byte tokens,
    some of which span two characters."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["世界你好日本語中文字符 😀🎉👍🏽🚀 naïve café hello world"] * 3 + ["语言模型流式输出测试 🙂🙃 über"] * 2
    trainer = trainers.BpeTrainer(vocab_size=285, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|eos|>"], show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return HFTokenizer(tok, ["<|eos|>"])


def byte_fallback_sentencepiece() -> HFTokenizer:
    """Llama-style: '▁' word markers, <0xNN> byte-fallback tokens, leading space stripped."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    merges = [("▁", "h"), ("▁", "w"), ("h", "e"), ("l", "l"), ("ll", "o"), ("▁h", "e"), ("▁he", "llo"),
              ("o", "r"), ("l", "d"), ("w", "or")]
    for piece in ["▁", "h", "e", "l", "o", "w", "r", "d"] + ["".join(m) for m in merges]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    return HFTokenizer(tok, ["<s>", "</s>"])


TOKENIZERS = {"byte_level": byte_level_bpe, "byte_fallback": byte_fallback_sentencepiece}


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    chunks = [detok.add([t]) for t in ids]
    chunks.append(detok.flush())
    return chunks


@pytest.mark.parametrize("name", TOKENIZERS)
def test_one_token_at_a_time_matches_full_decode(name):
    tok = TOKENIZERS[name]()
    ids = tok.encode(TEXT)
    # The test is only meaningful if characters really are split across tokens.
    assert sum(FFFD in tok.tok.decode([t]) for t in ids) >= 6
    chunks = stream(IncrementalDetokenizer(tok, [], skip_special_tokens=True), ids)
    assert "".join(chunks) == tok.tok.decode(ids) == TEXT
    assert not any(FFFD in c for c in chunks)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_with_prompt_context_and_specials(name):
    tok = TOKENIZERS[name]()
    prompt = tok.encode("hello world 你好")
    ids = tok.encode(" 世界 😀 hello 🚀")
    eos = max(tok.special_token_ids)
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=True)
    chunks = stream(detok, ids + [eos])
    expected = tok.tok.decode(prompt + ids)[len(tok.tok.decode(prompt)):]
    assert "".join(chunks) == expected
    assert not any(FFFD in c for c in chunks)


def test_special_tokens_kept_when_not_skipped():
    tok = byte_level_bpe()
    eos = tok.tok.token_to_id("<|eos|>")
    ids = tok.encode("你好") + [eos]
    chunks = stream(IncrementalDetokenizer(tok, [], skip_special_tokens=False), ids)
    assert "".join(chunks) == "你好<|eos|>"


def test_multi_token_adds_match():
    tok = byte_level_bpe()
    ids = tok.encode(TEXT)
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    chunks = [detok.add(ids[i:i + 3]) for i in range(0, len(ids), 3)] + [detok.flush()]
    assert "".join(chunks) == TEXT
    assert not any(FFFD in c for c in chunks)


def test_holds_back_incomplete_character_and_flush_emits_replacement():
    tok = byte_level_bpe()
    ids = tok.encode("ab 🚀")
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    out = "".join(detok.add([t]) for t in ids[:-1])  # cut inside the emoji (max_tokens hit)
    assert FFFD not in out and "🚀" not in out
    tail = detok.flush()
    assert tail.endswith(FFFD)
    assert detok.flush() == ""


def test_prompt_ending_mid_character():
    tok = byte_level_bpe()
    ids = tok.encode("好 🚀 ok")
    cut = next(i for i in range(1, len(ids)) if tok.tok.decode(ids[:i]).endswith(FFFD))
    chunks = stream(IncrementalDetokenizer(tok, ids[:cut], skip_special_tokens=True), ids[cut:])
    # The completed character is emitted once, whole.
    prompt_text = tok.tok.decode(ids[:cut]).rstrip(FFFD)
    assert "".join(chunks) == tok.tok.decode(ids)[len(prompt_text):]
    assert not any(FFFD in c for c in chunks)


def test_work_per_token_is_bounded():
    tok = byte_level_bpe()
    ids = tok.encode(TEXT * 20)
    detok = IncrementalDetokenizer(tok, tok.encode(TEXT * 50), skip_special_tokens=True)
    tok.decoded_lengths.clear()
    stream(detok, ids)
    assert len(tok.decoded_lengths) <= 2 * len(ids) + 2
    assert max(tok.decoded_lengths) <= 10  # windows, never the whole output or prompt


class FakeTokenizer:
    """Characters as tokens; ids >= 1000 decode as the UTF-8 bytes of a stored multi-byte char."""

    special_token_ids = frozenset({0})

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        data = b"".join(b"<eos>" if t == 0 else bytes([t - 1000]) if t >= 1000 else chr(t).encode()
                        for t in ids if not (skip_special_tokens and t == 0))
        return data.decode("utf-8", errors="replace")


def test_duck_typed_tokenizer_and_invalid_bytes_flushed_by_later_text():
    raw = [1000 + b for b in "é".encode()] + [ord("x")] + [1000 + 0xFF] + [ord("y")]
    detok = IncrementalDetokenizer(FakeTokenizer(), [], skip_special_tokens=True)
    chunks = [detok.add([t]) for t in raw]
    # an invalid byte in the middle is released (as U+FFFD) once valid text follows it
    assert chunks == ["", "é", "x", "", FFFD + "y"]
    assert detok.add([0]) == "" and detok.flush() == ""


def test_multi_token_add_releases_text_before_a_partial_character():
    raw = [ord("o"), ord("k")] + [1000 + b for b in "😀".encode()]
    detok = IncrementalDetokenizer(FakeTokenizer(), [], skip_special_tokens=True)
    assert detok.add(raw[:3]) == "ok"
    assert detok.add(raw[3:5]) == ""
    assert detok.add(raw[5:]) == "😀"
