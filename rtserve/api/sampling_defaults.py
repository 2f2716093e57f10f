"""Sampling fields a request leaves unset: the model's recommended defaults (`ServerSettings.
sampling_defaults`, chosen by `--generation-config`, rtserve/model/generation_config.py), and where the
model recommends nothing, the OpenAI defaults. A value the request sets always wins, 0 included."""
from __future__ import annotations

from typing import Any

from rtserve.model.generation_config import SamplingDefaults

OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def with_defaults(defaults: SamplingDefaults, **given: Any) -> dict[str, Any]:
    """SamplingParams keywords for the `given` request fields (None: not set by the request)."""
    out: dict[str, Any] = {}
    for name, value in given.items():
        if value is None:
            value = getattr(defaults, name)
        out[name] = OPENAI_DEFAULTS[name] if value is None else value
    return out
