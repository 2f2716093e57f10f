"""Model inputs from a scheduler output: verify chunks become decode rows, prefill chunks stay chunks."""
import torch

from rtserve.engine.request import Request
from rtserve.engine.scheduler_output import ScheduledSeq, SchedulerOutput
from rtserve.runner.input_batch import prepare_inputs
from rtserve.sampling_params import SamplingParams


def request(rid, num_tokens):
    return Request(rid, list(range(100, 100 + num_tokens)), SamplingParams(), 0.0)


def test_verify_chunk_is_one_decode_row_per_token_and_prefill_stays_a_chunk():
    block_size = 4
    plain = ScheduledSeq(request("plain", 6), 5, 1, [7, 3])
    verify = ScheduledSeq(request("verify", 9), 8, 1 + 3, [2, 5, 9], spec_token_ids=[41, 42, 43])
    prefill = ScheduledSeq(request("prefill", 5), 0, 5, [4, 6])
    inputs = prepare_inputs(SchedulerOutput([prefill, verify, plain]), block_size, torch.device("cpu"))
    meta = inputs.meta
    # Decode rows first, in schedule order: the verify chunk's last token and its three drafts (each
    # row sees one more position), then the plain decode; the prompt is a prefill chunk after them.
    assert meta.num_decodes == 5
    assert meta.decode_seq_lens.tolist() == [9, 10, 11, 12, 6]
    assert meta.decode_block_table.tolist() == [[2, 5, 9]] * 4 + [[7, 3, 0]]
    assert meta.decode_slot_range is None
    assert inputs.input_ids.tolist()[:6] == [108, 41, 42, 43, 105, 100]
    assert inputs.positions.tolist() == [8, 9, 10, 11, 5, 0, 1, 2, 3, 4]
    assert meta.slot_mapping.tolist()[:5] == [36, 37, 38, 39, 13]  # positions 8-11 in block 9, 5 in block 3
    assert [(p.query_start, p.query_len, p.context_len) for p in meta.prefills] == [(5, 5, 5)]
    assert inputs.logit_indices.tolist() == [0, 1, 2, 3, 4, 9]
    assert [s.request.request_id for s in inputs.sample_seqs] == ["verify", "plain", "prefill"]


def test_a_lone_decode_keeps_its_consecutive_slot_range():
    inputs = prepare_inputs(SchedulerOutput([ScheduledSeq(request("a", 6), 5, 1, [3, 4])]), 4, torch.device("cpu"))
    assert inputs.meta.num_decodes == 1 and inputs.meta.decode_slot_range == (12, 18)
