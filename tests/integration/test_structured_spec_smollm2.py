"""Constrained and draft-assisted greedy decoding on the real SmolLM2-135M, fp32 reference path (where
a verify step and a batch are token-exact; the quantized fast path may part at a near tie, see
tests/integration/test_fast_path.py): the same JSON with jump-forward drafts, with n-gram speculation
(drafts checked against the grammar, the matcher rolled back past rejected ones) and with neither;
an unconstrained request batched with constrained ones gives what it gives alone; a predicted output
leaves the answer unchanged in fewer steps."""
import json
import time

import jsonschema_rs
import pytest
import torch

from rtserve import LLM, SamplingParams
from rtserve.config import EngineConfig, RTConfig, SpeculativeConfig
from rtserve.protocol import EngineCoreRequest
from rtserve.sampling_params import StructuredOutputs

pytestmark = pytest.mark.slow
ITEM = {"type": "object", "properties": {"product_name": {"type": "string", "maxLength": 12},
                                         "quantity_in_stock": {"type": "integer", "minimum": 0, "maximum": 999}},
        "required": ["product_name", "quantity_in_stock"], "additionalProperties": False}
SCHEMA = {"type": "array", "items": ITEM, "minItems": 2, "maxItems": 2}
ASK = [{"role": "user", "content": "List two products in stock as JSON."}]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_llm(spec: bool) -> LLM:
    method = SpeculativeConfig(method="ngram", num_speculative_tokens=4, adaptive=False) if spec else \
        SpeculativeConfig()
    return LLM(config=EngineConfig(quantization="none", dtype="float32", rt=RTConfig(policy="fcfs", calibrate=False),
                                   speculative=method))


@pytest.fixture(scope="module")
def llm() -> LLM:
    return make_llm(spec=False)


def constrained(llm: LLM) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=100, structured=StructuredOutputs("json", json.dumps(SCHEMA)))
    (out,) = llm.chat([ASK], params)
    assert out.finish_reason == "stop"
    jsonschema_rs.validate(SCHEMA, json.loads(out.text))
    return out.token_ids


def run(llm: LLM, requests: dict[str, tuple[list[int], SamplingParams]]) -> tuple[dict[str, list[int]], int]:
    """Drive the core until every request is done: tokens per request, and steps taken."""
    for rid, (prompt, params) in requests.items():
        llm.core.add_request(EngineCoreRequest(rid, prompt, params, time.monotonic(),
                                               eos_token_ids=llm.tokenizer.eos_token_ids))
    out: dict[str, list[int]] = {rid: [] for rid in requests}
    steps = 0
    while llm.core.has_unfinished:
        for o in llm.core.step().outputs:
            out[o.request_id] += o.new_token_ids
        steps += 1
    return out, steps


def test_constrained_greedy_identical_with_jump_forward_and_speculation(llm):
    llm.core.request_drafts = False
    plain = constrained(llm)
    llm.core.request_drafts = True
    assert constrained(llm) == plain
    spec = make_llm(spec=True)
    assert constrained(spec) == plain
    assert spec.core.speculator.stats().num_accepted_tokens > 0


def test_unconstrained_unchanged_beside_constrained(llm):
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": "Name three fruits."}])
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    alone, _ = run(llm, {"alone": (prompt, greedy)})
    grammar = StructuredOutputs("json", json.dumps(SCHEMA))
    json_params = SamplingParams(temperature=0.0, max_tokens=100, structured=grammar)
    batch, _ = run(llm, {"plain": (prompt, greedy),
                         **{f"json{i}": (llm.tokenizer.encode_chat(ASK), json_params) for i in range(2)}})
    assert batch["plain"] == alone["alone"]
    for i in range(2):
        jsonschema_rs.validate(SCHEMA, json.loads(llm.tokenizer.decode(batch[f"json{i}"], skip_special_tokens=True)))


def test_predicted_output_same_answer_fewer_steps(llm):
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": "Write a Python function that adds two numbers."}])
    greedy = SamplingParams(temperature=0.0, max_tokens=40)
    plain, plain_steps = run(llm, {"a": (prompt, greedy)})
    edited = plain["a"][:12] + llm.tokenizer.encode(" # edited") + plain["a"][12:]
    predicted, steps = run(llm, {"b": (prompt, SamplingParams(temperature=0.0, max_tokens=40, prediction=edited))})
    assert predicted["b"] == plain["a"]
    assert steps < plain_steps
