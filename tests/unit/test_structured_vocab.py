"""The vocabulary xgrammar sees is the model's: read from the GGUF metadata or from an HF directory's
tokenizer.json, the embedded SmolLM2's decodes the same either way, and its tokens spell what the
tokenizer decodes."""
import os

from rtserve.client.tokenizer import Tokenizer
from rtserve.model.loader import default_model_path
from rtserve.structured.vocab import tokenizer_info_for_model


def test_gguf_and_hf_directory_agree_with_the_tokenizer(tmp_path):
    tok = Tokenizer.load()
    (tmp_path / "tokenizer.json").write_text(tok.backend.to_str(), encoding="utf-8")
    from_gguf = tokenizer_info_for_model(default_model_path(), tok.vocab_size, tok.eos_token_ids)
    from_dir = tokenizer_info_for_model(os.fspath(tmp_path), tok.vocab_size, tok.eos_token_ids)
    assert from_gguf.decoded_vocab == from_dir.decoded_vocab
    assert from_gguf.stop_token_ids == list(tok.eos_token_ids)
    for token_id in (300, 1000, 20000, 49000):
        assert from_gguf.decoded_vocab[token_id].decode("utf-8", errors="replace") == tok.decode([token_id])
