"""Q4_0, Q4_1 and Q4_K blocks as affine int4 groups of 32 (rtserve/model/quant_groups.py): the
groups give the gguf package's dequantized values bit for bit, and torch's int4 GEMV over them
matches a matmul with those values; other types are refused."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from rtserve.model.quant_groups import dequantize_groups, int4_groups, int4pack
from tests.unit.test_gguf import F16_FIELDS, random_blocks

ROWS, BLOCKS_PER_ROW = 64, 2


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q4_K], ids=lambda q: q.name)
def test_groups_reproduce_the_gguf_values_and_the_kernel_uses_them(qtype):
    rng = np.random.default_rng(int(qtype))
    raw = random_blocks(qtype, ROWS, BLOCKS_PER_ROW, rng)
    expected = gguf.quants.dequantize(raw, qtype)                      # [ROWS, K]
    q, scale, offset = int4_groups(raw, int(qtype), ROWS)
    k = expected.shape[1]
    assert q.shape == (ROWS, k) and scale.shape == offset.shape == (ROWS, k // 32) and int(q.max()) <= 15
    w = dequantize_groups(q, scale, offset)
    if qtype == QT.Q4_0:  # (q - 8) d against q d - 8 d: equal values; a zero may differ in sign
        np.testing.assert_array_equal(w.numpy(), expected)
    else:
        np.testing.assert_array_equal(w.numpy().view(np.uint32), expected.view(np.uint32))
    # The kernel, on rows of moderate scales (the edge-case scales above are for exactness only).
    raw = random_blocks(qtype, ROWS, BLOCKS_PER_ROW, np.random.default_rng(0))
    for at in F16_FIELDS[qtype]:
        raw.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])[:, at:at + 2] = np.array([0.01], np.float16).view(np.uint8)
    q, scale, offset = int4_groups(raw, int(qtype), ROWS)
    w = dequantize_groups(q, scale, offset)
    x = torch.randn(3, k)
    packed, sz = int4pack(q, scale, offset, scale_dtype=torch.float32)
    got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
    torch.testing.assert_close(got, x @ w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qtype", [QT.Q5_0, QT.Q8_0, QT.Q6_K, QT.F16], ids=lambda q: q.name)
def test_other_types_are_not_int4_groups(qtype):
    with pytest.raises(ValueError, match="not an affine int4 type"):
        int4_groups(np.zeros(256, np.uint8), int(qtype), 1)
