"""On-disk caches of converted tensors: safetensors files carrying the ModelConfig in their metadata.

Reads never unpickle anything; writes are atomic (a temporary file in the same directory renamed over
the target), so a crash mid-write leaves either the old file or none.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rtserve.config import ModelConfig


def read_tensor_cache(cache_path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]] | None:
    """(config, tensors), or None when the file is absent, torn or stale (the caller rebuilds it)."""
    if not os.path.isfile(cache_path):
        return None
    try:
        with safe_open(cache_path, framework="pt") as f:
            fields = json.loads(f.metadata()["rtserve_config"])
            fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        return ModelConfig(**fields), tensors
    except Exception:  # noqa: BLE001 - any unreadable cache is rebuilt
        return None


def write_tensor_cache(cache_path: str, config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cache_path), suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"rtserve_config": json.dumps(asdict(config))})
        os.replace(tmp, cache_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
