"""DraftModelProposer: a smaller Llama with the target's tokenizer proposes k tokens autoregressively.

The draft keeps its own small paged KV cache (its own blocks, never the target's, handed out by a
`rtserve.kv` block pool of its own, without prefix caching). Per request it
remembers which tokens its cache holds; each step it keeps the longest prefix those share with the
request's current tokens (rejected drafts fall off here: their KV is simply overwritten later),
computes the rest in one batched forward, then runs k - 1 more one-token forwards. Each draft token
is drawn from q = the draft's distribution under the request's own sampling parameters, and q is
returned with it, which is what exact rejection sampling needs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from rtserve.config import ModelConfig
from rtserve.kv.block_pool import BlockPool, KVBlock
from rtserve.model.decoder import DecoderForCausalLM
from rtserve.runner.attention_metadata import AttentionMetadata, PrefillChunk
from rtserve.sample.rejection import target_probs
from rtserve.sample.sampler import exponential_race
from rtserve.spec.proposer import Proposal, Proposer, SpecRequest


@dataclass
class _DraftSeq:
    token_ids: list[int] = field(default_factory=list)  # tokens whose K/V the draft cache holds, in order
    blocks: list[KVBlock] = field(default_factory=list)
    last_used: int = 0

    @property
    def block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks]


class DraftModelProposer(Proposer):
    name = "draft"
    is_cheap = False

    def __init__(self, model: DecoderForCausalLM, num_blocks: int, block_size: int = 16,
                 device: str | torch.device = "cpu") -> None:
        cfg = model.cfg
        self.model, self.cfg, self.block_size = model, cfg, block_size
        self.device = torch.device(device)
        dtype = next(model.parameters()).dtype
        shape = (2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(cfg.num_layers)]
        self._pool = BlockPool(num_blocks, enable_caching=False)
        self._seqs: dict[str, _DraftSeq] = {}
        self._clock = 0
        self._round_s = 0.0  # EWMA of measured seconds per draft forward

    @classmethod
    def from_weights(cls, config: ModelConfig, weights: dict[str, torch.Tensor], num_blocks: int,
                     block_size: int = 16, device: str = "cpu", dtype: torch.dtype = torch.float32,
                     ) -> "DraftModelProposer":
        """Build from Hugging Face-named weights (as `rtserve.model.loader.load_model` returns them).
        A draft with sliding-window layers is refused (ValueError): its own attention metadata has
        no windows."""
        if any(config.layer_windows):
            raise ValueError(f"a {config.model_type} draft model with sliding-window layers is not supported")
        model = DecoderForCausalLM(config)
        model.load_hf_weights(weights)
        model.to(device=device, dtype=dtype).eval()  # RoPE tables stay fp32
        return cls(model, num_blocks, block_size, device)

    @property
    def num_free_blocks(self) -> int:
        return self._pool.num_free_blocks

    def free(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self._pool.free(list(reversed(seq.blocks)))

    def cost_s(self, num_rounds: int, num_tokens: int) -> float:
        return self._round_s * num_rounds

    @torch.inference_mode()
    def propose(self, requests: Sequence[SpecRequest], num_tokens: Sequence[int]) -> list[Proposal]:
        start = time.monotonic()
        self._clock += 1
        proposals = [Proposal([]) for _ in requests]
        in_batch = {r.request_id for r in requests}
        batch = [(i, r, k) for i, (r, k) in enumerate(zip(requests, num_tokens))
                 if k > 0 and self._reserve(r, k, in_batch)]
        if not batch:
            return proposals
        drafts: list[list[int]] = [[] for _ in batch]
        probs: list[list[torch.Tensor]] = [[] for _ in batch]
        # Round 0: every uncomputed context token; later rounds: the previous round's draft token.
        chunks = [r.all_token_ids[len(self._seqs[r.request_id].token_ids):] for _, r, _ in batch]
        num_rounds = max(k for _, _, k in batch)
        rows = list(range(len(batch)))
        for round_idx in range(num_rounds):
            logits = self._forward([batch[b][1] for b in rows], [chunks[b] for b in rows])  # [len(rows), V]
            reqs = [batch[b][1] for b in rows]
            q = self._draft_probs(logits, reqs)  # [len(rows), V]
            x = exponential_race(q, [r.generator for r in reqs]).tolist()
            for n, b in enumerate(rows):
                drafts[b].append(x[n])
                probs[b].append(q[n])
                chunks[b] = [x[n]]
            rows = [b for b in rows if batch[b][2] > round_idx + 1]
        for b, (i, _, _) in enumerate(batch):
            proposals[i] = Proposal(drafts[b], torch.stack(probs[b]))
        elapsed = time.monotonic() - start
        self._round_s = elapsed / num_rounds if self._round_s == 0 else 0.8 * self._round_s + 0.2 * elapsed / num_rounds
        return proposals

    def _reserve(self, req: SpecRequest, k: int, in_batch: set[str]) -> bool:
        """Trim the request's draft cache to its shared prefix and hold blocks for k more rounds."""
        tokens = req.all_token_ids
        end = len(tokens) + k - 1  # positions whose K/V this call writes
        if end > self.cfg.max_position:
            return False
        seq = self._seqs.setdefault(req.request_id, _DraftSeq())
        seq.last_used = self._clock
        common = 0
        for a, b in zip(seq.token_ids, tokens):
            if a != b:
                break
            common += 1
        del seq.token_ids[min(common, len(tokens) - 1):]  # at least one token to compute: logits
        needed = -(-end // self.block_size) - len(seq.blocks)
        while needed > self._pool.num_free_blocks:
            victims = [rid for rid, s in self._seqs.items() if rid not in in_batch]
            if not victims:
                return False
            self.free(min(victims, key=lambda rid: self._seqs[rid].last_used))
        seq.blocks.extend(self._pool.allocate(max(needed, 0)))
        return True

    def _forward(self, reqs: list[SpecRequest], chunks: list[list[int]]) -> torch.Tensor:
        """Compute `chunks[i]` on top of request i's cached draft tokens; logits of each chunk's last token."""
        ids, positions, slots, prefills, logit_rows = [], [], [], [], []
        t = 0
        for req, chunk in zip(reqs, chunks):
            seq = self._seqs[req.request_id]
            start, end = len(seq.token_ids), len(seq.token_ids) + len(chunk)
            ids.extend(chunk)
            positions.append(torch.arange(start, end))
            slots.append(self._slots(seq.block_ids, start, end))
            prefills.append(PrefillChunk(
                query_start=t, query_len=len(chunk), context_len=end,
                gather_idx=self._slots(seq.block_ids, 0, end).to(self.device),
                causal_mask=(torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]).to(self.device)))
            seq.token_ids.extend(chunk)
            t += len(chunk)
            logit_rows.append(t - 1)
        meta = AttentionMetadata(slot_mapping=torch.cat(slots).to(self.device), num_decodes=0, prefills=prefills)
        return self.model(torch.tensor(ids, device=self.device), torch.cat(positions).to(self.device),
                          self.kv_caches, meta, torch.tensor(logit_rows, device=self.device))

    def _slots(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        table = torch.tensor(block_ids, dtype=torch.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _draft_probs(self, logits: torch.Tensor, reqs: list[SpecRequest]) -> torch.Tensor:
        params = [r.sampling_params for r in reqs]
        col = lambda vals, dtype: torch.tensor(vals, dtype=dtype, device=logits.device)  # noqa: E731
        return target_probs(logits, col([p.temperature for p in params], torch.float32),
                            col([p.top_k for p in params], torch.int64), col([p.top_p for p in params], torch.float32),
                            col([p.min_p for p in params], torch.float32))
