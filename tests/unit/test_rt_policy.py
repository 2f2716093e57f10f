"""Real-time policy: tiered EDF order, ITL-sized steps and running set, batch filling and starving, victims,
rt resolution."""
import pytest

from rtserve.config import RTClassDefaults, RTConfig
from rtserve.engine.rt_params import LATE
from rtserve.engine.rt_policy import HARD_CLASS_MESSAGE, resolve_rt
from rtserve.engine.validation import InvalidRequest
from rtserve.protocol import RTParams
from rtserve.engine.cost_model import StepCostModel, StepFeatures
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
    sched.add_request(rt_req("stream", 8, clock.now, itl_s=0.020))
    step(sched, clock)
    clock.advance(0.1)  # the stream is late: half its ITL budget, 10 ms, is less than its decode alone
    sched.requests["stream"].first_token_time = clock.now - 1.0  # ... and far behind its pace
    sched.add_request(rt_req("long", 2000, clock.now, ttft_s=10.0))
    assert dict(ids(step(sched, clock)))["long"] == 16


def test_uncalibrated_model_plans_nothing_but_keeps_steps_small():
    # No ITL-sized plan before the model has measured steps, but no 512-token steps either: on the
    # 2-core host a fresh server's first prefill steps of 512 tokens took 400-650 ms each.
    sched, _, clock, _ = make_sched("deadline", budget=512, calibrated=False)
    sched.add_request(rt_req("stream", 8, clock.now, itl_s=0.050))
    step(sched, clock)
    sched.add_request(rt_req("long", 2000, clock.now))
    assert dict(ids(step(sched, clock)))["long"] == 64


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


def test_an_urgent_prompt_does_not_stretch_a_step_past_the_streams_slack():
    # Due in 20 ms, it cannot be prefilled in time anyway (2000 tokens take 200 ms): a full-budget step
    # would only make the stream late too.
    sched, _, clock, _ = make_sched("deadline", budget=1024)
    sched.add_request(rt_req("stream", 8, clock.now, itl_s=0.050))
    step(sched, clock, 0.01)
    sched.requests["stream"].first_token_time = clock.now - 1.0  # no pace to spend either
    sched.add_request(rt_req("urgent", 2000, clock.now - 1.0, ttft_s=1.02))
    assert 385 <= dict(ids(step(sched, clock)))["urgent"] <= 390


def test_a_prompt_already_past_its_deadline_does_not_override_the_itl_cap():
    sched, _, clock, _ = make_sched("deadline", budget=1024)
    sched.add_request(rt_req("stream", 8, clock.now, itl_s=0.050))
    step(sched, clock, 0.01)
    sched.requests["stream"].first_token_time = clock.now - 1.0  # no pace to spend either
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
    share = 1 / sched.policy.overrun(firm=False)  # the planned share of the slack
    assert sched.policy.step_time_budget_s(sched.running, clock.now) == pytest.approx(0.030 * share)
    clock.advance(0.1)  # late: half its ITL budget
    assert sched.policy.step_time_budget_s(sched.running, clock.now) == pytest.approx(0.025 * share)
    fcfs, _, fclock, _ = make_sched("fcfs")
    fcfs.add_request(rt_req("tight", 8, fclock.now, itl_s=0.050))
    step(fcfs, fclock, 0.01)
    assert fcfs.policy.step_time_budget_s(fcfs.running, fclock.now) is None


def test_late_soft_work_waits_behind_on_time_work_and_batch_behind_both():
    sched, _, clock, _ = make_sched(max_seqs=1)
    sched.add_request(rt_req("batch", 8, clock.now - 5.0, "batch"))
    sched.add_request(rt_req("late", 8, clock.now - 2.0, ttft_s=0.5))  # missed its TTFT 1.5 s ago
    sched.add_request(rt_req("fresh", 8, clock.now, ttft_s=0.5))
    order = []
    for _ in range(3):
        out = sched.schedule()
        order.append(out.seqs[0].request.request_id)
        sched.finish_requests([order[-1]], "abort")
    assert order == ["fresh", "late", "batch"]


def test_fcfs_keeps_arrival_order_whatever_the_deadlines():
    sched, _, clock, _ = make_sched("fcfs", max_seqs=1)
    sched.add_request(rt_req("batch", 8, clock.now - 5.0, "batch"))
    sched.add_request(rt_req("late", 8, clock.now - 2.0, ttft_s=0.5))
    sched.add_request(rt_req("fresh", 8, clock.now, ttft_s=0.5))
    assert [r for r, _ in ids(sched.schedule())] == ["batch"]


def test_a_waiting_on_time_prompt_takes_the_prefill_budget_before_a_running_batch_prefill():
    sched, _, clock, _ = make_sched("deadline", budget=512)
    sched.add_request(rt_req("stream", 8, clock.now, itl_s=0.050))
    step(sched, clock, 0.01)
    sched.add_request(rt_req("batch", 2000, clock.now, "batch"))
    step(sched, clock, 0.01)
    sched.add_request(rt_req("firm", 300, clock.now, "firm", ttft_s=0.5, first_token=5000))
    got = dict(ids(step(sched, clock, 0.01)))
    # (50 ms - 10 ms - 1 decode ms) / 0.1 ms = 390 prefill tokens: the firm prompt's 300 first.
    assert got["stream"] == 1 and got["firm"] == 300 and 85 <= got["batch"] <= 90
    fcfs, _, clock2, _ = make_sched("fcfs", budget=512)
    fcfs.add_request(rt_req("batch", 2000, clock2.now, "batch"))
    step(fcfs, clock2, 0.01)
    fcfs.add_request(rt_req("firm", 300, clock2.now, "firm", ttft_s=0.5))
    assert ids(step(fcfs, clock2, 0.01)) == [("batch", 512)]


def test_steps_are_bounded_with_no_stream_running_by_what_an_arrival_can_wait():
    # The longest rescue step (0.6 of the interactive TTFT budget, 300 ms: (300 - 10 ms) / 0.1 ms), at
    # least the ITL budget.
    sched, _, clock, _ = make_sched("deadline", budget=4096)
    sched.add_request(rt_req("batch", 4000, clock.now, "batch"))
    assert ids(sched.schedule()) in ([("batch", 2899)], [("batch", 2900)])  # rounding at the boundary
    itl_only, _, clock3, _ = make_sched("deadline", budget=2048, rescue_step_fraction=0.0)
    itl_only.add_request(rt_req("batch", 2000, clock3.now, "batch"))
    assert ids(itl_only.schedule()) == [("batch", 400)]  # (50 ms - 10 ms) / 0.1 ms
    fcfs, _, clock2, _ = make_sched("fcfs", budget=2048)
    fcfs.add_request(rt_req("batch", 2000, clock2.now, "batch"))
    assert ids(fcfs.schedule()) == [("batch", 2000)]


def test_steps_leave_room_for_the_cost_models_observed_overruns():
    sched, _, clock, _ = make_sched("deadline", budget=1024, step_slack_fraction=0.8)
    sched.policy.cost_model.overrun_p99 = 2.0  # one step in 100 took twice its prediction
    assert sched.policy.overrun(firm=False) == 2.0
    sched.add_request(rt_req("stream", 8, clock.now, itl_s=0.050))
    step(sched, clock, 0.01)
    sched.add_request(rt_req("long", 2000, clock.now, "batch"))
    assert 139 <= dict(ids(step(sched, clock)))["long"] <= 140  # (50 ms / 2 - 11 ms) / 0.1 ms
    sched.policy.cost_model.overrun_p99 = 1.0
    assert sched.policy.overrun(firm=False) == 1.25  # the slack fraction caps the plan


def test_the_running_set_is_capped_so_that_a_step_of_decodes_fits_the_itl_budget():
    # 20 ms ITL budget, 10 ms per step: soft streams are paced, so a step of decodes alone must fit
    # (10 decodes); beside a firm stream a minimum prefill chunk (8 tokens, 0.8 ms) must fit too (9).
    tight = RTClassDefaults(0.5, 0.020, None)
    sched, _, clock, _ = make_sched("deadline", budget=512, max_seqs=64, soft=tight, firm=tight)
    for i in range(12):
        sched.add_request(rt_req(f"s{i}", 8, clock.now, itl_s=0.020))
    step(sched, clock, 0.005)
    assert len(sched.running) == 10 and len(sched.waiting) == 2
    assert sched.policy.max_num_running(sched.running) == 9  # what a firm arrival would find
    fcfs, _, clock2, _ = make_sched("fcfs", budget=512, max_seqs=64)
    for i in range(12):
        fcfs.add_request(rt_req(f"s{i}", 8, clock2.now, itl_s=0.020))
    step(fcfs, clock2, 0.005)
    assert len(fcfs.running) == 12


def test_batch_fills_the_engine_alone_and_joins_beside_interactive_work_only_below_its_share():
    tight = RTClassDefaults(0.5, 0.020, None)
    sched, _, clock, _ = make_sched("deadline", budget=512, max_seqs=64, soft=tight, firm=tight)
    for i in range(12):
        sched.add_request(rt_req(f"b{i}", 8, clock.now, "batch"))
    step(sched, clock, 0.005)
    assert len(sched.running) == 12  # no interactive work: past the ITL cap of 10, up to the slots
    beside, _, clock, _ = make_sched("deadline", budget=512, max_seqs=64, soft=tight, firm=tight)
    beside.add_request(rt_req("s", 8, clock.now, itl_s=0.020))
    step(beside, clock, 0.005)
    for i in range(6):
        beside.add_request(rt_req(f"b{i}", 8, clock.now, "batch"))
    step(beside, clock, 0.005)
    # int(10 * 0.5) places in all beside the soft stream
    assert [r.request_id for r in beside.running] == ["s", "b0", "b1", "b2", "b3"]
    alone, _, clock2, _ = make_sched("deadline", background_slot_share=0.0)
    alone.add_request(rt_req("b", 8, clock2.now, "batch"))
    assert ids(alone.schedule()) == [("b", 8)]


def _batch_decoding(num, **kw):
    """A deadline scheduler with `num` batch requests decoding (8-token prompts, 20 ms ITL budgets)."""
    tight = RTClassDefaults(0.5, 0.020, None)
    sched, kv, clock, rt = make_sched("deadline", budget=512, soft=tight, firm=tight, **kw)
    for i in range(num):
        sched.add_request(rt_req(f"b{i}", 8, clock.now, "batch", max_tokens=1000))
    step(sched, clock, 0.005)
    step(sched, clock, 0.005)
    return sched, kv, clock


def test_batch_decodes_sit_out_the_steps_an_interactive_prompt_needs_then_take_their_share():
    sched, _, clock = _batch_decoding(6, max_seqs=64)
    assert len(ids(step(sched, clock, 0.005))) == 6  # alone, every batch decode runs
    sched.add_request(rt_req("s", 40, clock.now, itl_s=0.020, max_tokens=100))
    out = step(sched, clock, 0.005)
    assert ids(out) == [("s", 40)] and out.preempted_ids == []  # held, not preempted: blocks kept
    assert all(r.status.name == "RUNNING" for r in sched.running)
    # the soft stream decodes: int(10 * 0.5) - 1 batch decodes beside it, the oldest
    assert ids(step(sched, clock, 0.005)) == [("s", 1), ("b0", 1), ("b1", 1), ("b2", 1), ("b3", 1)]
    fcfs, _, clock2, _ = make_sched("fcfs", budget=512)
    for i in range(6):
        fcfs.add_request(rt_req(f"b{i}", 8, clock2.now, "batch", max_tokens=1000))
    step(fcfs, clock2)
    fcfs.add_request(rt_req("s", 40, clock2.now, max_tokens=100))
    assert len(ids(step(fcfs, clock2))) == 7  # FCFS holds nothing


def test_a_held_batch_decode_runs_once_it_waited_batch_max_wait_s():
    sched, _, clock = _batch_decoding(2, max_seqs=64, batch_max_wait_s=1.0)
    for i in range(3):  # a stream of soft prompts keeps batch decodes held
        sched.add_request(rt_req(f"s{i}", 400, clock.now, ttft_s=5.0, max_tokens=100))
    assert [rid for rid, _ in ids(step(sched, clock, 0.3))] == ["s0", "s1"]
    clock.advance(0.8)
    got = [rid for rid, _ in ids(step(sched, clock, 0.01))]
    assert "b0" in got and "b1" in got


def test_a_waiting_batch_request_starves_only_while_no_batch_work_decodes():
    sched, _, clock = _batch_decoding(1, max_seqs=64, batch_max_wait_s=1.0)
    sched.add_request(rt_req("s", 8, clock.now, itl_s=0.020, max_tokens=1000))
    step(sched, clock, 0.005)
    sched.add_request(rt_req("old", 8, clock.now - 5.0, "batch", first_token=500))
    sched.schedule()
    assert not sched.policy.is_starving(sched.requests["old"])  # b0 decodes (held or not)
    sched.finish_requests(["b0"], "abort")
    sched.schedule()
    assert sched.policy.is_starving(sched.requests["old"])


def test_an_on_time_soft_arrival_preempts_batch_for_a_slot_but_a_batch_arrival_does_not():
    sched, _, clock = _batch_decoding(4, max_seqs=4)
    sched.add_request(rt_req("b-late", 8, clock.now, "batch"))
    assert sched.schedule().preempted_ids == []
    sched.add_request(rt_req("s", 8, clock.now, itl_s=0.020))
    out = step(sched, clock, 0.005)
    assert ("s", 8) in ids(out) and out.preempted_ids == ["b3"]  # the youngest batch request
    assert sorted(r.request_id for r in sched.running) == ["b0", "b1", "b2", "s"]


def test_held_decodes_never_leave_a_step_empty():
    sched, _, clock = _batch_decoding(3, max_seqs=64)
    sched.policy.can_admit = lambda req, running, now: req.rt.rt_class == "batch"  # no slot for it
    sched.policy.victims_for = lambda req, running, now: []
    sched.add_request(rt_req("s", 40, clock.now, itl_s=0.020))
    assert ids(step(sched, clock, 0.005)) == [("b0", 1), ("b1", 1), ("b2", 1)]


def test_the_oldest_starving_batch_request_goes_first_with_a_small_share_of_each_step():
    sched, _, clock, _ = make_sched("deadline", budget=512, batch_max_wait_s=30.0, min_prefill_chunk=16,
                                    rescue_step_fraction=0.0)  # 50 ms steps with no stream running
    sched.add_request(rt_req("young-batch", 2000, clock.now - 31.0, "batch"))
    sched.add_request(rt_req("old-batch", 2000, clock.now - 40.0, "batch"))
    sched.add_request(rt_req("soft", 100, clock.now, ttft_s=0.5))
    assert ids(step(sched, clock, 0.01)) == [("old-batch", 16), ("soft", 100), ("young-batch", 284)]
    # 16 tokens a step while it prefills, first of the prefills; the soft stream decodes.
    got = ids(sched.schedule())
    assert got[:2] == [("soft", 1), ("old-batch", 16)] and got[2][0] == "young-batch"


def test_exhausted_slack_gives_batch_work_nothing_until_it_starves():
    sched, _, clock, _ = make_sched("deadline", budget=512, min_prefill_chunk=16, batch_max_wait_s=5.0,
                                    min_running=2)  # a slot for the batch request: only the budget is tested
    # A 10.5 ms ITL budget: the stream's decode step alone (11 ms) already fills it.
    sched.add_request(rt_req("stream", 8, clock.now, itl_s=0.0105, max_tokens=1000))
    step(sched, clock)
    sched.add_request(rt_req("long", 2000, clock.now, "batch"))
    for _ in range(3):
        assert ids(step(sched, clock)) == [("stream", 1)]  # the batch prompt waits for capacity
    clock.advance(5.0)  # ... but never starves: past batch_max_wait_s it gets the minimum chunk
    assert dict(ids(step(sched, clock)))["long"] == 16
    # A soft prompt in the same place always gets the minimum chunk (it has a TTFT to make).
    sched2, _, clock2, _ = make_sched("deadline", budget=512, min_prefill_chunk=16, min_running=2)
    sched2.add_request(rt_req("stream", 8, clock2.now, itl_s=0.0105, max_tokens=1000))
    step(sched2, clock2)
    sched2.add_request(rt_req("soft", 2000, clock2.now))
    assert dict(ids(step(sched2, clock2)))["soft"] == 16


def test_each_chunk_is_sized_by_its_own_position():
    # Prefill attention costs 1 s per million query-key pairs: a chunk deep in a long prompt is dear.
    sched, _, clock, _ = make_sched("deadline", budget=2048, rescue_step_fraction=0.0)  # 50 ms steps
    sched.policy.cost_model.theta = list(FAKE_COEFFS) + [1.0, 0.0]
    sched.add_request(rt_req("long", 3000, clock.now, max_tokens=1))
    while sched.requests["long"].num_computed_tokens < 1900:
        step(sched, clock, 0.05)
    sched.add_request(rt_req("chat", 300, clock.now, first_token=5000))
    out = step(sched, clock, 0.05)
    got = dict(ids(out))
    # 40 ms of prefill time (50 ms - the 10 ms step): the chat from position 0 takes 212 tokens
    # (21.2 ms + 22.6 ms of pairs would exceed it at 300), the deep prompt what is left.
    model = sched.policy.cost_model
    assert got["chat"] == model.max_chunk_tokens(0.040, 0) < 300
    left = 0.040 - model.prefill_chunk_s(got["chat"], 0)
    assert got.get("long", 0) == model.max_chunk_tokens(left, 1900 if "long" not in got else
                                                        [s.start_pos for s in out.seqs if s.request.request_id == "long"][0])


def test_the_starving_batch_share_does_not_use_up_the_interactive_minimum_chunk():
    sched, _, clock, _ = make_sched("deadline", budget=512, min_prefill_chunk=8, batch_max_wait_s=5.0, min_running=4)
    sched.add_request(rt_req("stream", 8, clock.now, itl_s=0.0105, max_tokens=1000))  # fills the ITL budget
    step(sched, clock)
    sched.add_request(rt_req("old-batch", 2000, clock.now - 10.0, "batch", first_token=3000))
    sched.add_request(rt_req("firm", 60, clock.now, "firm", first_token=6000))
    got = dict(ids(step(sched, clock)))
    assert got["old-batch"] == 8 and got["firm"] == 8 and got["stream"] == 1


def test_prefill_chunks_grow_at_most_twofold_beyond_what_the_model_has_measured():
    sched, _, clock, _ = make_sched("deadline", budget=2048)
    model = sched.policy.cost_model
    for _ in range(8):  # a fitted model that has only seen 8-token chunks
        model.observe(StepFeatures(1, 8), 0.0118)
    model.overrun_ratio = 1.0
    sched.add_request(rt_req("long", 3000, clock.now, "soft", max_tokens=1))
    sizes = []
    for _ in range(4):
        out = step(sched, clock, 0.02)
        model.observe(out.step_features, model.predict_s(out.step_features))
        model.overrun_ratio = 1.0
        sizes.append(dict(ids(out))["long"])
    assert sizes[:3] == [64, 128, 256] and sizes[3] <= 512  # then the 50 ms plan limits it


def test_beside_a_firm_stream_the_plan_follows_the_overrun_tail_further_down():
    sched, _, _, _ = make_sched("deadline")
    policy = sched.policy
    policy.cost_model.overrun_p99, policy.cost_model.overrun_ratio = 1.5, 3.0  # p99 and 10^-5 tail
    assert policy.overrun(firm=False) == 1.5  # soft streams: one overrun is one late gap
    assert policy.overrun(firm=True) == 3.0  # one overrun drops a firm stream
    policy.cost_model.overrun_p99, policy.cost_model.overrun_ratio = 5.0, 10.0
    assert policy.overrun(firm=False) == 2.0 and policy.overrun(firm=True) == 4.0  # never below a half / quarter


def test_both_policies_return_a_step_plan_for_the_same_scenario():
    """One interface: FCFS plans the whole token budget with no time bound; the deadline policy bounds
    the step's prefill by time (50 ms ITL - the 11 ms decode step)."""
    plans = {}
    for policy in ("fcfs", "deadline"):
        sched, _, clock, _ = make_sched(policy, budget=1024)
        sched.add_request(rt_req("stream", 8, clock.now, itl_s=0.050))
        step(sched, clock, 0.01)
        sched.add_request(rt_req("long", 2000, clock.now, "batch"))
        plans[policy] = sched.policy.plan_step(sched.running, sched.waiting, clock.now, 1024)
    assert plans["fcfs"].prefill_token_budget == 1024 and plans["fcfs"].time_left_s is None
    assert plans["deadline"].time_left_s == pytest.approx(0.050 - 0.011)
    assert not plans["deadline"].rescue


def _stream_and_prompt(rt_class, prompt_len, **rt_kw):
    sched, _, clock, _ = make_sched("deadline", budget=2048, **rt_kw)
    cfg = RTConfig()
    sched.add_request(rt_req("stream", 8, clock.now, rt_class, max_tokens=500, config=cfg, itl_s=0.050))
    step(sched, clock, 0.01)
    sched.add_request(rt_req("prompt", prompt_len, clock.now, ttft_s=0.5, first_token=5000))
    return sched, clock


def test_a_prompt_running_out_of_ttft_slack_stretches_the_step_beside_a_soft_stream_on_pace():
    # 2,000 tokens at ITL-sized steps (390 tokens per 50 ms) take 0.26 s, over 40% of the 0.5 s TTFT:
    # the step may stretch (here to a quarter of the TTFT budget, 125 ms: (125 - 11) / 0.1 = 1,140
    # tokens), since the soft stream repays the longer gap within its pace horizon.
    sched, clock = _stream_and_prompt("soft", 2400, rescue_step_fraction=0.25)
    plan = sched.policy.plan_step(sched.running, sched.waiting, clock.now, 2048)
    assert plan.rescue and plan.time_left_s == pytest.approx(0.125 - 0.011)
    got = dict(ids(step(sched, clock, 0.125)))
    assert got["stream"] == 1 and 1135 <= got["prompt"] <= 1140
    # The chunk that ends a prompt may take the streams' pace up to the TTFT budget (500 ms):
    # 2,000 tokens (200 ms) in one step, its first token with it.
    sched, clock = _stream_and_prompt("soft", 2000, rescue_step_fraction=0.25)
    assert dict(ids(step(sched, clock, 0.21)))["prompt"] == 2000
    # A short prompt makes its TTFT at ITL-sized steps: no stretch, the stream's gap stays in budget.
    sched, clock = _stream_and_prompt("soft", 300)
    plan = sched.policy.plan_step(sched.running, sched.waiting, clock.now, 2048)
    assert not plan.rescue and plan.time_left_s == pytest.approx(0.039)


def test_a_firm_stream_is_never_stretched_for_a_prompt():
    sched, clock = _stream_and_prompt("firm", 2000)
    got = dict(ids(step(sched, clock, 0.05)))
    assert got["stream"] == 1 and 385 <= got["prompt"] <= 390  # (50 ms - 11 ms) / 0.1 ms


def _with_chunk_cost(rt_class, prompt_class="soft"):
    """A soft or firm 20 ms stream beside a 1,000-token prompt with a lax TTFT (no rescue), on a model
    where a chunk costs 5 ms besides its tokens: an efficient chunk is 4 x 5 ms / 0.1 ms = 200 tokens."""
    sched, _, clock, _ = make_sched("deadline", budget=2048)
    sched.policy.cost_model.theta = list(FAKE_COEFFS) + [0.0, 0.005]
    sched.add_request(rt_req("stream", 8, clock.now, rt_class, max_tokens=500, itl_s=0.020))
    step(sched, clock, 0.011)
    rt = {} if prompt_class == "batch" else {"ttft_s": 10.0}
    sched.add_request(rt_req("prompt", 1000, clock.now, prompt_class, first_token=5000, **rt))
    return sched, clock


def test_beside_soft_streams_a_prefill_chunk_is_worth_its_fixed_cost_or_waits():
    # The 20 ms gap leaves 9 ms: 40 tokens, mostly overhead. A batch prompt (no stretch for it)
    # waits for a step with room for an efficient chunk (4 x 5 ms / 0.1 ms = 200 tokens).
    sched, clock = _with_chunk_cost("soft", "batch")
    assert sched.policy._chunk_overhead_s() == 0.005
    assert ids(step(sched, clock, 0.011)) == [("stream", 1)]
    # A soft prompt on time: the step stretches within the stream's pace to hold it, here all of it
    # (the chunk that ends a prompt: 5 + 100 ms beside the 11 ms decode).
    sched, clock = _with_chunk_cost("soft")
    assert dict(ids(step(sched, clock, 0.116))) == {"stream": 1, "prompt": 1000}
    # A stream with no pace left: the decodes run alone (no 8-token chunk), banking pace.
    sched, clock = _with_chunk_cost("soft")
    sched.requests["stream"].first_token_time = clock.now - 1.0
    assert ids(step(sched, clock, 0.011)) == [("stream", 1)]
    # Beside a firm stream every gap is a deadline: what fits the gap ((20 - 11 - 5 ms) / 0.1 ms).
    sched, clock = _with_chunk_cost("firm")
    assert 39 <= dict(ids(step(sched, clock, 0.020)))["prompt"] <= 40


def test_a_soft_prompt_that_cannot_make_its_ttft_gives_way_before_its_deadline_passes():
    # 4,000 tokens take 400 ms at the fastest plan (0.1 ms a token), and its TTFT is due in 200 ms:
    # it is lost whatever the plan, and served first (deadline order) it would push the 300-token
    # prompt due in 500 ms past its TTFT too. Triage ranks it with the late, before either deadline.
    sched, _, clock, _ = make_sched("deadline", budget=8192, max_seqs=1)
    sched.add_request(rt_req("doomed", 4000, clock.now - 0.3, ttft_s=0.5, first_token=1))
    sched.add_request(rt_req("fresh", 300, clock.now, ttft_s=0.5, first_token=9000))
    assert [r for r, _ in ids(sched.schedule())] == ["fresh"]
    assert sched.policy.order_key(sched.requests["doomed"], clock.now)[0] == LATE
    # A firm prompt is never marked (its admission refused what it could not serve).
    firm, _, clock2, _ = make_sched("deadline", budget=8192, max_seqs=1)
    firm.add_request(rt_req("doomed", 4000, clock2.now - 0.3, "firm", ttft_s=0.5, first_token=1))
    firm.add_request(rt_req("fresh", 300, clock2.now, ttft_s=0.5, first_token=9000))
    assert [r for r, _ in ids(firm.schedule())] == ["doomed"]


def test_triage_counts_only_the_prefill_a_waiting_prompt_needs_beyond_its_cached_prefix():
    # 2,064 tokens would take 206 ms against a 100 ms TTFT; 2,048 of them are in the prefix cache.
    sched, _, clock, _ = make_sched("deadline", budget=4096, num_blocks=512)
    sched.add_request(rt_req("first", 2048, clock.now, ttft_s=10.0, max_tokens=1))
    while sched.has_unfinished:
        step(sched, clock, 0.01)
    sched.add_request(rt_req("again", 2064, clock.now, ttft_s=0.1, max_tokens=4))
    out = step(sched, clock, 0.01)
    assert sched.requests["again"].num_prefix_hit_tokens == 2048
    assert ids(out) == [("again", 16)]
    assert sched.policy.order_key(sched.requests["again"], clock.now)[0] != LATE


def test_late_prompts_spend_the_streams_spare_pace_when_no_prompt_is_on_time():
    # Beside a soft stream ahead of its pace, a prompt that missed its TTFT gets what the pace allows
    # (the ITL-sized step would give it 390 tokens), so its TTFT tail stays near FCFS's.
    sched, _, clock, _ = make_sched("deadline", budget=1024)
    sched.add_request(rt_req("stream", 8, clock.now, itl_s=0.050, max_tokens=500))
    step(sched, clock, 0.01)
    sched.add_request(rt_req("late", 2000, clock.now - 2.0, ttft_s=1.0, first_token=5000))
    assert dict(ids(step(sched, clock)))["late"] > 390
    # An on-time prompt waiting takes the stretch instead; the late one gets what the step has left.
    sched2, _, clock2, _ = make_sched("deadline", budget=4096)
    sched2.add_request(rt_req("stream", 8, clock2.now, itl_s=0.050, max_tokens=500))
    step(sched2, clock2, 0.01)
    sched2.add_request(rt_req("late", 2000, clock2.now - 2.0, ttft_s=1.0, first_token=5000))
    sched2.add_request(rt_req("fresh", 1000, clock2.now, ttft_s=0.5, first_token=9000))
    got = dict(ids(step(sched2, clock2)))
    assert got["fresh"] == 1000 and "late" not in got


def test_beside_a_firm_stream_a_starving_request_waits_as_background_work():
    """Its forced share deep in a long prompt would cost more than the firm gap leaves (each of its
    tokens attends to all before it); it gets only what the firm stream's step leaves."""
    sched, _, clock, _ = make_sched("deadline", budget=512, min_prefill_chunk=16, batch_max_wait_s=5.0,
                                    min_running=2)
    sched.policy.cost_model.theta = list(FAKE_COEFFS) + [1.0, 0.0]  # 1 s per million attention pairs
    sched.add_request(rt_req("old-batch", 2000, clock.now - 10.0, "batch"))
    sched.add_request(rt_req("old-batch-2", 2000, clock.now - 9.0, "batch"))
    step(sched, clock, 0.01)  # no stream yet: the starving request takes its share
    assert sched.policy.is_starving(next(r for r in sched.running if r.request_id == "old-batch"))
    for _ in range(6):  # ... and keeps it, deep into its prompt
        step(sched, clock, 0.01)
    sched.add_request(rt_req("firm", 8, clock.now, "firm", itl_s=0.0125, max_tokens=100))
    step(sched, clock, 0.01)  # the firm prompt's only chunk: its first token
    model = sched.policy.cost_model
    for _ in range(3):
        out = step(sched, clock, 0.011)
        got = dict(ids(out))
        # 11 ms of decode in a 12.5 ms gap: what is left fits a few tokens, never the 16-token share.
        assert got["firm"] == 1 and got.get("old-batch", 0) < 16
        assert model.predict_s(out.step_features) <= 0.0125 + 1e-9
    assert not any(sched.policy.is_starving(r) for r in sched.running)


def test_beside_a_firm_stream_a_step_carries_one_prefill_chunk():
    """Each chunk has a fixed cost the online fit apportions least well; beside a firm stream, whose
    every gap is a deadline, the step holds one chunk (the first in deadline order) whatever fits."""
    sched, _, clock, _ = make_sched("deadline", budget=2048)
    sched.add_request(rt_req("stream", 8, clock.now, "firm", max_tokens=500, itl_s=0.050))
    step(sched, clock, 0.011)
    sched.add_request(rt_req("a", 40, clock.now, ttft_s=2.0, first_token=5000))
    sched.add_request(rt_req("b", 40, clock.now, ttft_s=3.0, first_token=6000))
    got = ids(step(sched, clock, 0.011))
    assert got == [("stream", 1), ("a", 40)]
    # Beside a soft stream both fit the same step.
    sched2, _, clock2, _ = make_sched("deadline", budget=2048)
    sched2.add_request(rt_req("stream", 8, clock2.now, "soft", max_tokens=500, itl_s=0.050))
    step(sched2, clock2, 0.011)
    sched2.add_request(rt_req("a", 40, clock2.now, ttft_s=2.0, first_token=5000))
    sched2.add_request(rt_req("b", 40, clock2.now, ttft_s=3.0, first_token=6000))
    assert ids(step(sched2, clock2, 0.011)) == [("stream", 1), ("a", 40), ("b", 40)]


def test_a_grammar_constrained_stream_leaves_the_prompt_its_mask_cost_less():
    """A decode under a grammar's token mask costs MASK_ROW_S more (cost_model): the plan beside it
    gives the prefill chunk that much less time."""
    from rtserve.engine.cost_model import MASK_ROW_S
    got = {}
    for constrained in (False, True):
        sched, _, clock, _ = make_sched("deadline", budget=512)
        stream = rt_req("stream", 8, clock.now, itl_s=0.050)
        sched.add_request(stream)
        step(sched, clock, 0.01)
        stream.grammar = object() if constrained else None  # only its presence is costed here
        sched.add_request(rt_req("long", 2000, clock.now, "batch"))
        got[constrained] = dict(ids(sched.schedule()))["long"]
    assert got[False] - got[True] == pytest.approx(MASK_ROW_S / FAKE_COEFFS[2], abs=1.0)
