"""The CPU fast path on a Llama GGUF whose layer matrices mix Q4_0 and Q4_K (not only Q4_1): its int4
groups hold exactly the fp32 reference's dequantized weights (compared through the bf16 copy the fast
path keeps), and its logits follow the fp32 reference's."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from rtserve.config import ModelConfig
from rtserve.model.decoder import DecoderForCausalLM
from rtserve.model.fast_llama import FastLlamaForCausalLM
from rtserve.model.loader import expected_shapes, load_model
from rtserve.model.quantized_loader import load_fast_checkpoint
from tests.unit.gguf_fixtures import llama_gguf_writer
from tests.unit.test_loader import gguf_name, llama_cpp_permute
from tests.unit.test_quant import prefill_meta

# K = 256 or 512 everywhere: a Q4_K super-block is 256 weights.
CONFIG = ModelConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=64, max_position=64, rope_theta=1e4, rms_norm_eps=2.0 ** -17,
                     tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,))
Q4_K_NBYTES = 144


# Weights within about +-0.1 keep this random model's attention soft: with +-0.3 a few positions'
# softmax is nearly one-hot, and bf16 rounding (in either kernel, Q4_1 files alike) flips which key wins.
def q4_k_blocks(rows: int, cols: int, rng) -> np.ndarray:
    """Random Q4_K rows whose weights stay within about +-0.1 (d * 63 * 15 and dmin * 63)."""
    raw = rng.integers(0, 256, size=(rows * cols // 256, Q4_K_NBYTES), dtype=np.uint8)
    raw[:, 0:2] = np.array([0.1 / (63 * 15)], np.float16).view(np.uint8)
    raw[:, 2:4] = np.array([0.1 / 63], np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def write_mixed_gguf(path) -> None:
    rng, g = np.random.default_rng(0), torch.Generator().manual_seed(0)
    w = llama_gguf_writer(path, CONFIG)
    for name, shape in expected_shapes(CONFIG).items():
        if len(shape) == 1:
            w.add_tensor(gguf_name(name), (1.0 + 0.1 * torch.randn(shape, generator=g)).numpy())
        elif "embed" in name:
            w.add_tensor(gguf_name(name), gguf.quants.quantize((0.3 * torch.randn(shape, generator=g)).numpy(),
                                                               QT.Q8_0), raw_dtype=QT.Q8_0)
        elif "self_attn" in name and "o_proj" not in name:  # q/k/v: Q4_0, quantized by the reference
            array = (0.1 * torch.randn(shape, generator=g)).numpy()
            if ".q_proj." in name:
                array = llama_cpp_permute(array, CONFIG.num_heads)
            elif ".k_proj." in name:
                array = llama_cpp_permute(array, CONFIG.num_kv_heads)
            w.add_tensor(gguf_name(name), gguf.quants.quantize(np.ascontiguousarray(array), QT.Q4_0),
                         raw_dtype=QT.Q4_0)
        else:  # o_proj and the MLP: Q4_K
            w.add_tensor(gguf_name(name), q4_k_blocks(*shape, rng), raw_dtype=QT.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    path = str(d / "tiny.mixed.gguf")
    write_mixed_gguf(path)
    fast = load_fast_checkpoint(path, str(d / "cache"))
    assert fast is not None
    weights = load_model(path, str(d / "cache")).weights
    ref = DecoderForCausalLM(fast.config)
    ref.load_hf_weights(weights)
    return fast, weights, FastLlamaForCausalLM(fast.config, fast.tensors), ref.eval()


def test_groups_hold_the_reference_weights(models):
    fast, weights, _, _ = models
    for i in range(CONFIG.num_layers):
        p = f"model.layers.{i}."
        fused = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
                 "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
        for name, parts in fused.items():
            expected = torch.cat([weights[f"{p}{part}.weight"] for part in parts]).to(torch.bfloat16)
            assert torch.equal(fast.tensors[f"layers.{i}.{name}.bf16"], expected), (i, name)


@pytest.mark.parametrize("num_tokens", [5, 40])  # int4 GEMV rows and bf16 GEMM rows
def test_fast_logits_follow_the_reference(models, num_tokens):
    _, _, fast, ref = models
    ids = torch.randint(0, CONFIG.vocab_size, (num_tokens,), generator=torch.Generator().manual_seed(1))
    pos, rows = torch.arange(num_tokens), torch.arange(num_tokens)
    ref_cache = [torch.zeros(2, 64, 1, CONFIG.num_kv_heads, CONFIG.head_dim) for _ in range(2)]
    fast_cache = [torch.zeros(2, 64, 1, CONFIG.num_kv_heads, CONFIG.head_dim, dtype=torch.bfloat16)
                  for _ in range(2)]
    fast_slots = [(c[0].view(64, CONFIG.num_kv_heads, -1), c[1].view(64, CONFIG.num_kv_heads, -1))
                  for c in fast_cache]
    expected = ref(ids, pos, ref_cache, prefill_meta(num_tokens), rows)
    got = fast(ids, pos, fast_slots, prefill_meta(num_tokens), rows)
    assert (got - expected).norm() / expected.norm() < 0.03
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
