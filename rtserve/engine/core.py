"""EngineCore: the step loop's body. `step()` is schedule -> execute -> update.

Adding, aborting and stats live beside the step, not in it. A fault inside a step fails the
requests of that step (loudly, with the error text) and the engine keeps serving the others.
"""
from __future__ import annotations

import json
import logging
import os
import time

import torch

from rtserve.config import EngineConfig, ModelConfig
from rtserve.engine import backend
from rtserve.engine.cost_model import StepCostModel
from rtserve.engine.request_drafts import hold_until_compiled, propose_request_drafts
from rtserve.engine.queue_snapshot import build_queue_snapshot
from rtserve.engine.request import Request
from rtserve.engine.rt_policy import make_policy, resolve_rt
from rtserve.engine.scheduler import Scheduler
from rtserve.engine.spec_step import observe_acceptance, propose_drafts
from rtserve.engine.thread_governor import ThreadGovernor
from rtserve.engine.validation import validate_request
from rtserve.kv.manager import KVCacheManager
from rtserve.protocol import (EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest, EngineStats,
                              FinishReason, QueueSnapshot, RTClass)
from rtserve.runner.model_runner import ModelRunner, kv_bytes_per_block, kv_cache_dtype
from rtserve.spec.proposer import Proposer
from rtserve.spec.speculator import build_speculator
from rtserve.structured.compiler import GrammarService
from rtserve.structured.matcher import RequestGrammar
from rtserve.structured.vocab import tokenizer_info_for_model

logger = logging.getLogger("rtserve.engine")


class EngineCore:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, weights: dict,
                 proposer: Proposer | None = None) -> None:
        self.config = config
        self.model_config = model_config
        self.max_model_len = min(model_config.max_position, config.scheduler.max_model_len)
        cache = config.cache
        num_blocks = cache.num_blocks or max(
            cache.kv_cache_bytes // kv_bytes_per_block(model_config, cache.block_size,
                                                       kv_cache_dtype(weights, config.dtype)), 1)
        if num_blocks * cache.block_size < self.max_model_len:
            logger.warning("KV cache holds %d tokens, less than the context length %d",
                           num_blocks * cache.block_size, self.max_model_len)
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        rt = config.rt
        self.cost_model = StepCostModel(rt.cost_prior_s, rt.cost_window, rt.cost_min_samples)
        # "warmup" or "cache" once start-up calibrated the model, and where it keeps it between
        # starts (rtserve/engine/startup.py); a core built directly starts from the prior.
        self.cost_model_source = "prior"
        self.cost_model_store = None
        self.policy = make_policy(rt, self.cost_model)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len, self.policy)
        self.runner = ModelRunner(model_config, cache, num_blocks, weights, config.device, config.dtype)
        self.speculator = build_speculator(config.speculative, cache.block_size, config.device,
                                           config.weights_cache_dir, proposer, model_config.vocab_size)
        # Structured outputs: grammars compile on worker threads, against the model's own vocabulary
        # (read from the model files on the first constrained request).
        self.grammars = GrammarService(lambda: tokenizer_info_for_model(
            config.model or _default_model_path(), model_config.vocab_size, model_config.eos_token_ids))
        # Predicted outputs and grammar-forced tokens verified as drafts (rtserve/engine/request_drafts.py).
        self.request_drafts = True
        self.thread_governor = None
        if config.adaptive_threads and self.runner.device.type == "cpu":
            self.thread_governor = ThreadGovernor(torch.get_num_threads(), torch.set_num_threads)
        self._last_step_s = 0.0
        self._last_num_tokens = 0
        self.num_requests_added = 0  # every request received, accepted or not (see QueueSnapshot)
        # RTSERVE_STEP_LOG=path: one JSON line per step (features, predicted and measured time, threads),
        # to see where a deployment's step-time tail comes from.
        step_log = os.environ.get("RTSERVE_STEP_LOG")
        self._step_log = open(step_log, "a", buffering=1) if step_log else None

    @classmethod
    def from_config(cls, config: EngineConfig) -> "EngineCore":
        from rtserve.model.loader import default_model_path, load_model
        from rtserve.model.quantized_loader import load_fast_checkpoint
        config = backend.resolve(config)
        path = config.model or default_model_path()
        if config.quantization == "auto" and config.device == "cpu":
            fast = load_fast_checkpoint(path, config.weights_cache_dir)
            if fast is not None:
                return cls(config, fast.config, fast)
        backend.check_loaded(config, False, path)
        loaded = load_model(path, config.weights_cache_dir)
        return cls(config, loaded.config, loaded.weights)

    def add_request(self, req: EngineCoreRequest) -> None:
        """Validate and queue; raises ValueError (InvalidRequest) naming the parameter."""
        self.num_requests_added += 1
        rt = resolve_rt(req.rt, self.config.rt)
        validate_request(req.prompt_token_ids, req.sampling_params, max_model_len=self.max_model_len,
                         vocab_size=self.model_config.vocab_size, limits=self.config.limits)
        if len(req.prompt_token_ids) > self.kv.pool.num_blocks * self.kv.block_size:
            raise ValueError("prompt does not fit in the KV cache")
        request = Request(
            request_id=req.request_id, prompt_token_ids=list(req.prompt_token_ids),
            sampling_params=req.sampling_params, arrival_time=req.arrival_time,
            eos_token_ids=tuple(req.eos_token_ids or self.model_config.eos_token_ids), rt=rt,
            deadline_margin_s=self.config.rt.firm_delivery_margin_s if rt.rt_class == RTClass.FIRM else 0.0)
        if req.sampling_params.structured is not None:  # the compile starts now, beside the queue and prefill
            request.grammar = RequestGrammar(self.grammars.submit(req.sampling_params.structured),
                                             request.eos_token_ids)
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        return self._forget_finished(self.scheduler.finish_requests(request_ids, FinishReason.ABORT))

    def expire_requests(self) -> list[EngineCoreOutput]:
        """Drop requests whose deadline passed (deadline policy, firm class); frees their blocks."""
        return self._forget_finished(self.scheduler.expire())

    def pause_requests(self, request_ids: list[str], paused: bool) -> None:
        self.scheduler.set_paused(request_ids, paused)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> EngineCoreOutputs:
        start = time.monotonic()
        failed = self._fail_broken_grammars()
        hold_until_compiled(self.scheduler)
        if self.speculator is not None:
            propose_drafts(self.speculator, self.scheduler, self.cost_model, self.max_model_len)
        elif self.request_drafts:
            propose_request_drafts(self.scheduler, self.cost_model, self.max_model_len)
        sched = self.scheduler.schedule()
        if sched.is_empty:
            self._last_num_tokens = 0
            return EngineCoreOutputs(failed, time.monotonic(), self.stats())
        try:
            result = self.runner.execute(sched)
        except Exception as exc:  # noqa: BLE001 - a step fault fails its requests, not the engine
            logger.exception("engine step failed; failing %d requests", len(sched.seqs))
            outputs = self.scheduler.finish_requests(
                [s.request.request_id for s in sched.seqs], FinishReason.ERROR, f"engine step failed: {exc!r}")
        else:
            outputs = self.scheduler.update(sched, result)
            if self.speculator is not None:
                observe_acceptance(self.speculator, sched, result)
        outputs = failed + self._forget_finished(outputs)
        now = time.monotonic()
        self._last_step_s, self._last_num_tokens = now - start, sched.num_scheduled_tokens
        features = sched.step_features
        if self._step_log is not None:
            self._log_step(start, now, features)
        self.cost_model.observe(features, now - start)
        if self.speculator is not None:
            self.speculator.observe_step(features.num_decodes, features.num_prefill_tokens, now - start)
        if self.thread_governor is not None:
            threads = self.thread_governor.tick()
            if threads is not None:  # the cost model predicts at the new count from its next step
                self.cost_model.set_threads(threads, self.thread_governor.max_threads)
        return EngineCoreOutputs(outputs, now, self.stats())

    def close(self) -> None:
        """Clean shutdown: keep the cost model for the next start, where start-up gave it a store."""
        self.grammars.close()
        if self.cost_model_store is not None:
            self.cost_model_store.save_if_newer(self.cost_model)

    def _log_step(self, start: float, end: float, features) -> None:
        self._step_log.write(json.dumps({
            "t": round(start, 4), "measured_ms": round((end - start) * 1e3, 2),
            "predicted_ms": round(self.cost_model.predict_s(features) * 1e3, 2),
            "decodes": features.num_decodes, "prefill_tokens": features.num_prefill_tokens,
            "context_tokens": features.num_context_tokens, "prefill_pairs": features.num_prefill_pairs,
            "prefill_seqs": features.num_prefill_seqs, "threads": torch.get_num_threads(),
            "overrun_ratio": round(self.cost_model.overrun_ratio, 3),
            "calibrated": self.cost_model.is_calibrated}) + "\n")

    def _fail_broken_grammars(self) -> list[EngineCoreOutput]:
        """Finish requests whose grammar failed to compile (the API checks grammars first: this is rare)."""
        broken = {r.request_id: r.grammar.error for r in [*self.scheduler.running, *self.scheduler.waiting]
                  if r.grammar is not None and r.grammar.error is not None}
        if not broken:
            return []
        outputs = []
        for request_id, error in broken.items():
            outputs += self.scheduler.finish_requests([request_id], FinishReason.ERROR, f"grammar: {error}")
        return self._forget_finished(outputs)

    def _forget_finished(self, outputs: list[EngineCoreOutput]) -> list[EngineCoreOutput]:
        """Release what the speculator keeps for finished requests (a draft model's KV, estimates)."""
        if self.speculator is not None:
            for out in outputs:
                if out.finish_reason is not None:
                    self.speculator.free(out.request_id)
        return outputs

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_usage=self.kv.usage, num_free_blocks=self.kv.num_free_blocks,
            num_total_blocks=self.kv.pool.num_blocks, prefix_cache_queries=self.kv.prefix_cache_queries,
            prefix_cache_hits=self.kv.prefix_cache_hits, num_preemptions=self.scheduler.num_preemptions,
            step_time_s=self._last_step_s, num_scheduled_tokens=self._last_num_tokens,
            queue=self.queue_snapshot(), cost_model_source=self.cost_model_source,
            spec_decode=None if self.speculator is None else self.speculator.stats())

    def queue_snapshot(self) -> QueueSnapshot:
        """What admission control in the engine client needs to predict a new request's TTFT."""
        return build_queue_snapshot(self.scheduler, self.cost_model, self.num_requests_added,
                                    self.max_model_len, time.monotonic())


def _default_model_path() -> str:
    from rtserve.model.loader import default_model_path
    return default_model_path()
