"""A model's recommended sampling defaults, applied to requests that leave those fields unset.

`--generation-config` chooses where they come from, as vLLM's flag of that name does:
  - "auto": an HF directory's `generation_config.json`; for a GGUF (which carries none) the
    defaults documented for its model family below, keyed by `general.basename`; else none;
  - "none": no model defaults (the OpenAI defaults: temperature 1, top_p 1);
  - a path: that `generation_config.json` (or the directory holding one).
`--override-generation-config '{"temperature": 0.5}'` then sets fields over whichever was chosen.
Only the sampling fields below are taken; a request's own values always win.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from rtserve.model.gguf import GGUFFile

# Documented per-family recommendations for GGUF files (`general.basename`, lower case):
#   smollm2: the SmolLM2 Instruct model card's recommended temperature 0.2, top_p 0.9;
#   gemma-3: Gemma 3's generation_config.json (top_k 64, top_p 0.95, temperature 1).
FAMILY_DEFAULTS: dict[str, dict[str, float]] = {
    "smollm2": {"temperature": 0.2, "top_p": 0.9},
    "gemma-3": {"temperature": 1.0, "top_k": 64, "top_p": 0.95},
}


@dataclass(frozen=True)
class SamplingDefaults:
    """Values for unset request fields; None leaves the API's own default (OpenAI's)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    source: str = "none"  # where they came from, as /v1/models shows it

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "source" or value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"generation config {f.name} must be a finite number, got {value!r}")
        if self.top_k is not None:
            if self.top_k != int(self.top_k):
                raise ValueError(f"generation config top_k must be an integer, got {self.top_k!r}")
            object.__setattr__(self, "top_k", int(self.top_k))  # JSON may spell it 64.0

    def as_dict(self) -> dict[str, Any]:
        """The fields that are set, plus `source`."""
        return {k: v for k, v in asdict(self).items() if v is not None}


SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingDefaults) if f.name != "source")


def resolve_sampling_defaults(choice: str, model_path: str,
                              override: dict[str, Any] | None = None) -> SamplingDefaults:
    """The defaults `choice` ("auto", "none" or a path) gives for the model at `model_path`, with
    `override` over them. ValueError (one line) for an unreadable file or a bad value."""
    if choice == "none":
        defaults = SamplingDefaults()
    elif choice == "auto":
        defaults = _auto(model_path)
    else:
        path = os.path.join(choice, "generation_config.json") if os.path.isdir(choice) else choice
        if not os.path.isfile(path):
            raise ValueError(f"--generation-config {choice}: no such file (give auto, none, or a "
                             "generation_config.json path)")
        defaults = _from_json(path, f"file {path}")
    if override:
        unknown = sorted(set(override) - set(SAMPLING_FIELDS))
        if unknown:
            raise ValueError(f"--override-generation-config: unknown field(s) {unknown}; "
                             f"known: {', '.join(SAMPLING_FIELDS)}")
        defaults = replace(defaults, **override, source=f"{defaults.source} + override")
    return defaults


def _auto(model_path: str) -> SamplingDefaults:
    if os.path.isdir(model_path):
        path = os.path.join(model_path, "generation_config.json")
        return _from_json(path, f"file {path}") if os.path.isfile(path) else SamplingDefaults()
    try:
        basename = str(GGUFFile(model_path).metadata.get("general.basename", "")).lower()
    except (OSError, ValueError):
        return SamplingDefaults()  # the loader reports an unreadable model itself
    family = FAMILY_DEFAULTS.get(basename)
    if family is None:
        return SamplingDefaults()
    return SamplingDefaults(**family, source=f"documented defaults for {basename}")


def _from_json(path: str, source: str) -> SamplingDefaults:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable generation config ({exc})") from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a generation config must be a JSON object")
    values = {k: cfg[k] for k in SAMPLING_FIELDS if cfg.get(k) is not None}
    return SamplingDefaults(**values, source=source)
