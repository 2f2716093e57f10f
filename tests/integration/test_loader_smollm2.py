"""The real default model (SmolLM2-135M-Instruct Q4_1 GGUF): our dequantized weights, config,
tokenizer and chat template against what transformers builds from the same file."""
from __future__ import annotations

import os

import pytest
import torch

from rtserve.client.tokenizer import Tokenizer
from rtserve.model.loader import default_model_path, load_model

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello, world!", "The capital of France is Paris.", "", " ", "   ", "\n", "\n\n\n", "\t\tindented",
    "  two leading spaces", "trailing spaces   ", "mixed \t \n whitespace \r\n runs",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }", "SELECT * FROM users WHERE id = 42;",
    "x = [1, 2, 3]  # comment", "2024-11-29 02:45:00.123", "3.14159265358979 and 1e-10",
    "1234567890 0987654321", "日本語のテキストです。", "中文测试：你好，世界！", "한국어 문장입니다.",
    "Здравствуй, мир", "Ελληνικά", "مرحبا بالعالم", "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷",
    "Ünïcödé façade naïve café", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more<|endoftext|>", "<|im_start|><|im_start|>", "<repo_name>x<file_sep>y",
    "almost special <|im_start and |im_end|>", "don't can't I'm we'll they've",
    "URL https://example.com/a?b=c&d=e",
    "e-mail: someone@example.org", "$\\frac{a}{b}$ and \\(x^2\\)", "a" * 300, "ab " * 50,
    "\u200b zero width \u00a0 nbsp", "control \x00 \x07 chars",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "日本語で？ 😀"}],
]


@pytest.fixture(scope="module")
def model_file():
    path = default_model_path()
    return os.path.dirname(path), os.path.basename(path)


@pytest.fixture(scope="module")
def hf_state_dict(hf_smollm2):
    return hf_smollm2.config, {k: v.detach() for k, v in hf_smollm2.state_dict().items()}


@pytest.fixture(scope="module")
def hf_tokenizer(model_file):
    from transformers import AutoTokenizer
    directory, name = model_file
    return AutoTokenizer.from_pretrained(directory, gguf_file=name)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("rtserve_cache"))


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    return Tokenizer.load(default_model_path(), cache_dir=cache_dir)


def test_weights_match_transformers(hf_state_dict, cache_dir):
    hf_config, hf = hf_state_dict
    for attempt in ("convert", "cached"):
        ours = load_model(default_model_path(), cache_dir=cache_dir)
        assert ours.config.tie_word_embeddings and "lm_head.weight" not in ours.weights
        assert set(ours.weights) == set(hf) - {"lm_head.weight"}, attempt
        for name, weight in ours.weights.items():
            assert weight.dtype == torch.float32 and weight.shape == hf[name].shape, name
            assert (weight - hf[name]).abs().max().item() == 0.0, f"{attempt}: {name}"
    assert torch.equal(hf["lm_head.weight"], ours.weights["model.embed_tokens.weight"])
    c = ours.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads,
            c.head_dim, c.max_position) == (49152, 576, 1536, 30, 9, 3, 64, 8192)
    assert c.rope_theta == 100000.0 and c.rms_norm_eps == pytest.approx(hf_config.rms_norm_eps)
    assert c.bos_token_id == 1 and c.eos_token_ids == (2,)


def test_tokenizer_properties(tokenizer, hf_tokenizer):
    assert tokenizer.vocab_size == len(hf_tokenizer) == 49152
    assert tokenizer.bos_token_id == hf_tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_id == hf_tokenizer.eos_token_id == 2
    assert tokenizer.special_token_ids == frozenset(range(17))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tokenizer, hf_tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.encode(text, add_special_tokens=True) == hf_tokenizer.encode(text)
    for skip in (False, True):
        assert tokenizer.decode(ids, skip_special_tokens=skip) == \
            hf_tokenizer.decode(ids, skip_special_tokens=skip)
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tokenizer, hf_tokenizer, messages, add_generation_prompt):
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    if messages[0]["role"] != "system":
        assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in ours
    assert tokenizer.encode(ours) == hf_tokenizer.encode(theirs, add_special_tokens=False)


def test_cached_tokenizer_is_identical(tokenizer, cache_dir):
    again = Tokenizer.load(default_model_path(), cache_dir=cache_dir)
    for text in TEXTS:
        assert again.encode(text) == tokenizer.encode(text)
    assert again.chat_template == tokenizer.chat_template
