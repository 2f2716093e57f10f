"""EngineCore on a tiny random-weight Llama: token-exact against Hugging Face in every schedule."""
import pytest

from rtserve.protocol import EngineCoreRequest
from rtserve.sampling_params import SamplingParams
from tests.unit.conftest import hf_greedy, run_to_completion

PROMPTS = [
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    [5, 9, 200, 3],
    [7] * 20,
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
    [250, 17, 33, 91, 4, 4, 4, 180, 66, 12, 8, 199, 3, 77, 41, 9, 100, 2],
]
NEW = 12


@pytest.fixture(scope="module")
def reference(tiny_hf_model):
    return [hf_greedy(tiny_hf_model, p, NEW) for p in PROMPTS]


def add(core, rid, prompt, **kw):
    kw.setdefault("max_tokens", NEW)
    core.add_request(EngineCoreRequest(rid, prompt, SamplingParams(temperature=0, **kw), 0.0))


def assert_no_leaks(core):
    assert not core.has_unfinished
    assert core.kv.num_free_blocks == core.kv.pool.num_blocks
    assert all(b.ref_cnt == 0 for b in core.kv.pool.blocks)


def test_alone_matches_hf(make_core, reference):
    for prompt, ref in zip(PROMPTS, reference):
        core = make_core(prefix_caching=False)
        add(core, "x", prompt)
        assert run_to_completion(core)["x"] == ref
        assert_no_leaks(core)


@pytest.mark.parametrize("budget", [3, 16, 128])
def test_batched_with_chunked_prefill_matches_hf(make_core, reference, budget):
    core = make_core(budget=budget)
    for i, prompt in enumerate(PROMPTS):
        add(core, f"r{i}", prompt)
    got = run_to_completion(core)
    assert [got[f"r{i}"] for i in range(len(PROMPTS))] == reference
    assert_no_leaks(core)


def test_prefix_cache_hits_give_identical_output(make_core, reference, tiny_hf_model):
    core = make_core()
    add(core, "warm", PROMPTS[3])
    run_to_completion(core)
    hits_before = core.kv.prefix_cache_hits
    add(core, "again", PROMPTS[3])
    add(core, "extends", PROMPTS[3] + [42, 43])
    got = run_to_completion(core)
    assert got["again"] == reference[3]
    assert core.kv.prefix_cache_hits - hits_before >= 12 + 12
    assert got["extends"] == hf_greedy(tiny_hf_model, PROMPTS[3] + [42, 43], NEW)
    assert_no_leaks(core)


def test_forced_preemption_matches_hf(make_core, reference):
    # 12 blocks of 4 tokens cannot hold five sequences of up to 32 tokens: preemption must happen.
    core = make_core(num_blocks=12, budget=32)
    for i, prompt in enumerate(PROMPTS):
        add(core, f"r{i}", prompt)
    got = run_to_completion(core)
    assert core.scheduler.num_preemptions > 0
    assert [got[f"r{i}"] for i in range(len(PROMPTS))] == reference
    assert_no_leaks(core)


def test_abort_mid_generation_frees_blocks(make_core):
    core = make_core()
    add(core, "a", PROMPTS[0], max_tokens=50)
    add(core, "b", PROMPTS[1], max_tokens=50)
    for _ in range(3):
        core.step()
    outs = core.abort_requests(["a"])
    assert outs[0].finish_reason == "abort"
    core.abort_requests(["b"])
    assert_no_leaks(core)


def test_eos_and_stop_token_ids(make_core, reference):
    core = make_core()
    first = reference[0][0]
    core.add_request(EngineCoreRequest("eos", PROMPTS[0], SamplingParams(temperature=0, max_tokens=NEW), 0.0,
                                       eos_token_ids=(first,)))
    add(core, "stop", PROMPTS[0], stop_token_ids=[reference[0][2]])
    add(core, "ign", PROMPTS[0], ignore_eos=True)
    outs = {}
    while core.has_unfinished:
        for o in core.step().outputs:
            outs.setdefault(o.request_id, []).append(o)
    assert [t for o in outs["eos"] for t in o.new_token_ids] == [first]
    assert outs["eos"][-1].finish_reason == "stop" and outs["eos"][-1].stop_reason is None
    assert [t for o in outs["stop"] for t in o.new_token_ids] == reference[0][:3]
    assert outs["stop"][-1].stop_reason == reference[0][2]
    assert outs["ign"][-1].finish_reason == "length"


@pytest.mark.parametrize("prompt,kw,param", [
    ([], {}, "prompt"),
    ([1] * 512, {}, "prompt"),
    ([1, 2, 999], {}, "prompt"),
    ([1, 2], {"max_tokens": 600}, "max_tokens"),
])
def test_bad_input_names_parameter_and_engine_keeps_serving(make_core, reference, prompt, kw, param):
    core = make_core()
    add(core, "good", PROMPTS[1])
    with pytest.raises(ValueError) as err:
        add(core, "bad", prompt, **kw)
    assert err.value.param == param
    assert run_to_completion(core)["good"] == reference[1]


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=0),
                                dict(max_tokens=0), dict(logprobs=-1), dict(n=0)])
def test_bad_sampling_params_raise_value_error(kw):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kw)
    assert next(iter(kw)) in str(err.value)


def test_step_fault_fails_its_requests_and_engine_survives(make_core, reference, monkeypatch):
    core = make_core()
    add(core, "doomed", PROMPTS[0])
    original = core.runner.execute

    def boom(sched):
        raise RuntimeError("simulated kernel fault")

    monkeypatch.setattr(core.runner, "execute", boom)
    outs = core.step().outputs
    assert outs[0].finish_reason == "error" and "simulated kernel fault" in outs[0].error
    assert_no_leaks(core)
    monkeypatch.setattr(core.runner, "execute", original)
    add(core, "after", PROMPTS[1])
    assert run_to_completion(core)["after"] == reference[1]


def test_seeded_sampling_is_reproducible_across_batches(make_core):
    def run(extra):
        core = make_core()
        for i in range(extra):
            core.add_request(EngineCoreRequest(f"noise{i}", PROMPTS[i], SamplingParams(temperature=1.0, max_tokens=8), 0.0))
        core.add_request(EngineCoreRequest("s", PROMPTS[4], SamplingParams(temperature=0.8, top_k=50, seed=1234, max_tokens=10), 0.0))
        return run_to_completion(core)["s"]

    assert run(0) == run(3)
