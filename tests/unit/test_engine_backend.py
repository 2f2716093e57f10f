"""Backend choice (rtserve/engine/backend.py): what each choice sets, and a choice the machine cannot run
refused at start-up in one line with exit code 2."""
import subprocess
import sys

import pytest
import torch

from rtserve.config import EngineConfig
from rtserve.engine import backend


def test_each_backend_sets_device_quantization_and_dtype():
    assert backend.resolve(EngineConfig(backend="reference")).quantization == "none"
    assert backend.resolve(EngineConfig(backend="cpu", quantization="none")).quantization == "auto"
    auto = EngineConfig()
    assert backend.resolve(auto) == auto  # the fast path where the model allows it, else the reference path
    with pytest.raises(ValueError, match="--device cuda: the reference backend runs on the CPU"):
        backend.resolve(EngineConfig(backend="reference", device="cuda"))


@pytest.mark.parametrize("kw", [{"device": "gpu"}, {"device": "cuda:x"}, {"backend": "tpu"}])
def test_unknown_device_or_backend_is_refused(kw):
    with pytest.raises(ValueError, match="EngineConfig"):
        EngineConfig(**kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("kw", [{"backend": "cuda"}, {"device": "cuda:0"}])
def test_cuda_without_a_device_is_a_clear_error(kw):
    with pytest.raises(ValueError, match="no CUDA device is available"):
        backend.resolve(EngineConfig(**kw))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_bf16_without_the_cpu_fast_path():
    got = backend.resolve(EngineConfig(backend="cuda"))
    assert (got.device, got.quantization, got.dtype) == ("cuda", "none", "bfloat16")


def test_the_cpu_backend_refuses_a_model_its_fast_path_cannot_run():
    backend.check_loaded(EngineConfig(backend="cpu"), True, "m.gguf")
    backend.check_loaded(EngineConfig(backend="auto"), False, "m.gguf")  # auto falls back to the reference path
    with pytest.raises(ValueError, match="--backend cpu: the CPU fast path cannot run m.gguf"):
        backend.check_loaded(EngineConfig(backend="cpu"), False, "m.gguf")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_serve_with_an_impossible_backend_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "rtserve", "serve", "--backend", "cuda", "--port", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("rtserve serve: --backend cuda: no CUDA device is available")
    assert "Traceback" not in proc.stderr
