"""Quantized weights for the CPU fast path: Q4_1 -> torch int4 packing, Q8_0, the fast-path loader
and the fast model against the fp32 reference on a tiny GGUF."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from rtserve import kernels
from rtserve.config import ModelConfig
from rtserve.model import quant
from rtserve.model.fast_llama import FastLlamaForCausalLM
from rtserve.model.gguf import _deq_q4_1, _deq_q8_0
from rtserve.model.decoder import DecoderForCausalLM
from rtserve.model.loader import expected_shapes, load_model, unpermute_rope_rows
from rtserve.model.quantized_loader import load_fast_checkpoint
from rtserve.runner.attention_metadata import AttentionMetadata, PrefillChunk
from tests.unit.gguf_fixtures import llama_gguf_writer
from tests.unit.test_loader import gguf_name, llama_cpp_permute


def q4_1_blocks(n: int, k: int, seed: int = 0, nice: bool = False) -> torch.Tensor:
    """Random Q4_1 blocks [n, k/32, 20]. `nice`: d a power of two and m = -8d + a small multiple of
    d, so every product and sum in either dequantization formula is exact in fp32."""
    rng = np.random.default_rng(seed)
    num = n * k // 32
    if nice:
        d = (2.0 ** rng.integers(-12, -4, num)).astype(np.float16)
        m = (-8.0 * d + rng.integers(-4, 5, num) * d).astype(np.float16)
    else:
        d = rng.uniform(1e-3, 5e-2, num).astype(np.float16)
        m = (-8.0 * d * rng.uniform(0.5, 1.5, num)).astype(np.float16)
    qs = rng.integers(0, 256, (num, 16), dtype=np.uint8)
    raw = np.concatenate([d.view(np.uint8).reshape(-1, 2), m.view(np.uint8).reshape(-1, 2), qs], axis=1)
    return torch.from_numpy(raw.reshape(n, k // 32, 20))


def test_q4_1_dequantize_matches_gguf_reader():
    blocks = q4_1_blocks(64, 96)
    expected = _deq_q4_1(blocks.reshape(-1, 20).numpy()).reshape(64, 96)
    assert torch.equal(quant.q4_1_dequantize(blocks), torch.from_numpy(expected))


def test_q8_0_dequantize_matches_gguf_reader():
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (16 * 3, 34), dtype=np.uint8)
    raw[:, 0:2] = rng.uniform(-1, 1, len(raw)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    expected = _deq_q8_0(raw).reshape(16, 96)
    got = quant.q8_0_dequantize(torch.from_numpy(raw).reshape(16, 3, 34))
    assert torch.equal(got, torch.from_numpy(expected))


def test_int4_pack_of_q4_1_dequantizes_to_exactly_the_gguf_values():
    n, k = 64, 128
    blocks = q4_1_blocks(n, k, nice=True)
    packed, scales_zeros = quant.int4pack_from_q4_1(blocks, scale_dtype=torch.float32)
    assert packed.dtype == torch.uint8 and scales_zeros.shape == (k // 32, n, 2)
    # x = I reads the kernel's weights back: row j of the product is column j of W.T.
    w = quant.int4pack_mm(torch.eye(k), packed, scales_zeros).t()
    assert torch.equal(w, quant.q4_1_dequantize(blocks))


def test_int4_pack_is_close_for_arbitrary_fp16_scales():
    n, k = 64, 128
    blocks = q4_1_blocks(n, k, seed=3)
    ref = quant.q4_1_dequantize(blocks)
    fp32 = quant.int4pack_mm(torch.eye(k), *quant.int4pack_from_q4_1(blocks, torch.float32)).t()
    torch.testing.assert_close(fp32, ref, rtol=0, atol=1e-6)
    bf16 = quant.int4pack_mm(torch.eye(k, dtype=torch.bfloat16), *quant.int4pack_from_q4_1(blocks)).t()
    torch.testing.assert_close(bf16.float(), ref, rtol=2 ** -7, atol=2e-3)  # bf16 scale/zero rounding


def test_fast_linear_kernels_agree_with_fp32():
    kernels.native_available()
    blocks = q4_1_blocks(96, 64, seed=4)
    w = quant.q4_1_dequantize(blocks)
    lin = quant.FastLinear.from_q4_1(blocks)
    have_amx = bool(torch.ops.rtserve.amx_available())
    for m in (1, 3, quant.LARGE_M, 32, 40):
        x = torch.randn(m, 64)
        ref = x @ w.t()
        ys = [lin.small(x.bfloat16()), lin(x.bfloat16(), have_amx)]
        if quant.onednn_bf16():  # else no bf16 copy is kept (`FastLinear.from_q4_1`)
            ys.append(lin.large(x.bfloat16()))
        if lin.panel_q is not None:
            ys.append(lin.panel(x.bfloat16()))
        if have_amx and m <= quant.AMX_MAX_M:
            ys.append(lin.amx(x.bfloat16()))
        for y in ys:
            assert y.shape == (m, 96) and y.dtype == torch.bfloat16
            assert ((y.float() - ref).norm() / ref.norm()) < 1e-2


def test_row_permutation_of_blocks_commutes_with_dequantization():
    blocks = q4_1_blocks(64, 64, seed=5)
    assert torch.equal(quant.q4_1_dequantize(unpermute_rope_rows(blocks, 4)),
                       unpermute_rope_rows(quant.q4_1_dequantize(blocks), 4))


# --- the fast model on a tiny Q4_1 GGUF --------------------------------------------------------

TINY = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, max_position=64, rope_theta=1e4, rms_norm_eps=2.0 ** -17,
                   tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,))


def write_q4_1_gguf(path, config: ModelConfig) -> None:
    """Layer matrices Q4_1, embedding Q8_0, norms F32 (the layout of the embedded SmolLM2 file)."""
    g = torch.Generator().manual_seed(0)
    w = llama_gguf_writer(path, config)
    for name, shape in expected_shapes(config).items():
        if len(shape) == 1:
            w.add_tensor(gguf_name(name), (1.0 + 0.1 * torch.randn(shape, generator=g)).numpy())
            continue
        array = (0.3 * torch.randn(shape, generator=g)).numpy()
        if ".q_proj." in name:
            array = llama_cpp_permute(array, config.num_heads)
        elif ".k_proj." in name:
            array = llama_cpp_permute(array, config.num_kv_heads)
        qtype = QT.Q8_0 if "embed" in name else QT.Q4_1
        blocks = gguf.quants.quantize(np.ascontiguousarray(array), qtype)
        w.add_tensor(gguf_name(name), blocks, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("fast")
    path = str(d / "tiny.Q4_1.gguf")
    write_q4_1_gguf(path, TINY)
    fast = load_fast_checkpoint(path, str(d / "cache"))
    assert fast is not None and fast.config == TINY
    again = load_fast_checkpoint(path, str(d / "cache"))  # from the cache file this time
    assert set(again.tensors) == set(fast.tensors)
    assert all(torch.equal(again.tensors[n], t) for n, t in fast.tensors.items())
    ref = DecoderForCausalLM(TINY)
    ref.load_hf_weights(load_model(path, str(d / "cache")).weights)
    return FastLlamaForCausalLM(TINY, fast.tensors), ref.eval()


def prefill_meta(num_tokens: int) -> AttentionMetadata:
    slots = torch.arange(num_tokens)
    return AttentionMetadata(slot_mapping=slots,
                             prefills=[PrefillChunk(0, num_tokens, num_tokens, slots, None)])


def kv(num_slots: int, dtype=torch.float32):
    cache = [torch.zeros(2, num_slots, 1, TINY.num_kv_heads, TINY.head_dim, dtype=dtype) for _ in range(2)]
    return cache, [(c[0].view(num_slots, TINY.num_kv_heads, -1), c[1].view(num_slots, TINY.num_kv_heads, -1))
                   for c in cache]


@pytest.mark.parametrize("num_tokens", [5, 40])  # int4 kernels (< LARGE_M rows) and bf16 kernels
def test_fast_model_logits_close_to_fp32_reference(tiny_models, num_tokens):
    fast, ref = tiny_models
    ids = torch.randint(0, TINY.vocab_size, (num_tokens,), generator=torch.Generator().manual_seed(1))
    pos, rows = torch.arange(num_tokens), torch.arange(num_tokens)
    ref_cache, _ = kv(64)
    _, fast_slots = kv(64, torch.bfloat16)
    expected = ref(ids, pos, ref_cache, prefill_meta(num_tokens), rows)
    got = fast(ids, pos, fast_slots, prefill_meta(num_tokens), rows)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).norm() / expected.norm() < 0.03
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_decode_step_matches_prefill_of_the_same_tokens(tiny_models):
    """A decode step (scripted layers, native paged attention and fused ops) reproduces the last
    row of a prefill over the same 3 tokens (eager layers, SDPA; both under AMX_MIN_M rows, so the
    same int4 GEMV), within bf16 rounding. Compared before the LM head: its int8 activations are
    quantized per step (7 bits without VNNI), which would put the head's rounding into the check."""
    fast, _ = tiny_models
    n = quant.AMX_MIN_M - 1
    ids = torch.randint(0, TINY.vocab_size, (n,), generator=torch.Generator().manual_seed(2))
    _, slots = kv(64, torch.bfloat16)
    whole = fast.hidden_states(ids, torch.arange(n), slots, prefill_meta(n), torch.tensor([n - 1]))
    _, slots = kv(64, torch.bfloat16)
    fast(ids[:-1], torch.arange(n - 1), slots, prefill_meta(n - 1), torch.tensor([n - 2]))
    meta = AttentionMetadata(slot_mapping=torch.tensor([n - 1]), num_decodes=1,
                             decode_block_table=torch.arange(n)[None],
                             decode_mask=torch.ones(1, 1, 1, n, dtype=torch.bool),
                             decode_seq_lens=torch.tensor([n]), block_size=1)
    step = fast.hidden_states(ids[-1:], torch.tensor([n - 1]), slots, meta, torch.tensor([0]))
    torch.testing.assert_close(step, whole, atol=0.05, rtol=0.05)


def test_scripted_decode_layers_equal_the_python_function(tiny_models):
    """Decode-only steps run `fast_decode.decode_layers` through TorchScript: same ops, same bits."""
    from rtserve.model import fast_decode
    fast, _ = tiny_models
    assert isinstance(fast._decode_layers, torch.jit.ScriptFunction)
    ids = torch.randint(0, TINY.vocab_size, (3,), generator=torch.Generator().manual_seed(3))
    scripted, outs = fast._decode_layers, []
    try:
        for fn in (scripted, fast_decode.decode_layers):
            fast._decode_layers = fn
            _, slots = kv(64, torch.bfloat16)
            for pos, token in enumerate(ids.tolist()):  # three decode steps, block size 1: a block table
                meta = AttentionMetadata(slot_mapping=torch.tensor([pos]), num_decodes=1,
                                         decode_block_table=torch.arange(pos + 1)[None],
                                         decode_mask=torch.ones(1, 1, 1, pos + 1, dtype=torch.bool),
                                         decode_seq_lens=torch.tensor([pos + 1]), block_size=1)
                out = fast(torch.tensor([token]), torch.tensor([pos]), slots, meta, torch.tensor([0]))
            outs.append(out)
    finally:
        fast._decode_layers = scripted
    assert torch.equal(outs[0], outs[1])


def test_the_fast_checkpoint_cache_is_per_isa(monkeypatch, tmp_path):
    """torch packs int4 weights for the ISA it runs on: an AVX-512 pack read on an AVX2 CPU gave
    garbage text (seen under `qemu-x86_64-static -cpu Haswell`), so each ISA has its own cache file."""
    import torch

    from rtserve.model import quantized_loader
    from rtserve.model.loader import default_model_path
    paths = []
    monkeypatch.setattr(quantized_loader, "_read", lambda path: paths.append(path) or object())
    for isa in ("AVX512", "AVX2"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda isa=isa: isa)
        quantized_loader.load_fast_checkpoint(default_model_path(), str(tmp_path))
    assert len(set(paths)) == 2 and ".AVX512" in paths[0] and ".AVX2" in paths[1]


def test_the_panel_layout_is_built_only_where_the_panel_kernel_runs(monkeypatch, tmp_path):
    """CPUs with neither AMX nor oneDNN's bf16 linear (AVX2-only x86) keep the int4 panel layout and
    name their fast-path cache apart; the others never build it."""
    import rtserve.model.quantized_loader as ql
    blocks = torch.randint(0, 256, (64, 2, quant.Q4_1_BLOCK_NBYTES), dtype=torch.uint8)
    blocks[:, :, :4] = torch.tensor([0x00, 0x3C, 0x00, 0x00], dtype=torch.uint8)  # d = 1.0, m = 0.0 (fp16)
    for panel in (False, True):
        monkeypatch.setattr(quant, "panel_kernel_runs", lambda panel=panel: panel)
        lin = quant.FastLinear.from_q4_1(blocks)
        assert (lin.panel_q is not None) == panel and (lin.panel_dm is not None) == panel
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    names = []
    monkeypatch.setattr(ql, "_read", lambda path: names.append(path) or "cached")
    monkeypatch.setattr(ql, "cpu_has_amx", lambda: False)
    for panel in (False, True):
        monkeypatch.setattr(quant, "panel_kernel_runs", lambda panel=panel: panel)
        assert ql.load_fast_checkpoint(str(model), str(tmp_path)) == "cached"
    assert names[0] != names[1] and names[1].endswith("-panel.safetensors") and "-panel" not in names[0]


@pytest.mark.parametrize("onednn", [False, True])
def test_kernel_for_rows_falls_back_per_op(monkeypatch, onednn):
    """The matmul per step shape: the int4 GEMV for few rows; from LARGE_M, oneDNN's bf16 GEMM where
    it runs, else the panel kernel where its layout is built, else still the GEMV."""
    monkeypatch.setattr(quant, "onednn_bf16", lambda: onednn)
    large = quant.LARGE if onednn else quant.PANEL
    assert [quant.kernel_for_rows(m, False, True) for m in (1, quant.LARGE_M - 1, quant.LARGE_M, 512)] == \
        [quant.SMALL, quant.SMALL, large, large]
    assert quant.kernel_for_rows(512, False, False) == (quant.LARGE if onednn else quant.SMALL)
    assert [quant.kernel_for_rows(m, True) for m in (quant.AMX_MIN_M - 1, quant.AMX_MIN_M, quant.AMX_MAX_M + 1)] == \
        [quant.SMALL, quant.AMX, quant.LARGE if onednn else quant.SMALL]


def test_the_amx_layout_is_built_only_where_amx_tiles_run(monkeypatch, tmp_path):
    """A CPU without AMX (this AMD EPYC, AVX2 laptops) never builds or caches the AMX weight layout;
    one with AMX does, and its fast-path cache is named apart (torch reports AVX512 for both)."""
    import rtserve.model.quantized_loader as ql
    blocks = torch.randint(0, 256, (64, 2, quant.Q4_1_BLOCK_NBYTES), dtype=torch.uint8)
    blocks[:, :, :4] = torch.tensor([0x00, 0x3C, 0x00, 0x00], dtype=torch.uint8)  # d = 1.0, m = 0.0 (fp16)
    for amx in (False, True):
        monkeypatch.setattr(quant, "cpu_has_amx", lambda amx=amx: amx)
        lin = quant.FastLinear.from_q4_1(blocks)
        assert (lin.amx_q is not None) == amx and (lin.amx_dm is not None) == amx
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    names = []
    monkeypatch.setattr(ql, "_read", lambda path: names.append(path) or "cached")
    for amx in (False, True):
        monkeypatch.setattr(ql, "cpu_has_amx", lambda amx=amx: amx)
        assert ql.load_fast_checkpoint(str(model), str(tmp_path)) == "cached"
    assert names[0] != names[1] and names[1].endswith("-amx.safetensors") and "-amx" not in names[0]
