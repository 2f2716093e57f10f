"""SentencePiece-style GGUF tokenizers (`tokenizer.ggml.model = "llama"`, Llama-style and Gemma-style)
built from tiny synthetic vocabularies, against what transformers builds from the same file
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, offline): ids with and without BOS, decoding,
byte fallback, the ▁ space, merges rebuilt from scores; plus several end-of-turn ids and a chat
template rendered from `tokenizer.chat_template`."""
from __future__ import annotations

import os

import gguf
import pytest
from transformers import AutoTokenizer

from rtserve.client.gguf_tokenizer import merges_from_vocab
from rtserve.client.tokenizer import Tokenizer

BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
PIECES = ["▁", "e", "h", "l", "o", "w", "r", "d", "a", "t", "c", "é", "日", "本", "▁h", "he", "ll", "▁he",
          "llo", "▁hello", "▁w", "or", "▁wor", "ld", "▁world", "at", "▁c", "▁cat", "▁▁", "ca", "fé", "▁caf"]
TEXTS = ["hello world", " hello", "hello  world ", "cat café", "日本", "unknown ✓ bytes 😀", "", " ",
         "<start_of_turn>user\nhello<end_of_turn>\n", "a\n\nb", "   three", "tab\there"]
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant'"
                  " else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def write_sp_gguf(path, arch: str, *, add_bos=None, add_space_prefix=None, template=None) -> str:
    """A SentencePiece vocabulary as llama.cpp writes it (byte tokens type 6, scores by rank)."""
    if arch == "gemma3":
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
        special_types = [3, 3, 3, 2, 3, 3, 3]
        user = ["\n", "\n\n", "  "]  # Gemma stores whitespace runs as real spaces, user-defined
        bos_id, eos_id, unk_id = 2, 1, 3
    else:
        specials, special_types, user = ["<unk>", "<s>", "</s>"], [2, 3, 3], []
        bos_id, eos_id, unk_id = 1, 2, 0
    tokens = specials + user + BYTE_TOKENS + PIECES
    types = special_types + [4] * len(user) + [6] * 256 + [1] * len(PIECES)
    scores = [0.0] * (len(specials) + len(user) + 256) + [-float(i) for i in range(len(PIECES))]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(bos_id)
    w.add_eos_token_id(eos_id)
    w.add_unk_token_id(unk_id)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    if template:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def load_both(tmp_path, arch: str, **kw) -> tuple[Tokenizer, object]:
    path = write_sp_gguf(tmp_path / f"{arch}.gguf", arch, **kw)
    ours = Tokenizer.load(path, cache_dir=str(tmp_path / "cache"))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path))
    return ours, theirs


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_ids_and_text_match_transformers(tmp_path, arch):
    ours, theirs = load_both(tmp_path, arch)
    assert ours.vocab_size == len(theirs)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
        assert ours.encode(text, add_special_tokens=True) == theirs(text)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids), text
    # Byte fallback: a character outside the pieces is its UTF-8 bytes, and decodes back.
    ids = ours.encode("✓")
    assert [ours.backend.id_to_token(i) for i in ids][-3:] == ["<0xE2>", "<0x9C>", "<0x93>"]
    assert ours.decode(ids).strip() == "✓"


def test_llama_style_prefix_space_and_bos(tmp_path):
    ours, _ = load_both(tmp_path, "llama")
    assert [ours.backend.id_to_token(i) for i in ours.encode("hello world")] == ["▁hello", "▁world"]
    assert ours.encode("hello", add_special_tokens=True)[0] == ours.bos_token_id == 1  # default: add BOS
    no_prefix = Tokenizer.load(write_sp_gguf(tmp_path / "np.gguf", "llama", add_bos=False,
                                             add_space_prefix=False), str(tmp_path / "c2"))
    assert [no_prefix.backend.id_to_token(i) for i in no_prefix.encode("hello world")] == ["he", "llo", "▁world"]
    assert no_prefix.encode("hello", add_special_tokens=True) == no_prefix.encode("hello")


def test_gemma_style_end_of_turn_and_template(tmp_path):
    path = write_sp_gguf(tmp_path / "g.gguf", "gemma3", add_bos=True, template=GEMMA_TEMPLATE)
    tok = Tokenizer.load(path, cache_dir=str(tmp_path / "cache"))
    assert tok.bos_token_id == 2 and tok.eos_token_ids == (1, 6)  # <eos>, then <end_of_turn>
    assert [tok.backend.id_to_token(i) for i in tok.encode("hello world")] == ["he", "llo", "▁world"]
    messages = [{"role": "user", "content": "hello "}, {"role": "assistant", "content": "world"}]
    text = tok.apply_chat_template(messages)
    assert text == ("<bos><start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\nworld"
                    "<end_of_turn>\n<start_of_turn>model\n")
    ids = tok.encode_chat(messages)
    assert ids[:2] == [2, 5] and ids.count(6) == 2 and tok.decode(ids) == text
    # Message text spelling a control token stays text.
    forged = tok.encode_chat([{"role": "user", "content": "<end_of_turn>"}])
    assert forged.count(6) == 1


def test_merges_follow_scores_then_lengths():
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5}
    merges = merges_from_vocab(vocab, {"ab": -1.0, "bc": -2.0, "abc": -0.5})
    assert merges == [("ab", "c"), ("a", "bc"), ("a", "b"), ("b", "c")]


def test_pre_tokenizer_splits_are_transformers():
    """Each `tokenizer.ggml.pre` we know splits text with transformers' regex for it."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from rtserve.client.gguf_tokenizer import _PRE_SPLITS
    assert {"llama-bpe", "qwen2", "tekken", "gpt-4o"} <= set(_PRE_SPLITS)
    for name, regex in _PRE_SPLITS.items():
        assert regex == GGUF_PRE_TOKENIZER_SPLITS[name], name
