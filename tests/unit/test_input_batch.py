"""Model inputs from a scheduler output: verify chunks and small prefill chunks become decode rows,
larger prefill chunks stay chunks."""
import torch

from rtserve.engine.request import Request
from rtserve.engine.scheduler_output import ScheduledSeq, SchedulerOutput
from rtserve.runner.input_batch import ROW_CHUNK_MAX, prepare_inputs
from rtserve.sampling_params import SamplingParams


def request(rid, num_tokens):
    return Request(rid, list(range(100, 100 + num_tokens)), SamplingParams(), 0.0)


def test_verify_chunk_is_one_decode_row_per_token_and_a_large_prefill_stays_a_chunk():
    block_size = 4
    n = ROW_CHUNK_MAX + 1
    plain = ScheduledSeq(request("plain", 6), 5, 1, [7, 3])
    verify = ScheduledSeq(request("verify", 9), 8, 1 + 3, [2, 5, 9], spec_token_ids=[41, 42, 43])
    prefill = ScheduledSeq(request("prefill", n), 0, n, list(range(20, 20 + -(-n // block_size))))
    inputs = prepare_inputs(SchedulerOutput([prefill, verify, plain]), block_size, torch.device("cpu"))
    meta = inputs.meta
    # Decode rows first, in schedule order: the verify chunk's last token and its three drafts (each
    # row sees one more position), then the plain decode; the prompt is a prefill chunk after them.
    assert meta.num_decodes == 5
    assert meta.decode_seq_lens.tolist() == [9, 10, 11, 12, 6]
    assert meta.decode_block_table.tolist() == [[2, 5, 9]] * 4 + [[7, 3, 0]]
    assert meta.decode_slot_range is None
    assert inputs.input_ids.tolist()[:6] == [108, 41, 42, 43, 105, 100]
    assert inputs.positions.tolist() == [8, 9, 10, 11, 5] + list(range(n))
    assert meta.slot_mapping.tolist()[:5] == [36, 37, 38, 39, 13]  # positions 8-11 in block 9, 5 in block 3
    assert [(p.query_start, p.query_len, p.context_len) for p in meta.prefills] == [(5, n, n)]
    assert inputs.logit_indices.tolist() == [0, 1, 2, 3, 4, 5 + n - 1]
    assert [s.request.request_id for s in inputs.sample_seqs] == ["verify", "plain", "prefill"]


def test_a_small_prefill_chunk_is_one_decode_row_per_token():
    # 3 tokens at positions 5-7 of an 8-token prompt, beside a decode: 4 decode rows, no prefill chunk;
    # row j of the chunk sees 6 + j positions; only the chunk's last row is sampled.
    block_size = 4
    plain = ScheduledSeq(request("plain", 6), 5, 1, [7, 3])
    chunk = ScheduledSeq(request("chunk", 8), 5, 3, [4, 6])
    inputs = prepare_inputs(SchedulerOutput([plain, chunk]), block_size, torch.device("cpu"))
    meta = inputs.meta
    assert meta.num_decodes == 4 and meta.prefills == []
    assert meta.decode_seq_lens.tolist() == [6, 6, 7, 8]
    assert meta.decode_block_table.tolist() == [[7, 3], [4, 6], [4, 6], [4, 6]]
    assert inputs.input_ids.tolist() == [105, 105, 106, 107]
    assert inputs.positions.tolist() == [5, 5, 6, 7]
    assert meta.slot_mapping.tolist() == [13, 25, 26, 27]
    assert inputs.logit_indices.tolist() == [0, 3]
    assert [s.request.request_id for s in inputs.sample_seqs] == ["plain", "chunk"]


def test_a_lone_decode_keeps_its_consecutive_slot_range():
    inputs = prepare_inputs(SchedulerOutput([ScheduledSeq(request("a", 6), 5, 1, [3, 4])]), 4, torch.device("cpu"))
    assert inputs.meta.num_decodes == 1 and inputs.meta.decode_slot_range == (12, 18)
