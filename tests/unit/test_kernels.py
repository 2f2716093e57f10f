"""Native CPU kernels (rtserve/kernels) against their PyTorch reference implementations."""
import pytest
import torch

from rtserve import kernels

H, KVH, HD, BS = 9, 3, 64, 16


@pytest.fixture(scope="module", autouse=True)
def native():
    # The build must work wherever `make test` runs (CI has the compiler): a silent fallback would
    # make every comparison below a comparison of the reference with itself.
    assert kernels.native_available(), "native kernels failed to build or load (see the log)"


def _bf16(*shape, gen):
    return torch.randn(*shape, generator=gen).to(torch.bfloat16)


def _assert_close_bf16(actual, expected, atol=2e-2, rtol=1.6e-2):
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("group,head_dim", [(3, 64), (1, 64), (4, 128), (7, 64), (2, 48), (5, 64), (6, 128),
                                            (8, 64), (2, 256)])
def test_paged_decode_attention_matches_reference(group, head_dim):
    gen = torch.Generator().manual_seed(group * 1000 + head_dim)
    num_blocks, num_seqs, kv_heads = 64, 5, 2
    heads = kv_heads * group
    k = _bf16(num_blocks * BS, kv_heads, head_dim, gen=gen)
    v = _bf16(num_blocks * BS, kv_heads, head_dim, gen=gen)
    q = _bf16(num_seqs, heads, head_dim, gen=gen)
    lens = torch.tensor([1, 15, 16, 17, 100])
    table = torch.randperm(num_blocks, generator=gen)[:num_seqs * 7].view(num_seqs, 7)  # scattered blocks
    out = torch.ops.rtserve.paged_decode_attention(q, k, v, table, lens, BS, head_dim ** -0.5)
    ref = kernels.reference_paged_decode_attention(q, k, v, table, lens, BS, head_dim ** -0.5)
    assert out.shape == (num_seqs, heads, head_dim) and out.dtype == torch.bfloat16
    _assert_close_bf16(out, ref)


@pytest.mark.parametrize("block_size", [1, 5, 8, 32])
def test_paged_decode_attention_any_block_size(block_size):
    # The fast kernel walks 16 tokens at a time across block boundaries wherever they fall.
    gen = torch.Generator().manual_seed(block_size)
    lens = torch.tensor([1, 16, 17, 33, 70])
    num_blocks = int(sum(-(-n // block_size) for n in lens.tolist())) + 3
    width = -(-int(lens.max()) // block_size)
    k = _bf16(num_blocks * block_size, KVH, HD, gen=gen)
    v = _bf16(num_blocks * block_size, KVH, HD, gen=gen)
    q = _bf16(len(lens), H, HD, gen=gen)
    table = torch.randperm(num_blocks, generator=gen)[:len(lens) * width] if num_blocks >= len(lens) * width \
        else torch.randint(0, num_blocks, (len(lens) * width,), generator=gen)
    table = table.view(len(lens), width)
    out = torch.ops.rtserve.paged_decode_attention(q, k, v, table, lens, block_size, HD ** -0.5)
    _assert_close_bf16(out, kernels.reference_paged_decode_attention(q, k, v, table, lens, block_size, HD ** -0.5))


def test_paged_decode_attention_ignores_padding_and_extreme_scores():
    gen = torch.Generator().manual_seed(1)
    k = _bf16(4 * BS, KVH, HD, gen=gen) * 30  # large logits: the softmax must subtract the max
    v = _bf16(4 * BS, KVH, HD, gen=gen)
    q = _bf16(2, H, HD, gen=gen)
    table = torch.tensor([[2, 0], [1, 3]])
    lens = torch.tensor([3, 20])
    out = torch.ops.rtserve.paged_decode_attention(q, k, v, table, lens, BS, HD ** -0.5)
    assert torch.isfinite(out.float()).all()
    _assert_close_bf16(out, kernels.reference_paged_decode_attention(q, k, v, table, lens, BS, HD ** -0.5))
    k2 = k.clone()
    k2[2 * BS + 3:3 * BS] = 1e4  # beyond sequence 0's length: must not change its output
    out2 = torch.ops.rtserve.paged_decode_attention(q, k2, v, table, lens, BS, HD ** -0.5)
    assert torch.equal(out[0], out2[0])


@pytest.mark.parametrize("bad", ["block", "len", "dtype"])
def test_paged_decode_attention_rejects_bad_inputs(bad):
    k = torch.zeros(4 * BS, KVH, HD, dtype=torch.bfloat16)
    q = torch.zeros(1, H, HD, dtype=torch.bfloat16)
    table, lens = torch.tensor([[0, 1]]), torch.tensor([20])
    if bad == "block":
        table = torch.tensor([[0, 4]])  # block 4 of 4 does not exist
    elif bad == "len":
        lens = torch.tensor([33])  # more than 2 blocks hold
    else:
        q = q.float()
    with pytest.raises(RuntimeError):
        torch.ops.rtserve.paged_decode_attention(q, k, k, table, lens, BS, 0.125)


@pytest.mark.parametrize("rows,hidden", [(1, 576), (32, 576), (5, 40)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_reference(rows, hidden, with_residual):
    gen = torch.Generator().manual_seed(rows + hidden)
    x = torch.randn(rows, hidden, generator=gen) * 3
    w = torch.randn(hidden, generator=gen)
    res = _bf16(rows, hidden, gen=gen) if with_residual else None
    x_native, x_ref = x.clone(), x.clone()
    out = torch.ops.rtserve.add_rms_norm(x_native, res, w)
    ref = kernels.reference_add_rms_norm(x_ref, res, w)
    torch.testing.assert_close(x_native, x_ref)  # the in-place residual add
    _assert_close_bf16(out, ref)


@pytest.mark.parametrize("rows,head_dim", [(1, 64), (7, 64), (3, 40)])
def test_rope_kv_write_matches_reference(rows, head_dim):
    gen = torch.Generator().manual_seed(rows * head_dim)
    qkv_full = _bf16(rows, (H + 2 * KVH) * head_dim + 8, gen=gen)
    qkv = qkv_full[:, :-8]  # a row-strided view, as a slice of a wider matmul output would be
    cos, sin = _bf16(rows, head_dim, gen=gen), _bf16(rows, head_dim, gen=gen)
    slots = torch.randperm(32, generator=gen)[:rows]
    caches = [torch.zeros(32, KVH, head_dim, dtype=torch.bfloat16) for _ in range(4)]
    q = torch.ops.rtserve.rope_kv_write(qkv, cos, sin, caches[0], caches[1], slots, H, KVH)
    q_ref = kernels.reference_rope_kv_write(qkv, cos, sin, caches[2], caches[3], slots, H, KVH)
    _assert_close_bf16(q, q_ref)
    _assert_close_bf16(caches[0], caches[2])
    assert torch.equal(caches[1], caches[3])  # V is copied bit for bit


def test_rope_kv_write_rejects_out_of_range_slot():
    qkv = torch.zeros(1, (H + 2 * KVH) * HD, dtype=torch.bfloat16)
    cos = torch.zeros(1, HD, dtype=torch.bfloat16)
    cache = torch.zeros(8, KVH, HD, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):
        torch.ops.rtserve.rope_kv_write(qkv, cos, cos, cache, cache.clone(), torch.tensor([8]), H, KVH)


@pytest.mark.parametrize("rows,inter", [(1, 1536), (9, 1536), (2, 20)])
def test_silu_mul_matches_reference(rows, inter):
    gen = torch.Generator().manual_seed(rows + inter)
    gate_up = _bf16(rows, 2 * inter, gen=gen) * 4
    gate_up[0, :3] = torch.tensor([-100.0, 100.0, 0.0])  # saturated sigmoid both ways
    _assert_close_bf16(torch.ops.rtserve.silu_mul(gate_up), kernels.reference_silu_mul(gate_up))


def test_ops_are_callable_from_torchscript():
    @torch.jit.script
    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.ops.rtserve.add_rms_norm(x, None, w)

    x, w = torch.ones(2, 16), torch.ones(16)
    assert f(x, w).shape == (2, 16)


def test_argmax_rows_matches_torch_including_ties_and_nan():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 1000, generator=gen)
    logits[1, 10] = logits[1, 900] = 50.0                 # tie: lowest index
    logits[2] = float("-inf")                             # all -inf: index 0
    logits[3, 7] = float("nan")                           # NaN is the maximum
    logits[4, 999] = 99.0                                 # in the scalar tail
    rows = torch.ops.rtserve.argmax_rows(logits)
    assert rows.tolist() == logits.argmax(dim=-1).tolist()
    strided = logits[:, :500]                             # row stride != V
    assert torch.ops.rtserve.argmax_rows(strided).tolist() == strided.argmax(dim=-1).tolist()


def _q4_1_blocks(n: int, k: int, seed: int) -> torch.Tensor:
    """Random GGUF Q4_1 blocks [N, K/32, 20] with realistic fp16 scales and mins."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, k // 32, 20), dtype=torch.uint8, generator=gen)
    d = (torch.rand(n, k // 32, generator=gen) * 0.02 + 0.001).half()
    m = (-torch.rand(n, k // 32, generator=gen) * 0.1).half()
    blocks[..., 0:2] = d.view(torch.uint8).view(n, k // 32, 2)
    blocks[..., 2:4] = m.view(torch.uint8).view(n, k // 32, 2)
    return blocks


def test_amx_packing_round_trips_to_the_gguf_dequantization():
    from rtserve.model import quant
    blocks = _q4_1_blocks(64, 96, seed=5)
    qw, dm = quant.pack_q4_amx(blocks)
    assert qw.shape == (4, 3, 16, 16) and dm.shape == (4, 3, 64)
    assert torch.equal(kernels.unpack_q4_amx(qw, dm), quant.q4_1_dequantize(blocks))


@pytest.mark.parametrize("rows", [1, 4, 15, 16, 17, 32, 33, 48, 100])
def test_int4_linear_matches_reference(rows):
    from rtserve.model import quant
    if not torch.ops.rtserve.amx_available():
        pytest.skip("this CPU has no AMX; the int4 AMX kernel is never selected here")
    blocks = _q4_1_blocks(96, 128, seed=rows)
    qw, dm = quant.pack_q4_amx(blocks)
    x = _bf16(rows, 128, gen=torch.Generator().manual_seed(rows))
    out = torch.ops.rtserve.int4_linear(x, qw, dm)
    assert out.shape == (rows, 96) and out.dtype == torch.bfloat16
    # Same effective bf16 weights; only the fp32 summation order differs, then one bf16 rounding.
    _assert_close_bf16(out, kernels.reference_int4_linear(x, qw, dm), atol=1e-2, rtol=8e-3)


def test_int4_linear_rejects_bad_shapes():
    from rtserve.model import quant
    if not torch.ops.rtserve.amx_available():
        pytest.skip("no AMX")
    qw, dm = quant.pack_q4_amx(_q4_1_blocks(32, 64, seed=1))
    with pytest.raises(RuntimeError):
        torch.ops.rtserve.int4_linear(torch.zeros(2, 96, dtype=torch.bfloat16), qw, dm)  # K mismatch


def test_panel_packing_round_trips_to_the_gguf_dequantization():
    from rtserve.model import quant
    blocks = _q4_1_blocks(48, 96, seed=6)
    qw, dm = quant.pack_q4_panel(*quant.q4_1_unpack(blocks))
    assert qw.shape == (3, 3, 32, 8) and dm.shape == (3, 3, 32)
    assert torch.equal(kernels.unpack_q4_panel(qw, dm), quant.q4_1_dequantize(blocks))


@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 96, 97, 200])
def test_int4_panel_linear_is_within_its_rounding_of_the_exact_product(rows):
    """The panel kernel (native, whatever SIMD path this build has) against the exact product of the
    same weights: its fp32 FMAs along K may each round (at most K * 2^-24 of sum |x w| in all), then
    one rounding to bf16 (half a bf16 ulp: at most 2^-8 relative, 8 significant bits). Rows cross
    the 6-row tile and the 96-row block."""
    from rtserve.model import quant
    blocks = _q4_1_blocks(64, 160, seed=rows)
    qw, dm = quant.pack_q4_panel(*quant.q4_1_unpack(blocks))
    w = quant.q4_1_dequantize(blocks).double()                           # [N, K], exact
    gen = torch.Generator().manual_seed(rows)
    for x in (_bf16(rows, 160, gen=gen), torch.randn(rows, 160, generator=gen)):  # bf16 and fp32 inputs
        out = torch.ops.rtserve.int4_panel_linear(x, qw, dm)
        assert out.shape == (rows, 64) and out.dtype == torch.bfloat16
        exact = x.double() @ w.t()
        fp32_err = 160 * 2.0 ** -24 * (x.double().abs() @ w.abs().t())
        bound = fp32_err + 2.0 ** -8 * (exact.abs() + fp32_err)
        assert ((out.double() - exact).abs() <= bound + 1e-30).all()
        _assert_close_bf16(out, kernels.reference_int4_panel_linear(x, qw, dm), atol=1e-2, rtol=8e-3)


def test_int4_panel_linear_rejects_bad_shapes():
    from rtserve.model import quant
    qw, dm = quant.pack_q4_panel(*quant.q4_1_unpack(_q4_1_blocks(32, 64, seed=1)))
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.rtserve.int4_panel_linear(torch.zeros(2, 96, dtype=torch.bfloat16), qw, dm)  # K mismatch
    with pytest.raises(RuntimeError, match="dm"):
        torch.ops.rtserve.int4_panel_linear(torch.zeros(2, 64, dtype=torch.bfloat16), qw, dm[:1])
    with pytest.raises(RuntimeError, match="x must be"):
        torch.ops.rtserve.int4_panel_linear(torch.zeros(2, 64, dtype=torch.float16), qw, dm)
