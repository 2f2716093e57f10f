"""Native CPU kernels: `torch.ops.rtserve.*`, compiled from the C++ sources beside this file.

The shared library is built on first use (or ahead of time by `python -m rtserve.kernels`, which the
Makefile runs) with the system C++ compiler against the installed torch's headers, and cached under
`~/.cache/rtserve/kernels/`, keyed by the source, torch version, compiler and CPU flags. Builds are
serialized across processes with a file lock and published by atomic rename.

If the build or load fails (no compiler, an unusual platform) or `RTSERVE_NATIVE_KERNELS=0`, the same
op names are registered with the pure-PyTorch implementations in `REFERENCE_OPS`: identical contract,
slower (and the oracle the kernel tests compare against). Callers (including TorchScript) always just call `torch.ops.rtserve.*`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading

import torch
import torch.nn.functional as F

try:
    import fcntl  # POSIX: builds serialized across processes
except ImportError:  # not POSIX (Windows): no lock; a build is still published by atomic rename
    fcntl = None

from rtserve.config import default_cache_dir

logger = logging.getLogger(__name__)

_SOURCES = ("paged_attention.cpp", "fused_ops.cpp", "sampling_ops.cpp", "int4_gemm.cpp", "int4_panel.cpp")
_HEADERS = ("vec.h",)
_SCHEMAS = {  # must match the TORCH_LIBRARY_FRAGMENT definitions in the sources
    "paged_decode_attention": "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, "
                              "Tensor block_table, Tensor seq_lens, int block_size, float scale) -> Tensor",
    "add_rms_norm": "add_rms_norm(Tensor(a!) x, Tensor? residual, Tensor weight) -> Tensor",
    "rope_kv_write": "rope_kv_write(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
                     "Tensor slots, int num_heads, int num_kv_heads) -> Tensor",
    "silu_mul": "silu_mul(Tensor gate_up) -> Tensor",
    "argmax_rows": "argmax_rows(Tensor logits) -> Tensor",
    "int4_linear": "int4_linear(Tensor x, Tensor qw, Tensor dm) -> Tensor",
    "amx_available": "amx_available() -> bool",
    "int4_panel_linear": "int4_panel_linear(Tensor x, Tensor qw, Tensor dm) -> Tensor",
    "int4_panel_simd": "int4_panel_simd() -> bool",
}
_lock = threading.Lock()
_state: dict[str, object] = {}  # "native": bool once loaded; "fallback_lib": the Python registration


def reference_paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                                     scale: float) -> torch.Tensor:
    """The op in plain PyTorch: gather each sequence's blocks, mask the padding, SDPA.

    q [D, H, hd]; k_cache, v_cache [num_slots, KVH, hd]; block_table [D, B] int64; seq_lens [D]
    int64 (context lengths, the new token included). Returns [D, H, hd] in q's dtype.
    """
    num_seqs, num_kv_heads, head_dim = q.shape[0], k_cache.shape[1], k_cache.shape[2]
    width = block_table.shape[1] * block_size
    blocks = block_table.reshape(-1)
    kd = k_cache.view(-1, block_size, num_kv_heads, head_dim).index_select(0, blocks).view(
        num_seqs, width, num_kv_heads, head_dim).transpose(1, 2)                 # [D, KVH, W, hd]
    vd = v_cache.view(-1, block_size, num_kv_heads, head_dim).index_select(0, blocks).view(
        num_seqs, width, num_kv_heads, head_dim).transpose(1, 2)
    mask = (torch.arange(width, device=q.device)[None, :] < seq_lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), kd, vd, attn_mask=mask, scale=scale,
                                         enable_gqa=True)                        # [D, H, 1, hd]
    return out.squeeze(2)


def reference_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """x [T, H] fp32 += residual (bf16, in place, when given); returns bf16 x * weight / ||x|| (the
    fast path's RMSNorm: weight pre-scaled by sqrt(H), no eps)."""
    if residual is not None:
        x.add_(residual)
    return (x * (weight / torch.linalg.vector_norm(x, dim=-1, keepdim=True))).to(torch.bfloat16)


def reference_rope_kv_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, slots: torch.Tensor, num_heads: int,
                            num_kv_heads: int) -> torch.Tensor:
    """Rotate-half RoPE on q and k of qkv [T, (H + 2 KVH) hd] bf16 with cos, sin [T, hd] bf16 (sin
    signed: rotate_half(x) * sin == swap_halves(x) * signed_sin); writes k and v to cache slots
    [T]; returns q [T, H, hd] bf16."""
    num_tokens, head_dim = qkv.shape[0], k_cache.shape[2]
    qk_width = (num_heads + num_kv_heads) * head_dim
    qk = qkv[:, :qk_width].float().view(num_tokens, num_heads + num_kv_heads, 2, head_dim // 2)
    c = cos.float().view(num_tokens, 1, 2, head_dim // 2)
    s = sin.float().view(num_tokens, 1, 2, head_dim // 2)
    qk = (qk * c + qk.flip(2) * s).view(num_tokens, -1, head_dim).to(torch.bfloat16)
    k_cache.index_copy_(0, slots, qk[:, num_heads:])
    v_cache.index_copy_(0, slots, qkv[:, qk_width:].reshape(num_tokens, num_kv_heads, head_dim))
    return qk[:, :num_heads].contiguous()


def reference_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2 I] bf16 -> silu(gate) * up [T, I] bf16, computed in fp32."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(torch.bfloat16)


def reference_argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] fp32 -> [B] int64, ties to the lowest index."""
    return logits.argmax(dim=-1)


def unpack_q4_amx(qw: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
    """The inverse of `rtserve.model.quant.pack_q4_amx` (the AMX kernel's weight layout, groups of
    32 along K): [N, K] fp32 weights d * q + m."""
    col_blocks, g = qw.shape[0], qw.shape[1]
    q = torch.stack([qw & 0x0F, qw >> 4], dim=3).float()                      # [N/16, G, r, half, i]
    w = q * dm[:, :, None, :32].view(col_blocks, g, 1, 2, 16) + dm[:, :, None, 32:].view(col_blocks, g, 1, 2, 16)
    w = w.view(col_blocks, g, 16, 2, 8, 2)                                    # [N/16, G, r, half, c, e]
    return w.permute(0, 3, 4, 1, 2, 5).reshape(col_blocks * 16, g * 32)


def reference_int4_linear(x: torch.Tensor, qw: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 @ W^T -> [M, N] bf16, W unpacked from the AMX layout (`quant.pack_q4_amx`)."""
    weight = unpack_q4_amx(qw, dm).to(torch.bfloat16)  # [N, K], the exact bf16 dequantization
    return (x.float() @ weight.float().t()).to(torch.bfloat16)


def unpack_q4_panel(qw: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
    """The inverse of `rtserve.model.quant.pack_q4_panel` (the int4 panel kernel's weight layout):
    [N, K] fp32 weights d * q + m."""
    panels, g = qw.shape[0], qw.shape[1]
    q = torch.cat([qw & 0x0F, qw >> 4], dim=-1).float()                       # [N/16, G, 32, 16]
    w = q * dm[:, :, None, :16] + dm[:, :, None, 16:]                          # [N/16, G, 32 (k), 16 (c)]
    return w.permute(0, 3, 1, 2).reshape(panels * 16, g * 32)


def reference_int4_panel_linear(x: torch.Tensor, qw: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 or fp32 @ W^T -> [M, N] bf16 in fp32, W unpacked from the panel layout."""
    return (x.float() @ unpack_q4_panel(qw, dm).t()).to(torch.bfloat16)


def reference_int4_panel_simd() -> bool:
    return False  # without the native build the panel op is this slow reference: callers use others


def cpu_has_amx() -> bool:
    """Whether this CPU (and OS) runs AMX tiles, as torch probes it (CPUID, not /proc/cpuinfo): the AMX
    weight layout is built only then, since only then can the AMX kernel run."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def reference_amx_available() -> bool:
    return False  # without the native build there is no AMX kernel; callers use other matmuls


REFERENCE_OPS = {"paged_decode_attention": reference_paged_decode_attention, "add_rms_norm": reference_add_rms_norm,
                 "rope_kv_write": reference_rope_kv_write, "silu_mul": reference_silu_mul,
                 "argmax_rows": reference_argmax_rows, "int4_linear": reference_int4_linear,
                 "amx_available": reference_amx_available, "int4_panel_linear": reference_int4_panel_linear,
                 "int4_panel_simd": reference_int4_panel_simd}


def registered() -> bool:
    """Whether `torch.ops.rtserve.*` exist in this process (native or fallback); never builds."""
    return "native" in _state


def native_available() -> bool:
    """Load (building if needed) the native kernels; False means the PyTorch fallbacks are in use."""
    with _lock:
        if "native" not in _state:
            _state["native"] = _load_native()
            if not _state["native"]:
                _register_fallbacks()
        return bool(_state["native"])


def _load_native() -> bool:
    if os.environ.get("RTSERVE_NATIVE_KERNELS", "1") == "0":
        logger.info("native kernels disabled by RTSERVE_NATIVE_KERNELS=0; using PyTorch fallbacks")
        return False
    try:
        torch.ops.load_library(build())
        return True
    except Exception as e:  # noqa: BLE001 - any build/load problem falls back to the PyTorch ops
        logger.warning("native CPU kernels unavailable (%s); using slower PyTorch fallbacks", e)
        return False


def _register_fallbacks() -> None:
    lib = torch.library.Library("rtserve", "DEF")
    for name, schema in _SCHEMAS.items():
        lib.define(schema)
        lib.impl(name, REFERENCE_OPS[name], "CPU" if "Tensor" in schema else "CompositeExplicitAutograd")
    _state["fallback_lib"] = lib  # the registration lives as long as this object


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX)")
    return cxx


def _cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> str:
    """What identifies the CPU a `-march=native` build is for, in the kernel cache key: the machine,
    torch's own ISA check, and the first processor's feature lines (x86 `flags`; aarch64 `Features`,
    `CPU implementer`, `CPU part`, whose lines carry no `flags`), so one CPU never loads another's
    build from a shared cache."""
    parts = [platform.machine(), sys.platform, torch.backends.cpu.get_cpu_capability()]
    keys = ("flags", "Features", "CPU implementer", "CPU architecture", "CPU variant", "CPU part", "model name")
    try:
        with open(cpuinfo) as f:
            seen = set()
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in keys and key not in seen:
                    seen.add(key)
                    parts.append(line.strip())
    except OSError:
        pass
    return "\n".join(parts)


def _run_all(commands: list[list[str]]) -> None:
    """Run the commands concurrently; raise with the first failure's stderr."""
    for cmd in commands:
        logger.info("building native kernels: %s", " ".join(cmd))
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for cmd in commands]
    errors = [p.communicate()[1] for p in procs]
    for proc, err in zip(procs, errors):
        if proc.returncode != 0:
            raise RuntimeError(f"kernel build failed: {err.strip()[-2000:]}")


def build(cache_dir: str = "", march: str = "native") -> str:
    """Path of the compiled library, building it if this source/torch/compiler/CPU has none yet.
    `march` other than "native" (e.g. "x86-64-v3", AVX2 + FMA) builds for that target instead, so
    a test can run another CPU family's code paths on this one; it is part of the cache key."""
    here = os.path.dirname(os.path.abspath(__file__))
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    cxx = _compiler()
    real_cxx = os.path.realpath(cxx)
    version = f"{real_cxx}:{os.stat(real_cxx).st_mtime_ns}"  # identifies the compiler without running it
    digest = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        with open(os.path.join(here, name), "rb") as f:
            digest.update(f.read())
    for part in (torch.__version__, torch_dir, version, _cpu_flags(), sys.version) + (() if march == "native" else (march,)):
        digest.update(part.encode())
    out_dir = os.path.join(default_cache_dir(cache_dir), "kernels")
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, f"rtserve_kernels_{digest.hexdigest()[:20]}.so")
    if os.path.isfile(target):
        return target
    with open(target + ".lock", "w") as lock_file:
        if fcntl is not None:
            fcntl.flock(lock_file, fcntl.LOCK_EX)  # one build at a time; later waiters find it built
        if os.path.isfile(target):
            return target
        torch_lib = os.path.join(torch_dir, "lib")
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
        os.close(fd)
        compile_flags = [cxx, "-O3", f"-march={march}", "-std=c++20", "-fopenmp", "-fPIC", "-w",
                         f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                         "-I", os.path.join(torch_dir, "include"),
                         "-I", os.path.join(torch_dir, "include", "torch", "csrc", "api", "include"),
                         "-I", sysconfig.get_paths()["include"]]
        try:
            with tempfile.TemporaryDirectory(dir=out_dir) as work:
                objects = [os.path.join(work, name + ".o") for name in _SOURCES]
                # One compiler per source, in parallel (each takes ~10 s: the torch headers dominate).
                _run_all([compile_flags + ["-c", os.path.join(here, name), "-o", obj]
                          for name, obj in zip(_SOURCES, objects)])
                # torch's own libgomp (same soname): one OpenMP runtime and thread pool in the process.
                _run_all([[cxx, "-shared", "-fopenmp", *objects, "-o", tmp, "-L", torch_lib, "-lc10",
                           "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]])
        except BaseException:
            os.unlink(tmp)
            raise
        os.replace(tmp, target)
        os.unlink(target + ".lock")  # waiters hold it open and find the target built
    return target
