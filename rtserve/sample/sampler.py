"""Batched token sampling as pure tensor functions (no host syncs on the hot path).

Per row: greedy rows (temperature == 0) take argmax of the raw logits. Random rows divide by the
temperature, mask with top-k, then top-p, then min-p, softmax, and draw with the exponential race:

    argmax_i p_i / E_i,  E_i ~ Exponential(1)   ==   a draw from Categorical(p)

(P[i wins] = p_i / sum_j p_j because E_i / p_i ~ Exponential(p_i) and the minimum of independent
exponentials is i with probability proportional to its rate). Logprobs come from log_softmax of the
raw logits, before temperature and truncation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rtserve import kernels
from rtserve.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SamplingBatch:
    """Sampling parameters of one batch as device tensors, one row per sequence."""

    temperature: Tensor  # [B] f32; 0 = greedy
    top_k: Tensor  # [B] int64; <= 0 = disabled
    top_p: Tensor  # [B] f32; 1 = disabled
    min_p: Tensor  # [B] f32; 0 = disabled
    generators: list[torch.Generator | None]  # per row; None rows share the default RNG
    max_num_logprobs: int  # K for SamplerOutput; -1 = no row asked for logprobs
    all_greedy: bool
    all_random: bool
    # The no_* flags are over the random rows only: greedy rows ignore the masks.
    no_top_k: bool
    no_top_p: bool
    no_min_p: bool

    @classmethod
    def build(cls, params: list[SamplingParams], generators: list[torch.Generator | None],
              device: torch.device | str) -> SamplingBatch:
        """Pack per-request params; `generators[i]` belongs to `params[i]` (keep it across steps)."""
        if len(params) != len(generators):
            raise ValueError(f"{len(params)} params but {len(generators)} generators")
        random = [p for p in params if not p.is_greedy]
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device),
            generators=list(generators),
            max_num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=-1),
            all_greedy=not random,
            all_random=len(random) == len(params),
            no_top_k=all(p.top_k <= 0 for p in random),
            no_top_p=all(p.top_p >= 1.0 for p in random),
            no_min_p=all(p.min_p <= 0.0 for p in random),
        )


@dataclass
class SamplerOutput:
    token_ids: Tensor  # [B] int64
    logprobs: Tensor | None  # [B, 1+K] f32: column 0 = sampled token, then top-K by raw logprob
    logprob_token_ids: Tensor | None  # [B, 1+K] int64, same layout


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A per-request generator; the caller keeps it for the request's lifetime."""
    return torch.Generator(device=device).manual_seed(seed)


def sample(logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
    """logits: [B, V] f32 (not modified). Returns sampled ids and, if requested, logprobs."""
    greedy_ids = None if batch.all_random else argmax(logits)  # [B]; ties -> lowest index
    if batch.all_greedy:
        token_ids = greedy_ids
    else:
        random_ids = _sample_random(logits, batch)  # [B]
        token_ids = random_ids if greedy_ids is None else torch.where(
            batch.temperature == 0.0, greedy_ids, random_ids)
    if batch.max_num_logprobs < 0:
        return SamplerOutput(token_ids, None, None)
    logprobs, logprob_token_ids = compute_logprobs(logits, token_ids, batch.max_num_logprobs)
    return SamplerOutput(token_ids, logprobs, logprob_token_ids)


def argmax(logits: Tensor) -> Tensor:
    """logits [B, V] -> [B] int64 (ties -> lowest index): the native row argmax on the CPU when the
    fast path has registered it (torch's CPU argmax is ~10x slower than its amax), else torch's."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and kernels.registered():
        return torch.ops.rtserve.argmax_rows(logits)
    return logits.argmax(dim=-1)


def _sample_random(logits: Tensor, batch: SamplingBatch) -> Tensor:
    # Greedy rows get temperature 1 here only to keep the math finite; their result is discarded.
    temperature = torch.where(batch.temperature == 0.0, 1.0, batch.temperature)  # [B]
    logits = logits / temperature[:, None]  # [B, V]
    if not batch.no_top_k:
        logits = apply_top_k(logits, batch.top_k)
    if not batch.no_top_p:
        logits = apply_top_p(logits, batch.top_p)
    if not batch.no_min_p:
        logits = apply_min_p(logits, batch.min_p)
    probs = logits.softmax(dim=-1)  # [B, V]
    return exponential_race(probs, batch.generators)


def exponential_race(probs: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    """Draw one token per row from `probs` [B, V]: argmax(probs / E), E ~ Exponential(1).

    Rows with a generator draw their noise from it alone, so a seeded row's draws do not depend
    on which other rows share the batch or where it sits.

    E = -log U with U ~ Uniform[0, 1): torch's CPU `exponential_` costs ~1.1 ms per 49k-logit row (4.6
    ms for 4 rows, a quarter of a decode step), `uniform_` and a log about a seventh of that. A float32
    U is a multiple of 2^-24 below 1, so E >= 2^-24 (never 0: no 0/0) and E = inf when U = 0 (that
    token cannot win: a 2^-24 chance per token, far below anything a sampler test can see).
    """
    noise = torch.empty_like(probs)  # [B, V]
    if any(g is None for g in generators):
        noise.uniform_()
    for row, gen in enumerate(generators):
        if gen is not None:
            noise[row].uniform_(generator=gen)
    noise.log_().neg_()
    return argmax(probs / noise)  # [B] int64


def apply_top_k(logits: Tensor, top_k: Tensor) -> Tensor:
    """Keep each row's k largest logits (and anything tied with the k-th); k <= 0 keeps all.

    logits: [B, V], top_k: [B] int64. Returns a new tensor with masked entries set to -inf.
    Only the batch's largest k is selected (`topk`), not the whole vocabulary sorted: on the CPU a
    sort of 49k logits costs ~2 ms a row, a 64-wide selection a tenth of that.
    """
    vocab_size = logits.shape[-1]
    k = torch.where(top_k <= 0, vocab_size, top_k).clamp(max=vocab_size)  # [B]
    largest = logits.topk(int(k.max()), dim=-1).values  # [B, max k], descending
    kth = largest.gather(-1, (k - 1)[:, None])  # [B, 1]
    return logits.masked_fill(logits < kth, _NEG_INF)


# How many of the most likely tokens `apply_top_p` examines for the nucleus, in turn, before it
# sorts a row whole (8 rows of 49k logits: a 256-wide selection ~0.8 ms, 4096-wide ~2.8, a sort ~15).
TOP_P_CANDIDATES = (256, 4096)


def apply_top_p(logits: Tensor, top_p: Tensor) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p (nucleus).

    A token survives iff the mass of the tokens more likely than it (in descending order) is < p,
    so the most likely token always survives. Rows with p >= 1 are untouched (float cumsum can
    reach 1 early). logits: [B, V], top_p: [B] f32.

    The nucleus is looked for among each row's most likely tokens (`topk` of `TOP_P_CANDIDATES`, in
    turn, with their true probabilities from the whole row's logsumexp); only a row whose nucleus is
    wider is sorted whole (`_top_p_sorted`). On the CPU a sort of 49k logits costs ~2 ms a row: with
    8 sampled rows a step spent 17 ms in it. Tokens tied at the nucleus' edge may be kept in another
    order than a full sort keeps them (either is the nucleus).
    """
    active = top_p < 1.0  # [B]
    if not bool(active.any()):
        return logits
    out = logits.clone()
    rows = active.nonzero().squeeze(-1)  # [R] rows still to filter
    lse = logits.logsumexp(dim=-1, keepdim=True)  # [B, 1]
    for size in TOP_P_CANDIDATES:
        if rows.numel() == 0 or size >= logits.shape[-1]:
            break
        vals, idx = logits[rows].topk(size, dim=-1)  # [R, C] descending
        probs = (vals - lse[rows]).exp()  # [R, C] true probabilities
        mass_before = probs.cumsum(dim=-1) - probs  # [R, C] exclusive prefix sum
        p = top_p[rows, None]  # [R, 1]
        closed = mass_before[:, -1:] + probs[:, -1:] >= p  # [R, 1] the nucleus ends among them
        keep = torch.zeros(rows.numel(), logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep.scatter_(-1, idx, mass_before < p)
        done = closed.squeeze(-1)
        out[rows[done]] = logits[rows[done]].masked_fill(~keep[done], _NEG_INF)
        rows = rows[~done]
    if rows.numel():
        out[rows] = _top_p_sorted(logits[rows], top_p[rows])
    return out


def _top_p_sorted(logits: Tensor, top_p: Tensor) -> Tensor:
    """`apply_top_p` over the whole sorted vocabulary (rows whose nucleus is wider than the candidates)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V] each
    sorted_probs = sorted_logits.softmax(dim=-1)  # [B, V]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [B, V] exclusive prefix sum
    drop_sorted = (mass_before >= top_p[:, None]) & (top_p < 1.0)[:, None]  # [B, V]
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)  # back to vocab order
    return logits.masked_fill(drop, _NEG_INF)


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability.

    p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p); min_p = 0 gives log 0 = -inf (no-op).
    logits: [B, V], min_p: [B] f32.
    """
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log()[:, None]  # [B, 1]
    return logits.masked_fill(logits < threshold, _NEG_INF)


def compute_logprobs(logits: Tensor, token_ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Raw logprobs of `token_ids` [B] plus each row's top-k.

    Returns (logprobs [B, 1+k] f32, ids [B, 1+k] int64); column 0 is the given token.
    """
    logprobs = logits.float().log_softmax(dim=-1)  # [B, V]
    ids = token_ids.to(torch.int64)[:, None]  # [B, 1]
    chosen = logprobs.gather(-1, ids)  # [B, 1]
    if k <= 0:
        return chosen, ids
    top_logprobs, top_ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)  # [B, k] each
    return torch.cat([chosen, top_logprobs], dim=-1), torch.cat([ids, top_ids], dim=-1)
