"""Tokenizer on a tiny synthetic byte-level GGUF vocabulary: BPE merges, special and user-defined
tokens, BOS handling, the chat template sandbox, the conversion cache, and HF directories."""
from __future__ import annotations

import json

import gguf
import pytest

import rtserve.client.tokenizer as tokenizer_module
from rtserve.client.gguf_tokenizer import bytes_to_unicode
from rtserve.client.tokenizer import Tokenizer

CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTES = [bytes_to_unicode()[b] for b in range(256)]
MERGED = ["he", "ll", "hell", "Ġw", "Ġwo"]
TOKENS = CONTROL + BYTES + MERGED + ["<think>"]
TYPES = [3] * len(CONTROL) + [1] * (len(BYTES) + len(MERGED)) + [4]
MERGES = ["h e", "l l", "he ll", "Ġ w", "Ġw o"]
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nDefault prompt<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = ["hello world", "", " ", "  leading and trailing  ", "tabs\tand\nnewlines\r\n\n",
         "日本語のテキスト", "emoji 😀👍🏽 and ZWJ 👨‍👩‍👧", "code: def f(x):\n    return x**2  # ok",
         "Ünïcödé façade", "<think>reasoning</think> done"]


def write_vocab_gguf(path, *, add_bos=False, model="gpt2", template=CHATML, eot=True) -> str:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_types(TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if eot:
        w.add_uint32("tokenizer.ggml.eot_token_id", 0)
    w.add_add_bos_token(add_bos)
    if template:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture
def tok(tmp_path) -> Tokenizer:
    return Tokenizer.load(write_vocab_gguf(tmp_path / "v.gguf"), cache_dir=str(tmp_path / "cache"))


def test_bpe_merges_and_ids(tok):
    ids = tok.encode("hello world")
    assert [TOKENS[i] for i in ids] == ["hell", "o", "Ġwo", "r", "l", "d"]
    assert tok.vocab_size == len(TOKENS)
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.eos_token_ids == (2, 0)
    assert tok.special_token_ids == frozenset({0, 1, 2})


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_and_user_defined_tokens(tok):
    ids = tok.encode("<|im_start|>user\nhello<|im_end|><think>")
    assert ids[0] == 1 and ids[-2:] == [2, len(TOKENS) - 1]
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhello<think>"
    assert tok.decode(ids) == "<|im_start|>user\nhello<|im_end|><think>"


def test_bos_is_added_only_when_the_file_asks(tmp_path, tok):
    assert tok.encode("he", add_special_tokens=True) == tok.encode("he") == [TOKENS.index("he")]
    with_bos = Tokenizer.load(write_vocab_gguf(tmp_path / "b.gguf", add_bos=True), str(tmp_path / "c"))
    assert with_bos.encode("he", add_special_tokens=True) == [1, TOKENS.index("he")]
    assert with_bos.encode("he") == [TOKENS.index("he")]


def test_chat_template(tok):
    user = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(user) == (
        "<|im_start|>system\nDefault prompt<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}] + user
    assert tok.apply_chat_template(with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


def test_template_globals_and_sandbox(tmp_path):
    template = ("{% if messages|length == 0 %}{{ raise_exception('empty') }}{% endif %}"
                "{{ bos_token }}{{ messages|tojson }}{{ eos_token }}")
    tok = Tokenizer.load(write_vocab_gguf(tmp_path / "t.gguf", template=template), str(tmp_path / "c"))
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == \
        '<|im_start|>[{"role": "user", "content": "é"}]<|im_end|>'
    with pytest.raises(ValueError, match="empty"):
        tok.apply_chat_template([])
    for i, attack in enumerate(["{{ ''.__class__.__mro__ }}", "{% set x = messages.append(1) %}"]):
        escape = Tokenizer.load(write_vocab_gguf(tmp_path / f"e{i}.gguf", template=attack),
                                str(tmp_path / "c"))
        with pytest.raises(ValueError, match="unsafe"):  # dunders and mutation are refused
            escape.apply_chat_template([])


def test_no_template(tmp_path):
    tok = Tokenizer.load(write_vocab_gguf(tmp_path / "n.gguf", template=None, eot=False), str(tmp_path))
    assert tok.chat_template is None and tok.eos_token_ids == (2,)
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_second_load_uses_the_cache(tmp_path, tok, monkeypatch):
    cached = sorted(p.name.split(".", 1)[1] for p in (tmp_path / "cache").iterdir())
    assert cached == ["tokenizer.json", "tokenizer_config.json"]

    def no_parse(path):
        raise AssertionError("the GGUF should not be parsed again")
    monkeypatch.setattr(tokenizer_module, "GGUFFile", no_parse)
    again = Tokenizer.load(str(tmp_path / "v.gguf"), cache_dir=str(tmp_path / "cache"))
    assert again.encode(TEXTS[6]) == tok.encode(TEXTS[6])
    assert again.eos_token_ids == tok.eos_token_ids and again.chat_template == tok.chat_template


def test_torn_cache_is_rebuilt(tmp_path, tok):
    for p in (tmp_path / "cache").iterdir():
        p.write_text("{")
    again = Tokenizer.load(str(tmp_path / "v.gguf"), cache_dir=str(tmp_path / "cache"))
    assert again.encode("hello") == tok.encode("hello")


def test_unsupported_tokenizer_model(tmp_path):
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer"):
        Tokenizer.load(write_vocab_gguf(tmp_path / "s.gguf", model="bert"), str(tmp_path))


def test_hf_directory(tmp_path, tok):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "tokenizer.json").write_text(tok.backend.to_str())
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>"}}))
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    hf = Tokenizer.load(str(hf_dir))
    assert hf.bos_token_id == 1 and hf.eos_token_ids == (2, 0)
    assert hf.special_token_ids == tok.special_token_ids
    for text in TEXTS:
        assert hf.encode(text) == tok.encode(text)
    messages = [{"role": "user", "content": "Hi"}]
    assert hf.apply_chat_template(messages) == tok.apply_chat_template(messages)
