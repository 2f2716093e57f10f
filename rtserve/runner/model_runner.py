"""ModelRunner: owns the model weights and KV tensors; executes one scheduled step.

It reads block ids from the scheduler output and never decides anything about blocks.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from rtserve import kernels
from rtserve.config import CacheConfig, ModelConfig
from rtserve.engine.scheduler_output import RunnerOutput, SchedulerOutput
from rtserve.model.fast_llama import FastLlamaForCausalLM
from rtserve.model.decoder import DecoderForCausalLM
from rtserve.model.quantized_loader import FastCheckpoint
from rtserve.protocol import TokenLogprob
from rtserve.runner.input_batch import ModelInputs, prepare_inputs
from rtserve.sample.logits_processors import LogitsAdjustments
from rtserve.sample.rejection import verify
from rtserve.sample.sampler import SamplingBatch, compute_logprobs, make_generator, sample
from rtserve.structured.matcher import BatchMask, apply_masks, fill_masks

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: str) -> int:
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * _DTYPES[dtype].itemsize


def kv_cache_dtype(weights, dtype: str) -> str:
    """The KV cache's dtype name: bf16 on the fast path (a `FastCheckpoint`), else the engine dtype."""
    return "bfloat16" if isinstance(weights, FastCheckpoint) else dtype


class ModelRunner:
    """`weights`: HF-named fp32 tensors (the reference `DecoderForCausalLM`, in `dtype`), or a
    `FastCheckpoint` (the quantized CPU fast path; bf16 KV cache, `dtype` is ignored)."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, num_blocks: int,
                 weights: "dict[str, torch.Tensor] | FastCheckpoint", device: str = "cpu",
                 dtype: str = "float32") -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.device = torch.device(device)
        self.is_fast_path = isinstance(weights, FastCheckpoint)
        self.dtype = torch.bfloat16 if self.is_fast_path else _DTYPES[dtype]  # activations and KV cache
        self.block_size = cache_config.block_size
        if self.is_fast_path:
            if self.device.type != "cpu":
                raise ValueError("the quantized fast path runs on the CPU only (use quantization='none')")
            self.model = FastLlamaForCausalLM(model_config, weights.tensors)
        else:
            self.model = DecoderForCausalLM(model_config)
            self.model.load_hf_weights(weights)
            self.model.to(device=self.device, dtype=self.dtype).eval()  # RoPE tables stay fp32
        # The distinct sliding windows of the model's layers: each gets its own attention metadata.
        self.windows = tuple(sorted({w for w in model_config.layer_windows if w}))
        shape = (2, num_blocks, self.block_size, model_config.num_kv_heads, model_config.head_dim)
        # One [2, num_blocks, block_size, KVH, hd] tensor per layer (0 = K, 1 = V). The fast path's
        # native kernels read only written slots, so its cache is left uninitialised (pages are
        # touched as they fill: zeroing 512 MiB cost 0.24 s of every start); every other attention
        # path masks padded slots, where uninitialised NaNs would still poison the softmax.
        alloc = torch.empty if self.is_fast_path and kernels.native_available() else torch.zeros
        self.kv_caches = [alloc(shape, dtype=self.dtype, device=self.device) for _ in range(model_config.num_layers)]
        slots = (-1, model_config.num_kv_heads, model_config.head_dim)
        # The fast path takes per-layer (K, V) views [num_slots, KVH, hd] of the same storage.
        self._kv_slots = [(c[0].view(slots), c[1].view(slots)) for c in self.kv_caches]
        self.vocab_size = model_config.vocab_size
        # Fills grammar bitmasks while the forward runs (xgrammar and torch both release the GIL).
        self._mask_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtserve-mask")

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        inputs = prepare_inputs(sched, self.block_size, self.device, self.windows)
        kv = self._kv_slots if self.is_fast_path else self.kv_caches
        masks = None
        if any(s.request.grammar is not None for s in inputs.sample_seqs):
            masks = self._mask_worker.submit(fill_masks, inputs.sample_seqs, self.vocab_size)
        logits = self.model(inputs.input_ids, inputs.positions, kv, inputs.meta,
                            inputs.logit_indices)  # [S, V] fp32
        mask = masks.result() if masks is not None else BatchMask(None, [], set())
        if not inputs.sample_seqs:
            return RunnerOutput()
        return self._sample(logits, inputs, mask)

    def _sample(self, logits: torch.Tensor, inputs: ModelInputs, mask: BatchMask) -> RunnerOutput:
        reqs = [s.request for s in inputs.sample_seqs]
        is_verify = any(s.spec_token_ids for s in inputs.sample_seqs)
        if not is_verify:  # a verify step's rows are per draft: `_verify` masks them itself
            self._mask_early_stops(logits, reqs)
        self._adjust_logits(logits, inputs.sample_seqs)
        apply_masks(logits, mask)
        failed = mask.failed
        for req in reqs:
            if req.generator is None and req.sampling_params.seed is not None:
                req.generator = make_generator(req.sampling_params.seed, self.device)
        batch = SamplingBatch.build([r.sampling_params for r in reqs], [r.generator for r in reqs], self.device)
        if is_verify:
            return _drop(self._verify(logits, inputs.sample_seqs, batch, failed), failed)
        result = sample(logits, batch)
        token_ids = result.token_ids.tolist()
        _advance_grammars([(r, [t]) for r, t in zip(reqs, token_ids) if r.request_id not in failed])
        out = RunnerOutput(sampled_token_ids={r.request_id: t for r, t in zip(reqs, token_ids)})
        if result.logprobs is not None:
            lps, lp_ids = result.logprobs.tolist(), result.logprob_token_ids.tolist()
            for i, req in enumerate(reqs):
                k = req.sampling_params.logprobs
                if k is not None:
                    out.logprobs[req.request_id] = [_token_logprob(token_ids[i], lps[i], lp_ids[i], k)]
        return _drop(out, failed)

    def _verify(self, logits: torch.Tensor, seqs, batch: SamplingBatch, failed: set[str]) -> RunnerOutput:
        """Speculative step: rows are p_0..p_k per sequence (k = 0 for plain decodes in the batch)."""
        drafts = [s.spec_token_ids for s in seqs]
        # Row j of a sequence predicts its (num_output_tokens + j)-th output token.
        self._mask_early_stops(logits, [s.request for s in seqs for _ in range(len(s.spec_token_ids) + 1)],
                               [j for s in seqs for j in range(len(s.spec_token_ids) + 1)])
        emitted = verify(logits, drafts, [s.spec_probs for s in seqs], batch)
        _advance_grammars([(s.request, ids) for s, ids in zip(seqs, emitted) if s.request.request_id not in failed])
        out = RunnerOutput()
        for seq, token_ids in zip(seqs, emitted):
            if seq.spec_token_ids:
                out.spec_token_ids[seq.request.request_id] = token_ids
            else:
                out.sampled_token_ids[seq.request.request_id] = token_ids[0]
        if batch.max_num_logprobs >= 0:
            out.logprobs = _emitted_logprobs(logits, seqs, emitted, batch.max_num_logprobs)
        return out

    def _adjust_logits(self, logits: torch.Tensor, seqs) -> None:
        """Penalties and logit bias (modifies logits). A sequence's row j predicts the token after its
        drafts[:j], so row j counts those drafts as generated (its grammar mask, likewise, is the one
        after them). A request whose grammar failed to compile (`BatchMask.failed`) emits nothing
        this step, and the engine fails it before the next."""
        rows, params, outputs, prompts = [], [], [], []
        row = 0
        for seq in seqs:
            req, drafts = seq.request, list(seq.spec_token_ids)
            p = req.sampling_params
            if p.has_penalties or p.logit_bias:
                for j in range(len(drafts) + 1):
                    rows.append(row + j)
                    params.append(p)
                    outputs.append(req.output_token_ids + drafts[:j])
                    prompts.append(req.prompt_token_ids)
            row += len(drafts) + 1
        if rows:
            LogitsAdjustments.build(rows, params, outputs, prompts, logits.shape[-1], self.device).apply(logits)

    @staticmethod
    def _mask_early_stops(logits: torch.Tensor, reqs, offsets=None) -> None:
        """Below min_tokens, EOS and stop token ids cannot be sampled (modifies logits).

        Row i predicts output token number reqs[i].num_output_tokens + offsets[i] (offsets: all 0)."""
        for i, req in enumerate(reqs):
            params = req.sampling_params
            if req.num_output_tokens + (offsets[i] if offsets else 0) < params.min_tokens:
                banned = list(params.stop_token_ids) + ([] if params.ignore_eos else list(req.eos_token_ids))
                if banned:
                    logits[i, banned] = float("-inf")


def _drop(out: RunnerOutput, request_ids: set[str]) -> RunnerOutput:
    """`out` without these requests' tokens (they emit nothing this step)."""
    for request_id in request_ids:
        out.sampled_token_ids.pop(request_id, None)
        out.spec_token_ids.pop(request_id, None)
        out.logprobs.pop(request_id, None)
    return out


def _advance_grammars(emitted: list[tuple]) -> None:
    """Feed each constrained request's emitted tokens to its grammar (masked sampling keeps them legal)."""
    for req, token_ids in emitted:
        if req.grammar is not None and not req.grammar.accept(token_ids):
            raise RuntimeError(f"request {req.request_id}: a sampled token broke its grammar")


def _emitted_logprobs(logits: torch.Tensor, seqs, emitted: list[list[int]],
                      max_k: int) -> dict[str, list[TokenLogprob]]:
    """Logprobs of every emitted token (accepted drafts, then the target's own token) from the row
    that predicted it: emitted token j of a sequence comes from its row j, as a plain decode of that
    position would have computed it (raw logits, before temperature; one batched log_softmax)."""
    rows, token_ids, owners = [], [], []
    row = 0
    for seq, ids in zip(seqs, emitted):
        if seq.request.sampling_params.logprobs is not None:
            rows.extend(range(row, row + len(ids)))
            token_ids.extend(ids)
            owners.append((seq.request, len(ids)))
        row += len(seq.spec_token_ids) + 1
    if not rows:
        return {}
    lps, lp_ids = compute_logprobs(logits[rows], torch.tensor(token_ids, device=logits.device), max_k)
    lps, lp_ids = lps.tolist(), lp_ids.tolist()
    out, i = {}, 0
    for req, n in owners:
        k = req.sampling_params.logprobs
        out[req.request_id] = [_token_logprob(token_ids[j], lps[j], lp_ids[j], k) for j in range(i, i + n)]
        i += n
    return out


def _token_logprob(token_id: int, lps: list[float], ids: list[int], k: int) -> TokenLogprob:
    """One token's logprob from a compute_logprobs row (column 0: the token, then the top ones)."""
    return TokenLogprob(token_id=token_id, logprob=lps[0], top_ids=ids[1:1 + k], top_logprobs=lps[1:1 + k])
