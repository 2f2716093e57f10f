"""Speculative verification as pure tensor functions: greedy matching and exact rejection sampling.

One verify step scores k proposed tokens x_1..x_k of a sequence with one target forward over
[last token, x_1, ..., x_k], giving k + 1 target distributions p_0..p_k (p_j predicts the token after
x_j). The output is the accepted prefix x_1..x_a followed by one more token drawn by the target, so
every verify step emits between 1 and k + 1 tokens and the output distribution is exactly the
target's (Leviathan et al., 2023; Chen et al., 2023). Rows of a batch may propose different k
(`num_draft`, padding beyond it is ignored) and k = 0 is an ordinary decode.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rtserve.sample.sampler import SamplingBatch, apply_min_p, apply_top_k, apply_top_p, argmax, exponential_race

PAD_ID = -1  # output positions after the bonus token


def target_probs(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """The distribution the sampler draws from, per row. logits: [N, V]; params: [N]. Returns [N, V] f32.

    Greedy rows (temperature 0) become one-hot at argmax (ties -> lowest index, as in `sample`), so
    rejection sampling over them reduces to exact greedy matching.
    """
    temp = torch.where(temperature == 0.0, 1.0, temperature)  # [N]
    scaled = apply_min_p(apply_top_p(apply_top_k(logits.float() / temp[:, None], top_k), top_p), min_p)
    probs = scaled.softmax(dim=-1)  # [N, V]
    one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where((temperature == 0.0)[:, None], one_hot, probs)


def greedy_verify(target_ids: Tensor, draft_ids: Tensor, num_draft: Tensor) -> tuple[Tensor, Tensor]:
    """Accept the longest prefix of drafts equal to the target's argmax, then the target's next token.

    target_ids: [B, K+1] argmax of p_0..p_K; draft_ids: [B, K]; num_draft: [B] (<= K).
    Returns (output_ids [B, K+1] padded with PAD_ID, num_accepted [B]); row b emits
    output_ids[b, :num_accepted[b] + 1].
    """
    k = draft_ids.shape[1]
    valid = torch.arange(k, device=draft_ids.device)[None, :] < num_draft[:, None]  # [B, K]
    accepted = (draft_ids == target_ids[:, :k]) & valid  # [B, K]
    num_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)  # [B] length of the leading run
    return _emit(draft_ids, num_accepted, target_ids.gather(1, num_accepted[:, None]).squeeze(1)), num_accepted


def rejection_sample(target_probs: Tensor, draft_ids: Tensor, draft_probs: Tensor | None, num_draft: Tensor,
                     generators: list[torch.Generator | None]) -> tuple[Tensor, Tensor]:
    """Exact speculative sampling over a batch.

    target_probs: [B, K+1, V] p_0..p_K; draft_ids: [B, K]; draft_probs: [B, K, V] q_1..q_K, or None
    for a deterministic proposer (q is one-hot at the proposed token); num_draft: [B] (<= K);
    generators: per row (None rows share the default RNG). Returns (output_ids [B, K+1] padded with
    PAD_ID, num_accepted [B]).
    """
    b, k = draft_ids.shape
    rows = torch.arange(b, device=draft_ids.device)
    valid = torch.arange(k, device=draft_ids.device)[None, :] < num_draft[:, None]  # [B, K]
    ids = torch.where(valid, draft_ids, 0)  # [B, K] padding made a harmless index
    p_x = target_probs[:, :k].gather(-1, ids[..., None]).squeeze(-1)  # [B, K]
    q_x = torch.ones_like(p_x) if draft_probs is None else draft_probs.gather(-1, ids[..., None]).squeeze(-1)
    # p: target prob, q: draft prob of the proposed token x
    # accept x with probability min(1, p(x) / q(x))   (u < p/q, written without the division)
    # on the first rejection draw from norm(max(0, p - q)); if all k pass, draw from p_k (q = 0 there)
    accepted = (_uniform(b, k, generators, p_x) * q_x < p_x) & valid  # [B, K]
    num_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)  # [B]
    p_a = target_probs[rows, num_accepted]  # [B, V]
    rejected = num_accepted < num_draft  # [B]; False: every draft passed, q_a = 0
    a = num_accepted.clamp(max=max(k - 1, 0))
    if k == 0:
        q_a = torch.zeros_like(p_a)
    elif draft_probs is None:
        q_a = torch.zeros_like(p_a).scatter_(-1, ids[rows, a][:, None], 1.0)  # [B, V] one-hot
    else:
        q_a = draft_probs[rows, a]  # [B, V]
    residual = torch.where(rejected[:, None], (p_a - q_a).clamp_min(0.0), p_a)  # [B, V]
    # p == q at the rejected position means rejection had probability 0; fall back to p (float noise).
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_a)
    return _emit(draft_ids, num_accepted, exponential_race(residual, generators)), num_accepted


def verify(logits: Tensor, draft_ids: list[list[int]], draft_probs: list[Tensor | None],
           batch: SamplingBatch) -> list[list[int]]:
    """Verify a batch whose sequence b contributed rows p_0..p_{k_b} (k_b = len(draft_ids[b])), in order.

    logits: [sum(k_b + 1), V] raw target logits (masked as the sampler would see them);
    draft_probs[b]: [k_b, V] or None (deterministic proposer). Returns the emitted ids per sequence:
    the accepted drafts and the target's token after them (1 to k_b + 1 ids).
    """
    num_seqs, max_k = len(draft_ids), max((len(d) for d in draft_ids), default=0)
    device = logits.device
    num_draft = torch.tensor([len(d) for d in draft_ids], dtype=torch.int64, device=device)  # [B]
    starts = torch.cumsum(num_draft + 1, 0) - (num_draft + 1)  # [B] first row of each sequence
    pos = torch.arange(max_k + 1, device=device)  # [K+1]
    rows = starts[:, None] + torch.minimum(pos[None, :], num_draft[:, None])  # [B, K+1]; padding repeats
    drafts = torch.tensor([d + [0] * (max_k - len(d)) for d in draft_ids], dtype=torch.int64,
                          device=device).view(num_seqs, max_k)  # [B, K]
    if batch.all_greedy:
        out, num_accepted = greedy_verify(argmax(logits)[rows], drafts, num_draft)
    else:
        expand = lambda t: t[:, None].expand(-1, max_k + 1).reshape(-1)  # noqa: E731  [B] -> [B*(K+1)]
        p = target_probs(logits[rows.view(-1)], expand(batch.temperature), expand(batch.top_k),
                         expand(batch.top_p), expand(batch.min_p)).view(num_seqs, max_k + 1, -1)
        out, num_accepted = rejection_sample(p, drafts, _stack_draft_probs(draft_ids, draft_probs, p), num_draft,
                                             batch.generators)
    return [row[:n + 1] for row, n in zip(out.tolist(), num_accepted.tolist())]


def _stack_draft_probs(draft_ids: list[list[int]], draft_probs: list[Tensor | None], p: Tensor) -> Tensor | None:
    """[B, K, V] q, zero-padded; rows of a deterministic proposer one-hot. None if every row is one-hot."""
    if all(q is None for q in draft_probs):
        return None
    b, k1, v = p.shape
    q = p.new_zeros(b, k1 - 1, v)
    for row, (ids, probs) in enumerate(zip(draft_ids, draft_probs)):
        if probs is not None:
            q[row, :len(ids)] = probs
        elif ids:
            q[row, torch.arange(len(ids)), torch.tensor(ids)] = 1.0
    return q


def _uniform(b: int, k: int, generators: list[torch.Generator | None], like: Tensor) -> Tensor:
    """U[0, 1) draws [B, K]; rows with a generator draw from it alone (batch-independent)."""
    u = torch.rand(b, k, device=like.device) if any(g is None for g in generators) else torch.empty(
        b, k, device=like.device)
    for row, gen in enumerate(generators):
        if gen is not None:
            u[row] = torch.rand(k, generator=gen, device=like.device)
    return u


def _emit(draft_ids: Tensor, num_accepted: Tensor, bonus_ids: Tensor) -> Tensor:
    """[B, K+1]: accepted drafts, then the bonus token at index num_accepted, then PAD_ID."""
    b, k = draft_ids.shape
    pos = torch.arange(k + 1, device=draft_ids.device)[None, :]  # [1, K+1]
    padded = torch.cat([draft_ids, draft_ids.new_full((b, 1), PAD_ID)], dim=1)  # [B, K+1]
    out = torch.where(pos < num_accepted[:, None], padded, PAD_ID)
    return out.scatter_(1, num_accepted[:, None], bonus_ids.to(out.dtype)[:, None])
