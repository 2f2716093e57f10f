"""Real-time policy: EDF order, ITL-slack-sized prefill chunks, batch filling, victims, rt resolution."""
import pytest

from rtserve.config import RTClassDefaults, RTConfig
from rtserve.engine.rt_policy import HARD_CLASS_MESSAGE, resolve_rt
from rtserve.engine.validation import InvalidRequest
from rtserve.protocol import RTParams
from rtserve.engine.cost_model import StepCostModel
from tests.unit.rt_helpers import FAKE_COEFFS, ids, make_sched, rt_req, step


def test_resolve_fills_class_defaults_and_refuses_hard():
    cfg = RTConfig(firm=RTClassDefaults(0.3, 0.04, 4.0))
    assert resolve_rt(RTParams("firm"), cfg) == RTParams("firm", 0.3, 0.04, 4.0)
    assert resolve_rt(None, cfg) == RTParams("soft", 0.5, 0.05, None)
    assert resolve_rt(RTParams("soft", ttft_s=2.0), cfg).ttft_s == 2.0
    assert resolve_rt(RTParams("batch", ttft_s=1.0), cfg) == RTParams("batch", None, None, None)
    with pytest.raises(InvalidRequest) as exc:
        resolve_rt(RTParams("hard"), cfg)
    assert exc.value.param == "rt.class" and "garbage collector" in str(exc.value) and "firm" in str(exc.value)
    assert HARD_CLASS_MESSAGE == str(exc.value)
    for field, kw in (("rt.ttft_ms", {"ttft_s": -1}), ("rt.itl_ms", {"itl_s": 0}),
                      ("rt.deadline_ms", {"deadline_s": "soon"})):
        with pytest.raises(InvalidRequest) as exc:
            resolve_rt(RTParams("firm", **kw), cfg)
        assert exc.value.param == field
    with pytest.raises(InvalidRequest) as exc:
        resolve_rt(RTParams("urgent"), cfg)
    assert exc.value.param == "rt.class"


@pytest.mark.parametrize("policy,first", [("deadline", "tight"), ("fcfs", "loose")])
def test_waiting_order_is_edf_under_deadline_and_arrival_under_fcfs(policy, first):
    sched, _, clock, _ = make_sched(policy, max_seqs=1)
    sched.add_request(rt_req("loose", 8, clock.now, ttft_s=2.0))
    sched.add_request(rt_req("tight", 8, clock.now + 0.001, ttft_s=0.2))
    assert [r for r, _ in ids(sched.schedule())] == [first]


def test_batch_fills_leftover_capacity_but_never_starves():
    sched, _, clock, _ = make_sched(max_seqs=1, batch_max_wait_s=5.0)
    sched.add_request(rt_req("batch", 8, clock.now - 1.0, "batch"))  # arrived first
    sched.add_request(rt_req("soft", 8, clock.now))
    assert [r for r, _ in ids(sched.schedule())] == ["soft"]
    sched2, _, clock2, _ = make_sched(max_seqs=1, batch_max_wait_s=5.0)
    sched2.add_request(rt_req("old-batch", 8, clock2.now - 10.0, "batch"))  # waited past batch_max_wait_s
    sched2.add_request(rt_req("soft", 8, clock2.now))
    assert [r for r, _ in ids(sched2.schedule())] == ["old-batch"]


def test_prefill_chunk_fits_the_tightest_itl_slack_so_decodes_never_stall():
    sched, _, clock, _ = make_sched("deadline", budget=512)
    sched.add_request(rt_req("stream", 8, clock.now, itl_s=0.050))
    step(sched, clock, 0.01)  # prefill + first token
    sched.add_request(rt_req("long", 2000, clock.now, "batch"))
    for _ in range(4):
        out = step(sched, clock, 0.01)
        got = dict(ids(out))
        assert got["stream"] == 1  # the decode runs every step
        # slack = 50 ms since the token just came; 10 ms + 1 decode ms fixed; 0.1 ms per prefill token.
        assert 385 <= got["long"] <= 390
        assert StepCostModel.from_coeffs(FAKE_COEFFS).predict_s(out.step_features) <= 0.050


def test_fcfs_gives_the_long_prompt_the_whole_budget():
    sched, _, clock, _ = make_sched("fcfs", budget=512)
    sched.add_request(rt_req("stream", 8, clock.now, itl_s=0.050))
    step(sched, clock)
    sched.add_request(rt_req("long", 2000, clock.now, "batch"))
    assert ids(step(sched, clock)) == [("stream", 1), ("long", 511)]


def test_exhausted_slack_still_gives_a_minimum_prefill_chunk():
    sched, _, clock, _ = make_sched("deadline", budget=512, min_prefill_chunk=16)
    sched.add_request(rt_req("stream", 8, clock.now, itl_s=0.005))  # tighter than any step
    step(sched, clock)
    sched.add_request(rt_req("long", 2000, clock.now))
    assert dict(ids(step(sched, clock)))["long"] == 16


def test_uncalibrated_model_does_not_cap_prefill():
    sched, _, clock, _ = make_sched("deadline", budget=512, calibrated=False)
    sched.add_request(rt_req("stream", 8, clock.now, itl_s=0.050))
    step(sched, clock)
    sched.add_request(rt_req("long", 2000, clock.now))
    assert dict(ids(step(sched, clock)))["long"] == 511


def test_victim_is_batch_first_then_most_slack():
    # 6 blocks of 4 tokens; three 8-token requests hold 2 blocks each; the next decode needs a third.
    sched, _, clock, _ = make_sched("deadline", budget=64, num_blocks=6, block_size=4)
    sched.add_request(rt_req("firm", 8, clock.now, "firm", max_tokens=8, ttft_s=1.0, itl_s=0.02))
    sched.add_request(rt_req("batch", 8, clock.now, "batch", max_tokens=8))
    sched.add_request(rt_req("soft", 8, clock.now, max_tokens=8, ttft_s=1.0, itl_s=0.5))
    step(sched, clock)
    out = sched.schedule()
    assert out.preempted_ids == ["batch"]
    sched2, _, clock2, _ = make_sched("deadline", budget=64, num_blocks=6, block_size=4)
    sched2.add_request(rt_req("tight", 8, clock2.now, max_tokens=8, itl_s=0.02))
    sched2.add_request(rt_req("slack", 8, clock2.now, max_tokens=8, itl_s=0.5))
    sched2.add_request(rt_req("mid", 8, clock2.now, max_tokens=8, itl_s=0.1))
    step(sched2, clock2)
    assert sched2.schedule().preempted_ids == ["slack"]


def test_paused_request_keeps_its_blocks_and_is_skipped_until_resumed():
    sched, kv, clock, _ = make_sched()
    sched.add_request(rt_req("a", 8, clock.now))
    sched.add_request(rt_req("b", 8, clock.now))
    step(sched, clock)
    blocks = kv.block_ids("a")
    sched.set_paused(["a"], True)
    assert ids(step(sched, clock)) == [("b", 1)]
    assert kv.block_ids("a") == blocks
    sched.set_paused(["a"], False)
    assert sorted(ids(step(sched, clock))) == [("a", 1), ("b", 1)]


def test_a_stream_already_late_bounds_the_step_to_half_its_itl_budget():
    sched, _, clock, _ = make_sched("deadline", budget=1024)
    sched.add_request(rt_req("stream", 8, clock.now, itl_s=0.100))
    step(sched, clock, 0.01)
    clock.advance(0.3)  # its next token is already 200 ms late
    sched.add_request(rt_req("long", 2000, clock.now, "batch"))
    got = dict(ids(step(sched, clock)))
    assert got["stream"] == 1 and 385 <= got["long"] <= 390  # (50 ms - 11 ms) / 0.1 ms


def test_a_prompt_due_before_the_tightest_stream_gets_the_whole_budget():
    sched, _, clock, _ = make_sched("deadline", budget=1024)
    sched.add_request(rt_req("stream", 8, clock.now, itl_s=0.050))
    step(sched, clock, 0.01)
    sched.add_request(rt_req("urgent", 2000, clock.now - 1.0, ttft_s=1.02))  # due in 20 ms < 50 ms
    assert dict(ids(step(sched, clock)))["urgent"] == 1023


def test_a_prompt_already_past_its_deadline_does_not_override_the_itl_cap():
    sched, _, clock, _ = make_sched("deadline", budget=1024)
    sched.add_request(rt_req("stream", 8, clock.now, itl_s=0.050))
    step(sched, clock, 0.01)
    sched.add_request(rt_req("late", 2000, clock.now - 2.0, ttft_s=1.0))  # missed 1 s ago
    assert 385 <= dict(ids(step(sched, clock)))["late"] <= 390


def test_step_time_budget_is_the_tightest_stream_slack_and_bounds_verification_too():
    sched, _, clock, _ = make_sched("deadline")
    assert sched.policy.step_time_budget_s(sched.running, clock.now) is None  # no stream yet
    sched.add_request(rt_req("tight", 8, clock.now, itl_s=0.050))
    sched.add_request(rt_req("loose", 8, clock.now, itl_s=0.200))
    sched.add_request(rt_req("batch", 8, clock.now, "batch"))  # no ITL budget: never binds
    step(sched, clock, 0.01)
    clock.advance(0.02)
    assert sched.policy.step_time_budget_s(sched.running, clock.now) == pytest.approx(0.030)
    clock.advance(0.1)  # late: half its ITL budget
    assert sched.policy.step_time_budget_s(sched.running, clock.now) == pytest.approx(0.025)
    fcfs, _, fclock, _ = make_sched("fcfs")
    fcfs.add_request(rt_req("tight", 8, fclock.now, itl_s=0.050))
    step(fcfs, fclock, 0.01)
    assert fcfs.policy.step_time_budget_s(fcfs.running, fclock.now) is None
