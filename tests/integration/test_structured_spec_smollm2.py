"""Grammar-constrained greedy decoding on the real SmolLM2-135M (fp32 reference path, where a verify
step is token-exact): the same JSON with jump-forward drafts, with n-gram speculation (drafts checked
against the grammar, the matcher rolled back past rejected ones) and with neither, and every output
validates against its schema."""
import json

import jsonschema_rs
import pytest
import torch

from rtserve import LLM, SamplingParams
from rtserve.config import EngineConfig, RTConfig, SpeculativeConfig
from rtserve.sampling_params import StructuredOutputs

pytestmark = pytest.mark.slow
ITEM = {"type": "object", "properties": {"product_name": {"type": "string", "maxLength": 12},
                                         "quantity_in_stock": {"type": "integer", "minimum": 0, "maximum": 999}},
        "required": ["product_name", "quantity_in_stock"], "additionalProperties": False}
SCHEMA = {"type": "array", "items": ITEM, "minItems": 2, "maxItems": 2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(spec: bool, jump_forward: bool) -> tuple[list[list[int]], LLM]:
    method = SpeculativeConfig(method="ngram", num_speculative_tokens=4, adaptive=False) if spec else \
        SpeculativeConfig()
    llm = LLM(config=EngineConfig(quantization="none", dtype="float32", rt=RTConfig(policy="fcfs", calibrate=False),
                                  speculative=method))
    llm.core.jump_forward = jump_forward
    params = SamplingParams(temperature=0.0, max_tokens=100, structured=StructuredOutputs("json", json.dumps(SCHEMA)))
    outs = llm.chat([[{"role": "user", "content": "List two products in stock as JSON."}]], params)
    for o in outs:
        assert o.finish_reason == "stop"
        jsonschema_rs.validate(SCHEMA, json.loads(o.text))
    return [o.token_ids for o in outs], llm


def test_constrained_greedy_identical_with_jump_forward_and_speculation():
    plain, _ = run(spec=False, jump_forward=False)
    jumped, _ = run(spec=False, jump_forward=True)
    speculated, llm = run(spec=True, jump_forward=False)
    assert jumped == plain
    assert speculated == plain
    assert llm.core.speculator.stats().num_accepted_tokens > 0
