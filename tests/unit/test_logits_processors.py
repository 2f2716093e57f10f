"""Penalties and logit bias against a per-token reference loop."""
import torch

from rtserve.sample.logits_processors import LogitsAdjustments
from rtserve.sampling_params import SamplingParams

V = 12


def reference(row, params, output_ids, prompt_ids):
    row = row.clone()
    seen = set(prompt_ids) | set(output_ids)
    for t in range(V):
        if t in seen and params.repetition_penalty != 1.0:
            row[t] = row[t] / params.repetition_penalty if row[t] > 0 else row[t] * params.repetition_penalty
        c = output_ids.count(t)
        row[t] -= params.frequency_penalty * c + params.presence_penalty * (c > 0)
        row[t] += params.logit_bias.get(t, 0.0)
    return row


def test_matches_reference_and_leaves_other_rows():
    torch.manual_seed(0)
    logits = torch.randn(4, V)
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=-0.25),
              SamplingParams(),
              SamplingParams(repetition_penalty=1.7, logit_bias={3: 5.0, 11: -100.0}),
              SamplingParams(logit_bias={0: 2.0}, frequency_penalty=1.0)]
    outputs = [[1, 1, 2], [4], [5, 3, 3], []]
    prompts = [[0, 7], [1], [9, 9, 10], [6]]
    adj = LogitsAdjustments.build([0, 1, 2, 3], params, outputs, prompts, V, "cpu")
    got = logits.clone()
    adj.apply(got)
    for i in range(4):
        torch.testing.assert_close(got[i], reference(logits[i], params[i], outputs[i], prompts[i]))
    assert torch.equal(got[1], logits[1])


def test_nothing_to_do_is_none():
    assert LogitsAdjustments.build([0], [SamplingParams()], [[1]], [[2]], V, "cpu") is None
