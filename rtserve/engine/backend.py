"""Which backend runs the model: `EngineConfig.backend`, resolved once at start-up.

- `reference`: the fp32 model on the CPU (token-identical to transformers); `quantization="none"`.
- `cpu`: the quantized CPU fast path (int4/bf16 kernels chosen per step shape, the native kernels where
  they built, PyTorch ops otherwise); a model it cannot run is a start-up error, not a silent fallback.
- `cuda`: the model in bf16 on a CUDA device. Implemented through PyTorch ops, not yet verified on a GPU.
- `auto` (default): `cuda` when `--device cuda...` is given, else the fast path where the model allows
  it and the reference path otherwise (logged).

`resolve` turns the choice into the device, quantization and dtype the engine is built with, and
raises ValueError (a one-line start-up error) for a choice this machine cannot run.
"""
from __future__ import annotations

import dataclasses

import torch

from rtserve.config import EngineConfig

BACKENDS = ("auto", "reference", "cpu", "cuda")


def resolve(config: EngineConfig) -> EngineConfig:
    """`config` with its device, quantization and dtype set for its backend (see the module doc)."""
    backend, device = config.backend, config.device
    if backend == "auto" and device.startswith("cuda"):
        backend = "cuda"
    if backend == "cuda":
        if not device.startswith("cuda"):
            device = "cuda"
        _check_cuda(device)
        dtype = "bfloat16" if config.dtype == "float32" else config.dtype
        return dataclasses.replace(config, backend="cuda", device=device, quantization="none", dtype=dtype)
    if device != "cpu":
        raise ValueError(f"--device {device}: the {backend} backend runs on the CPU")
    if backend == "reference":
        return dataclasses.replace(config, quantization="none")
    if backend == "cpu":
        return dataclasses.replace(config, quantization="auto")
    return config


def probe_summary() -> str:
    """What this machine offers, for `rtserve serve --help`: the CPU ISA torch detected, CUDA or not."""
    cuda = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
    return f"This machine: CPU {torch.backends.cpu.get_cpu_capability()}, {cuda}"


def _check_cuda(device: str) -> None:
    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        raise ValueError(f"--backend cuda: no CUDA device is available (torch {torch.__version__}, {built})")
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")


def check_loaded(config: EngineConfig, is_fast_path: bool, model_path: str) -> None:
    """After loading: `--backend cpu` promised the fast path; a model it cannot run is an error."""
    if config.backend == "cpu" and not is_fast_path:
        raise ValueError(f"--backend cpu: the CPU fast path cannot run {model_path} (it runs Llama-family "
                         f"GGUF files quantized as Q4_1); use --backend reference or auto")
