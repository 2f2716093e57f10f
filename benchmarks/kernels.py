"""Per-kernel milliseconds for SmolLM2-135M's linear shapes at M = 1, 8, 32, 128 (rows per step).

Kernels: fp32 `F.linear` (the reference mode), bf16 `F.linear`, bf16 oneDNN prepacked, int4
group-32 weight-only from the GGUF's Q4_1 blocks (bf16 activations), int8 dynamic-activation fbgemm,
int8 weight-only. Weights are the real GGUF's layer-0 matrices (Q4_1, dequantized where a kernel
needs floats). One layer's four matmuls are timed as a group with 30 distinct weight copies cycled, so
the weights are not cache-resident (as in a real 30-layer step); "step" = 30 layers plus the LM head
(49152 x 576) for M rows. Also prints each kernel's relative error against fp32 on the same input.

Usage: python benchmarks/kernels.py [--threads N] [--ms 1,8,32,128] [--reps 20]   (~1-2 minutes)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from rtserve.model import quant
from rtserve.model.gguf import GGUFFile
from rtserve.model.loader import default_model_path

SHAPES = {"qkv": ("attn_q", "attn_k", "attn_v"), "o": ("attn_output",), "gate_up": ("ffn_gate", "ffn_up"),
          "down": ("ffn_down",)}
COPIES = 30


def layer_blocks(gguf: GGUFFile) -> dict[str, torch.Tensor]:
    """Layer 0's fused matrices as Q4_1 blocks [N, K/32, 20]."""
    out = {}
    for fused, parts in SHAPES.items():
        blocks = []
        for part in parts:
            info = gguf.tensors[f"blk.0.{part}.weight"]
            blocks.append(quant.blocks_view(gguf.raw(info.name), info.shape[0], quant.Q4_1_BLOCK_NBYTES))
        out[fused] = torch.cat(blocks)
    return out


RUN = {  # name -> run(state, x) -> y
    "fp32": lambda w, x: F.linear(x, w),
    "bf16": lambda w, x: F.linear(x, w),
    "bf16_onednn": lambda w, x: quant.bf16_mm(x, w),
    "int4_g32": lambda w, x: quant.int4pack_mm(x, *w),
    "int8_dyn": lambda w, x: torch.ops.quantized.linear_dynamic(x, w),
    "int8_wo": lambda w, x: torch.ops.aten._weight_int8pack_mm(x, *w),
}


def preparers(w32: torch.Tensor, blocks: torch.Tensor | None):
    """name -> prepare() -> the kernel's weight state for one [N, K] matrix."""
    prep = {
        "fp32": lambda: w32.clone(),
        "bf16": lambda: w32.bfloat16(),
        "bf16_onednn": lambda: quant.prepack_bf16(w32),
        "int4_g32": lambda: quant.int4pack_from_q4_1(blocks),
        "int8_dyn": lambda: _int8_dyn_prepack(w32),
        "int8_wo": lambda: _int8_wo(w32),
    }
    if blocks is None:
        del prep["int4_g32"]
    return prep


def _int8_dyn_prepack(w: torch.Tensor):
    scale = (w.abs().amax(1) / 127).clamp_min(1e-8).double()
    qw = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(qw, None)


def _int8_wo(w: torch.Tensor):
    scale = (w.abs().amax(1) / 127).clamp_min(1e-8)
    return torch.round(w / scale[:, None]).to(torch.int8), scale.bfloat16()


def act_dtype(name: str) -> torch.dtype:
    return torch.float32 if name in ("fp32", "int8_dyn") else torch.bfloat16


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--ms", default="1,8,32,128")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import warnings
    warnings.filterwarnings("ignore", message=".*quantize_per_channel.*|.*deprecated.*")
    gguf = GGUFFile(default_model_path())
    blocks = layer_blocks(gguf)
    emb = gguf.tensors["token_embd.weight"]
    head_blocks = quant.blocks_view(gguf.raw(emb.name), emb.shape[0], quant.Q8_0_BLOCK_NBYTES)
    head32 = quant.q8_0_dequantize(head_blocks)
    ms = [int(m) for m in args.ms.split(",")]
    print(f"threads={args.threads}; ms per call (median of {args.reps}); layer = qkv+o+gate_up+down, "
          f"step = 30 layers + LM head")
    per_kernel = {}
    errors = {}
    for fused, b in blocks.items():
        w32 = quant.q4_1_dequantize(b)
        for name, prepare in preparers(w32, b).items():
            run = RUN[name]
            states = [prepare() for _ in range(COPIES)]
            for m in ms:
                x = torch.randn(m, w32.shape[1]).to(act_dtype(name))
                it = iter(range(10 ** 9))
                t = median_ms(lambda: run(states[next(it) % COPIES], x), args.reps * 4)
                per_kernel.setdefault(name, {}).setdefault(m, {})[fused] = t
            x = torch.randn(8, w32.shape[1])
            ref = F.linear(x, w32)
            y = run(states[0], x.to(act_dtype(name))).float()
            errors.setdefault(name, []).append(((y - ref).norm() / ref.norm()).item())
    head_ms = {}
    for name, prepare in preparers(head32, None).items():
        run, state = RUN[name], prepare()
        head_ms[name] = {m: median_ms(lambda: run(state, torch.randn(m, 576).to(act_dtype(name))), args.reps)
                         for m in ms}
    header = (f"{'kernel':<12} {'M':>4} " + " ".join(f"{s:>8}" for s in SHAPES)
              + f" {'layer':>8} {'lm_head':>8} {'step':>8}")
    print(header)
    for name, by_m in per_kernel.items():
        for m, by_shape in by_m.items():
            layer = sum(by_shape.values())
            head = head_ms.get(name, {}).get(m, float("nan"))
            print(f"{name:<12} {m:>4} " + " ".join(f"{by_shape[s]:8.3f}" for s in SHAPES)
                  + f" {layer:8.3f} {head:8.3f} {30 * layer + head:8.2f}")
    print("relative error vs fp32 (layer-0 matrices, 8 random rows): "
          + ", ".join(f"{k} {statistics.mean(v):.2e}" for k, v in errors.items()))


if __name__ == "__main__":
    main()
