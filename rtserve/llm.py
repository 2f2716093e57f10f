"""Offline API: `LLM(...).generate(prompts, params)` and `.chat(messages, params)`.

Drives an in-process EngineCore synchronously with the same output processor as the server, so
stop strings, detokenization and finish reasons behave identically.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace

from rtserve.client.output_processor import OutputProcessor
from rtserve.client.tokenizer import Tokenizer
from rtserve.config import CacheConfig, EngineConfig, RTConfig, SchedulerConfig
from rtserve.engine.core import EngineCore
from rtserve.protocol import EngineCoreRequest, TokenLogprob
from rtserve.sampling_params import SamplingParams


@dataclass
class Completion:
    """One generated sequence."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class GenerationOutput:
    """The result for one prompt. `.text` etc. are the first sample; all n are in `.samples`."""

    prompt_token_ids: list[int]
    samples: list[Completion]
    num_cached_tokens: int = 0
    error: str | None = None

    text: str = field(init=False)
    token_ids: list[int] = field(init=False)
    finish_reason: str | None = field(init=False)

    def __post_init__(self) -> None:
        first = self.samples[0]
        self.text, self.token_ids, self.finish_reason = first.text, first.token_ids, first.finish_reason


class LLM:
    def __init__(self, model: str = "", *, dtype: str = "float32", quantization: str = "auto", backend: str = "auto",
                 kv_cache_bytes: int | None = None, num_blocks: int = 0, block_size: int = 16,
                 enable_prefix_caching: bool = True,
                 max_num_batched_tokens: int = 512, max_num_seqs: int = 64, max_model_len: int = 8192,
                 weights_cache_dir: str = "", policy: str = "fcfs",
                 config: EngineConfig | None = None) -> None:
        """Offline generation has no deadlines, so the scheduling policy defaults to FCFS (throughput)."""
        if config is None:
            cache = CacheConfig(block_size=block_size, num_blocks=num_blocks,
                                enable_prefix_caching=enable_prefix_caching)
            if kv_cache_bytes:
                cache = replace(cache, kv_cache_bytes=kv_cache_bytes)
            config = EngineConfig(model=model, dtype=dtype, quantization=quantization, backend=backend, cache=cache,
                                  weights_cache_dir=weights_cache_dir, rt=RTConfig(policy=policy),
                                  scheduler=SchedulerConfig(max_num_batched_tokens, max_num_seqs, max_model_len))
        from rtserve.client.async_llm import model_path
        path = model_path(config)
        self.config = config
        self.core = EngineCore.from_config(replace(config, model=path))
        self.tokenizer = Tokenizer.load(path, config.weights_cache_dir)
        self._ids = itertools.count()

    def generate(self, prompts, params: SamplingParams | None = None) -> list[GenerationOutput]:
        """prompts: a string, a list of strings, or a list of token-id lists. Raises ValueError on bad input."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        # A text prompt gets the BOS its tokenizer asks for (Gemma's), as the completions API gives it.
        token_lists = [self.tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p)
                       for p in prompts]
        return self._run(token_lists, params or SamplingParams())

    def chat(self, messages, params: SamplingParams | None = None) -> list[GenerationOutput]:
        """messages: one conversation (list of {"role","content"}) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.tokenizer.encode_chat(c, add_generation_prompt=True) for c in conversations],
                             params)

    def _run(self, token_lists: list[list[int]], params: SamplingParams) -> list[GenerationOutput]:
        processor = OutputProcessor(self.tokenizer)
        plan: list[list[str]] = []
        try:
            for ids in token_lists:
                rids = []
                for i in range(params.n):
                    rid = f"offline-{next(self._ids)}"
                    sample_params = params if params.n == 1 or params.seed is None else replace(params, seed=params.seed + i)
                    self.core.add_request(EngineCoreRequest(rid, ids, sample_params, time.monotonic()))
                    processor.add_request(rid, ids, sample_params)
                    rids.append(rid)
                plan.append(rids)
        except ValueError:
            self.core.abort_requests([r for rids in plan for r in rids])
            raise
        results = self._drive(processor)
        return [self._collect(ids, rids, results) for ids, rids in zip(token_lists, plan)]

    def _drive(self, processor: OutputProcessor) -> dict[str, list]:
        results: dict[str, list] = {}
        while self.core.has_unfinished:
            for out in self.core.step().outputs:
                if out.request_id in results and results[out.request_id][-1].finished:
                    continue
                delta, stopped = processor.process(out)
                results.setdefault(out.request_id, []).append(delta)
                if stopped and not out.finished:
                    self.core.abort_requests([out.request_id])
        return results

    @staticmethod
    def _collect(prompt_ids: list[int], rids: list[str], results: dict[str, list]) -> GenerationOutput:
        samples, cached, error = [], 0, None
        for rid in rids:
            deltas = results.get(rid, [])
            last = deltas[-1] if deltas else None
            lps = [lp for d in deltas for lp in (d.logprobs or [])]
            samples.append(Completion(
                text="".join(d.text for d in deltas), token_ids=[t for d in deltas for t in d.token_ids],
                finish_reason=last.finish_reason if last else None, stop_reason=last.stop_reason if last else None,
                logprobs=lps or None))
            if last:
                cached = max(cached, last.num_cached_tokens)
                error = error or last.error
        return GenerationOutput(prompt_ids, samples, cached, error)
