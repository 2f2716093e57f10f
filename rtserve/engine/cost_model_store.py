"""Where a calibrated step-time model waits between starts: one JSON file per model, backend, thread
count and CPU.

A step's time depends on all four, so the file is named by a digest of them (`calibration_key`) and
repeats them inside; a file whose fields differ, or that does not parse, is ignored with a warning
and rewritten by the next calibration. Writes go to a temporary file renamed over the old one, so a
reader never sees half a file. JSON only: the file is data, never code to run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from dataclasses import dataclass, field

from rtserve.engine.cost_model import StepCostModel

logger = logging.getLogger("rtserve.engine")

STORE_FORMAT_VERSION = 1  # bump when the file's fields or the cost model's features change
# /proc/cpuinfo fields that name the CPU and its instruction sets: x86 (model name, flags) and
# aarch64 (implementer, part, variant, architecture, Features).
_CPU_FIELDS = ("vendor_id", "model name", "flags", "CPU implementer", "CPU architecture", "CPU variant",
               "CPU part", "Features")


def cpu_identity(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The machine and its first processor's identifying /proc/cpuinfo fields, one `name: value` a line;
    the machine and `platform.processor()` alone where the file is missing or unreadable."""
    lines = [f"machine: {platform.machine()}"]
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            first = f.read().split("\n\n", 1)[0]
    except OSError:
        return "\n".join(lines + [f"processor: {platform.processor()}"])
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {k.strip(): " ".join(v.split()) for k, v in fields.items()}
    lines += [f"{name}: {fields[name]}" for name in _CPU_FIELDS if name in fields]
    return "\n".join(lines)


def calibration_key(fields: dict[str, str | int]) -> str:
    """A hex digest naming one (model, backend, threads, CPU) combination."""
    text = json.dumps({"version": STORE_FORMAT_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class CostModelStore:
    """One calibration file: `fields` name what it was measured on (`model`, `backend`, `num_threads`,
    `cpu`) and must match for it to load."""

    directory: str
    fields: dict
    # (num_samples, trusted_prefill_tokens) of the model when last loaded or saved here
    _last: tuple[int, int] | None = field(default=None, init=False, repr=False)

    @property
    def path(self) -> str:
        return os.path.join(self.directory, calibration_key(self.fields) + ".json")

    def load(self, model: StepCostModel) -> bool:
        """Restore the stored model into `model` (modifies it); False, changing nothing, when there
        is no file or it is unusable (a warning says why)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as exc:
            logger.warning("ignoring the cost model cache %s: %s", self.path, exc)
            return False
        if not isinstance(data, dict) or data.get("version") != STORE_FORMAT_VERSION or data.get("key") != self.fields:
            logger.warning("ignoring the cost model cache %s: it was measured on something else", self.path)
            return False
        try:
            model.load_json(data.get("model") or {})
        except (ValueError, AttributeError) as exc:
            logger.warning("ignoring the cost model cache %s: %s", self.path, exc)
            return False
        self._last = (model.num_samples, model.trusted_prefill_tokens)
        return True

    def save(self, model: StepCostModel) -> None:
        """Write the model atomically (a temporary file renamed over the old one); a failure is a warning."""
        data = {"version": STORE_FORMAT_VERSION, "key": self.fields, "model": model.to_json()}
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".cost-model-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f)
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            logger.warning("could not write the cost model cache %s: %s", self.path, exc)
            return
        self._last = (model.num_samples, model.trusted_prefill_tokens)

    def save_if_newer(self, model: StepCostModel) -> bool:
        """Save `model` if it is calibrated, measured steps since it was last loaded or saved here,
        and still covers the prefill sizes it did then: a window of decode steps alone would have
        the next start plan small prefill steps again. Returns whether it saved."""
        if not model.is_calibrated or (self._last is not None and (
                model.num_samples <= self._last[0] or model.trusted_prefill_tokens < self._last[1])):
            return False
        self.save(model)
        return True
