"""Shared fixtures for real-model integration tests. Loading SmolLM2 through transformers costs
~30 s on 2 cores, so one fp32 copy serves the whole session."""
from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' fp32 SmolLM2-135M-Instruct, dequantized from the embedded GGUF (the reference)."""
    from transformers import AutoModelForCausalLM

    from rtserve.model.loader import default_model_path
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()
