"""Grammar-constrained decoding inside the engine on the tiny random Llama (256 byte tokens, EOS = 0):
outputs follow their grammar, unconstrained neighbours are untouched, speculation keeps greedy output,
penalties and logit bias act on the logits."""
import json
import re

import jsonschema_rs
import pytest

from rtserve.config import CacheConfig, EngineConfig, RTConfig, SchedulerConfig, SpeculativeConfig
from rtserve.engine.core import EngineCore
from rtserve.protocol import EngineCoreRequest
from rtserve.sampling_params import SamplingParams, StructuredOutputs
from rtserve.structured.compiler import GrammarService
from rtserve.structured.vocab import raw_tokenizer_info
from tests.unit.conftest import TINY, hf_greedy, run_to_completion

EOS = 0
PROMPT = [5, 9, 200, 3, 17, 33]
SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
     "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"k": {"enum": ["x", "yy"]},
                                      "v": {"type": "array", "items": {"type": "boolean"}, "minItems": 1,
                                            "maxItems": 2},
                                      "o": {"anyOf": [{"type": "null"}, {"type": "number"}]}},
     "required": ["k", "v"], "additionalProperties": False},
]


def byte_vocab_info():
    return raw_tokenizer_info([bytes([i]) for i in range(TINY.vocab_size)], TINY.vocab_size, (EOS,))


def engine(tiny_weights, speculative=None, policy="deadline") -> EngineCore:
    cfg = EngineConfig(cache=CacheConfig(block_size=4, num_blocks=128), rt=RTConfig(policy=policy),
                       scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8,
                                                 max_model_len=TINY.max_position),
                       **({"speculative": speculative} if speculative else {}))
    core = EngineCore(cfg, TINY, tiny_weights)
    core.grammars = GrammarService(byte_vocab_info)
    return core


def add(core, rid, structured=None, max_tokens=60, prompt=PROMPT, **kw):
    params = SamplingParams(temperature=kw.pop("temperature", 0.0), max_tokens=max_tokens, structured=structured,
                            **kw)
    core.add_request(EngineCoreRequest(rid, list(prompt), params, 0.0, eos_token_ids=(EOS,)))


def text(ids):
    return bytes(t for t in ids if t != EOS).decode("latin-1")


@pytest.mark.parametrize("schema", SCHEMAS)
def test_json_schema_output_validates(tiny_weights, schema):
    core = engine(tiny_weights)
    for i in range(3):  # greedy and two seeded samples
        add(core, f"r{i}", StructuredOutputs("json", json.dumps(schema)), temperature=0.0 if i == 0 else 1.0,
            seed=i)
    out = run_to_completion(core)
    for ids in out.values():
        assert ids[-1] == EOS, "a complete JSON value ends the output with EOS"
        jsonschema_rs.validate(schema, json.loads(text(ids)))


def test_regex_choice_and_json_object(tiny_weights):
    core = engine(tiny_weights)
    add(core, "re", StructuredOutputs("regex", r"[a-c]{2,4}-[0-9]+"), max_tokens=30)
    add(core, "choice", StructuredOutputs("choice", json.dumps(["left", "right"])))
    add(core, "obj", StructuredOutputs("json_object"), max_tokens=40, temperature=1.0, seed=3)
    out = run_to_completion(core)
    assert re.fullmatch(r"[a-c]{2,4}-[0-9]+", text(out["re"])) or out["re"][-1] != EOS
    assert text(out["choice"]) in ("left", "right")
    if out["obj"][-1] == EOS:  # finished inside max_tokens: a whole object
        assert isinstance(json.loads(text(out["obj"])), dict)
    else:
        assert text(out["obj"]).startswith("{")


def test_unconstrained_neighbour_is_unchanged(tiny_weights, tiny_hf_model):
    core = engine(tiny_weights)
    add(core, "plain", None, max_tokens=16)
    add(core, "json", StructuredOutputs("json", json.dumps(SCHEMAS[1])))
    add(core, "plain2", None, max_tokens=16, prompt=[7] * 9)
    out = run_to_completion(core)
    assert out["plain"] == hf_greedy(tiny_hf_model, PROMPT, 16)
    assert out["plain2"] == hf_greedy(tiny_hf_model, [7] * 9, 16)
    jsonschema_rs.validate(SCHEMAS[1], json.loads(text(out["json"])))


def test_speculation_keeps_constrained_greedy_output(tiny_weights):
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=4, adaptive=False, ngram_min=1, ngram_max=3)
    outs = []
    for speculative in (None, spec):
        core = engine(tiny_weights, speculative)
        # A schema with long fixed keys repeats text, so n-gram drafts are proposed inside the grammar.
        item = {"type": "object", "properties": {"name_of_item": {"type": "integer", "minimum": 0, "maximum": 99}},
                "required": ["name_of_item"]}
        schema = {"type": "array", "items": item, "minItems": 3, "maxItems": 3}
        add(core, "s", StructuredOutputs("json", json.dumps(schema)), max_tokens=120)
        add(core, "p", None, max_tokens=24, prompt=[30, 31, 32, 33, 34, 35, 99, 30, 31, 32, 33])
        outs.append(run_to_completion(core))
        if speculative is not None:
            assert core.speculator.stats().num_drafts > 0
    assert outs[0] == outs[1]
    assert json.loads(text(outs[0]["s"]))


def test_compile_failure_fails_only_that_request(tiny_weights):
    core = engine(tiny_weights)
    add(core, "bad", StructuredOutputs("regex", "a("))
    add(core, "ok", None, max_tokens=4)
    errors, tokens = {}, {}
    while core.has_unfinished:
        for o in core.step().outputs:
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                errors[o.request_id] = (o.finish_reason, o.error)
    assert errors["bad"][0] == "error" and "grammar" in errors["bad"][1]
    assert errors["ok"][0] == "length" and len(tokens["ok"]) == 4


def test_logit_bias_and_penalties_change_greedy_output(tiny_weights, tiny_hf_model):
    core = engine(tiny_weights)
    add(core, "bias", None, max_tokens=6, logit_bias={42: 100.0})
    add(core, "freq", None, max_tokens=12, prompt=[7] * 20, frequency_penalty=2.0)
    add(core, "plain", None, max_tokens=12, prompt=[7] * 20)
    out = run_to_completion(core)
    assert out["bias"] == [42] * 6
    assert out["plain"] == hf_greedy(tiny_hf_model, [7] * 20, 12)
    assert out["freq"] != out["plain"]


def test_jump_forward_keeps_output_in_fewer_steps(tiny_weights):
    item = {"type": "object", "properties": {"a_rather_long_key_name": {"type": "integer", "minimum": 0,
                                                                        "maximum": 9}},
            "required": ["a_rather_long_key_name"], "additionalProperties": False}
    spec = StructuredOutputs("json", json.dumps({"type": "array", "items": item, "minItems": 2, "maxItems": 2}))
    outs, steps = [], []
    for jump in (False, True):
        core = engine(tiny_weights, policy="fcfs")  # no step-time budget to limit the drafts
        core.request_drafts = jump
        add(core, "s", spec, max_tokens=150)
        add(core, "p", None, max_tokens=20)
        add(core, "t", spec, max_tokens=150, temperature=1.0, seed=4)
        n = 0
        out: dict[str, list[int]] = {}
        while core.has_unfinished:
            for o in core.step().outputs:
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
            n += 1
        outs.append(out)
        steps.append(n)
    assert outs[0]["s"] == outs[1]["s"] and outs[0]["p"] == outs[1]["p"]
    for out in outs:
        jsonschema_rs.validate(json.loads(spec.spec), json.loads(text(out["s"])))
        jsonschema_rs.validate(json.loads(spec.spec), json.loads(text(out["t"])))
    assert steps[1] < steps[0]


def test_jump_forward_stays_within_the_step_time_budget(tiny_weights):
    from rtserve.engine.request_drafts import propose_request_drafts
    core = engine(tiny_weights, policy="fcfs")
    spec = StructuredOutputs("json", json.dumps(SCHEMAS[0]))
    core.grammars.submit(spec).result()  # compiled: the request is not held
    add(core, "s", spec, max_tokens=50)
    core.step()  # prefill: the grammar's first forced tokens are `{"a": `
    core.scheduler.policy.step_time_budget_s = lambda running, now: 0.0  # no room for another row
    propose_request_drafts(core.scheduler, core.cost_model, core.max_model_len)
    assert core.scheduler.running[0].spec_token_ids == []
    core.scheduler.policy.step_time_budget_s = lambda running, now: None
    propose_request_drafts(core.scheduler, core.cost_model, core.max_model_len)
    assert text(core.scheduler.running[0].spec_token_ids) == '"a": '[:4]


def test_a_compiling_grammar_holds_only_its_request(tiny_weights, tiny_hf_model):
    import threading
    release = threading.Event()
    core = engine(tiny_weights)
    slow = GrammarService(lambda: (release.wait(30), byte_vocab_info())[1])
    core.grammars = slow
    add(core, "json", StructuredOutputs("json", json.dumps(SCHEMAS[0])))
    add(core, "plain", None, max_tokens=8)
    out: dict[str, list[int]] = {}
    for _ in range(12):  # the compile is blocked: the plain request runs to its end meanwhile
        for o in core.step().outputs:
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert out["plain"] == hf_greedy(tiny_hf_model, PROMPT, 8) and "json" not in out
    release.set()
    for rid, ids in run_to_completion(core).items():
        out.setdefault(rid, []).extend(ids)
    jsonschema_rs.validate(SCHEMAS[0], json.loads(text(out["json"])))


def test_predicted_output_keeps_greedy_output_in_fewer_steps(tiny_weights, tiny_hf_model):
    from rtserve.engine.request_drafts import predicted_continuation
    assert predicted_continuation([1, 2, 3, 4, 2, 3, 9], [7, 2, 3], 2) == [4, 2]
    assert predicted_continuation([1, 2, 3, 4, 2, 3, 9], [7, 2, 3, 4, 2, 3], 2) == [9]
    assert predicted_continuation([1, 2], [], 5) == [1, 2] and predicted_continuation([1, 2], [8], 5) == []
    ref = hf_greedy(tiny_hf_model, PROMPT, 24)
    edited = ref[:10] + [5, 5] + ref[10:]  # most of the output, with an edit the model will not make
    for prediction in (ref, edited, [9] * 30):
        core = engine(tiny_weights, policy="fcfs")
        add(core, "p", None, max_tokens=24, prediction=prediction)
        add(core, "q", None, max_tokens=24, prompt=[7] * 9)
        steps, out = 0, {}
        while core.has_unfinished:
            for o in core.step().outputs:
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
            steps += len(out.get("p", [])) < 24
        assert out["p"] == ref and out["q"] == hf_greedy(tiny_hf_model, [7] * 9, 24)
        if prediction == ref:
            assert steps < 6  # 24 tokens, up to 9 a step


def test_a_grammar_that_cannot_finish_in_max_tokens_ends_with_length(tiny_weights):
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 40}
    core = engine(tiny_weights)
    add(core, "s", StructuredOutputs("json", json.dumps(schema)), max_tokens=12)
    finish, tokens = None, []
    while core.has_unfinished:
        for o in core.step().outputs:
            tokens += o.new_token_ids
            finish = o.finish_reason or finish
    assert finish == "length" and len(tokens) == 12 and EOS not in tokens
    assert text(tokens).startswith("[")


def test_preload_builds_the_grammar_engine_before_the_first_request(tiny_weights):
    from rtserve.api.server import build_parser, engine_config_from_args
    from rtserve.engine.startup import preload_grammar
    assert engine_config_from_args(build_parser().parse_args(["--preload-grammar"])).preload_grammar
    assert not engine_config_from_args(build_parser().parse_args([])).preload_grammar
    core = engine(tiny_weights)
    assert core.grammars._compiler is None  # built on first use by default
    preload_grammar(core)
    assert core.grammars._compiler is not None
    assert core.grammars.submit(StructuredOutputs("json_object")).done()  # the preloaded one, cached
