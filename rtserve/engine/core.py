"""EngineCore: the step loop's body. `step()` is schedule -> execute -> update.

Adding, aborting and stats live beside the step, not in it. A fault inside a step fails the
requests of that step (loudly, with the error text) and the engine keeps serving the others.
"""
from __future__ import annotations

import logging
import time

from rtserve.config import EngineConfig, ModelConfig
from rtserve.engine.request import Request
from rtserve.engine.scheduler import Scheduler
from rtserve.engine.validation import validate_request
from rtserve.kv.manager import KVCacheManager
from rtserve.protocol import (EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest, EngineStats,
                              FinishReason)
from rtserve.runner.model_runner import ModelRunner, kv_bytes_per_block

logger = logging.getLogger("rtserve.engine")


class EngineCore:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, weights: dict) -> None:
        self.config = config
        self.model_config = model_config
        self.max_model_len = min(model_config.max_position, config.scheduler.max_model_len)
        cache = config.cache
        num_blocks = cache.num_blocks or max(
            cache.kv_cache_bytes // kv_bytes_per_block(model_config, cache.block_size, config.dtype), 1)
        if num_blocks * cache.block_size < self.max_model_len:
            logger.warning("KV cache holds %d tokens, less than the context length %d",
                           num_blocks * cache.block_size, self.max_model_len)
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len)
        self.runner = ModelRunner(model_config, cache, num_blocks, weights, config.device, config.dtype)
        self._last_step_s = 0.0
        self._last_num_tokens = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> "EngineCore":
        from rtserve.model.loader import default_model_path, load_model
        loaded = load_model(config.model or default_model_path(), config.weights_cache_dir)
        return cls(config, loaded.config, loaded.weights)

    def add_request(self, req: EngineCoreRequest) -> None:
        """Validate and queue; raises ValueError (InvalidRequest) naming the parameter."""
        validate_request(req.prompt_token_ids, req.sampling_params, max_model_len=self.max_model_len,
                         vocab_size=self.model_config.vocab_size, limits=self.config.limits)
        if len(req.prompt_token_ids) > self.kv.pool.num_blocks * self.kv.block_size:
            raise ValueError("prompt does not fit in the KV cache")
        self.scheduler.add_request(Request(
            request_id=req.request_id, prompt_token_ids=list(req.prompt_token_ids),
            sampling_params=req.sampling_params, arrival_time=req.arrival_time,
            eos_token_ids=tuple(req.eos_token_ids or self.model_config.eos_token_ids)))

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        return self.scheduler.finish_requests(request_ids, FinishReason.ABORT)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> EngineCoreOutputs:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return EngineCoreOutputs([], time.monotonic(), self.stats())
        start = time.monotonic()
        try:
            result = self.runner.execute(sched)
        except Exception as exc:  # noqa: BLE001 - a step fault fails its requests, not the engine
            logger.exception("engine step failed; failing %d requests", len(sched.seqs))
            outputs = self.scheduler.finish_requests(
                [s.request.request_id for s in sched.seqs], FinishReason.ERROR, f"engine step failed: {exc!r}")
        else:
            outputs = self.scheduler.update(sched, result)
        now = time.monotonic()
        self._last_step_s, self._last_num_tokens = now - start, sched.num_scheduled_tokens
        return EngineCoreOutputs(outputs, now, self.stats())

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_usage=self.kv.usage, num_free_blocks=self.kv.num_free_blocks,
            num_total_blocks=self.kv.pool.num_blocks, prefix_cache_queries=self.kv.prefix_cache_queries,
            prefix_cache_hits=self.kv.prefix_cache_hits, num_preemptions=self.scheduler.num_preemptions,
            step_time_s=self._last_step_s, num_scheduled_tokens=self._last_num_tokens)
