"""Turn a SchedulerOutput into model inputs: flat token ids, positions, slots, attention metadata."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rtserve.engine.scheduler_output import ScheduledSeq, SchedulerOutput
from rtserve.runner.attention_metadata import AttentionMetadata, PrefillChunk


@dataclass
class ModelInputs:
    input_ids: torch.Tensor       # [T] int64
    positions: torch.Tensor       # [T] int64
    meta: AttentionMetadata
    logit_indices: torch.Tensor   # [S] rows of T whose logits are sampled
    sample_seqs: list[ScheduledSeq]  # the S sequences, in logit_indices order


def _slots(block_ids: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """Flat cache slots for positions [start, end) of a sequence with these blocks. [end - start]"""
    pos = torch.arange(start, end, dtype=torch.int64)
    table = torch.tensor(block_ids, dtype=torch.int64)
    return table[pos // block_size] * block_size + pos % block_size


# A prefill chunk of at most this many tokens is computed as decode rows too, as a verify chunk is:
# row j attends to its sequence's first start_pos + j + 1 slots through the block table, so the step
# stays on the decode path (native paged attention reading the blocks in place, the scripted layer
# stack) instead of a gathered, masked attention call per chunk. Measured beside 4 decodes (medians of
# 3 interleaved rounds): an 8-token chunk at position 1,900 took 30 ms as rows
# against 39 ms as a chunk; but 16 tokens there 46 against 42 ms, 32 tokens 82 against 75 ms (each row
# reads the whole context again). 8 is the deadline policy's minimum chunk beside running streams.
ROW_CHUNK_MAX = 8


def _is_prefill_chunk(seq) -> bool:
    """Computed as a masked prefill chunk (more than ROW_CHUNK_MAX new tokens, not a verify chunk)."""
    return seq.num_sequence_tokens > 1 and seq.num_new_tokens > ROW_CHUNK_MAX


def prepare_inputs(sched: SchedulerOutput, block_size: int, device: torch.device,
                   windows: tuple[int, ...] = ()) -> ModelInputs:
    """Decode rows first, then multi-token prefill chunks; `meta.windowed` for each sliding window
    in `windows` (the model's distinct nonzero `layer_windows`).

    A verify chunk (the last token plus k drafts), and a prefill chunk of at most ROW_CHUNK_MAX
    tokens, is one decode row per token, not a prefill chunk: row j
    attends to the sequence's first start_pos + j + 1 slots through the same block table. Every
    layer writes the step's K/V before attending, so each row sees the drafts before it. A verify
    step thus runs the decode path (same kernels as a plain decode of that many rows) instead of a
    masked attention per verifying sequence.
    """
    prefills = [s for s in sched.seqs if _is_prefill_chunk(s)]
    decodes = [s for s in sched.seqs if not _is_prefill_chunk(s)]
    ordered = decodes + prefills
    ids, positions, slot_mapping, logit_rows, sample_seqs = [], [], [], [], []
    prefill_chunks, prefill_spans = [], []  # spans: (block ids, start, end) per chunk
    t = 0
    for seq in ordered:
        start, end = seq.start_pos, seq.start_pos + seq.num_new_tokens
        ids.extend(seq.request.all_token_ids[start:end - len(seq.spec_token_ids)])
        ids.extend(seq.spec_token_ids)
        positions.append(torch.arange(start, end, dtype=torch.int64))
        slot_mapping.append(_slots(seq.block_ids, start, end, block_size))
        if _is_prefill_chunk(seq):
            prefill_chunks.append(PrefillChunk(
                query_start=t, query_len=seq.num_new_tokens, context_len=end,
                gather_idx=_slots(seq.block_ids, 0, end, block_size).to(device),
                causal_mask=None if start == 0 else _offset_causal_mask(seq.num_new_tokens, end).to(device)))
            prefill_spans.append((seq.block_ids, start, end))
        t += seq.num_new_tokens
        if seq.do_sample:  # the last sequence token and every draft token predict a next token
            logit_rows.extend(range(t - 1 - len(seq.spec_token_ids), t))
            sample_seqs.append(seq)
    # One decode row per token of a decode or verify chunk: (its sequence's blocks, context length).
    decode_rows = [(s.block_ids, pos + 1) for s in decodes
                   for pos in range(s.start_pos, s.start_pos + s.num_new_tokens)]
    meta = AttentionMetadata(slot_mapping=torch.cat(slot_mapping).to(device), num_decodes=len(decode_rows),
                             prefills=prefill_chunks, block_size=block_size)
    if decode_rows:
        meta.decode_block_table, meta.decode_mask, meta.decode_seq_lens = _decode_tables(
            decode_rows, block_size, device)
        if len(decode_rows) == 1:
            meta.decode_slot_range = _consecutive_slots(*decode_rows[0], block_size)
    for window in windows:
        meta.windowed[window] = _windowed_metadata(meta, window, decode_rows, prefill_spans, block_size, device)
    return ModelInputs(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        positions=torch.cat(positions).to(device),
        meta=meta,
        logit_indices=torch.tensor(logit_rows, dtype=torch.int64, device=device),
        sample_seqs=sample_seqs,
    )


def _offset_causal_mask(query_len: int, context_len: int) -> torch.Tensor:
    """[query_len, context_len] bool: query i (at position context_len - query_len + i) sees keys <= it."""
    q_pos = torch.arange(context_len - query_len, context_len).unsqueeze(1)
    return torch.arange(context_len).unsqueeze(0) <= q_pos


def _decode_tables(rows: list[tuple[list[int], int]], block_size: int, device: torch.device,
                   window: int = 0):
    """Block table [D, num_blocks_max] (padded with block 0), mask [D, 1, 1, num_blocks_max *
    block_size] and context lengths [D] for D single-token query rows given as (block ids, context
    length) (gathering whole blocks is a plain memcpy per block; the native kernel reads them in place).

    With a window, row i sees positions [lo_i, n_i), lo_i = max(0, n_i - window): its table starts
    at the block holding lo_i, so blocks wholly before the window are never read."""
    lens = [n for _, n in rows]
    los = [max(0, n - window) if window else 0 for n in lens]
    first = [lo // block_size for lo in los]
    num_blocks = [-(-n // block_size) - f for n, f in zip(lens, first)]
    table = torch.zeros(len(rows), max(num_blocks), dtype=torch.int64)
    for i, ((block_ids, _), f, nb) in enumerate(zip(rows, first, num_blocks)):
        table[i, :nb] = torch.tensor(block_ids[f:f + nb], dtype=torch.int64)
    width = table.shape[1] * block_size
    seq_lens = torch.tensor(lens, dtype=torch.int64)
    if window:
        pos = torch.arange(width).unsqueeze(0) + torch.tensor(first).unsqueeze(1) * block_size  # [D, width]
        mask = (pos < seq_lens.unsqueeze(1)) & (pos >= torch.tensor(los).unsqueeze(1))
    else:  # every decode step of a full-attention model: keep it to one comparison
        mask = torch.arange(width).unsqueeze(0) < seq_lens.unsqueeze(1)  # [D, width]
    return table.to(device), mask[:, None, None, :].to(device), seq_lens.to(device)


def _windowed_metadata(meta: AttentionMetadata, window: int, decode_rows: list[tuple[list[int], int]],
                       prefill_spans: list[tuple[list[int], int, int]], block_size: int,
                       device: torch.device) -> AttentionMetadata:
    """`meta` for layers whose query at position q sees keys (q - window, q]; `meta` itself when no
    context of the step is longer than the window. Its decode_seq_lens is None: the native decode
    kernel has no window, so a sliding layer must not reach it."""
    if all(n <= window for _, n in decode_rows) and all(end <= window for _, _, end in prefill_spans):
        return meta
    out = AttentionMetadata(slot_mapping=meta.slot_mapping, num_decodes=meta.num_decodes, block_size=block_size)
    if decode_rows:
        out.decode_block_table, out.decode_mask, _ = _decode_tables(decode_rows, block_size, device, window)
        if meta.decode_slot_range is not None:
            start, end = meta.decode_slot_range
            out.decode_slot_range = (max(start, end - window), end)
    for chunk, (block_ids, start, end) in zip(meta.prefills, prefill_spans):
        lo = max(0, start - window + 1)  # the oldest key the chunk's first query sees
        if end <= window:
            out.prefills.append(chunk)
            continue
        q_pos = torch.arange(start, end).unsqueeze(1)
        k_pos = torch.arange(lo, end).unsqueeze(0)
        out.prefills.append(PrefillChunk(
            query_start=chunk.query_start, query_len=chunk.query_len, context_len=end - lo,
            gather_idx=_slots(block_ids, lo, end, block_size).to(device),
            causal_mask=((k_pos <= q_pos) & (k_pos > q_pos - window)).to(device)))
    return out


def _consecutive_slots(block_ids: list[int], context_len: int, block_size: int) -> tuple[int, int] | None:
    """[start, end) slots of a decode's context when its blocks are consecutive ids, else None."""
    num_blocks = -(-context_len // block_size)
    ids = block_ids[:num_blocks]
    if ids[-1] - ids[0] != num_blocks - 1 or any(b - a != 1 for a, b in zip(ids, ids[1:])):
        return None
    start = ids[0] * block_size
    return start, start + context_len
