"""The engine core's start-up: load the model, then calibrate the step-time cost model before ready.

`start_engine_core` is what the engine process (and the in-process server's thread) runs before it
reports ready. With `RTConfig.calibrate`, a cost model stored by an earlier start on the same model,
backend, thread count and CPU is loaded and checked with a few steps (a median measured / predicted
ratio beyond `MAX_CHECK_RATIO` either way recalibrates); otherwise the warm-up
(rtserve/engine/calibration.py) measures one, and it is stored. A core built any other way (tests,
embedding) starts from the prior, as `EngineCore` alone always does.
"""
from __future__ import annotations

import logging
import os
import time

import torch

from rtserve import kernels
from rtserve.config import EngineConfig
from rtserve.engine.calibration import median_ratio, warm_up
from rtserve.engine.core import EngineCore
from rtserve.engine.cost_model_store import CostModelStore, cpu_identity
from rtserve.model import quant
from rtserve.model.gguf import cache_key, default_cache_dir
from rtserve.sampling_params import StructuredOutputs

logger = logging.getLogger("rtserve.engine")

MAX_CHECK_RATIO = 3.0  # a stored model this far off the check's measured steps is measured again
NUM_CHECK_STEPS = 7  # the warm-up's first steps: decodes of 1 to 4 sequences, chunks of 16 to 64 tokens


def start_engine_core(config: EngineConfig) -> EngineCore:
    """Load the model and, with `config.rt.calibrate`, calibrate its cost model (see the module doc)."""
    from rtserve.model.loader import default_model_path
    path = config.model or default_model_path()
    core = EngineCore.from_config(config)
    logger.info("backend: %s threads=%d", describe_backend(core), torch.get_num_threads())
    if config.rt.calibrate:
        calibrate(core, store_for(core, path))
    if config.preload_grammar:
        preload_grammar(core)
    return core


def preload_grammar(core: EngineCore) -> None:
    """Build the grammar compiler and the vocabulary's tables now: compile one grammar and wait."""
    start = time.monotonic()
    core.grammars.submit(StructuredOutputs("json_object")).result()
    logger.info("grammar engine preloaded in %.2f s", time.monotonic() - start)


def describe_backend(core: EngineCore) -> str:
    """What runs the model, in one line: device, path, dtype, and on the CPU the ISA torch detected,
    whether the native kernels loaded and whether oneDNN's bf16 GEMM serves the prefill rows."""
    runner = core.runner
    native = kernels.registered() and kernels.native_available()  # never builds: only reads the state
    cpu = (f" cpu_isa={torch.backends.cpu.get_cpu_capability()} onednn_bf16={quant.onednn_bf16()}"
           if runner.device.type == "cpu" else "")
    return (f"{runner.device.type} {'fast' if runner.is_fast_path else 'reference'} {runner.dtype} "
            f"quantization={core.config.quantization} native_kernels={native}{cpu} torch={torch.__version__}")


def store_for(core: EngineCore, model_path: str) -> CostModelStore:
    """The calibration file of this model file, backend, torch thread count and CPU."""
    backend = describe_backend(core)
    directory = core.config.rt.calibration_cache_dir or os.path.join(
        default_cache_dir(core.config.weights_cache_dir), "calibration")
    return CostModelStore(directory, {"model": f"{os.path.abspath(model_path)} {cache_key(model_path)}",
                                      "backend": backend, "num_threads": torch.get_num_threads(),
                                      "cpu": cpu_identity()})


def calibrate(core: EngineCore, store: CostModelStore | None) -> None:
    """Load and check, or measure (and store), `core`'s cost model; sets `core.cost_model_source` and
    logs one line. A failure leaves the prior and is logged: the engine still starts."""
    start = time.monotonic()
    try:
        if store is not None and _load_and_check(core, store, start):
            return
        core.cost_model.load_json({"samples": []})  # the prior, whatever was loaded
        result = warm_up(core, core.config.rt.calibration_budget_s)
    except Exception:  # noqa: BLE001 - a start without calibration is what a fresh server always was
        logger.exception("cost model: calibration failed; starting from the prior")
        core.cost_model.load_json({"samples": []})
        return
    core.cost_model_source = "warmup"
    kept = store is not None and core.cost_model.is_calibrated  # too few steps: the next start measures again
    if kept:
        store.save(core.cost_model)
        core.cost_model_store = store
    logger.info("cost model: calibrated in %d steps in %.2f s%s", result.num_steps, time.monotonic() - start,
                f" (cached in {store.path})" if kept else "")


def _load_and_check(core: EngineCore, store: CostModelStore, start: float) -> bool:
    """Load the stored model into `core` and time a few warm-up steps against it; they join its
    window when it passes. False when there is none, or it is too far off (then it is measured again)."""
    model = core.cost_model
    if not store.load(model) or not model.is_calibrated:
        return False
    num_stored = model.num_samples
    check = warm_up(core, core.config.rt.calibration_budget_s, observe=False, max_samples=NUM_CHECK_STEPS)
    ratio = median_ratio(model, check.samples)
    if not 1.0 / MAX_CHECK_RATIO <= ratio <= MAX_CHECK_RATIO:
        logger.warning("cost model: the cached model is %.1fx off this machine's steps now; calibrating again",
                       ratio if ratio >= 1 else 1.0 / ratio)
        return False
    for features, seconds in check.samples:
        model.observe(features, seconds)
    core.cost_model_source, core.cost_model_store = "cache", store
    logger.info("cost model: calibrated from cache %s (%d steps stored; checked in %d steps, %.2f s: "
                "measured / predicted %.2f)", store.path, num_stored, check.num_steps, time.monotonic() - start, ratio)
    return True
