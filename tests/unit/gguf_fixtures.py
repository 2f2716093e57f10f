"""Writing tiny Llama GGUF files in tests (gguf's GGUFWriter is a test-only dependency)."""
from __future__ import annotations

import gguf

from rtserve.config import ModelConfig


def llama_gguf_writer(path, config: ModelConfig) -> gguf.GGUFWriter:
    """A GGUFWriter with the llama.* hyperparameters and a placeholder vocabulary of `config` written."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(config.num_layers)
    w.add_context_length(config.max_position)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    return w
