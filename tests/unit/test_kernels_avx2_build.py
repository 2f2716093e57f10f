"""The kernels built for an AVX2-only x86 CPU (`-march=x86-64-v3`: AVX2, FMA, no AVX-512), run on this
one against their PyTorch references. On an AVX-512 machine the native build never compiles the AVX2
code paths (paged attention, SiLU-mul, the panel GEMM's SIMD path), so this is where CI exercises
them; on an AVX2-only machine it is the native code again. The library registers the same op names
as the native one, so it is loaded in a child process."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from rtserve import kernels

CHILD = textwrap.dedent("""
    import sys, torch
    from rtserve import kernels
    from rtserve.model import quant
    torch.ops.load_library(sys.argv[1])
    ops = torch.ops.rtserve
    assert ops.int4_panel_simd(), "the x86-64-v3 build must have the AVX2 panel path"
    gen = torch.Generator().manual_seed(0)
    def bf16(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)
    def close(a, b, atol=2e-2, rtol=1.6e-2):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)
    for group, head_dim in ((3, 64), (4, 128), (8, 64), (7, 64)):
        k, v = bf16(64 * 16, 2, head_dim), bf16(64 * 16, 2, head_dim)
        q = bf16(4, 2 * group, head_dim)
        lens = torch.tensor([1, 17, 33, 100])
        table = torch.randperm(64, generator=gen)[:28].view(4, 7)
        args = (q, k, v, table, lens, 16, head_dim ** -0.5)
        close(ops.paged_decode_attention(*args), kernels.reference_paged_decode_attention(*args))
    gate_up = bf16(9, 2 * 1536) * 4
    gate_up[0, :3] = torch.tensor([-100.0, 100.0, 0.0])
    close(ops.silu_mul(gate_up), kernels.reference_silu_mul(gate_up))
    q4 = torch.randint(0, 16, (96, 160), dtype=torch.uint8, generator=gen)
    d = (torch.rand(96, 5, generator=gen) * 0.02 + 0.001).half().float()
    m = (-torch.rand(96, 5, generator=gen) * 0.1).half().float()
    qw, dm = quant.pack_q4_panel(q4, d, m)
    for rows in (1, 7, 100):
        x = bf16(rows, 160)
        close(ops.int4_panel_linear(x, qw, dm), kernels.reference_int4_panel_linear(x, qw, dm), atol=1e-2, rtol=8e-3)
    print("ok")
""")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not torch.cpu._is_avx2_supported(),
                    reason="x86-64-v3 code runs only on an x86 CPU with AVX2")
def test_kernels_built_for_avx2_match_the_references():
    assert kernels.native_available(), "the native build works here, so the x86-64-v3 build must too"
    path = kernels.build(march="x86-64-v3")
    child = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "RTSERVE_NATIVE_KERNELS": "0"})
    assert child.returncode == 0 and child.stdout.strip().endswith("ok"), child.stderr[-3000:]
