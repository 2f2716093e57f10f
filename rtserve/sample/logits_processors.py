"""Penalties and logit bias, applied to a batch of logit rows with tensor ops (no loop over the vocabulary).

For a row whose request has generated tokens with counts c (over the vocabulary) and saw the token
set P in prompt or output:

    logit -= frequency_penalty * c + presence_penalty * (c > 0)          (OpenAI)
    logit  = logit / r if logit > 0 else logit * r,  for tokens in P     (repetition_penalty r, HF/vLLM)
    logit += logit_bias[token]                                           (OpenAI)

Rows are built from Python lists of each request's token ids (the data itself), then one scatter per
tensor; rows whose request asks for none of this are left untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rtserve.sampling_params import SamplingParams


@dataclass
class LogitsAdjustments:
    """What to add to (or scale in) some rows of a [R, V] logits tensor."""

    rows: Tensor  # [A] int64: the rows adjusted
    frequency: Tensor  # [A, 1] f32
    presence: Tensor  # [A, 1] f32
    repetition: Tensor  # [A, 1] f32
    output_ids: Tensor  # [A, L] int64, padded with V (a scratch column)
    seen_ids: Tensor | None  # [A, L2] int64 prompt + output ids padded with V; None: no repetition penalty
    bias: Tensor | None  # [A, V] f32; None: no logit_bias

    @classmethod
    def build(cls, rows: list[int], params: list[SamplingParams], output_ids: list[list[int]],
              prompt_ids: list[list[int]], vocab_size: int, device: torch.device | str
              ) -> "LogitsAdjustments | None":
        """`rows[i]` of the logits belongs to a request with `params[i]`, `output_ids[i]`, `prompt_ids[i]`.
        None when no row needs anything."""
        keep = [i for i, p in enumerate(params) if p.has_penalties or p.logit_bias]
        if not keep:
            return None
        kept = [params[i] for i in keep]
        column = lambda values: torch.tensor(values, dtype=torch.float32, device=device)[:, None]  # noqa: E731
        seen = None
        if any(p.repetition_penalty != 1.0 for p in kept):
            seen = _padded([prompt_ids[i] + output_ids[i] for i in keep], vocab_size, device)
        bias = None
        if any(p.logit_bias for p in kept):
            bias = torch.zeros(len(keep), vocab_size + 1, dtype=torch.float32, device=device)
            flat = [(a, t, b) for a, p in enumerate(kept) for t, b in p.logit_bias.items()]
            if flat:
                r, t, b = zip(*flat)
                bias[list(r), [min(x, vocab_size) for x in t]] = torch.tensor(b, dtype=torch.float32, device=device)
            bias = bias[:, :vocab_size]
        return cls(rows=torch.tensor([rows[i] for i in keep], dtype=torch.int64, device=device),
                   frequency=column([p.frequency_penalty for p in kept]),
                   presence=column([p.presence_penalty for p in kept]),
                   repetition=column([p.repetition_penalty for p in kept]),
                   output_ids=_padded([output_ids[i] for i in keep], vocab_size, device),
                   seen_ids=seen, bias=bias)

    def apply(self, logits: Tensor) -> None:
        """Modifies `logits` [R, V] in place (its adjusted rows)."""
        vocab_size = logits.shape[-1]
        sub = logits[self.rows]  # [A, V]
        if self.seen_ids is not None:
            seen = _counts(self.seen_ids, vocab_size) > 0  # [A, V]
            scaled = torch.where(sub > 0, sub / self.repetition, sub * self.repetition)
            sub = torch.where(seen, scaled, sub)
        counts = _counts(self.output_ids, vocab_size)  # [A, V]
        sub = sub - self.frequency * counts - self.presence * (counts > 0).float()
        if self.bias is not None:
            sub = sub + self.bias
        logits[self.rows] = sub


def _padded(seqs: list[list[int]], pad: int, device: torch.device | str) -> Tensor:
    """[len(seqs), max_len] int64 padded with `pad` (at least one column)."""
    width = max(1, max(len(s) for s in seqs))
    out = torch.full((len(seqs), width), pad, dtype=torch.int64)
    for i, s in enumerate(seqs):
        if s:
            out[i, :len(s)] = torch.tensor(s, dtype=torch.int64)
    return out.to(device)


def _counts(ids: Tensor, vocab_size: int) -> Tensor:
    """ids [A, L] padded with vocab_size -> counts [A, V] f32 (the pad column is dropped)."""
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.float32, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]
